// The host build of the CUDA kernel (backend "cpu"): the same per-token table and per-item work as
// rope_kernels.cu, run one after the other on CPU pointers, so CI checks the kernel's arithmetic without a GPU.
#include <vector>

#include "rope.h"

namespace ctxext {

void rope_host(const RopeArgs& args) {
  const RopeLaunch launch = prepare_rope(args);
  const RopeParams& p = launch.params;
  std::vector<CosSin> table(p.rotary_dim / 2);
  dispatch_rope(args.dtype, args.interleaved, launch.vectorized, [&](auto type, auto interleaved, auto vectorized) {
    using T = typename decltype(type)::type;
    constexpr bool kInterleaved = decltype(interleaved)::value, kVectorized = decltype(vectorized)::value;
    for (int64_t token = 0; token < launch.tokens; ++token) {
      const TokenOffsets offsets = token_offsets(p, token);
      fill_cos_sin<T, kInterleaved, kVectorized>(p, offsets.position, 0, 1, table.data());
      for (int item = 0; item < launch.items_per_token; ++item) {
        process_item<T, kInterleaved, kVectorized>(p, offsets, item, table.data());
      }
    }
  });
}

}  // namespace ctxext
