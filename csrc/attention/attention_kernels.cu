// Fused RoPE + FlashAttention-2 kernels (forward, dK/dV, dQ) on tensor cores, and their launchers.
//
// Kept deliberately simple: 128 threads (4 warps) per block, 64-row tiles staged in shared memory, tensor-core products
// through WMMA 16x16x16 fragments (mma.sync with ldmatrix-style fragment loads on sm_80+). Each warp owns 16 rows of
// every row-indexed tile (scores, probabilities, accumulators), so the softmax and the accumulator rescaling of those
// rows need only __syncwarp; only the shared K/V (or Q/dO) tiles need block barriers. Accumulators live in fp32
// shared memory; no pipelining. Rotation happens when a Q or K tile is staged: every (row, pair) item computes its
// cos/sin with rope_cos_sin of the shared math header, rotates in fp32 and rounds once to the element type.
//
// Backward follows FlashAttention-2: one kernel per K/V block accumulates dK and dV over every Q block of the kv
// head's GQA group (no atomics), a second kernel per Q block accumulates dQ; both recompute P from the saved lse.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "attention/attention.h"
#include "cuda_check.h"
#include "ctxext/rope_math.h"

namespace ctxext {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockRows = 16 * kWarps;  // rows of a Q tile (forward, dQ) or K tile (dK/dV): 16 per warp
constexpr int kBlockCols = 64;           // K rows per step (forward, dQ)
constexpr int kBwdQRows = 32;            // Q rows per step of the dK/dV kernel (keeps it within sm_80's 163 KB)
// Row padding in elements: rows shift by 16 bytes across banks, and every 16-row fragment start stays 32-byte aligned
// as WMMA requires.
constexpr int kPadHalf = 8;
constexpr int kPadFloat = 4;

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
  int64_t grad_q_stride[3], grad_k_stride[3], grad_v_stride[3], lse_stride[2], delta_stride[2];
  const void* positions;
  int64_t positions_stride[2];
  bool positions_int64;
  const float* inv_freq;
  const int* cu_seqlens;  // null: B sequences of length seq
  int seq, q_heads, k_heads, group, rotary_dim;
  float scaling, softmax_scale, qk_scale_log2;  // qk_scale_log2 = softmax_scale * log2(e): softmax in base 2
  bool causal, interleaved, exact, rotate;
};

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

// The sequence a block works on: tensor batch index, its first token, its length.
struct Sequence {
  int64_t batch;
  int64_t start;
  int length;
};

__device__ __forceinline__ Sequence sequence_of(const Params& p, int index) {
  if (p.cu_seqlens == nullptr) return Sequence{index, 0, p.seq};
  const int start = p.cu_seqlens[index];
  return Sequence{0, start, p.cu_seqlens[index + 1] - start};
}

__device__ __forceinline__ int64_t position_of(const Params& p, const Sequence& s, int row) {
  const int64_t offset = s.batch * p.positions_stride[0] + (s.start + row) * p.positions_stride[1];
  return p.positions_int64 ? static_cast<const int64_t*>(p.positions)[offset]
                           : static_cast<const int32_t*>(p.positions)[offset];
}

__device__ __forceinline__ CosSin cos_sin_of(const Params& p, const Sequence& s, int row, int pair, bool conjugate) {
  if (!p.rotate) return CosSin{1.0f, 0.0f};
  return rope_cos_sin(position_of(p, s, row), p.inv_freq[pair], p.scaling, p.exact, conjugate);
}

// Address of row `row` of the sequence in head `head` of a [B, S, H, D] tensor.
template <typename T>
__device__ __forceinline__ T* row_ptr(const void* base, const int64_t* stride, const Sequence& s, int row, int head) {
  return const_cast<T*>(static_cast<const T*>(base)) + s.batch * stride[0] + (s.start + row) * stride[1] +
         head * stride[2];
}

