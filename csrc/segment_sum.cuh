// The segmented sum behind dW_dec (sparse_decode.cu) and dW_enc / db_enc (sparse_encode_backward.cu); see
// segment_sum_rows / segment_sum_columns in fusedsae.h for the contract.
//
// A block owns kSegLatents consecutive latents and kSegCols consecutive columns; each warp walks the segments of
// its latents one after the other, each lane accumulating two columns in float, in segment order (so the result
// does not depend on scheduling). About 16 entries per latent at the reference shapes (16384 tokens x k=32 over
// 32768 latents): the walk is a chain of dependent loads (position -> token -> row), so entries are taken four at
// a time to keep four row loads in flight per warp. The transposed variant (W_enc's [d_in, d_sae] layout) stages
// the 32 x 64 tile in shared memory so that each warp then writes 32 consecutive latents of one column: coalesced
// stores instead of one 32-byte sector per element.
#pragma once

#include "common.cuh"
#include "fusedsae.h"

namespace fusedsae {

constexpr int kSegLatents = 32;
constexpr int kSegCols = 2 * kWarp;
constexpr int kSegThreads = 256;

template <typename T, bool TRANSPOSE>
__global__ void __launch_bounds__(kSegThreads)
    segment_sum_kernel(T* __restrict__ out, T* __restrict__ out_sum, const int64_t* __restrict__ order,
                       const int64_t* __restrict__ offsets, const T* __restrict__ weights, int64_t weights_stride,
                       int64_t m, const T* __restrict__ src, int64_t src_stride, const T* __restrict__ sub,
                       int64_t n_latents, int64_t d) {
  // [column][latent], padded by one so that the column-major writes below hit 32 different banks.
  __shared__ float tile[TRANSPOSE ? kSegCols : 1][kSegLatents + 1];
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kSegLatents;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kSegCols;
  const int64_t ca = c0 + lane;
  const int64_t cb = c0 + lane + kWarp;
  const bool has_a = ca < d;
  const bool has_b = cb < d;
  const float sub_a = (sub != nullptr && has_a) ? to_float(sub[ca]) : 0.f;
  const float sub_b = (sub != nullptr && has_b) ? to_float(sub[cb]) : 0.f;

  for (int l = warp; l < kSegLatents; l += kSegThreads / kWarp) {
    const int64_t i = i0 + l;
    float acc_a = 0.f, acc_b = 0.f, weight_sum = 0.f;
    if (i < n_latents) {
      const int64_t end = offsets[i + 1];
      int64_t e = offsets[i];
      for (; e + 4 <= end; e += 4) {
        float w[4], xa[4], xb[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int64_t p = order[e + u];
          const int64_t n = p / m;
          w[u] = to_float(weights[n * weights_stride + (p - n * m)]);
          const T* row = src + n * src_stride;
          xa[u] = has_a ? to_float(row[ca]) : 0.f;
          xb[u] = has_b ? to_float(row[cb]) : 0.f;
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          acc_a = fmaf(w[u], xa[u] - sub_a, acc_a);
          acc_b = fmaf(w[u], xb[u] - sub_b, acc_b);
          weight_sum += w[u];
        }
      }
      for (; e < end; ++e) {
        const int64_t p = order[e];
        const int64_t n = p / m;
        const float w = to_float(weights[n * weights_stride + (p - n * m)]);
        const T* row = src + n * src_stride;
        if (has_a) acc_a = fmaf(w, to_float(row[ca]) - sub_a, acc_a);
        if (has_b) acc_b = fmaf(w, to_float(row[cb]) - sub_b, acc_b);
        weight_sum += w;
      }
    }
    if constexpr (TRANSPOSE) {
      tile[lane][l] = acc_a;
      tile[lane + kWarp][l] = acc_b;
    } else if (i < n_latents) {
      if (has_a) out[i * d + ca] = from_float<T>(acc_a);
      if (has_b) out[i * d + cb] = from_float<T>(acc_b);
    }
    if (out_sum != nullptr && blockIdx.y == 0 && lane == 0 && i < n_latents) out_sum[i] = from_float<T>(weight_sum);
  }

  if constexpr (TRANSPOSE) {
    __syncthreads();
    for (int t = threadIdx.x; t < kSegCols * kSegLatents; t += kSegThreads) {
      const int col = t / kSegLatents;
      const int l = t % kSegLatents;
      const int64_t c = c0 + col;
      const int64_t i = i0 + l;
      if (c < d && i < n_latents) out[c * n_latents + i] = from_float<T>(tile[col][l]);
    }
  }
}

template <typename T, bool TRANSPOSE>
cudaError_t launch_segment_sum(T* out, T* out_sum, const int64_t* order, const int64_t* offsets, const T* weights,
                               int64_t weights_stride, int64_t m, const T* src, int64_t src_stride, const T* sub,
                               int64_t n_latents, int64_t d, cudaStream_t stream) {
  if (n_latents < 0 || d < 0 || m < 0) return cudaErrorInvalidValue;
  if (n_latents == 0) return cudaSuccess;
  // d == 0 still launches one column block so that out_sum is written.
  const int64_t grid_x = ceil_div(n_latents, kSegLatents);
  const int64_t grid_y = d == 0 ? 1 : ceil_div(d, kSegCols);
  if (grid_x > kMaxGridX || grid_y > kMaxGridY) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  segment_sum_kernel<T, TRANSPOSE><<<grid, kSegThreads, 0, stream>>>(
      out, out_sum, order, offsets, weights, weights_stride, m, src, src_stride, sub, n_latents, d);
  return cudaGetLastError();
}

}  // namespace fusedsae
