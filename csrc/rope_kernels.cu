// The CUDA RoPE kernel and its launcher.
//
// RoPE is pure bandwidth: each element is read once and written once, with a few flops. One block takes a tile of
// consecutive tokens: its threads first compute the tile's cos/sin table (once per token and pair, the only
// transcendental work) into shared memory, then sweep every (token, head, chunk) item of q and then k, reusing the
// table across all heads. Consecutive threads take consecutive chunks of a head row, so a warp reads and writes whole
// rows with 16-byte accesses where the rows are aligned.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "cuda_check.h"
#include "rope.h"

namespace ctxext {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kItemsPerThread = 4;     // enough bytes in flight per thread to hide memory latency
constexpr int kBlocksPerSm = 4;        // keep at least this many tiles per SM before making tiles larger
constexpr int kMaxTokensPerBlock = 64;  // bounds the per-token offsets in shared memory
constexpr int kTableBytes = kMaxRotaryDim / 2 * static_cast<int>(sizeof(CosSin));

// Shared memory of a tile: per-token offsets, then the cos/sin table [tokens][rotary_dim / 2] (ordered by table_index).
size_t shared_bytes(int64_t tokens_per_block, int pairs) {
  return tokens_per_block * (sizeof(TokenOffsets) + pairs * sizeof(CosSin));
}

template <typename T, bool kInterleaved, bool kVectorized>
__global__ void __launch_bounds__(kMaxThreads) rope_kernel(const RopeParams p, int64_t tokens, int tokens_per_block,
                                                           int items_per_token) {
  extern __shared__ __align__(16) unsigned char shared[];
  TokenOffsets* offsets = reinterpret_cast<TokenOffsets*>(shared);
  CosSin* table = reinterpret_cast<CosSin*>(offsets + tokens_per_block);
  const int pairs = p.rotary_dim / 2;
  const int64_t first_token = static_cast<int64_t>(blockIdx.x) * tokens_per_block;
  const int tile_tokens = static_cast<int>(min(static_cast<int64_t>(tokens_per_block), tokens - first_token));

  for (int t = threadIdx.x; t < tile_tokens; t += blockDim.x) offsets[t] = token_offsets(p, first_token + t);
  __syncthreads();
  for (int i = threadIdx.x; i < tile_tokens * pairs; i += blockDim.x) {
    const int t = i / pairs, pair = i - t * pairs;
    fill_cos_sin<T, kInterleaved, kVectorized>(p, offsets[t].position, pair, pairs, table + t * pairs);
  }
  __syncthreads();

  for (int i = threadIdx.x; i < tile_tokens * items_per_token; i += blockDim.x) {
    const int t = i / items_per_token;
    process_item<T, kInterleaved, kVectorized>(p, offsets[t], i - t * items_per_token, table + t * pairs);
  }
}

int sm_count(int device) {
  int count = 0;
  check_cuda(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), "rope_cuda",
             "reading the SM count");
  return count;
}

}  // namespace

void rope_cuda(const RopeArgs& args) {
  const RopeLaunch launch = prepare_rope(args);
  if (launch.tokens == 0 || launch.items_per_token == 0) return;
  DeviceGuard guard(args.device);
  const int pairs = launch.params.rotary_dim / 2;

  // Tokens per tile: ~kItemsPerThread items per thread, but small enough to give every SM kBlocksPerSm tiles, and
  // within the shared-memory budget (kMaxRotaryDim guarantees that one token fits).
  int64_t tokens_per_block = (kMaxThreads * kItemsPerThread + launch.items_per_token - 1) / launch.items_per_token;
  const int64_t tiles_wanted = static_cast<int64_t>(sm_count(args.device)) * kBlocksPerSm;
  tokens_per_block = std::min(tokens_per_block, (launch.tokens + tiles_wanted - 1) / tiles_wanted);
  const int64_t table_tokens = kTableBytes / (pairs * int64_t{sizeof(CosSin)});
  tokens_per_block = std::min<int64_t>({tokens_per_block, kMaxTokensPerBlock, table_tokens});
  tokens_per_block = std::max<int64_t>(tokens_per_block, 1);
  const int64_t blocks = (launch.tokens + tokens_per_block - 1) / tokens_per_block;
  // Small launches (decode) get a smaller block so that no warp idles through the table phase and the sweep.
  const int64_t tile_items = std::max<int64_t>(tokens_per_block * launch.items_per_token, tokens_per_block * pairs);
  const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, (tile_items + 31) / 32 * 32));
  if (blocks > INT32_MAX) throw std::invalid_argument("q: too many tokens for one launch");

  cudaStream_t stream = reinterpret_cast<cudaStream_t>(args.stream);
  dispatch_rope(args.dtype, args.interleaved, launch.vectorized, [&](auto type, auto interleaved, auto vectorized) {
    using T = typename decltype(type)::type;
    constexpr bool kInterleaved = decltype(interleaved)::value, kVectorized = decltype(vectorized)::value;
    const size_t shared = shared_bytes(tokens_per_block, pairs);
    rope_kernel<T, kInterleaved, kVectorized><<<static_cast<unsigned>(blocks), threads, shared, stream>>>(
        launch.params, launch.tokens, static_cast<int>(tokens_per_block), launch.items_per_token);
  });
  check_cuda(cudaGetLastError(), "rope_cuda", "launching the RoPE kernel");
}

}  // namespace ctxext