// Stage rows [row0, row0 + rows) of one head into `tile` ([rows][ld]), rotated by each row's angle when `rotated`;
// rows past the sequence end are zero. Pairs of the rotary dims are items (consecutive threads read consecutive
// pairs of a row); dims past rotary_dim are copied.
template <typename T, int D>
__device__ void stage_tile(T* tile, int ld, const void* base, const int64_t* stride, const Params& p,
                           const Sequence& s, int head, int row0, int rows, bool rotated) {
  const int pairs = rotated ? p.rotary_dim / 2 : 0;
  const int first_plain = 2 * pairs;
  for (int item = threadIdx.x; item < rows * (D / 2); item += kThreads) {
    const int r = item / (D / 2), i = item % (D / 2);
    const int row = row0 + r;
    T* dst = tile + r * ld;
    if (row >= s.length) {
      dst[2 * i] = dst[2 * i + 1] = from_f32<T>(0.0f);
      continue;
    }
    const T* src = row_ptr<T>(base, stride, s, row, head);
    if (i < pairs) {
      int first, second;
      pair_offsets(i, p.rotary_dim, p.interleaved, &first, &second);
      float y1, y2;
      rotate_pair(to_f32(src[first]), to_f32(src[second]), cos_sin_of(p, s, row, i, false), &y1, &y2);
      dst[first] = from_f32<T>(y1);  // rounded once, as a separate RoPE pass would store it
      dst[second] = from_f32<T>(y2);
    } else {
      // The (D - 2 * pairs) unrotated dims, two per item.
      const int col = first_plain + 2 * (i - pairs);
      dst[col] = src[col];
      dst[col + 1] = src[col + 1];
    }
  }
}

// Store rows [row0, row0 + rows) of the fp32 accumulator `acc` ([rows][ld]) times factor * row_factor[r] (when given)
// into one head of a [B, S, H, D] tensor; `unrotate`: rotate the rotary dims back by the negative angle (the gradient
// of the unrotated input is R^T times the gradient of the rotated one).
template <typename T, int D>
__device__ void store_tile(void* base, const int64_t* stride, const float* acc, int ld, const Params& p,
                           const Sequence& s, int head, int row0, int rows, float factor, const float* row_factor,
                           bool unrotate) {
  const int pairs = unrotate ? p.rotary_dim / 2 : 0;
  const int first_plain = 2 * pairs;
  for (int item = threadIdx.x; item < rows * (D / 2); item += kThreads) {
    const int r = item / (D / 2), i = item % (D / 2);
    const int row = row0 + r;
    if (row >= s.length) continue;
    const float f = row_factor != nullptr ? factor * row_factor[r] : factor;
    const float* src = acc + r * ld;
    T* dst = row_ptr<T>(base, stride, s, row, head);
    if (i < pairs) {
      int first, second;
      pair_offsets(i, p.rotary_dim, p.interleaved, &first, &second);
      float y1, y2;
      rotate_pair(src[first] * f, src[second] * f, cos_sin_of(p, s, row, i, true), &y1, &y2);
      dst[first] = from_f32<T>(y1);
      dst[second] = from_f32<T>(y2);
    } else {
      const int col = first_plain + 2 * (i - pairs);
      dst[col] = from_f32<T>(src[col] * f);
      dst[col + 1] = from_f32<T>(src[col + 1] * f);
    }
  }
}

// One warp: acc[16 x N] (fp32, row-major, ld_acc) = (kAccumulate ? acc : 0) + A[16 x K] * B, where A is row-major T
// and B is [K x N] row-major, or, kBTransposed, given as its transpose [N x K] row-major (a column-major operand).
template <typename T, int K, int N, bool kBTransposed, bool kAccumulate>
__device__ void warp_gemm(float* acc, int ld_acc, const T* a, int lda, const T* b, int ldb) {
  using BLayout = typename std::conditional<kBTransposed, wmma::col_major, wmma::row_major>::type;
#pragma unroll 1
  for (int n = 0; n < N; n += 16) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
    if (kAccumulate) {
      wmma::load_matrix_sync(c, acc + n, ld_acc, wmma::mem_row_major);
    } else {
      wmma::fill_fragment(c, 0.0f);
    }
#pragma unroll
    for (int k = 0; k < K; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> fb;
      wmma::load_matrix_sync(fa, a + k, lda);
      wmma::load_matrix_sync(fb, kBTransposed ? b + n * ldb + k : b + k * ldb + n, ldb);
      wmma::mma_sync(c, fa, fb, c);
    }
    wmma::store_matrix_sync(acc + n, c, ld_acc, wmma::mem_row_major);
  }
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Whether query row q_row may attend to key row k_row (token order, inside one sequence).
__device__ __forceinline__ bool attends(const Params& p, const Sequence& s, int q_row, int k_row) {
  return q_row < s.length && k_row < s.length && (!p.causal || k_row <= q_row);
}

