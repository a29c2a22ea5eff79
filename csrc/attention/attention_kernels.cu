// Fused RoPE + FlashAttention-2 kernels (forward, dK/dV, dQ) on tensor cores, and their launchers.
//
// 128 threads (4 warps) per block. Each warp owns 16 rows of the block's row tile (queries in the forward and dQ
// kernels, keys in the dK/dV kernel): its scores, probabilities, online-softmax state and accumulators live in
// registers (mma.sync C fragments; warp_tiles.cuh), so a row's max and sum need only shuffles among the 4 lanes that
// hold it. Shared memory holds the 16-bit operand tiles only, filled by cp.async while the tensor cores work: the
// forward kernel loads V_j during S = Q K_j^T and K_j+1 during O += P V_j (FlashAttention-2's order, one buffer each);
// the backward kernels, which need both streamed tiles until the end of a step, double-buffer them.
//
// RoPE: the forward kernel rotates its Q tile once, in shared memory right after it lands (outside the K loop), with
// the exact angle of ctxext/rope_math.h and the hardware sin/cos on the reduced angle, rounding to the input dtype as a
// separate RoPE pass would. Keys come rotated. The backward kernels read queries rotated once by the caller (the dK/dV
// kernel visits every Q tile once per key block: rotating there would repeat the trig that often); the dQ kernel
// rotates its fp32 result back by the negative angle before rounding it.
//
// Backward follows FlashAttention-2 without atomics: one kernel per key block accumulates dK and dV over every Q block
// of the kv head's GQA group, a second kernel per Q block accumulates dQ; both recompute P from the saved lse.
#include <cuda_runtime.h>

#include <algorithm>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "attention/attention.h"
#include "attention/warp_tiles.cuh"
#include "ctxext/rope_math.h"
#include "cuda_check.h"

namespace ctxext {
namespace attention {
namespace {

constexpr int kBlockM = 16 * kWarps;  // query rows of a forward / dQ block, key rows of a dK/dV block: 16 per warp

// Tile sizes per head dim. Shared memory stays within the 99 KB per block of sm_86/89/120 and registers within 255 per
// thread without spills (checked by tests/test_cuda_attention_static.py on the compiled code).
template <int D>
struct Tiles {
  static_assert(D == 64 || D == 128, "head_dim 64 or 128");
  static constexpr int kLd = tile_ld<D>();
  static constexpr int kTileRowBytes = 2 * kLd;
  static constexpr int kFwdN = 64;                 // keys per forward step
  static constexpr int kDqN = D == 128 ? 32 : 64;  // keys per dQ step: Q, dO and 2x(K, V) of 64 rows exceed 99 KB
  static constexpr int kDkvM = D == 128 ? 32 : 64;  // queries per dK/dV step: dK + dV take 128 registers at D = 128

  // Byte offsets in dynamic shared memory.
  struct Forward {  // Q, K, V
    static constexpr int kK = kBlockM * kTileRowBytes;
    static constexpr int kV = kK + kFwdN * kTileRowBytes;
    static constexpr int kBytes = kV + kFwdN * kTileRowBytes;
  };
  struct Dq {  // Q, dO, then K[2], V[2]; the fp32 dQ tile reuses the K/V buffers at the end
    static constexpr int kDo = kBlockM * kTileRowBytes;
    static constexpr int kK = 2 * kDo;
    static constexpr int kKvBuffer = kDqN * kTileRowBytes;
    static constexpr int kV = kK + 2 * kKvBuffer;
    static constexpr int kBytes = kV + 2 * kKvBuffer;
    static_assert(kBlockM * kLd * 4 <= 4 * kKvBuffer, "the fp32 dQ tile must fit the K/V buffers");
  };
  struct Dkv {  // K, V, then Q[2], dO[2], lse[2], delta[2]
    static constexpr int kV = kBlockM * kTileRowBytes;
    static constexpr int kQ = 2 * kV;
    static constexpr int kQBuffer = kDkvM * kTileRowBytes;
    static constexpr int kDo = kQ + 2 * kQBuffer;
    static constexpr int kLse = kDo + 2 * kQBuffer;
    static constexpr int kStatsBuffer = kDkvM * 4;
    static constexpr int kDelta = kLse + 2 * kStatsBuffer;
    static constexpr int kBytes = kDelta + 2 * kStatsBuffer;
  };
};

// Everything a kernel needs, as plain values; strides in elements for dims [B, S, H].
struct Params {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  const void* grad_out;
  const float* delta;
  void* grad_q;
  void* grad_k;
  void* grad_v;
  int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3], grad_out_stride[3];
  int64_t grad_q_stride[3], grad_k_stride[3], grad_v_stride[3], lse_stride[3], delta_stride[3];
  const void* positions;
  int64_t positions_stride[2];
  bool positions_int64;
  const float* inv_freq;
  const int* cu_seqlens_q;  // null: B sequences of seq_q queries and seq_k keys
  const int* cu_seqlens_k;
  int seq_q, seq_k, q_heads, k_heads, group, rotary_dim;
  float scaling, softmax_scale, scale_log2;  // scale_log2 = softmax_scale * log2(e): the softmax runs in base 2
  bool causal, interleaved, exact, rotate;
};

// One sequence: tensor batch index, first query and key token, lengths.
struct Span {
  int64_t batch;
  int64_t q_start, k_start;
  int q_len, k_len;

