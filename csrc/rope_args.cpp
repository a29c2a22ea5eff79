// Validation of the launcher's arguments, shared by the CUDA and host launchers: every message names the argument.
#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>

#include "rope.h"

namespace ctxext {
namespace {

std::string format_dims(const std::vector<int64_t>& dims) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < dims.size(); ++i) out << (i ? ", " : "") << dims[i];
  out << "]";
  return out.str();
}

[[noreturn]] void fail(const std::string& name, const std::string& problem) {
  throw std::invalid_argument(name + ": " + problem);
}

// Rank, non-null data, one stride per dim, non-negative sizes.
void check_view(const TensorView& t, const char* name, size_t rank, const char* dims) {
  if (t.shape.size() != rank) {
    fail(name, "expected " + std::to_string(rank) + " dims " + dims + ", got shape " + format_dims(t.shape));
  }
  if (t.strides.size() != rank) {
    fail(name, "got " + std::to_string(t.strides.size()) + " strides for " + std::to_string(rank) + " dims");
  }
  int64_t elements = 1;
  for (int64_t size : t.shape) {
    if (size < 0) fail(name, "negative size in shape " + format_dims(t.shape));
    elements *= size;
  }
  if (t.data == 0 && elements > 0) fail(name, "null data pointer");  // empty tensors may have none
}

// q, k and their outputs: [B, S, H, D] with a contiguous head dim.
void check_heads_view(const TensorView& t, const char* name) {
  check_view(t, name, 4, "[B, S, H, D]");
  if (t.strides[3] != 1 && t.shape[3] > 1) {
    fail(name, "last dimension must be contiguous (stride 1), got stride " + std::to_string(t.strides[3]));
  }
}

void check_same_shape(const TensorView& out, const char* out_name, const TensorView& in, const char* in_name) {
  if (out.shape != in.shape) {
    fail(out_name, "shape " + format_dims(out.shape) + " must equal " + in_name + "'s shape " + format_dims(in.shape));
  }
  if (out.data != 0 && out.data == in.data && out.strides != in.strides) {
    fail(out_name, std::string("shares ") + in_name + "'s data pointer with different strides " +
                       format_dims(out.strides) + " vs " + format_dims(in.strides) + "; pass " + in_name +
                       " itself to rotate in place");
  }
}

// 16-byte vector access needs every row start 16-byte aligned: aligned base pointers and strides (of dims that have
// more than one index) that are multiples of 16 bytes, and chunk boundaries that fall on 16-byte multiples.
bool rows_are_16_byte_aligned(const RopeArgs& args, int rotary_dim, bool has_k) {
  const int element = element_size(args.dtype);
  const int vec = 16 / element;
  auto aligned = [&](const TensorView& t) {
    if (t.data % 16 != 0) return false;
    for (int d = 0; d < 3; ++d) {
      if (t.shape[d] > 1 && t.strides[d] % vec != 0) return false;
    }
    return true;
  };
  const int64_t head_dim = args.q.shape[3];
  const bool chunks_fit = head_dim % vec == 0 && (args.interleaved ? rotary_dim % vec : (rotary_dim / 2) % vec) == 0;
  return chunks_fit && aligned(args.q) && aligned(args.q_out) && (!has_k || (aligned(args.k) && aligned(args.k_out)));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

int element_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
  }
  throw std::invalid_argument("dtype: unknown dtype tag " + std::to_string(static_cast<int>(dtype)));
}