// Bump allocator over dynamic shared memory; every buffer starts 128-byte aligned (WMMA needs 32).
struct SharedArena {
  unsigned char* next;
  template <typename U>
  __device__ U* take(int count) {
    U* result = reinterpret_cast<U*>(next);
    next += (static_cast<size_t>(count) * sizeof(U) + 127) / 128 * 128;
    return result;
  }
};

template <typename U>
constexpr size_t arena_bytes(int count) {
  return (static_cast<size_t>(count) * sizeof(U) + 127) / 128 * 128;
}

// ------------------------------------------------------------------------------------------------------ forward
template <int D>
constexpr size_t forward_shared_bytes() {
  return 3 * arena_bytes<__half>(kBlockRows * (D + kPadHalf)) + arena_bytes<float>(kBlockRows * (kBlockCols + kPadFloat)) +
         arena_bytes<__half>(kBlockRows * (kBlockCols + kPadHalf)) + arena_bytes<float>(kBlockRows * (D + kPadFloat)) +
         2 * arena_bytes<float>(kBlockRows);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) forward_kernel(const Params p) {
  constexpr int ld = D + kPadHalf, ld_s = kBlockCols + kPadFloat, ld_p = kBlockCols + kPadHalf, ld_o = D + kPadFloat;
  const Sequence s = sequence_of(p, blockIdx.x / p.q_heads);
  const int head = blockIdx.x % p.q_heads, kv_head = head / p.group;
  const int m0 = blockIdx.y * kBlockRows;
  if (m0 >= s.length) return;
  extern __shared__ __align__(128) unsigned char shared[];
  SharedArena arena{shared};
  T* q_tile = arena.take<T>(kBlockRows * ld);
  T* k_tile = arena.take<T>(kBlockCols * ld);
  T* v_tile = arena.take<T>(kBlockCols * ld);
  float* scores = arena.take<float>(kBlockRows * ld_s);
  T* probs = arena.take<T>(kBlockRows * ld_p);
  float* acc = arena.take<float>(kBlockRows * ld_o);
  float* row_max = arena.take<float>(kBlockRows);
  float* row_sum = arena.take<float>(kBlockRows);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wr = 16 * warp;  // this warp's first row
  stage_tile<T, D>(q_tile, ld, p.q, p.q_stride, p, s, head, m0, kBlockRows, true);
  for (int i = threadIdx.x; i < kBlockRows * ld_o; i += kThreads) acc[i] = 0.0f;
  for (int i = threadIdx.x; i < kBlockRows; i += kThreads) {
    row_max[i] = -INFINITY;
    row_sum[i] = 0.0f;
  }

  const int end = p.causal ? min(s.length, m0 + kBlockRows) : s.length;
  for (int n0 = 0; n0 < end; n0 += kBlockCols) {
    __syncthreads();  // every warp is done with the previous K/V tiles (and the Q tile is staged)
    stage_tile<T, D>(k_tile, ld, p.k, p.k_stride, p, s, kv_head, n0, kBlockCols, true);
    stage_tile<T, D>(v_tile, ld, p.v, p.v_stride, p, s, kv_head, n0, kBlockCols, false);
    __syncthreads();
    warp_gemm<T, D, kBlockCols, true, false>(scores + wr * ld_s, ld_s, q_tile + wr * ld, ld, k_tile, ld);
    __syncwarp();
    // Online softmax of this warp's 16 rows: each lane takes two columns of a row.
    for (int r = wr; r < wr + 16; ++r) {
      float x[2];
      for (int j = 0; j < 2; ++j) {
        const int c = lane + 32 * j;
        x[j] = attends(p, s, m0 + r, n0 + c) ? scores[r * ld_s + c] * p.qk_scale_log2 : -INFINITY;
      }
      const float m_old = row_max[r];
      const float m_new = fmaxf(m_old, warp_max(fmaxf(x[0], x[1])));
      const float m_safe = m_new == -INFINITY ? 0.0f : m_new;  // a row that sees nothing yet stays all zero
      const float p0 = exp2f(x[0] - m_safe), p1 = exp2f(x[1] - m_safe);
      probs[r * ld_p + lane] = from_f32<T>(p0);
      probs[r * ld_p + lane + 32] = from_f32<T>(p1);
      const float alpha = exp2f(m_old - m_safe);
      const float total = warp_sum(p0 + p1);
      for (int c = lane; c < D; c += 32) acc[r * ld_o + c] *= alpha;
      __syncwarp();  // every lane has read row_max[r] before it changes
      if (lane == 0) {
        row_sum[r] = row_sum[r] * alpha + total;
        row_max[r] = m_new;
      }
    }
    __syncwarp();
    warp_gemm<T, kBlockCols, D, false, true>(acc + wr * ld_o, ld_o, probs + wr * ld_p, ld_p, v_tile, ld);
  }
  __syncthreads();
  // row_sum becomes 1 / l (0 rows: padding past the sequence end, never stored), and the lse is written.
  for (int r = threadIdx.x; r < kBlockRows; r += kThreads) {
    const float l = row_sum[r] == 0.0f ? 1.0f : row_sum[r];
    if (m0 + r < s.length) {
      p.lse[s.batch * p.lse_stride[0] + (s.start + m0 + r) * p.lse_stride[1] + head] = row_max[r] + log2f(l);
    }
    row_sum[r] = 1.0f / l;
  }
  __syncthreads();
  store_tile<T, D>(p.out, p.out_stride, acc, ld_o, p, s, head, m0, kBlockRows, 1.0f, row_sum, false);
}