  // Bottom-right causal alignment: query i sees keys j <= i + k_len - q_len.
  __device__ int diagonal() const { return k_len - q_len; }
};

__device__ __forceinline__ Span span_of(const Params& p, int index) {
  if (p.cu_seqlens_q == nullptr) return Span{index, 0, 0, p.seq_q, p.seq_k};
  const int q0 = p.cu_seqlens_q[index], k0 = p.cu_seqlens_k[index];
  return Span{0, q0, k0, p.cu_seqlens_q[index + 1] - q0, p.cu_seqlens_k[index + 1] - k0};
}

// Whether query `query` may attend to key `key` (both counted from the sequence start).
__device__ __forceinline__ bool attends(const Params& p, const Span& s, int query, int key) {
  return query < s.q_len && key < s.k_len && (!p.causal || key <= query + s.diagonal());
}

// Whether any (query, key) of a block of queries [m0, m0 + rows) x keys [n0, n0 + cols) is masked: only such blocks
// pay for the per-element test.
__device__ __forceinline__ bool needs_mask(const Params& p, const Span& s, int m0, int rows, int n0, int cols) {
  return m0 + rows > s.q_len || n0 + cols > s.k_len || (p.causal && n0 + cols - 1 > m0 + s.diagonal());
}

// Scale a warp's C fragments of scores to base 2 and set the masked ones to -inf (exp2 makes them 0). The block's rows
// start at row0 (16 per warp: lane/4 and lane/4 + 8 for this thread), its N columns at col0; kKeyRows: rows are keys
// and columns queries (the dK/dV kernel's S^T), else rows are queries.
template <bool kKeyRows, int N>
__device__ __forceinline__ void scale_and_mask(float (&x)[N / 8][4], const Params& p, const Span& s, int row0,
                                               int col0) {
  const bool masked = kKeyRows ? needs_mask(p, s, col0, N, row0, kBlockM) : needs_mask(p, s, row0, kBlockM, col0, N);
  const int lane = threadIdx.x % 32;
  const int row = row0 + 16 * (threadIdx.x / 32) + lane / 4, col = col0 + 2 * (lane % 4);
#pragma unroll
  for (int nb = 0; nb < N / 8; ++nb) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      x[nb][e] *= p.scale_log2;
      const int r = row + 8 * (e / 2), c = col + 8 * nb + e % 2;
      if (masked && !(kKeyRows ? attends(p, s, c, r) : attends(p, s, r, c))) x[nb][e] = -INFINITY;
    }
  }
}

// Row `row` (from the sequence start) of head `head` of a [B, S, H, D] tensor; `key` picks the key token offset.
__device__ __forceinline__ const void* row_address(const void* base, const int64_t (&stride)[3], const Span& s,
                                                   bool key, int row, int head) {
  return static_cast<const uint16_t*>(base) + s.batch * stride[0] + ((key ? s.k_start : s.q_start) + row) * stride[1] +
         head * stride[2];
}

// Element offset of query row `row` of head `head` in a [B, S, H] fp32 tensor (lse, delta).
__device__ __forceinline__ int64_t stat_offset(const int64_t (&stride)[3], const Span& s, int row, int head) {
  return s.batch * stride[0] + (s.q_start + row) * stride[1] + head * stride[2];
}

__device__ __forceinline__ int64_t position_of(const Params& p, const Span& s, int row) {
  const int64_t at = s.batch * p.positions_stride[0] + (s.q_start + row) * p.positions_stride[1];
  return p.positions_int64 ? static_cast<const int64_t*>(p.positions)[at]
                           : static_cast<const int32_t*>(p.positions)[at];
}