RopeLaunch prepare_rope(const RopeArgs& args) {
  element_size(args.dtype);  // throws on an unknown tag
  check_heads_view(args.q, "q");
  check_heads_view(args.q_out, "q_out");
  check_same_shape(args.q_out, "q_out", args.q, "q");
  const int64_t batch = args.q.shape[0], seq = args.q.shape[1], head_dim = args.q.shape[3];

  // An absent k is a default TensorView (no shape); an empty k has a shape but possibly no data.
  const bool has_k = !args.k.shape.empty();
  if (has_k != !args.k_out.shape.empty()) fail("k_out", "must be given exactly when k is");
  if (has_k) {
    check_heads_view(args.k, "k");
    check_heads_view(args.k_out, "k_out");
    check_same_shape(args.k_out, "k_out", args.k, "k");
    if (args.k.shape[0] != batch || args.k.shape[1] != seq || args.k.shape[3] != head_dim) {
      fail("k", "shape " + format_dims(args.k.shape) + " must match q's [B, S, *, D] = " + format_dims(args.q.shape));
    }
  }

  check_view(args.positions, "positions", 2, "[B, S]");
  if (args.positions.shape != std::vector<int64_t>{batch, seq}) {
    fail("positions", "shape must be [B, S] = " + format_dims({batch, seq}) + ", got " +
                          format_dims(args.positions.shape));
  }

  check_view(args.inv_freq, "inv_freq", 1, "[rotary_dim / 2]");
  const int64_t pairs = args.inv_freq.shape[0];
  if (pairs > 1 && args.inv_freq.strides[0] != 1) {
    fail("inv_freq", "must be contiguous (stride 1), got stride " + std::to_string(args.inv_freq.strides[0]));
  }
  if (pairs == 0) fail("inv_freq", "must hold at least one frequency (rotary_dim >= 2)");
  const int64_t rotary_dim = 2 * pairs;
  if (rotary_dim > head_dim) {
    fail("inv_freq", "rotary_dim = 2 * " + std::to_string(pairs) + " = " + std::to_string(rotary_dim) +
                         " exceeds the head dim " + std::to_string(head_dim));
  }
  if (rotary_dim > kMaxRotaryDim) {
    fail("inv_freq", "rotary_dim " + std::to_string(rotary_dim) + " exceeds the supported maximum " +
                         std::to_string(kMaxRotaryDim));
  }
  if (!std::isfinite(args.scaling)) fail("scaling", "must be finite, got " + std::to_string(args.scaling));
  const int64_t heads = args.q.shape[2] + (has_k ? args.k.shape[2] : 0);

  RopeLaunch launch{};
  launch.vectorized = rows_are_16_byte_aligned(args, static_cast<int>(rotary_dim), has_k);
  const int element = element_size(args.dtype);
  const int vec = chunk_elements(element, args.interleaved, launch.vectorized);
  const int64_t rotation_chunks = pairs / chunk_pairs(element, args.interleaved, launch.vectorized);
  const bool copy_q_tail = rotary_dim < head_dim && args.q_out.data != args.q.data;
  const bool copy_k_tail = has_k && rotary_dim < head_dim && args.k_out.data != args.k.data;
  const int64_t chunks_per_row =
      rotation_chunks + (copy_q_tail || copy_k_tail ? ceil_div(head_dim - rotary_dim, vec) : 0);
  if (heads * chunks_per_row > INT32_MAX) {
    fail("q", "too many heads times head dim for one token: " + std::to_string(heads) + " heads of " +
                  std::to_string(head_dim));
  }

  RopeParams& p = launch.params;
  p.q = reinterpret_cast<const void*>(args.q.data);
  p.q_out = reinterpret_cast<void*>(args.q_out.data);
  p.k = has_k ? reinterpret_cast<const void*>(args.k.data) : nullptr;
  p.k_out = has_k ? reinterpret_cast<void*>(args.k_out.data) : nullptr;
  for (int d = 0; d < 3; ++d) {
    p.q_stride[d] = args.q.strides[d];
    p.q_out_stride[d] = args.q_out.strides[d];
    p.k_stride[d] = has_k ? args.k.strides[d] : 0;
    p.k_out_stride[d] = has_k ? args.k_out.strides[d] : 0;
  }
  p.positions = reinterpret_cast<const void*>(args.positions.data);
  p.positions_int64 = args.positions_int64;
  p.positions_stride[0] = args.positions.strides[0];
  p.positions_stride[1] = args.positions.strides[1];
  p.inv_freq = reinterpret_cast<const float*>(args.inv_freq.data);
  p.scaling = args.scaling;
  p.exact = args.exact;
  p.conjugate = args.conjugate;
  p.seq = seq;
  p.q_heads = static_cast<int>(args.q.shape[2]);
  p.head_dim = static_cast<int>(head_dim);
  p.rotary_dim = static_cast<int>(rotary_dim);
  p.copy_q_tail = copy_q_tail;
  p.copy_k_tail = copy_k_tail;
  p.rotation_chunks = static_cast<int>(rotation_chunks);
  p.chunks_per_row = static_cast<int>(chunks_per_row);
  launch.tokens = batch * seq;
  launch.items_per_token = static_cast<int>(heads * chunks_per_row);
  return launch;
}

}  // namespace ctxext