// ------------------------------------------------------------------------------------------------------ backward
// Loads lse and delta of rows [row0, row0 + rows) of one head (zero past the sequence end: those rows are masked).
__device__ void stage_row_stats(float* lse, float* delta, const Params& p, const Sequence& s, int head, int row0,
                                int rows) {
  for (int r = threadIdx.x; r < rows; r += kThreads) {
    const bool inside = row0 + r < s.length;
    const int64_t token = s.start + row0 + r;
    lse[r] = inside ? p.lse[s.batch * p.lse_stride[0] + token * p.lse_stride[1] + head] : 0.0f;
    delta[r] = inside ? p.delta[s.batch * p.delta_stride[0] + token * p.delta_stride[1] + head] : 0.0f;
  }
}

template <int D>
constexpr size_t dkdv_shared_bytes() {
  return 2 * arena_bytes<__half>(kBlockRows * (D + kPadHalf)) + 2 * arena_bytes<__half>(kBwdQRows * (D + kPadHalf)) +
         2 * arena_bytes<float>(kBlockRows * (kBwdQRows + kPadFloat)) +
         arena_bytes<__half>(kBlockRows * (kBwdQRows + kPadHalf)) + 2 * arena_bytes<float>(kBlockRows * (D + kPadFloat)) +
         2 * arena_bytes<float>(kBwdQRows);
}

