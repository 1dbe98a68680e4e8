// The sparse decoder: x_hat = sum_j values[:, j] * W_dec[indices[:, j]] + b_dec (gather_rows), and its backward:
// d_values = (grad_out @ W_dec^T) at the active entries (gather_dot) and dW_dec per latent (segment_sum_rows).
// All three are bandwidth-bound gathers at about 1 multiply-add per element loaded (docs/architecture.md#sparse-gathers).
#include <algorithm>

#include "common.cuh"
#include "fusedsae.h"
#include "segment_sum.cuh"

namespace fusedsae {
namespace {

constexpr int kGatherMaxThreads = 256;
constexpr int kDotThreads = 256;  // 8 warps per token, one (token, slot) pair per warp at a time

// One block row per token: grid (n_rows, column blocks); each thread owns VEC consecutive columns and walks the
// token's m slots in order, so the sum is deterministic. The slots' values and indices are the same address for
// every thread of the block (broadcast loads).
template <typename T, typename IdxT, int VEC>
__global__ void __launch_bounds__(kGatherMaxThreads)
    gather_rows_kernel(T* __restrict__ out, int64_t out_stride, const T* __restrict__ values, int64_t values_stride,
                       const IdxT* __restrict__ indices, int64_t indices_stride, const T* __restrict__ table,
                       int64_t s_lat, int64_t s_feat, const T* __restrict__ bias, int64_t m, int64_t d) {
  const int64_t n = blockIdx.x;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (c >= d) return;
  const T* v_row = values + n * values_stride;
  const IdxT* i_row = indices + n * indices_stride;
  float acc[VEC];
#pragma unroll
  for (int u = 0; u < VEC; ++u) acc[u] = 0.f;
#pragma unroll 4
  for (int64_t j = 0; j < m; ++j) {
    const float v = to_float(v_row[j]);
    if (v == 0.f) continue;
    const T* w = table + static_cast<int64_t>(i_row[j]) * s_lat + c * s_feat;
    float r[VEC];
    load_floats<T, VEC>(w, r);
#pragma unroll
    for (int u = 0; u < VEC; ++u) acc[u] = fmaf(v, r[u], acc[u]);
  }
  if (bias != nullptr) {
    float b[VEC];
    load_floats<T, VEC>(bias + c, b);
#pragma unroll
    for (int u = 0; u < VEC; ++u) acc[u] += b[u];
  }
  store_floats<T, VEC>(out + n * out_stride + c, acc);
}

template <typename T, typename IdxT, int VEC>
cudaError_t launch_gather_rows(T* out, int64_t out_stride, const T* values, int64_t values_stride,
                               const IdxT* indices, int64_t indices_stride, const T* table, int64_t s_lat,
                               int64_t s_feat, const T* bias, int64_t n_rows, int64_t m, int64_t d,
                               cudaStream_t stream) {
  const int64_t vectors = ceil_div(d, VEC);
  // Just enough warps to cover a row (768 bf16 columns: 96 threads), at most 256 per block.
  const int64_t threads = std::min<int64_t>(kGatherMaxThreads, ceil_div(vectors, kWarp) * kWarp);
  const int64_t grid_y = ceil_div(vectors, threads);
  if (n_rows > kMaxGridX || grid_y > kMaxGridY) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(n_rows), static_cast<unsigned>(grid_y));
  gather_rows_kernel<T, IdxT, VEC><<<grid, static_cast<unsigned>(threads), 0, stream>>>(
      out, out_stride, values, values_stride, indices, indices_stride, table, s_lat, s_feat, bias, m, d);
  return cudaGetLastError();
}

template <typename T, typename IdxT, int VEC>
__global__ void __launch_bounds__(kDotThreads)
    gather_dot_kernel(T* __restrict__ out, int64_t out_stride, const T* __restrict__ vectors, int64_t vectors_stride,
                      const IdxT* __restrict__ indices, int64_t indices_stride, const T* __restrict__ table,
                      int64_t s_lat, int64_t s_feat, int64_t m, int64_t d) {
  const int64_t n = blockIdx.x;
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const T* g = vectors + n * vectors_stride;
  for (int64_t j = warp; j < m; j += kDotThreads / kWarp) {
    const T* w = table + static_cast<int64_t>(indices[n * indices_stride + j]) * s_lat;
    float acc = 0.f;
    for (int64_t c = static_cast<int64_t>(lane) * VEC; c < d; c += kWarp * VEC) {
      float a[VEC], b[VEC];
      load_floats<T, VEC>(w + c * s_feat, a);
      load_floats<T, VEC>(g + c, b);
#pragma unroll
      for (int u = 0; u < VEC; ++u) acc = fmaf(a[u], b[u], acc);
    }
    acc = warp_sum(acc);
    if (lane == 0) out[n * out_stride + j] = from_float<T>(acc);
  }
}

template <typename T, typename IdxT, int VEC>
cudaError_t launch_gather_dot(T* out, int64_t out_stride, const T* vectors, int64_t vectors_stride,
                              const IdxT* indices, int64_t indices_stride, const T* table, int64_t s_lat,
                              int64_t s_feat, int64_t n_rows, int64_t m, int64_t d, cudaStream_t stream) {
  if (n_rows > kMaxGridX) return cudaErrorInvalidValue;
  gather_dot_kernel<T, IdxT, VEC><<<static_cast<unsigned>(n_rows), kDotThreads, 0, stream>>>(
      out, out_stride, vectors, vectors_stride, indices, indices_stride, table, s_lat, s_feat, m, d);
  return cudaGetLastError();
}

}  // namespace

