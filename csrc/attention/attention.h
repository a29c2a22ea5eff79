// Fused RoPE + FlashAttention-2 on CUDA tensor cores: the launcher arguments as Python fills them (torch-free, like
// RopeArgs) and the two launchers; csrc/bindings.cpp exposes them (pybind11 stays out of the nvcc-compiled code).
//
// Keys arrive already rotated (the op rotates k once with the RoPE kernel; a KV cache holds rotated keys), so the key
// length may exceed the query length. The forward kernel rotates each Q tile once, right after loading it, with the
// angle of the RoPE op (ctxext/rope_math.h) and rounds it to the input dtype -- what a separate RoPE pass would have
// stored. The backward kernels take the queries already rotated and rotate dQ back by the negative angle before
// storing it; dK is the gradient of the rotated keys (the op rotates it back with the RoPE kernel).
//
// Causal masking is aligned bottom-right per sequence: query i of a sequence with Sq queries and Sk keys sees keys
// j <= i + Sk - Sq (Sk == Sq: the usual lower triangle).
#pragma once

#include "rope.h"  // TensorView, DType

namespace ctxext {

struct AttentionArgs {
  TensorView q;          // [B, Sq, Hq, D]: unrotated (forward) / already rotated (backward) queries
  TensorView k;          // [B, Sk, Hk, D] rotated keys (Hq % Hk == 0, Sk >= Sq)
  TensorView v;          // [B, Sk, Hk, D]
  TensorView out;        // [B, Sq, Hq, D]: forward output; the forward output O as read by the backward pass
  TensorView lse;        // [B, Sq, Hq] fp32: base-2 log-sum-exp of the scaled scores (written forward, read backward)
  TensorView positions;  // [B, Sq] int32/int64 positions of the queries, any strides, values in [0, 2^24)
  TensorView inv_freq;   // [rotary_dim / 2] fp32, contiguous
  TensorView cu_seqlens;    // [N + 1] int32 query boundaries of packed sequences (B == 1), or empty (data 0)
  TensorView cu_seqlens_k;  // [N + 1] int32 key boundaries, given exactly when cu_seqlens is
  // Backward only.
  TensorView grad_out;  // [B, Sq, Hq, D]
  TensorView delta;     // [B, Sq, Hq] fp32: rowsum(dO * O)
  TensorView grad_q;    // [B, Sq, Hq, D]: gradient of the unrotated q
  TensorView grad_k;    // [B, Sk, Hk, D]: gradient of the rotated k (summed over each GQA group)
  TensorView grad_v;    // [B, Sk, Hk, D]
  DType dtype = DType::kBFloat16;  // of q, k, v, out and the gradients: float16 or bfloat16
  bool positions_int64 = true;
  int max_seqlen_q = 0;     // longest query sequence (Sq, or the longest of cu_seqlens): sizes the grid
  int max_seqlen_k = 0;     // longest key sequence (Sk, or the longest of cu_seqlens_k)
  float scaling = 1.0f;     // attention scaling multiplying cos and sin
  float softmax_scale = 1.0f;
  bool causal = true;       // by token order inside each sequence (bottom-right aligned), not by position id
  bool interleaved = false;  // GPT-J pairs
  bool exact = true;         // exact angle product
  bool rotate = true;        // false: plain attention (to measure what the rotation costs)
  int device = 0;
  uintptr_t stream = 0;      // cudaStream_t
};

// Check the arguments (std::invalid_argument naming the problem) and launch asynchronously on args.stream.
// Packed sequences with fewer keys than queries are not detected here (that needs the lengths on the host): their
// queries that see no key get a zero output and a zero gradient.
void rope_attention_forward_cuda(const AttentionArgs& args);
void rope_attention_backward_cuda(const AttentionArgs& args);

}  // namespace ctxext