// dK and dV of one 64-row K/V block of one kv head, summed over the q heads of its group. Everything is transposed
// (rows = keys): S^T = K Q^T, dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(const Params p) {
  constexpr int ld = D + kPadHalf, ld_s = kBwdQRows + kPadFloat, ld_p = kBwdQRows + kPadHalf, ld_a = D + kPadFloat;
  const Sequence s = sequence_of(p, blockIdx.x / p.k_heads);
  const int kv_head = blockIdx.x % p.k_heads;
  const int n0 = blockIdx.y * kBlockRows;
  if (n0 >= s.length) return;
  extern __shared__ __align__(128) unsigned char shared[];
  SharedArena arena{shared};
  T* k_tile = arena.take<T>(kBlockRows * ld);
  T* v_tile = arena.take<T>(kBlockRows * ld);
  T* q_tile = arena.take<T>(kBwdQRows * ld);
  T* do_tile = arena.take<T>(kBwdQRows * ld);
  float* scores_t = arena.take<float>(kBlockRows * ld_s);  // S^T, then P^T in fp32
  float* dprobs_t = arena.take<float>(kBlockRows * ld_s);
  T* probs_t = arena.take<T>(kBlockRows * ld_p);  // P^T, then dS^T, in T for the tensor cores
  float* grad_k = arena.take<float>(kBlockRows * ld_a);
  float* grad_v = arena.take<float>(kBlockRows * ld_a);
  float* lse = arena.take<float>(kBwdQRows);
  float* delta = arena.take<float>(kBwdQRows);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wr = 16 * warp;
  stage_tile<T, D>(k_tile, ld, p.k, p.k_stride, p, s, kv_head, n0, kBlockRows, true);
  stage_tile<T, D>(v_tile, ld, p.v, p.v_stride, p, s, kv_head, n0, kBlockRows, false);
  for (int i = threadIdx.x; i < kBlockRows * ld_a; i += kThreads) grad_k[i] = grad_v[i] = 0.0f;

  const int m_start = p.causal ? n0 : 0;  // earlier queries see none of these keys
  for (int g = 0; g < p.group; ++g) {
    const int head = kv_head * p.group + g;
    for (int m0 = m_start; m0 < s.length; m0 += kBwdQRows) {
      __syncthreads();  // every warp is done with the previous Q/dO tiles
      stage_tile<T, D>(q_tile, ld, p.q, p.q_stride, p, s, head, m0, kBwdQRows, true);
      stage_tile<T, D>(do_tile, ld, p.grad_out, p.grad_out_stride, p, s, head, m0, kBwdQRows, false);
      stage_row_stats(lse, delta, p, s, head, m0, kBwdQRows);
      __syncthreads();
      warp_gemm<T, D, kBwdQRows, true, false>(scores_t + wr * ld_s, ld_s, k_tile + wr * ld, ld, q_tile, ld);
      __syncwarp();
      for (int i = lane; i < 16 * kBwdQRows; i += 32) {
        const int r = wr + i / kBwdQRows, c = i % kBwdQRows;
        const float prob =
            attends(p, s, m0 + c, n0 + r) ? exp2f(scores_t[r * ld_s + c] * p.qk_scale_log2 - lse[c]) : 0.0f;
        scores_t[r * ld_s + c] = prob;
        probs_t[r * ld_p + c] = from_f32<T>(prob);
      }
      __syncwarp();
      warp_gemm<T, kBwdQRows, D, false, true>(grad_v + wr * ld_a, ld_a, probs_t + wr * ld_p, ld_p, do_tile, ld);
      warp_gemm<T, D, kBwdQRows, true, false>(dprobs_t + wr * ld_s, ld_s, v_tile + wr * ld, ld, do_tile, ld);
      __syncwarp();  // the dV product has read P^T before dS^T replaces it
      for (int i = lane; i < 16 * kBwdQRows; i += 32) {
        const int r = wr + i / kBwdQRows, c = i % kBwdQRows;
        probs_t[r * ld_p + c] = from_f32<T>(scores_t[r * ld_s + c] * (dprobs_t[r * ld_s + c] - delta[c]));
      }
      __syncwarp();
      warp_gemm<T, kBwdQRows, D, false, true>(grad_k + wr * ld_a, ld_a, probs_t + wr * ld_p, ld_p, q_tile, ld);
    }
  }
  __syncthreads();
  store_tile<T, D>(p.grad_k, p.grad_k_stride, grad_k, ld_a, p, s, kv_head, n0, kBlockRows, p.softmax_scale, nullptr,
                   true);
  store_tile<T, D>(p.grad_v, p.grad_v_stride, grad_v, ld_a, p, s, kv_head, n0, kBlockRows, 1.0f, nullptr, false);
}

template <int D>
constexpr size_t dq_shared_bytes() {
  return 4 * arena_bytes<__half>(kBlockRows * (D + kPadHalf)) +
         2 * arena_bytes<float>(kBlockRows * (kBlockCols + kPadFloat)) +
         arena_bytes<__half>(kBlockRows * (kBlockCols + kPadHalf)) + arena_bytes<float>(kBlockRows * (D + kPadFloat)) +
         2 * arena_bytes<float>(kBlockRows);
}