// Rotate the kBlockM rows of a shared tile of E (T or fp32, [kBlockM][D + 8]) in place by the angle of query rows
// row0.. (conjugate: by the negative angle); rows past the sequence end stay as they are. Two threads per row, so each
// warp rotates exactly its own 16 rows and the position is read once per thread.
template <typename E, int D>
__device__ void rotate_rows(E* tile, const Params& p, const Span& s, int row0, bool conjugate) {
  constexpr int kPerRow = kThreads / kBlockM;
  static_assert(kPerRow * kBlockM == kThreads && 32 % kPerRow == 0, "a warp must rotate its own rows");
  const int r = threadIdx.x / kPerRow;
  if (row0 + r >= s.q_len) return;
  const int64_t position = position_of(p, s, row0 + r);
  E* row = tile + r * tile_ld<D>();
  for (int i = threadIdx.x % kPerRow; i < p.rotary_dim / 2; i += kPerRow) {
    int first, second;
    pair_offsets(i, p.rotary_dim, p.interleaved, &first, &second);
    const CosSin cs = rope_cos_sin<true>(position, __ldg(p.inv_freq + i), p.scaling, p.exact, conjugate);
    float y1, y2;
    rotate_pair(to_float(row[first]), to_float(row[second]), cs, &y1, &y2);
    row[first] = from_float<E>(y1);
    row[second] = from_float<E>(y2);
  }
}

// Sum of a value over the 4 lanes (a quad) that hold one accumulator row.
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

// ------------------------------------------------------------------------------------------------------ forward
// One block: kBlockM queries of one q head against every key they see. At most 168 registers (3 blocks per SM):
// left alone, ptxas for sm_120 picks 128 at D = 64 and spills.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 3) forward_kernel(const Params p) {
  using Tile = Tiles<D>;
  using Smem = typename Tile::Forward;
  constexpr int kN = Tile::kFwdN, kLd = Tile::kLd;
  const Span s = span_of(p, blockIdx.x / p.q_heads);
  const int head = blockIdx.x % p.q_heads, kv_head = head / p.group;
  const int m0 = blockIdx.y * kBlockM;
  if (m0 >= s.q_len) return;
  extern __shared__ __align__(128) unsigned char shared[];
  T* q_tile = reinterpret_cast<T*>(shared);
  const uint32_t q_addr = shared_address(shared), k_addr = q_addr + Smem::kK, v_addr = q_addr + Smem::kV;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const int n_end = p.causal ? min(s.k_len, m0 + kBlockM + s.diagonal()) : s.k_len;
  const int n_blocks = n_end > 0 ? (n_end + kN - 1) / kN : 0;
  auto load_keys = [&](uint32_t tile, const void* base, const int64_t(&stride)[3], int j) {
    load_rows_async<D>(tile, row_address(base, stride, s, true, j * kN, kv_head), stride[1], kN, s.k_len - j * kN);
    commit_copies();
  };
  load_rows_async<D>(q_addr, row_address(p.q, p.q_stride, s, false, m0, head), p.q_stride[1], kBlockM,
                     s.q_len - m0);
  commit_copies();
  if (n_blocks > 0) load_keys(k_addr, p.k, p.k_stride, 0);
  wait_copies<1>();  // Q has landed; K_0 is still in flight while Q rotates
  __syncthreads();
  if (p.rotate) rotate_rows<T, D>(q_tile, p, s, m0, false);  // the loop's first barrier orders it before any mma

  // Rows lane/4 and lane/4 + 8 of this warp's 16: running max (scaled, base 2) and this thread's share of the sum.
  float o[D / 8][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
  const int my_row0 = m0 + 16 * warp + lane / 4;
  for (int j = 0; j < n_blocks; ++j) {
    wait_copies<0>();  // K_j
    __syncthreads();   // ... visible to every warp, and every warp is done with V_j-1
    load_keys(v_addr, p.v, p.v_stride, j);
    float x[kN / 8][4] = {};
    mma_shared_a<T, D, kN, false>(x, q_addr, 16 * warp, k_addr, kLd);  // S = Q K^T
    scale_and_mask<false, kN>(x, p, s, m0, j * kN);
    // Online softmax: P = exp2(x - running max), the accumulator and sum rescaled by how much the max grew.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float block_max = row_max[h];
#pragma unroll
      for (int nb = 0; nb < kN / 8; ++nb) block_max = fmaxf(block_max, fmaxf(x[nb][2 * h], x[nb][2 * h + 1]));
      block_max = quad_max(block_max);
      const float base = block_max == -INFINITY ? 0.0f : block_max;  // a row that sees no key yet: weights stay 0
      const float alpha = exp2f(row_max[h] - base);
      row_max[h] = block_max;
      float sum = 0.0f;
#pragma unroll
      for (int nb = 0; nb < kN / 8; ++nb) {
#pragma unroll
        for (int e = 2 * h; e < 2 * h + 2; ++e) {
          x[nb][e] = exp2f(x[nb][e] - base);
          sum += x[nb][e];
        }
      }
      row_sum[h] = row_sum[h] * alpha + sum;
#pragma unroll
      for (int db = 0; db < D / 8; ++db) {
        o[db][2 * h] *= alpha;
        o[db][2 * h + 1] *= alpha;
      }
    }
    wait_copies<0>();  // V_j
    __syncthreads();   // ... visible to every warp, and every warp is done with K_j
    if (j + 1 < n_blocks) load_keys(k_addr, p.k, p.k_stride, j + 1);
    mma_register_a<T, kN, D, true>(o, x, v_addr, kLd);  // O += P V
  }

  float inverse[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float total = quad_sum(row_sum[h]);
    // total >= 1 when the row saw a key (its max contributes exp2(0)), so the fast reciprocal (2 ulp, no slow-path
    // call that would put a register on the stack) is in range; a query that sees no key (fewer keys than queries)
    // gets a zero output.
    inverse[h] = total > 0.0f ? __fdividef(1.0f, total) : 0.0f;
    const int row = my_row0 + 8 * h;
    if (lane % 4 == 0 && row < s.q_len) {
      // +inf for a query that sees no key: the backward pass then gets P = 0 for it.
      p.lse[stat_offset(p.lse_stride, s, row, head)] = total > 0.0f ? row_max[h] + log2f(total) : INFINITY;
    }
  }
  // The warp's own 16 Q rows become its output rows (no other warp reads them), then go out 16 bytes at a time.
  __syncwarp();
  store_fragments<T, D>(q_tile, kLd, 16 * warp, o, inverse[0], inverse[1]);
  __syncwarp();
  store_rows<T, T, D>(const_cast<void*>(row_address(p.out, p.out_stride, s, false, m0 + 16 * warp, head)),
                      p.out_stride[1], q_tile + 16 * warp * kLd, 16, s.q_len - m0 - 16 * warp, lane, 32);
}

