// Per-head attribution at selected (token, latent) pairs (docs/architecture.md#attribution): for SAEs on concatenated attention heads,
// out[n, j, h] = (x[n] - b_dec)_h . W_enc[h-block, indices[n, j]], which sums over heads to the pre-activation
// minus b_enc. N*m*d_in multiply-adds, the cost of one decoder pass, instead of n_heads dense GEMMs.
//
// One block per token, one warp per selected latent at a time; the warp walks the heads in order, its lanes
// splitting a head's d_head columns, and reduces each head with a butterfly sum (deterministic). Lanes idle when
// d_head < 32 (MiniLM's 32 and GPT-2's 64 keep them busy).
#include "common.cuh"
#include "fusedsae.h"

namespace fusedsae {
namespace {

constexpr int kHeadThreads = 256;

template <typename T, typename IdxT>
__global__ void __launch_bounds__(kHeadThreads)
    head_partial_sums_kernel(T* __restrict__ out, const T* __restrict__ x, int64_t x_stride, const T* __restrict__ sub,
                             const IdxT* __restrict__ indices, int64_t indices_stride, const T* __restrict__ table,
                             int64_t s_lat, int64_t s_feat, int64_t m, int64_t n_heads, int64_t d_head) {
  const int64_t n = blockIdx.x;
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const T* x_row = x + n * x_stride;
  for (int64_t j = warp; j < m; j += kHeadThreads / kWarp) {
    const T* w = table + static_cast<int64_t>(indices[n * indices_stride + j]) * s_lat;
    T* o = out + (n * m + j) * n_heads;
    for (int64_t h = 0; h < n_heads; ++h) {
      const int64_t end = (h + 1) * d_head;
      float acc = 0.f;
      for (int64_t c = h * d_head + lane; c < end; c += kWarp) {
        const float centred = to_float(x_row[c]) - (sub != nullptr ? to_float(sub[c]) : 0.f);
        acc = fmaf(centred, to_float(w[c * s_feat]), acc);
      }
      acc = warp_sum(acc);
      if (lane == 0) o[h] = from_float<T>(acc);
    }
  }
}

}  // namespace

template <typename T, typename IdxT>
cudaError_t head_partial_sums(T* out, const T* x, int64_t x_stride, const T* sub, const IdxT* indices,
                              int64_t indices_stride, const T* table, int64_t table_stride_latent,
                              int64_t table_stride_feature, int64_t n_rows, int64_t m, int64_t n_heads,
                              int64_t d_head, cudaStream_t stream) {
  if (n_rows < 0 || m < 0 || n_heads < 1 || d_head < 0 || n_rows > kMaxGridX) return cudaErrorInvalidValue;
  if (n_rows == 0 || m == 0) return cudaSuccess;
  head_partial_sums_kernel<T, IdxT><<<static_cast<unsigned>(n_rows), kHeadThreads, 0, stream>>>(
      out, x, x_stride, sub, indices, indices_stride, table, table_stride_latent, table_stride_feature, m, n_heads,
      d_head);
  return cudaGetLastError();
}

#define FUSEDSAE_INSTANTIATE_HEADS(T, IdxT)                                                                         \
  template cudaError_t head_partial_sums<T, IdxT>(T*, const T*, int64_t, const T*, const IdxT*, int64_t, const T*, \
                                                  int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, cudaStream_t);

FUSEDSAE_INSTANTIATE_HEADS(float, int32_t)
FUSEDSAE_INSTANTIATE_HEADS(float, int64_t)
FUSEDSAE_INSTANTIATE_HEADS(__nv_bfloat16, int32_t)
FUSEDSAE_INSTANTIATE_HEADS(__nv_bfloat16, int64_t)
FUSEDSAE_INSTANTIATE_HEADS(__half, int32_t)
FUSEDSAE_INSTANTIATE_HEADS(__half, int64_t)

}  // namespace fusedsae