// dQ of one 64-row Q block of one q head: S = Q K^T, dP = dO V^T, dS = P (dP - delta), dQ += dS K.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) dq_kernel(const Params p) {
  constexpr int ld = D + kPadHalf, ld_s = kBlockCols + kPadFloat, ld_p = kBlockCols + kPadHalf, ld_a = D + kPadFloat;
  const Sequence s = sequence_of(p, blockIdx.x / p.q_heads);
  const int head = blockIdx.x % p.q_heads, kv_head = head / p.group;
  const int m0 = blockIdx.y * kBlockRows;
  if (m0 >= s.length) return;
  extern __shared__ __align__(128) unsigned char shared[];
  SharedArena arena{shared};
  T* q_tile = arena.take<T>(kBlockRows * ld);
  T* do_tile = arena.take<T>(kBlockRows * ld);
  T* k_tile = arena.take<T>(kBlockCols * ld);
  T* v_tile = arena.take<T>(kBlockCols * ld);
  float* scores = arena.take<float>(kBlockRows * ld_s);
  float* dprobs = arena.take<float>(kBlockRows * ld_s);
  T* dscores = arena.take<T>(kBlockRows * ld_p);
  float* grad_q = arena.take<float>(kBlockRows * ld_a);
  float* lse = arena.take<float>(kBlockRows);
  float* delta = arena.take<float>(kBlockRows);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wr = 16 * warp;
  stage_tile<T, D>(q_tile, ld, p.q, p.q_stride, p, s, head, m0, kBlockRows, true);
  stage_tile<T, D>(do_tile, ld, p.grad_out, p.grad_out_stride, p, s, head, m0, kBlockRows, false);
  stage_row_stats(lse, delta, p, s, head, m0, kBlockRows);
  for (int i = threadIdx.x; i < kBlockRows * ld_a; i += kThreads) grad_q[i] = 0.0f;

  const int end = p.causal ? min(s.length, m0 + kBlockRows) : s.length;
  for (int n0 = 0; n0 < end; n0 += kBlockCols) {
    __syncthreads();
    stage_tile<T, D>(k_tile, ld, p.k, p.k_stride, p, s, kv_head, n0, kBlockCols, true);
    stage_tile<T, D>(v_tile, ld, p.v, p.v_stride, p, s, kv_head, n0, kBlockCols, false);
    __syncthreads();
    warp_gemm<T, D, kBlockCols, true, false>(scores + wr * ld_s, ld_s, q_tile + wr * ld, ld, k_tile, ld);
    warp_gemm<T, D, kBlockCols, true, false>(dprobs + wr * ld_s, ld_s, do_tile + wr * ld, ld, v_tile, ld);
    __syncwarp();
    for (int i = lane; i < 16 * kBlockCols; i += 32) {
      const int r = wr + i / kBlockCols, c = i % kBlockCols;
      const float prob =
          attends(p, s, m0 + r, n0 + c) ? exp2f(scores[r * ld_s + c] * p.qk_scale_log2 - lse[r]) : 0.0f;
      dscores[r * ld_p + c] = from_f32<T>(prob * (dprobs[r * ld_s + c] - delta[r]));
    }
    __syncwarp();
    warp_gemm<T, kBlockCols, D, false, true>(grad_q + wr * ld_a, ld_a, dscores + wr * ld_p, ld_p, k_tile, ld);
  }
  __syncthreads();
  store_tile<T, D>(p.grad_q, p.grad_q_stride, grad_q, ld_a, p, s, head, m0, kBlockRows, p.softmax_scale, nullptr,
                   true);
}

// ------------------------------------------------------------------------------------------------------ launchers
constexpr const char* kOp = "rope_attention (CUDA)";

[[noreturn]] void bad(const std::string& name, const std::string& problem) {
  throw std::invalid_argument(name + ": " + problem);
}