// ------------------------------------------------------------------------------------------------------ backward
// dK, dV of kBlockM keys of one kv head: for every query of the GQA group that sees them,
// S^T = K Q^T, P^T = exp2(S^T - lse), dP^T = V dO^T, dS^T = P^T (dP^T - delta), dV += P^T dO, dK += dS^T Q.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(const Params p) {
  using Tile = Tiles<D>;
  using Smem = typename Tile::Dkv;
  constexpr int kM = Tile::kDkvM, kLd = Tile::kLd;
  const Span s = span_of(p, blockIdx.x / p.k_heads);
  const int kv_head = blockIdx.x % p.k_heads;
  const int n0 = blockIdx.y * kBlockM;
  if (n0 >= s.k_len) return;
  extern __shared__ __align__(128) unsigned char shared[];
  T* k_tile = reinterpret_cast<T*>(shared);
  T* v_tile = reinterpret_cast<T*>(shared + Smem::kV);
  const float* lse_tiles = reinterpret_cast<const float*>(shared + Smem::kLse);
  const float* delta_tiles = reinterpret_cast<const float*>(shared + Smem::kDelta);
  const uint32_t base = shared_address(shared);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  // Earlier queries see none of these keys (causal); steps run over (head of the group, Q block).
  const int m_begin = p.causal ? max(0, n0 - s.diagonal()) / kM * kM : 0;
  const int m_blocks = s.q_len > m_begin ? (s.q_len - m_begin + kM - 1) / kM : 0;
  const int steps = p.group * m_blocks;
  auto load_step = [&](int t) {
    const int head = kv_head * p.group + t / m_blocks, m0 = m_begin + t % m_blocks * kM;
    const int valid = s.q_len - m0, buffer = t % 2;
    load_rows_async<D>(base + Smem::kQ + buffer * Smem::kQBuffer, row_address(p.q, p.q_stride, s, false, m0, head),
                       p.q_stride[1], kM, valid);
    load_rows_async<D>(base + Smem::kDo + buffer * Smem::kQBuffer,
                       row_address(p.grad_out, p.grad_out_stride, s, false, m0, head), p.grad_out_stride[1], kM,
                       valid);
    load_values_async(base + Smem::kLse + buffer * Smem::kStatsBuffer, p.lse + stat_offset(p.lse_stride, s, m0, head),
                      p.lse_stride[1], kM, valid);
    load_values_async(base + Smem::kDelta + buffer * Smem::kStatsBuffer,
                      p.delta + stat_offset(p.delta_stride, s, m0, head), p.delta_stride[1], kM, valid);
  };
  load_rows_async<D>(base, row_address(p.k, p.k_stride, s, true, n0, kv_head), p.k_stride[1], kBlockM, s.k_len - n0);
  load_rows_async<D>(base + Smem::kV, row_address(p.v, p.v_stride, s, true, n0, kv_head), p.v_stride[1], kBlockM,
                     s.k_len - n0);
  if (steps > 0) load_step(0);
  commit_copies();

  float dk[D / 8][4] = {}, dv[D / 8][4] = {};
  for (int t = 0; t < steps; ++t) {
    const int m0 = m_begin + t % m_blocks * kM, buffer = t % 2;
    if (t + 1 < steps) load_step(t + 1);
    commit_copies();
    wait_copies<1>();
    __syncthreads();
    const uint32_t q_tile = base + Smem::kQ + buffer * Smem::kQBuffer;
    const uint32_t do_tile = base + Smem::kDo + buffer * Smem::kQBuffer;
    const float* lse = lse_tiles + buffer * kM;
    const float* delta = delta_tiles + buffer * kM;
    float st[kM / 8][4] = {}, dpt[kM / 8][4] = {};
    mma_shared_a<T, D, kM, false>(st, base, 16 * warp, q_tile, kLd);             // S^T = K Q^T
    mma_shared_a<T, D, kM, false>(dpt, base + Smem::kV, 16 * warp, do_tile, kLd);  // dP^T = V dO^T

    scale_and_mask<true, kM>(st, p, s, n0, m0);
#pragma unroll
    for (int nb = 0; nb < kM / 8; ++nb) {  // columns are queries here
      const int c = 8 * nb + 2 * (lane % 4);
      const float2 lse2 = *reinterpret_cast<const float2*>(lse + c);
      const float2 delta2 = *reinterpret_cast<const float2*>(delta + c);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float prob = exp2f(st[nb][e] - (e % 2 ? lse2.y : lse2.x));
        st[nb][e] = prob;
        dpt[nb][e] = prob * (dpt[nb][e] - (e % 2 ? delta2.y : delta2.x));
      }
    }
    mma_register_a<T, kM, D, true>(dv, st, do_tile, kLd);  // dV += P^T dO
    mma_register_a<T, kM, D, true>(dk, dpt, q_tile, kLd);  // dK += dS^T Q
    __syncthreads();  // every warp is done with buffer t % 2 before step t + 1 refills it
  }

  // With no step at all, K and V (copied by any thread) may still be landing in the tiles the epilogue reuses.
  wait_copies<0>();
  __syncthreads();
  // Each warp's own K and V rows (read by no other warp) become its dK and dV rows.
  store_fragments<T, D>(k_tile, kLd, 16 * warp, dk, p.softmax_scale, p.softmax_scale);
  store_fragments<T, D>(v_tile, kLd, 16 * warp, dv, 1.0f, 1.0f);
  __syncwarp();
  const int valid = s.k_len - n0 - 16 * warp;
  store_rows<T, T, D>(const_cast<void*>(row_address(p.grad_k, p.grad_k_stride, s, true, n0 + 16 * warp, kv_head)),
                      p.grad_k_stride[1], k_tile + 16 * warp * kLd, 16, valid, lane, 32);
  store_rows<T, T, D>(const_cast<void*>(row_address(p.grad_v, p.grad_v_stride, s, true, n0 + 16 * warp, kv_head)),
                      p.grad_v_stride[1], v_tile + 16 * warp * kLd, 16, valid, lane, 32);
}

