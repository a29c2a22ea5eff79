// Warp-level tensor-core building blocks of the fused attention kernels (sm_80+), in hand-written PTX:
//   cp.async.cg (16-byte global -> shared copies that bypass registers, zero-filling rows past the sequence end),
//   ldmatrix.x4 (.trans) (four 8x8 blocks of 16-bit elements from shared memory into mma fragments), and
//   mma.sync.m16n8k16 (fp16/bf16 inputs, fp32 accumulators kept in registers).
//
// Shared tiles are row-major [rows][D + 8] of 16-bit elements: the 16 bytes of padding shift consecutive rows by 4
// banks, so the 8 row addresses of every ldmatrix phase and every 16-byte cp.async hit distinct banks (no swizzle).
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"; lane = 4 * group + quad):
//   A 16x16: a[0] = (row group, cols 2*quad, +1), a[1] = row group + 8, a[2] = cols + 8, a[3] = both + 8.
//   B 16x8:  b[0] = (depth 2*quad, +1; col group), b[1] = depth + 8.
//   C 16x8:  c[0], c[1] = (row group, cols 2*quad, +1), c[2], c[3] = row group + 8.
// C of two adjacent 8-column blocks is exactly A of one 16-deep chunk, so a product's output (P, dS) feeds the next
// product straight from registers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "ctxext/dtype.h"
#include "ctxext/rope_tile.h"  // Pack

namespace ctxext {
namespace attention {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;

// Elements per shared tile row for head dim D (see the padding note above).
template <int D>
constexpr int tile_ld() {
  return D + 8;
}

// The 32-bit shared-window address that ldmatrix and cp.async take.
__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// ------------------------------------------------------------------------------------------------------ cp.async
// Copy 16 bytes global -> shared without waiting; valid=false writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void copy_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}

// The same for one 4-byte value (row statistics).
__device__ __forceinline__ void copy_async_4(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0));
}

// Close the group of copies issued so far by this thread.
__device__ __forceinline__ void commit_copies() { asm volatile("cp.async.commit_group;\n" ::); }

// Wait until at most kPending of this thread's groups are in flight (a __syncthreads must follow before other threads
// read the data).
template <int kPending>
__device__ __forceinline__ void wait_copies() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Start copying `rows` rows of D 16-bit elements (row stride `stride` elements, 16-byte aligned) into a shared tile
// [rows][D + 8]; rows >= valid are zero-filled. All threads of the block take part.
template <int D>
__device__ __forceinline__ void load_rows_async(uint32_t tile, const void* src, int64_t stride, int rows, int valid) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  const auto* base = static_cast<const uint16_t*>(src);
  for (int c = threadIdx.x; c < rows * kChunks; c += kThreads) {
    const int r = c / kChunks, col = c % kChunks * 8;
    const bool inside = r < valid;
    copy_async_16(tile + 2 * (r * tile_ld<D>() + col), inside ? base + r * stride + col : base, inside);
  }
}

// Start copying `rows` fp32 values (stride `stride` elements) into shared memory; values >= valid are zero.
__device__ __forceinline__ void load_values_async(uint32_t dst, const float* src, int64_t stride, int rows,
                                                  int valid) {
  for (int r = threadIdx.x; r < rows; r += kThreads) {
    copy_async_4(dst + 4 * r, r < valid ? src + r * stride : src, r < valid);
  }
}

// ------------------------------------------------------------------------------------------------------ ldmatrix
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// A fragment of the 16x16 block at (row0, col0) of a shared tile: lanes 0-15 address rows row0.. at col0, lanes 16-31
// the same rows at col0 + 8 (blocks a[0..3] in the order of the layout above).
__device__ __forceinline__ void load_a(uint32_t (&a)[4], uint32_t tile, int ld, int row0, int col0) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4(a, tile + 2 * ((row0 + lane % 16) * ld + col0 + lane / 16 * 8));
}

// B fragments of the two 8-column blocks n0.. and n0 + 8.. at depth k0..k0+15: b[0], b[1] for n0, b[2], b[3] for
// n0 + 8.
// kRowsAreDepth=false: the tile stores B transposed, one row per output column ([n][k]: K for Q K^T);
// kRowsAreDepth=true: one row per depth index ([k][n]: V for P V), transposed on the way by ldmatrix.trans.
template <bool kRowsAreDepth>
__device__ __forceinline__ void load_b(uint32_t (&b)[4], uint32_t tile, int ld, int n0, int k0) {
  const int lane = threadIdx.x % 32, eighth = lane % 8, second_half = lane / 16, odd_eighth = lane / 8 % 2;
  if constexpr (kRowsAreDepth) {
    ldmatrix_x4_trans(b, tile + 2 * ((k0 + eighth + 8 * odd_eighth) * ld + n0 + 8 * second_half));
  } else {
    ldmatrix_x4(b, tile + 2 * ((n0 + eighth + 8 * second_half) * ld + k0 + 8 * odd_eighth));
  }
}

// ------------------------------------------------------------------------------------------------------ mma.sync
#define CTXEXT_MMA_16816(TYPE)                                                                                    \
  asm("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, " \
      "{%0, %1, %2, %3};\n"                                                                                        \
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                                             \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))