void copy_strides(const TensorView& t, int dims, int64_t* out) {
  for (int i = 0; i < dims; ++i) out[i] = t.strides[i];
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

// Validate the arguments and fill Params (everything but the backward-only fields when !backward).
Params prepare(const AttentionArgs& a, bool backward) {
  if (a.dtype != DType::kFloat16 && a.dtype != DType::kBFloat16) bad("dtype", "the CUDA kernels take float16/bfloat16");
  if (a.q.shape.size() != 4) bad("q", "expected [B, S, Hq, D]");
  const int64_t batch = a.q.shape[0], seq = a.q.shape[1], q_heads = a.q.shape[2], head_dim = a.q.shape[3];
  if (a.k.shape.size() != 4) bad("k", "expected [B, S, Hk, D]");
  const int64_t k_heads = a.k.shape[2];
  if (head_dim != 64 && head_dim != 128) bad("q", "head_dim must be 64 or 128, got " + std::to_string(head_dim));
  if (k_heads <= 0 || q_heads % k_heads) bad("k", "q heads must be a multiple of k heads");
  expect_shape(a.q, "q", {batch, seq, q_heads, head_dim});
  expect_shape(a.k, "k", {batch, seq, k_heads, head_dim});
  expect_shape(a.v, "v", {batch, seq, k_heads, head_dim});
  expect_shape(a.out, "out", {batch, seq, q_heads, head_dim});
  expect_shape(a.lse, "lse", {batch, seq, q_heads});
  expect_shape(a.positions, "positions", {batch, seq});
  for (const auto* t : {&a.q, &a.k, &a.v, &a.out}) {
    if (t->strides[3] != 1) bad("q/k/v/out", "the head dimension must be contiguous");
  }
  if (a.lse.strides[2] != 1) bad("lse", "the head dimension must be contiguous");
  if (a.inv_freq.data == 0 || a.inv_freq.shape.size() != 1) bad("inv_freq", "expected [rotary_dim / 2]");
  const int64_t rotary_dim = 2 * a.inv_freq.shape[0];
  if (rotary_dim > head_dim) bad("inv_freq", "rotary_dim exceeds head_dim");
  if (a.cu_seqlens.data != 0 && batch != 1) bad("cu_seqlens", "packed sequences need B == 1");
  if (a.max_seqlen < 0 || a.max_seqlen > seq) bad("max_seqlen", "must lie in [0, S]");
  if (a.max_seqlen > 65535 * kBlockRows) bad("q", "sequences longer than 4M tokens are not supported");

  Params p{};
  p.q = reinterpret_cast<const void*>(a.q.data);
  p.k = reinterpret_cast<const void*>(a.k.data);
  p.v = reinterpret_cast<const void*>(a.v.data);
  p.out = reinterpret_cast<void*>(a.out.data);
  p.lse = reinterpret_cast<float*>(a.lse.data);
  copy_strides(a.q, 3, p.q_stride);
  copy_strides(a.k, 3, p.k_stride);
  copy_strides(a.v, 3, p.v_stride);
  copy_strides(a.out, 3, p.out_stride);
  copy_strides(a.lse, 2, p.lse_stride);
  p.positions = reinterpret_cast<const void*>(a.positions.data);
  copy_strides(a.positions, 2, p.positions_stride);
  p.positions_int64 = a.positions_int64;
  p.inv_freq = reinterpret_cast<const float*>(a.inv_freq.data);
  p.cu_seqlens = reinterpret_cast<const int*>(a.cu_seqlens.data);
  p.seq = static_cast<int>(seq);
  p.q_heads = static_cast<int>(q_heads);
  p.k_heads = static_cast<int>(k_heads);
  p.group = static_cast<int>(q_heads / k_heads);
  p.rotary_dim = static_cast<int>(rotary_dim);
  p.scaling = a.scaling;
  p.softmax_scale = a.softmax_scale;
  p.qk_scale_log2 = a.softmax_scale * 1.4426950408889634f;
  p.causal = a.causal;
  p.interleaved = a.interleaved;
  p.exact = a.exact;
  p.rotate = a.rotate;
  if (backward) {
    expect_shape(a.grad_out, "grad_out", {batch, seq, q_heads, head_dim});
    expect_shape(a.delta, "delta", {batch, seq, q_heads});
    expect_shape(a.grad_q, "grad_q", {batch, seq, q_heads, head_dim});
    expect_shape(a.grad_k, "grad_k", {batch, seq, k_heads, head_dim});
    expect_shape(a.grad_v, "grad_v", {batch, seq, k_heads, head_dim});
    for (const auto* t : {&a.grad_out, &a.grad_q, &a.grad_k, &a.grad_v}) {
      if (t->strides[3] != 1) bad("grad_out/grad_q/grad_k/grad_v", "the head dimension must be contiguous");
    }
    if (a.delta.strides[2] != 1) bad("delta", "the head dimension must be contiguous");
    p.grad_out = reinterpret_cast<const void*>(a.grad_out.data);
    p.delta = reinterpret_cast<const float*>(a.delta.data);
    p.grad_q = reinterpret_cast<void*>(a.grad_q.data);
    p.grad_k = reinterpret_cast<void*>(a.grad_k.data);
    p.grad_v = reinterpret_cast<void*>(a.grad_v.data);
    copy_strides(a.grad_out, 3, p.grad_out_stride);
    copy_strides(a.delta, 2, p.delta_stride);
    copy_strides(a.grad_q, 3, p.grad_q_stride);
    copy_strides(a.grad_k, 3, p.grad_k_stride);
    copy_strides(a.grad_v, 3, p.grad_v_stride);
  }
  return p;
}

// Launch `kernel` with `shared` bytes of dynamic shared memory, opting in above the 48 KB default.
void launch(void (*kernel)(Params), const Params& p, dim3 grid, size_t shared, int device, cudaStream_t stream,
            const char* what) {
  int limit = 0;
  check_cuda(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), kOp,
             "reading the shared-memory limit");
  if (shared > static_cast<size_t>(limit)) {
    throw std::invalid_argument(std::string("q: the CUDA ") + what + " kernel needs " + std::to_string(shared) +
                                " bytes of shared memory for this head_dim, the GPU allows " + std::to_string(limit) +
                                "; use backend='triton'");
  }
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)),
             kOp, "cudaFuncSetAttribute");
  kernel<<<grid, kThreads, shared, stream>>>(p);
  check_cuda(cudaGetLastError(), kOp, what);
}

