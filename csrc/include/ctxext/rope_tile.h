// One RoPE launch's work, split into items that the CUDA kernel and the host loop process the same way.
//
// A launch rotates q [B, S, Hq, D] and k [B, S, Hk, D]. Per token, the cos/sin of its rotary_dim/2 pairs are computed
// once into a table (shared memory on the GPU) and reused by every head of q and k. Each head row is cut into chunks:
// a rotation chunk holds kPairs pairs, loaded as 16-byte vectors when the rows are aligned ("vectorized"), and, when
// writing out of place, tail chunks copy dims >= rotary_dim unchanged.
#pragma once

#include <cstdint>

#include "ctxext/dtype.h"
#include "ctxext/rope_math.h"

#if defined(__CUDACC__)
#define CTXEXT_UNROLL _Pragma("unroll")
#else
#define CTXEXT_UNROLL _Pragma("GCC unroll 16")
#endif

namespace ctxext {

// Everything a launch needs, as plain values: built and validated once on the host (rope_args.cpp), passed by value to the
// kernel. Strides are in elements, for dims [B, S, H]; the head dim is contiguous.
struct RopeParams {
  const void* q;
  void* q_out;
  const void* k;  // null when there is no k (then no item reaches it)
  void* k_out;
  int64_t q_stride[3], q_out_stride[3], k_stride[3], k_out_stride[3];
  const void* positions;  // [B, S], int32 or int64
  bool positions_int64;
  int64_t positions_stride[2];
  const float* inv_freq;  // [rotary_dim / 2]
  float scaling;
  bool exact, conjugate;
  int64_t seq;
  int q_heads, head_dim, rotary_dim;  // k's head count only enters the item count
  bool copy_q_tail, copy_k_tail;  // out of place with rotary_dim < head_dim
  int rotation_chunks;            // chunks per head row that rotate
  int chunks_per_row;             // rotation chunks, plus tail chunks when some tail is copied
};

// Elements per load and pairs per rotation chunk. Vectorized: 16 bytes per load (8 fp16/bf16 or 4 fp32). Scalar: one
// pair per chunk, i.e. 1 element per load in the half-split layout and 2 adjacent ones in the interleaved layout.
// The host wrapper sizes the launch with the same two functions.
CTXEXT_HD constexpr int chunk_elements(int element_size, bool interleaved, bool vectorized) {
  return vectorized ? 16 / element_size : (interleaved ? 2 : 1);
}
CTXEXT_HD constexpr int chunk_pairs(int element_size, bool interleaved, bool vectorized) {
  return interleaved ? chunk_elements(element_size, interleaved, vectorized) / 2
                     : chunk_elements(element_size, interleaved, vectorized);
}

template <typename T, bool kInterleaved, bool kVectorized>
struct ChunkShape {
  static constexpr int kVec = chunk_elements(static_cast<int>(sizeof(T)), kInterleaved, kVectorized);
  static constexpr int kPairs = chunk_pairs(static_cast<int>(sizeof(T)), kInterleaved, kVectorized);
};

// Where pair `pair` of a token sits in its cos/sin table. Pair p of chunk c goes to p * rotation_chunks + c, so that
// threads on consecutive chunks read consecutive entries (no shared-memory bank conflicts on the GPU).
CTXEXT_HD int table_index(int pair, int pairs_per_chunk, int rotation_chunks) {
  return (pair % pairs_per_chunk) * rotation_chunks + pair / pairs_per_chunk;
}

// One token's position and the element offsets of its head-0 rows in q, q_out, k and k_out: computed once per token
// (the only 64-bit divisions), shared by all its items.
struct TokenOffsets {
  int64_t position;
  int64_t q, q_out, k, k_out;
};

CTXEXT_HD TokenOffsets token_offsets(const RopeParams& p, int64_t token) {
  const int64_t b = token / p.seq, s = token - b * p.seq;
  const int64_t at = b * p.positions_stride[0] + s * p.positions_stride[1];
  TokenOffsets t;
  t.position = p.positions_int64 ? static_cast<const int64_t*>(p.positions)[at]
                                 : static_cast<const int32_t*>(p.positions)[at];
  t.q = b * p.q_stride[0] + s * p.q_stride[1];
  t.q_out = b * p.q_out_stride[0] + s * p.q_out_stride[1];
  t.k = b * p.k_stride[0] + s * p.k_stride[1];
  t.k_out = b * p.k_out_stride[0] + s * p.k_out_stride[1];
  return t;
}

template <int N, typename T>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, bool kVectorized, typename T>
CTXEXT_HD void load_floats(const T* src, float (&dst)[N]) {
  if constexpr (kVectorized) {
    const Pack<N, T> pack = *reinterpret_cast<const Pack<N, T>*>(src);  // one 16-byte load
CTXEXT_UNROLL
    for (int j = 0; j < N; ++j) dst[j] = to_float(pack.v[j]);
  } else {
CTXEXT_UNROLL
    for (int j = 0; j < N; ++j) dst[j] = to_float(src[j]);
  }
}

template <int N, bool kVectorized, typename T>
CTXEXT_HD void store_floats(const float (&src)[N], T* dst) {
  if constexpr (kVectorized) {
    Pack<N, T> pack;
CTXEXT_UNROLL
    for (int j = 0; j < N; ++j) pack.v[j] = from_float<T>(src[j]);
    *reinterpret_cast<Pack<N, T>*>(dst) = pack;
  } else {
CTXEXT_UNROLL
    for (int j = 0; j < N; ++j) dst[j] = from_float<T>(src[j]);
  }
}

// Fill one token's table: `table[table_index(pair)]` for pairs [begin, rotary_dim/2) in steps of `step` (the GPU
// spreads the pairs over threads; the host passes begin 0, step 1).
template <typename T, bool kInterleaved, bool kVectorized>
CTXEXT_HD void fill_cos_sin(const RopeParams& p, int64_t position, int begin, int step, CosSin* table) {
  constexpr int kPairs = ChunkShape<T, kInterleaved, kVectorized>::kPairs;
  for (int pair = begin; pair < p.rotary_dim / 2; pair += step) {
    table[table_index(pair, kPairs, p.rotation_chunks)] =
        rope_cos_sin(position, p.inv_freq[pair], p.scaling, p.exact, p.conjugate);
  }
}

// Rotate chunk `chunk` of one head row (in -> out, which may alias).
template <typename T, bool kInterleaved, bool kVectorized>
CTXEXT_HD void rotate_chunk(const T* in, T* out, const CosSin* table, int chunk, int rotary_dim, int rotation_chunks) {
  using Shape = ChunkShape<T, kInterleaved, kVectorized>;
  int first, second;
  pair_offsets(chunk * Shape::kPairs, rotary_dim, kInterleaved, &first, &second);
  if constexpr (kInterleaved) {  // one load holds kPairs adjacent (x1, x2) pairs
    float x[Shape::kVec], y[Shape::kVec];
    load_floats<Shape::kVec, kVectorized>(in + first, x);
CTXEXT_UNROLL
    for (int j = 0; j < Shape::kPairs; ++j) {
      const CosSin cs = table[table_index(chunk * Shape::kPairs + j, Shape::kPairs, rotation_chunks)];
      rotate_pair(x[2 * j], x[2 * j + 1], cs, &y[2 * j], &y[2 * j + 1]);
    }
    store_floats<Shape::kVec, kVectorized>(y, out + first);
  } else {  // one load from each half: x1 = x[first + j], x2 = x[second + j]
    float x1[Shape::kVec], x2[Shape::kVec], y1[Shape::kVec], y2[Shape::kVec];
    load_floats<Shape::kVec, kVectorized>(in + first, x1);
    load_floats<Shape::kVec, kVectorized>(in + second, x2);
CTXEXT_UNROLL
    for (int j = 0; j < Shape::kPairs; ++j) {
      const CosSin cs = table[table_index(chunk * Shape::kPairs + j, Shape::kPairs, rotation_chunks)];
      rotate_pair(x1[j], x2[j], cs, &y1[j], &y2[j]);
    }
    store_floats<Shape::kVec, kVectorized>(y1, out + first);
    store_floats<Shape::kVec, kVectorized>(y2, out + second);
  }
}

// Copy tail chunk `chunk` (dims >= rotary_dim) unchanged. Vectorized launches guarantee whole 16-byte chunks.
template <typename T, bool kInterleaved, bool kVectorized>
CTXEXT_HD void copy_tail_chunk(const T* in, T* out, int chunk, int rotary_dim, int head_dim) {
  constexpr int kVec = ChunkShape<T, kInterleaved, kVectorized>::kVec;
  const int begin = rotary_dim + chunk * kVec;
  if constexpr (kVectorized) {
    *reinterpret_cast<Pack<kVec, T>*>(out + begin) = *reinterpret_cast<const Pack<kVec, T>*>(in + begin);
  } else {
    for (int e = begin; e < begin + kVec && e < head_dim; ++e) out[e] = in[e];
  }
}

// Item `item` of a token: head item / chunks_per_row (q heads first, then k heads), chunk item % chunks_per_row.
template <typename T, bool kInterleaved, bool kVectorized>
CTXEXT_HD void process_item(const RopeParams& p, const TokenOffsets& token, int item, const CosSin* table) {
  const int head = item / p.chunks_per_row;
  const int chunk = item - head * p.chunks_per_row;
  const bool is_q = head < p.q_heads;
  const int64_t h = is_q ? head : head - p.q_heads;
  const T* in = static_cast<const T*>(is_q ? p.q : p.k) + (is_q ? token.q : token.k) +
                h * (is_q ? p.q_stride[2] : p.k_stride[2]);
  T* out = static_cast<T*>(is_q ? p.q_out : p.k_out) + (is_q ? token.q_out : token.k_out) +
           h * (is_q ? p.q_out_stride[2] : p.k_out_stride[2]);
  if (chunk < p.rotation_chunks) {
    rotate_chunk<T, kInterleaved, kVectorized>(in, out, table, chunk, p.rotary_dim, p.rotation_chunks);
  } else if (is_q ? p.copy_q_tail : p.copy_k_tail) {
    copy_tail_chunk<T, kInterleaved, kVectorized>(in, out, chunk - p.rotation_chunks, p.rotary_dim, p.head_dim);
  }
}

}  // namespace ctxext