// dQ of kBlockM queries of one q head: S = Q K^T, P = exp2(S - lse), dP = dO V^T, dS = P (dP - delta), dQ += dS K;
// then dQ is rotated back (the gradient of the unrotated q is R^T times that of the rotated one).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) dq_kernel(const Params p) {
  using Tile = Tiles<D>;
  using Smem = typename Tile::Dq;
  constexpr int kN = Tile::kDqN, kLd = Tile::kLd;
  const Span s = span_of(p, blockIdx.x / p.q_heads);
  const int head = blockIdx.x % p.q_heads, kv_head = head / p.group;
  const int m0 = blockIdx.y * kBlockM;
  if (m0 >= s.q_len) return;
  extern __shared__ __align__(128) unsigned char shared[];
  const uint32_t q_addr = shared_address(shared), do_addr = q_addr + Smem::kDo;
  const uint32_t k_addr = q_addr + Smem::kK, v_addr = q_addr + Smem::kV;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const int n_end = p.causal ? min(s.k_len, m0 + kBlockM + s.diagonal()) : s.k_len;
  const int n_blocks = n_end > 0 ? (n_end + kN - 1) / kN : 0;
  auto load_kv = [&](int j) {
    const int n0 = j * kN, buffer = j % 2 * Smem::kKvBuffer;
    load_rows_async<D>(k_addr + buffer, row_address(p.k, p.k_stride, s, true, n0, kv_head), p.k_stride[1], kN,
                       s.k_len - n0);
    load_rows_async<D>(v_addr + buffer, row_address(p.v, p.v_stride, s, true, n0, kv_head), p.v_stride[1], kN,
                       s.k_len - n0);
  };
  load_rows_async<D>(q_addr, row_address(p.q, p.q_stride, s, false, m0, head), p.q_stride[1], kBlockM, s.q_len - m0);
  load_rows_async<D>(do_addr, row_address(p.grad_out, p.grad_out_stride, s, false, m0, head), p.grad_out_stride[1],
                     kBlockM, s.q_len - m0);
  if (n_blocks > 0) load_kv(0);
  commit_copies();

  const int my_row0 = m0 + 16 * warp + lane / 4;
  float lse[2], delta[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const bool inside = my_row0 + 8 * h < s.q_len;
    lse[h] = inside ? p.lse[stat_offset(p.lse_stride, s, my_row0 + 8 * h, head)] : 0.0f;
    delta[h] = inside ? p.delta[stat_offset(p.delta_stride, s, my_row0 + 8 * h, head)] : 0.0f;
  }

  float dq[D / 8][4] = {};
  for (int j = 0; j < n_blocks; ++j) {
    if (j + 1 < n_blocks) load_kv(j + 1);
    commit_copies();
    wait_copies<1>();
    __syncthreads();
    const uint32_t k_tile = k_addr + j % 2 * Smem::kKvBuffer, v_tile = v_addr + j % 2 * Smem::kKvBuffer;
    float x[kN / 8][4] = {}, dp[kN / 8][4] = {};
    mma_shared_a<T, D, kN, false>(x, q_addr, 16 * warp, k_tile, kLd);    // S = Q K^T
    mma_shared_a<T, D, kN, false>(dp, do_addr, 16 * warp, v_tile, kLd);  // dP = dO V^T
    scale_and_mask<false, kN>(x, p, s, m0, j * kN);
#pragma unroll
    for (int nb = 0; nb < kN / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) x[nb][e] = exp2f(x[nb][e] - lse[e / 2]) * (dp[nb][e] - delta[e / 2]);  // dS
    }
    mma_register_a<T, kN, D, true>(dq, x, k_tile, kLd);  // dQ += dS K
    __syncthreads();  // every warp is done with buffer j % 2 before step j + 1 refills it
  }

  // fp32 dQ into the K/V buffers (each warp its own 16 rows), rotated back there and rounded once on the way out.
  wait_copies<0>();
  __syncthreads();
  float* dq_tile = reinterpret_cast<float*>(shared + Smem::kK);
  store_fragments<float, D>(dq_tile, kLd, 16 * warp, dq, p.softmax_scale, p.softmax_scale);
  __syncwarp();
  if (p.rotate) {
    rotate_rows<float, D>(dq_tile, p, s, m0, true);
    __syncwarp();
  }
  store_rows<T, float, D>(const_cast<void*>(row_address(p.grad_q, p.grad_q_stride, s, false, m0 + 16 * warp, head)),
                          p.grad_q_stride[1], dq_tile + 16 * warp * kLd, 16, s.q_len - m0 - 16 * warp, lane, 32);
}