template <typename T, typename IdxT>
cudaError_t gather_rows(T* out, int64_t out_stride, const T* values, int64_t values_stride, const IdxT* indices,
                        int64_t indices_stride, const T* table, int64_t table_stride_latent,
                        int64_t table_stride_feature, const T* bias, int64_t n_rows, int64_t m, int64_t d,
                        cudaStream_t stream) {
  if (n_rows < 0 || m < 0 || d < 0) return cudaErrorInvalidValue;
  if (n_rows == 0 || d == 0) return cudaSuccess;
  const bool vec = table_stride_feature == 1 && rows_vectorizable(table, table_stride_latent, d) &&
                   rows_vectorizable(out, out_stride, d) && (bias == nullptr || aligned16(bias));
  if (vec) {
    return launch_gather_rows<T, IdxT, kVec<T>>(out, out_stride, values, values_stride, indices, indices_stride,
                                                 table, table_stride_latent, 1, bias, n_rows, m, d, stream);
  }
  return launch_gather_rows<T, IdxT, 1>(out, out_stride, values, values_stride, indices, indices_stride, table,
                                        table_stride_latent, table_stride_feature, bias, n_rows, m, d, stream);
}

template <typename T, typename IdxT>
cudaError_t gather_dot(T* out, int64_t out_stride, const T* vectors, int64_t vectors_stride, const IdxT* indices,
                       int64_t indices_stride, const T* table, int64_t table_stride_latent,
                       int64_t table_stride_feature, int64_t n_rows, int64_t m, int64_t d, cudaStream_t stream) {
  if (n_rows < 0 || m < 0 || d < 0) return cudaErrorInvalidValue;
  if (n_rows == 0 || m == 0) return cudaSuccess;
  const bool vec = table_stride_feature == 1 && rows_vectorizable(table, table_stride_latent, d) &&
                   rows_vectorizable(vectors, vectors_stride, d);
  if (vec) {
    return launch_gather_dot<T, IdxT, kVec<T>>(out, out_stride, vectors, vectors_stride, indices, indices_stride,
                                                table, table_stride_latent, 1, n_rows, m, d, stream);
  }
  return launch_gather_dot<T, IdxT, 1>(out, out_stride, vectors, vectors_stride, indices, indices_stride, table,
                                       table_stride_latent, table_stride_feature, n_rows, m, d, stream);
}

template <typename T>
cudaError_t segment_sum_rows(T* out, const Segments& segments, const T* weights, int64_t weights_stride, int64_t m,
                             const T* src, int64_t src_stride, int64_t n_latents, int64_t d, cudaStream_t stream) {
  if (d == 0) return cudaSuccess;  // nothing to write: no column sums, no weight sums
  return launch_segment_sum<T, false>(out, nullptr, segments, weights, weights_stride, m, src, src_stride, nullptr,
                                      n_latents, d, stream);
}

cudaError_t probe_kernel_image() {
  cudaFuncAttributes attributes;
  return cudaFuncGetAttributes(&attributes, gather_rows_kernel<float, int64_t, 1>);
}

#define FUSEDSAE_INSTANTIATE_DECODE(T, IdxT)                                                                      \
  template cudaError_t gather_rows<T, IdxT>(T*, int64_t, const T*, int64_t, const IdxT*, int64_t, const T*,      \
                                            int64_t, int64_t, const T*, int64_t, int64_t, int64_t, cudaStream_t); \
  template cudaError_t gather_dot<T, IdxT>(T*, int64_t, const T*, int64_t, const IdxT*, int64_t, const T*,       \
                                           int64_t, int64_t, int64_t, int64_t, int64_t, cudaStream_t);

#define FUSEDSAE_INSTANTIATE_SEGMENT_ROWS(T)                                                                 \
  template cudaError_t segment_sum_rows<T>(T*, const Segments&, const T*, int64_t, int64_t, const T*, int64_t, \
                                           int64_t, int64_t, cudaStream_t);

FUSEDSAE_INSTANTIATE_DECODE(float, int32_t)
FUSEDSAE_INSTANTIATE_DECODE(float, int64_t)
FUSEDSAE_INSTANTIATE_DECODE(__nv_bfloat16, int32_t)
FUSEDSAE_INSTANTIATE_DECODE(__nv_bfloat16, int64_t)
FUSEDSAE_INSTANTIATE_DECODE(__half, int32_t)
FUSEDSAE_INSTANTIATE_DECODE(__half, int64_t)
FUSEDSAE_INSTANTIATE_SEGMENT_ROWS(float)
FUSEDSAE_INSTANTIATE_SEGMENT_ROWS(__nv_bfloat16)
FUSEDSAE_INSTANTIATE_SEGMENT_ROWS(__half)

}  // namespace fusedsae