// c (16x8, fp32) += a (16x16) * b (16x8), inputs of element type T (Half or BFloat16).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same_v<T, Half> || std::is_same_v<T, BFloat16>, "mma takes fp16 or bf16");
  if constexpr (std::is_same_v<T, Half>) {
    CTXEXT_MMA_16816("f16");
  } else {
    CTXEXT_MMA_16816("bf16");
  }
}
#undef CTXEXT_MMA_16816

// Two fp32 values rounded to T and packed into one 32-bit register (lo in the low half: the smaller column index).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t bits;
  if constexpr (std::is_same_v<T, Half>) {
    const __half2 pair = __floats2half2_rn(lo, hi);
    std::memcpy(&bits, &pair, sizeof bits);
  } else {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
    std::memcpy(&bits, &pair, sizeof bits);
  }
  return bits;
}

// acc (16 x N) += a (16 x 16) times the 16 x N block of B at depth k0 of a shared tile (see load_b).
template <typename T, int N, bool kRowsAreDepth>
__device__ __forceinline__ void mma_chunk(float (&acc)[N / 8][4], const uint32_t (&a)[4], uint32_t b_tile, int ld,
                                          int k0) {
#pragma unroll
  for (int n = 0; n < N; n += 16) {
    uint32_t b[4];
    load_b<kRowsAreDepth>(b, b_tile, ld, n, k0);
    mma_16816<T>(acc[n / 8], a, b[0], b[1]);
    mma_16816<T>(acc[n / 8 + 1], a, b[2], b[3]);
  }
}

// One warp: acc (16 x N) += A B, A = rows a_row0..a_row0+15, cols 0..K-1 of a shared tile, B from a shared tile.
template <typename T, int K, int N, bool kRowsAreDepth>
__device__ __forceinline__ void mma_shared_a(float (&acc)[N / 8][4], uint32_t a_tile, int a_row0, uint32_t b_tile,
                                             int ld) {
#pragma unroll
  for (int k = 0; k < K; k += 16) {
    uint32_t a[4];
    load_a(a, a_tile, ld, a_row0, k);
    mma_chunk<T, N, kRowsAreDepth>(acc, a, b_tile, ld, k);
  }
}

// One warp: acc (16 x N) += A B with A (16 x K) the fp32 C fragments of an earlier product, rounded to T here.
template <typename T, int K, int N, bool kRowsAreDepth>
__device__ __forceinline__ void mma_register_a(float (&acc)[N / 8][4], const float (&a)[K / 8][4], uint32_t b_tile,
                                               int ld) {
#pragma unroll
  for (int k = 0; k < K; k += 16) {
    const float(&lo)[4] = a[k / 8];
    const float(&hi)[4] = a[k / 8 + 1];
    const uint32_t frag[4] = {pack2<T>(lo[0], lo[1]), pack2<T>(lo[2], lo[3]), pack2<T>(hi[0], hi[1]),
                              pack2<T>(hi[2], hi[3])};
    mma_chunk<T, N, kRowsAreDepth>(acc, frag, b_tile, ld, k);
  }
}

// ------------------------------------------------------------------------------------------------------ epilogue
// One warp: write its C fragments acc (16 x N) into rows row0..row0+15 of a shared tile of E (T or fp32, row stride
// ld), the thread's first row times factor0 and its second (8 below) times factor1.
template <typename E, int N>
__device__ __forceinline__ void store_fragments(E* tile, int ld, int row0, const float (&acc)[N / 8][4], float factor0,
                                                float factor1) {
  const int lane = threadIdx.x % 32;
  E* first = tile + (row0 + lane / 4) * ld + 2 * (lane % 4);
  E* second = first + 8 * ld;
#pragma unroll
  for (int nb = 0; nb < N / 8; ++nb) {
    *reinterpret_cast<Pack<2, E>*>(first + 8 * nb) =
        Pack<2, E>{{from_float<E>(acc[nb][0] * factor0), from_float<E>(acc[nb][1] * factor0)}};
    *reinterpret_cast<Pack<2, E>*>(second + 8 * nb) =
        Pack<2, E>{{from_float<E>(acc[nb][2] * factor1), from_float<E>(acc[nb][3] * factor1)}};
  }
}

// Store `rows` rows of a shared tile of E ([rows][D + 8]) as T into global rows (stride `stride`, 16-byte aligned),
// 16 bytes per store; rows >= valid are skipped. Work items begin, begin + step, ... (a warp: lane, 32).
template <typename T, typename E, int D>
__device__ __forceinline__ void store_rows(void* dst, int64_t stride, const E* tile, int rows, int valid, int begin,
                                           int step) {
  constexpr int kChunks = D / 8;
  for (int c = begin; c < rows * kChunks; c += step) {
    const int r = c / kChunks, col = c % kChunks * 8;
    if (r >= valid) continue;
    const auto& in = *reinterpret_cast<const Pack<8, E>*>(tile + r * tile_ld<D>() + col);
    Pack<8, T> out;
    if constexpr (std::is_same_v<E, T>) {
      out = in;
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) out.v[j] = from_float<T>(in.v[j]);
    }
    *reinterpret_cast<Pack<8, T>*>(static_cast<T*>(dst) + r * stride + col) = out;
  }
}

}  // namespace attention
}  // namespace ctxext