// ------------------------------------------------------------------------------------------------------ launchers
constexpr const char* kOp = "rope_attention (CUDA)";

[[noreturn]] void bad(const std::string& name, const std::string& problem) {
  throw std::invalid_argument(name + ": " + problem);
}

void expect_shape(const TensorView& t, const char* name, std::initializer_list<int64_t> shape) {
  if (t.data == 0) bad(name, "missing");
  if (t.shape.size() != shape.size() || t.strides.size() != shape.size()) {
    bad(name, "expected " + std::to_string(shape.size()) + " dims, got " + std::to_string(t.shape.size()));
  }
  int i = 0;
  for (int64_t want : shape) {
    if (t.shape[i] != want) {
      bad(name, "dim " + std::to_string(i) + " is " + std::to_string(t.shape[i]) + ", expected " +
                    std::to_string(want));
    }
    ++i;
  }
}

// A [B, S, H, D] tile operand: head dim contiguous, rows 16-byte aligned (cp.async and the 16-byte stores need it).
const void* tile_operand(const TensorView& t, const char* name, int64_t (&stride)[3]) {
  if (t.strides[3] != 1) bad(name, "the head dimension must be contiguous (stride 1)");
  if (t.data % 16 != 0) bad(name, "the data pointer must be 16-byte aligned");
  for (int i = 0; i < 3; ++i) {
    if (t.strides[i] % 8 != 0) bad(name, "strides must be multiples of 8 elements (16-byte aligned rows)");
    stride[i] = t.strides[i];
  }
  return reinterpret_cast<const void*>(t.data);
}

void copy_strides(const TensorView& t, int64_t (&stride)[3]) {
  for (int i = 0; i < 3; ++i) stride[i] = t.strides[i];
}

