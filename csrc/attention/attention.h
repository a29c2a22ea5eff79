// Fused RoPE + FlashAttention-2 on CUDA tensor cores: the launcher arguments as Python fills them (torch-free, like
// RopeArgs) and the two launchers; csrc/bindings.cpp exposes them (pybind11 stays out of the nvcc-compiled code).
//
// q and k arrive unrotated. Every Q and K tile is rotated while it is staged into shared memory, with the angle of the
// RoPE op (ctxext/rope_math.h), and rounded to the input dtype -- exactly what a separate RoPE pass would have stored.
// The backward pass recomputes the rotation and rotates dQ and dK back by the negative angle before storing them.
#pragma once

#include "rope.h"  // TensorView, DType

namespace ctxext {

struct AttentionArgs {
  TensorView q;          // [B, S, Hq, D] unrotated, head dim contiguous
  TensorView k;          // [B, S, Hk, D] unrotated (Hq % Hk == 0)
  TensorView v;          // [B, S, Hk, D]
  TensorView out;        // [B, S, Hq, D]: forward output; the forward output O as read by the backward pass
  TensorView lse;        // [B, S, Hq] fp32: base-2 log-sum-exp of the scaled scores (written forward, read backward)
  TensorView positions;  // [B, S] int32/int64, any strides, values in [0, 2^24)
  TensorView inv_freq;   // [rotary_dim / 2] fp32, contiguous
  TensorView cu_seqlens;  // [num_seqs + 1] int32 for packed batches (B == 1), or empty (data 0)
  // Backward only.
  TensorView grad_out;  // [B, S, Hq, D]
  TensorView delta;     // [B, S, Hq] fp32: rowsum(dO * O)
  TensorView grad_q;    // [B, S, Hq, D]: gradient of the unrotated q
  TensorView grad_k;    // [B, S, Hk, D]: gradient of the unrotated k (summed over each GQA group)
  TensorView grad_v;    // [B, S, Hk, D]
  DType dtype = DType::kBFloat16;  // of q, k, v, out and the gradients: float16 or bfloat16
  bool positions_int64 = true;
  int max_seqlen = 0;       // longest sequence (S, or the longest of cu_seqlens): sizes the grid
  float scaling = 1.0f;     // attention scaling multiplying cos and sin
  float softmax_scale = 1.0f;
  bool causal = true;       // by token order inside each sequence, not by position id
  bool interleaved = false;  // GPT-J pairs
  bool exact = true;         // exact angle product
  bool rotate = true;        // false: plain attention (to measure what the rotation costs)
  int device = 0;
  uintptr_t stream = 0;      // cudaStream_t
};

// Check the arguments (std::invalid_argument naming the problem) and launch asynchronously on args.stream.
void rope_attention_forward_cuda(const AttentionArgs& args);
void rope_attention_backward_cuda(const AttentionArgs& args);


}  // namespace ctxext
