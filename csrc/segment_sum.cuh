// The segmented sum behind dW_dec (sparse_decode.cu) and dW_enc / db_enc (sparse_encode_backward.cu); see
// segment_sum_rows / segment_sum_columns in fusedsae.h for the contract.
//
// Work is cut by entries, not by latents, so that a hot latent (one firing on every token: 16384 entries at the
// reference shapes, against about 16 for a typical latent) costs what the same entries spread over many latents
// cost. Phase 1: one block per kSegmentChunk consecutive entries of the latent-sorted list and kSegBlockCols
// columns; each warp owns 64 columns (two per lane) and walks the chunk in order, so each latent's run within the
// chunk is summed in entry order. A run whose latent lies wholly inside the chunk is complete and is stored; the
// run of a latent that crosses the chunk's start goes to part[chunk][0], that of one that starts inside and crosses
// its end to part[chunk][1] (float). Phase 2: one warp per latent adds the pieces of every crossing latent in chunk
// order, part[c0][1] + part[c0 + 1][0] + ... + part[c1][0], and zeroes latents with no entry. Fixed orders
// throughout, no atomics: bitwise reproducible. A hot latent's combine is one load per 64 entries.
#pragma once

#include "common.cuh"
#include "fusedsae.h"

namespace fusedsae {

constexpr int kSegCols = 2 * kWarp;  // columns per warp
constexpr int kSegWarps = 4;
constexpr int kSegThreads = kSegWarps * kWarp;
constexpr int kSegBlockCols = kSegWarps * kSegCols;

template <typename T, bool TRANSPOSE>
__device__ __forceinline__ void store_sum(T* out, int64_t i, int64_t c, int64_t n_latents, int64_t d, float v) {
  if constexpr (TRANSPOSE) {
    out[c * n_latents + i] = from_float<T>(v);
  } else {
    out[i * d + c] = from_float<T>(v);
  }
}

template <typename T, bool TRANSPOSE>
__global__ void __launch_bounds__(kSegThreads)
    segment_chunk_kernel(T* __restrict__ out, T* __restrict__ out_sum, Segments seg, const T* __restrict__ weights,
                         int64_t weights_stride, int64_t m, const T* __restrict__ src, int64_t src_stride,
                         const T* __restrict__ sub, int64_t n_latents, int64_t d) {
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t chunk = blockIdx.x;
  const int64_t base = chunk * kSegmentChunk;
  const int64_t end = base + kSegmentChunk < seg.n_entries ? base + kSegmentChunk : seg.n_entries;
  const int64_t ca = static_cast<int64_t>(blockIdx.y) * kSegBlockCols + warp * kSegCols + lane;
  const int64_t cb = ca + kWarp;
  const bool has_a = ca < d;
  const bool has_b = cb < d;
  const bool writes_sums = out_sum != nullptr && blockIdx.y == 0 && warp == 0 && lane == 0;
  if (!has_a && !writes_sums) return;
  const float sub_a = (sub != nullptr && has_a) ? to_float(sub[ca]) : 0.f;
  const float sub_b = (sub != nullptr && has_b) ? to_float(sub[cb]) : 0.f;
  float acc_a = 0.f, acc_b = 0.f, weight_sum = 0.f;
  for (int64_t e = base; e < end; ++e) {
    const int32_t latent = seg.keys[e];
    const int64_t p = seg.order[e];
    const int64_t n = p / m;
    const float w = to_float(weights[n * weights_stride + (p - n * m)]);
    if (w != 0.f) {  // BatchTopK padding and AuxK fillers: no row load (and 0 x Inf stays 0)
      const T* row = src + n * src_stride;
      if (has_a) acc_a = fmaf(w, to_float(row[ca]) - sub_a, acc_a);
      if (has_b) acc_b = fmaf(w, to_float(row[cb]) - sub_b, acc_b);
    }
    weight_sum += w;
    if (e + 1 < end && seg.keys[e + 1] == latent) continue;
    // the run of `latent` in this chunk ends here
    const int64_t lo = seg.offsets[latent];
    const int64_t hi = seg.offsets[latent + 1];
    if (lo >= base && hi <= base + kSegmentChunk) {
      if (has_a) store_sum<T, TRANSPOSE>(out, latent, ca, n_latents, d, acc_a);
      if (has_b) store_sum<T, TRANSPOSE>(out, latent, cb, n_latents, d, acc_b);
      if (writes_sums) out_sum[latent] = from_float<T>(weight_sum);
    } else {
      const int64_t slot = chunk * 2 + (lo < base ? 0 : 1);
      if (has_a) seg.part[slot * d + ca] = acc_a;
      if (has_b) seg.part[slot * d + cb] = acc_b;
      if (writes_sums) seg.part_sum[slot] = weight_sum;
    }
    acc_a = acc_b = weight_sum = 0.f;
  }
}

template <typename T, bool TRANSPOSE>
__global__ void __launch_bounds__(kSegThreads)
    segment_combine_kernel(T* __restrict__ out, T* __restrict__ out_sum, Segments seg, int64_t n_latents, int64_t d) {
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kSegWarps + warp;
  if (i >= n_latents) return;
  const int64_t ca = static_cast<int64_t>(blockIdx.y) * kSegCols + lane;
  const int64_t cb = ca + kWarp;
  const bool has_a = ca < d;
  const bool has_b = cb < d;
  const bool writes_sums = out_sum != nullptr && blockIdx.y == 0 && lane == 0;
  const int64_t lo = seg.offsets[i];
  const int64_t hi = seg.offsets[i + 1];
  float acc_a = 0.f, acc_b = 0.f, weight_sum = 0.f;
  if (hi > lo) {
    const int64_t c0 = lo / kSegmentChunk;
    const int64_t c1 = (hi - 1) / kSegmentChunk;
    if (c0 == c1) return;  // complete inside one chunk: stored by phase 1
    if (has_a) acc_a = seg.part[(c0 * 2 + 1) * d + ca];
    if (has_b) acc_b = seg.part[(c0 * 2 + 1) * d + cb];
    if (writes_sums) weight_sum = seg.part_sum[c0 * 2 + 1];
    for (int64_t c = c0 + 1; c <= c1; ++c) {
      if (has_a) acc_a += seg.part[c * 2 * d + ca];
      if (has_b) acc_b += seg.part[c * 2 * d + cb];
      if (writes_sums) weight_sum += seg.part_sum[c * 2];
    }
  }
  if (has_a) store_sum<T, TRANSPOSE>(out, i, ca, n_latents, d, acc_a);
  if (has_b) store_sum<T, TRANSPOSE>(out, i, cb, n_latents, d, acc_b);
  if (writes_sums) out_sum[i] = from_float<T>(weight_sum);
}

template <typename T, bool TRANSPOSE>
cudaError_t launch_segment_sum(T* out, T* out_sum, const Segments& seg, const T* weights, int64_t weights_stride,
                               int64_t m, const T* src, int64_t src_stride, const T* sub, int64_t n_latents,
                               int64_t d, cudaStream_t stream) {
  if (n_latents < 0 || d < 0 || m < 0 || seg.n_entries < 0) return cudaErrorInvalidValue;
  if (n_latents == 0) return cudaSuccess;
  if (seg.n_entries > 0 && (m == 0 || seg.part == nullptr || (out_sum != nullptr && seg.part_sum == nullptr))) {
    return cudaErrorInvalidValue;
  }
  // d == 0 still launches one column block so that out_sum is written.
  const int64_t chunks = segment_chunks(seg.n_entries);
  const int64_t chunk_grid_y = d == 0 ? 1 : ceil_div(d, kSegBlockCols);
  const int64_t combine_grid_x = ceil_div(n_latents, kSegWarps);
  const int64_t combine_grid_y = d == 0 ? 1 : ceil_div(d, kSegCols);
  if (chunks > kMaxGridX || combine_grid_x > kMaxGridX || combine_grid_y > kMaxGridY) return cudaErrorInvalidValue;
  if (chunks > 0) {
    const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(chunk_grid_y));
    segment_chunk_kernel<T, TRANSPOSE><<<grid, kSegThreads, 0, stream>>>(out, out_sum, seg, weights, weights_stride,
                                                                          m, src, src_stride, sub, n_latents, d);
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return error;
  }
  const dim3 grid(static_cast<unsigned>(combine_grid_x), static_cast<unsigned>(combine_grid_y));
  segment_combine_kernel<T, TRANSPOSE><<<grid, kSegThreads, 0, stream>>>(out, out_sum, seg, n_latents, d);
  return cudaGetLastError();
}

}  // namespace fusedsae