// Validate the arguments and fill Params (everything but the backward-only fields when !backward).
Params prepare(const AttentionArgs& a, bool backward) {
  if (a.dtype != DType::kFloat16 && a.dtype != DType::kBFloat16) bad("dtype", "the CUDA kernels take float16/bfloat16");
  if (a.q.shape.size() != 4) bad("q", "expected [B, Sq, Hq, D]");
  if (a.k.shape.size() != 4) bad("k", "expected [B, Sk, Hk, D]");
  const int64_t batch = a.q.shape[0], seq_q = a.q.shape[1], q_heads = a.q.shape[2], head_dim = a.q.shape[3];
  const int64_t seq_k = a.k.shape[1], k_heads = a.k.shape[2];
  if (head_dim != 64 && head_dim != 128) bad("q", "head_dim must be 64 or 128, got " + std::to_string(head_dim));
  if (k_heads <= 0 || q_heads % k_heads) bad("k", "q heads must be a multiple of k heads");
  expect_shape(a.q, "q", {batch, seq_q, q_heads, head_dim});
  expect_shape(a.k, "k", {batch, seq_k, k_heads, head_dim});
  expect_shape(a.v, "v", {batch, seq_k, k_heads, head_dim});
  expect_shape(a.out, "out", {batch, seq_q, q_heads, head_dim});
  expect_shape(a.lse, "lse", {batch, seq_q, q_heads});
  expect_shape(a.positions, "positions", {batch, seq_q});
  if (a.inv_freq.data == 0 || a.inv_freq.shape.size() != 1) bad("inv_freq", "expected [rotary_dim / 2]");
  const int64_t rotary_dim = 2 * a.inv_freq.shape[0];
  if (rotary_dim > head_dim) bad("inv_freq", "rotary_dim exceeds head_dim");
  const bool packed = a.cu_seqlens.data != 0;
  if (packed != (a.cu_seqlens_k.data != 0)) bad("cu_seqlens_k", "give cu_seqlens and cu_seqlens_k together");
  if (packed) {
    if (batch != 1) bad("cu_seqlens", "packed sequences need B == 1");
    if (a.cu_seqlens.shape.size() != 1 || a.cu_seqlens.shape[0] < 1) bad("cu_seqlens", "expected [N + 1]");
    if (a.cu_seqlens_k.shape != a.cu_seqlens.shape) bad("cu_seqlens_k", "expected the shape of cu_seqlens");
  } else if (seq_k < seq_q) {
    bad("k", "needs at least as many keys as queries (Sk " + std::to_string(seq_k) + " < Sq " +
                 std::to_string(seq_q) + ")");
  }
  if (a.max_seqlen_q < 0 || a.max_seqlen_q > seq_q) bad("max_seqlen_q", "must lie in [0, Sq]");
  if (a.max_seqlen_k < 0 || a.max_seqlen_k > seq_k) bad("max_seqlen_k", "must lie in [0, Sk]");
  if (std::max(a.max_seqlen_q, a.max_seqlen_k) > 65535 * kBlockM) {
    bad("q", "sequences longer than 4M tokens are not supported");
  }

  Params p{};
  p.q = tile_operand(a.q, "q", p.q_stride);
  p.k = tile_operand(a.k, "k", p.k_stride);
  p.v = tile_operand(a.v, "v", p.v_stride);
  p.out = const_cast<void*>(tile_operand(a.out, "out", p.out_stride));
  p.lse = reinterpret_cast<float*>(a.lse.data);
  copy_strides(a.lse, p.lse_stride);
  p.positions = reinterpret_cast<const void*>(a.positions.data);
  p.positions_stride[0] = a.positions.strides[0];
  p.positions_stride[1] = a.positions.strides[1];
  p.positions_int64 = a.positions_int64;
  p.inv_freq = reinterpret_cast<const float*>(a.inv_freq.data);
  p.cu_seqlens_q = reinterpret_cast<const int*>(a.cu_seqlens.data);
  p.cu_seqlens_k = reinterpret_cast<const int*>(a.cu_seqlens_k.data);
  p.seq_q = static_cast<int>(seq_q);
  p.seq_k = static_cast<int>(seq_k);
  p.q_heads = static_cast<int>(q_heads);
  p.k_heads = static_cast<int>(k_heads);
  p.group = static_cast<int>(q_heads / k_heads);
  p.rotary_dim = static_cast<int>(rotary_dim);
  p.scaling = a.scaling;
  p.softmax_scale = a.softmax_scale;
  p.scale_log2 = a.softmax_scale * 1.4426950408889634f;
  p.causal = a.causal;
  p.interleaved = a.interleaved;
  p.exact = a.exact;
  p.rotate = a.rotate;
  if (backward) {
    expect_shape(a.grad_out, "grad_out", {batch, seq_q, q_heads, head_dim});
    expect_shape(a.delta, "delta", {batch, seq_q, q_heads});
    expect_shape(a.grad_q, "grad_q", {batch, seq_q, q_heads, head_dim});
    expect_shape(a.grad_k, "grad_k", {batch, seq_k, k_heads, head_dim});
    expect_shape(a.grad_v, "grad_v", {batch, seq_k, k_heads, head_dim});
    p.grad_out = tile_operand(a.grad_out, "grad_out", p.grad_out_stride);
    p.grad_q = const_cast<void*>(tile_operand(a.grad_q, "grad_q", p.grad_q_stride));
    p.grad_k = const_cast<void*>(tile_operand(a.grad_k, "grad_k", p.grad_k_stride));
    p.grad_v = const_cast<void*>(tile_operand(a.grad_v, "grad_v", p.grad_v_stride));
    p.delta = reinterpret_cast<const float*>(a.delta.data);
    copy_strides(a.delta, p.delta_stride);
  }
  return p;
}

