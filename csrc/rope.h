// The RoPE launcher's arguments as the Python side fills them (no torch types: raw pointers, shapes, strides, a dtype
// tag and a stream handle), their validation, and the dtype/layout dispatch shared by the CUDA and host launchers.
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

#include "ctxext/dtype.h"
#include "ctxext/rope_tile.h"

namespace ctxext {

// A strided tensor as Python sees it: data pointer (an int), sizes and strides in elements.
struct TensorView {
  uintptr_t data = 0;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;
};

// The launcher contract (see ctxext_kernels/ops/rope.py), stated once: Python fills these fields by name.
struct RopeArgs {
  TensorView q;          // [B, S, Hq, D], head dim contiguous
  TensorView k;          // [B, S, Hk, D] or empty (data 0) for q only
  TensorView q_out;      // [B, S, Hq, D]; q itself (same pointer and strides) for in place
  TensorView k_out;      // [B, S, Hk, D], given exactly when k is
  TensorView positions;  // [B, S], any strides (stride 0 along B when shared), values in [0, 2^24)
  TensorView inv_freq;   // [rotary_dim / 2], fp32, contiguous
  DType dtype = DType::kFloat32;  // of q, k, q_out, k_out
  bool positions_int64 = true;    // int64 positions, else int32
  float scaling = 1.0f;           // multiplies cos and sin (attention scaling)
  bool interleaved = false;       // GPT-J pairs (2i, 2i+1) instead of half-split (i, i + rotary_dim/2)
  bool conjugate = false;         // rotate by -angle (the backward pass)
  bool exact = true;              // exact angle product (false: transformers' rounded fp32 product)
  int device = 0;                 // CUDA device index of the tensors (ignored by the host launcher)
  uintptr_t stream = 0;           // cudaStream_t to launch on (torch's current stream)
};

// Validated launch: the kernel parameters, whether 16-byte vector access is legal, and the work size.
struct RopeLaunch {
  RopeParams params;
  bool vectorized;
  int64_t tokens;           // B * S
  int items_per_token;      // (Hq + Hk) * chunks_per_row
};

// Largest rotary_dim: one token's cos/sin table (rotary_dim/2 pairs of fp32) must fit the kernel's shared memory.
constexpr int kMaxRotaryDim = 8192;

int element_size(DType dtype);

// Check every argument (throws std::invalid_argument naming the argument and the problem) and size the launch.
RopeLaunch prepare_rope(const RopeArgs& args);

// Run the rotation on CPU pointers: the same items as the CUDA kernel, one after the other.
void rope_host(const RopeArgs& args);

#if CTXEXT_WITH_CUDA
// Launch the CUDA kernel on args.stream (asynchronous; launch errors are thrown as std::runtime_error).
void rope_cuda(const RopeArgs& args);
#endif

template <typename T>
struct TypeTag {
  using type = T;
};

// Call f(TypeTag<T>{}, std::bool_constant<interleaved>{}, std::bool_constant<vectorized>{}) with the compile-time
// versions of the runtime flags: the kernels are templates on these, not copies.
template <typename F>
void dispatch_rope(DType dtype, bool interleaved, bool vectorized, F&& f) {
  auto with_flags = [&](auto type) {
    if (interleaved) {
      vectorized ? f(type, std::true_type{}, std::true_type{}) : f(type, std::true_type{}, std::false_type{});
    } else {
      vectorized ? f(type, std::false_type{}, std::true_type{}) : f(type, std::false_type{}, std::false_type{});
    }
  };
  switch (dtype) {
    case DType::kFloat32: return with_flags(TypeTag<float>{});
    case DType::kFloat16: return with_flags(TypeTag<Half>{});
    case DType::kBFloat16: return with_flags(TypeTag<BFloat16>{});
  }
}

}  // namespace ctxext