// Call f(T{}, std::integral_constant<int, D>{}) with the compile-time element type and head dim.
template <typename F>
void dispatch(DType dtype, int head_dim, F&& f) {
  auto with_dim = [&](auto type) {
    head_dim == 64 ? f(type, std::integral_constant<int, 64>{}) : f(type, std::integral_constant<int, 128>{});
  };
  dtype == DType::kFloat16 ? with_dim(__half{}) : with_dim(__nv_bfloat16{});
}

int sequences(const AttentionArgs& a) {
  return a.cu_seqlens.data != 0 ? static_cast<int>(a.cu_seqlens.shape.at(0) - 1) : static_cast<int>(a.q.shape[0]);
}

}  // namespace

void rope_attention_forward_cuda(const AttentionArgs& args) {
  const Params p = prepare(args, false);
  const int n_seqs = sequences(args);
  if (args.max_seqlen == 0 || n_seqs == 0) return;
  DeviceGuard guard(args.device);
  // (sequence, head) pairs on x (up to 2^31 - 1), row tiles on y (up to 65535 tiles of 64 rows: 4M tokens)
  const dim3 grid(n_seqs * p.q_heads, (args.max_seqlen + kBlockRows - 1) / kBlockRows);
  const auto stream = reinterpret_cast<cudaStream_t>(args.stream);
  dispatch(args.dtype, static_cast<int>(args.q.shape[3]), [&](auto type, auto dim) {
    using T = decltype(type);
    constexpr int D = decltype(dim)::value;
    launch(forward_kernel<T, D>, p, grid, forward_shared_bytes<D>(), args.device, stream, "forward");
  });
}

void rope_attention_backward_cuda(const AttentionArgs& args) {
  const Params p = prepare(args, true);
  const int n_seqs = sequences(args);
  if (args.max_seqlen == 0 || n_seqs == 0) return;
  DeviceGuard guard(args.device);
  const int blocks = (args.max_seqlen + kBlockRows - 1) / kBlockRows;
  const auto stream = reinterpret_cast<cudaStream_t>(args.stream);
  dispatch(args.dtype, static_cast<int>(args.q.shape[3]), [&](auto type, auto dim) {
    using T = decltype(type);
    constexpr int D = decltype(dim)::value;
    launch(dkdv_kernel<T, D>, p, dim3(n_seqs * p.k_heads, blocks), dkdv_shared_bytes<D>(), args.device, stream,
           "dK/dV");
    launch(dq_kernel<T, D>, p, dim3(n_seqs * p.q_heads, blocks), dq_shared_bytes<D>(), args.device, stream, "dQ");
  });
}

}  // namespace ctxext