// Launch `kernel` with `shared` bytes of dynamic shared memory, opting in above the 48 KB default.
void launch(void (*kernel)(Params), const Params& p, dim3 grid, int shared, int device, cudaStream_t stream,
            const char* what) {
  int limit = 0;
  check_cuda(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), kOp,
             "reading the shared-memory limit");
  if (shared > limit) {
    throw std::invalid_argument(std::string("q: the CUDA ") + what + " kernel needs " + std::to_string(shared) +
                                " bytes of shared memory for this head_dim, the GPU allows " + std::to_string(limit) +
                                "; use backend='triton'");
  }
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared), kOp,
             "cudaFuncSetAttribute");
  kernel<<<grid, kThreads, shared, stream>>>(p);
  check_cuda(cudaGetLastError(), kOp, what);
}

// Call f(T{}, std::integral_constant<int, D>{}) with the compile-time element type and head dim.
template <typename F>
void dispatch(DType dtype, int head_dim, F&& f) {
  auto with_dim = [&](auto type) {
    head_dim == 64 ? f(type, std::integral_constant<int, 64>{}) : f(type, std::integral_constant<int, 128>{});
  };
  dtype == DType::kFloat16 ? with_dim(Half{}) : with_dim(BFloat16{});
}

int sequences(const AttentionArgs& a) {
  return a.cu_seqlens.data != 0 ? static_cast<int>(a.cu_seqlens.shape[0] - 1) : static_cast<int>(a.q.shape[0]);
}

// Row blocks covering `rows` (grid y: up to 65535 blocks of kBlockM rows).
unsigned row_blocks(int rows) { return static_cast<unsigned>((rows + kBlockM - 1) / kBlockM); }

}  // namespace
}  // namespace attention

void rope_attention_forward_cuda(const AttentionArgs& args) {
  using namespace attention;
  const Params p = prepare(args, false);
  const int n_seqs = sequences(args);
  if (args.max_seqlen_q == 0 || n_seqs == 0) return;
  DeviceGuard guard(args.device);
  const dim3 grid(n_seqs * p.q_heads, row_blocks(args.max_seqlen_q));  // (sequence, head) pairs on x
  const auto stream = reinterpret_cast<cudaStream_t>(args.stream);
  dispatch(args.dtype, static_cast<int>(args.q.shape[3]), [&](auto type, auto dim) {
    using T = decltype(type);
    constexpr int D = decltype(dim)::value;
    launch(forward_kernel<T, D>, p, grid, Tiles<D>::Forward::kBytes, args.device, stream, "forward");
  });
}

void rope_attention_backward_cuda(const AttentionArgs& args) {
  using namespace attention;
  const Params p = prepare(args, true);
  const int n_seqs = sequences(args);
  if (n_seqs == 0) return;
  DeviceGuard guard(args.device);
  const auto stream = reinterpret_cast<cudaStream_t>(args.stream);
  dispatch(args.dtype, static_cast<int>(args.q.shape[3]), [&](auto type, auto dim) {
    using T = decltype(type);
    constexpr int D = decltype(dim)::value;
    // Every key block runs, also one that no query sees: it writes its zero gradients.
    if (args.max_seqlen_k > 0) {
      launch(dkdv_kernel<T, D>, p, dim3(n_seqs * p.k_heads, row_blocks(args.max_seqlen_k)), Tiles<D>::Dkv::kBytes,
             args.device, stream, "dK/dV");
    }
    if (args.max_seqlen_q > 0) {
      launch(dq_kernel<T, D>, p, dim3(n_seqs * p.q_heads, row_blocks(args.max_seqlen_q)), Tiles<D>::Dq::kBytes,
             args.device, stream, "dQ");
    }
  });
}

}  // namespace ctxext
