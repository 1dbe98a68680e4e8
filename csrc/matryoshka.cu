// The Matryoshka decoder + loss (docs/architecture.md#decoder; maths in fusedsae.reference.matryoshka_decode_loss):
// the full reconstruction and every prefix's squared error in one pass over the active entries, and its backward
// in one more, without the [N, L, d] prefix reconstructions.
//
// One block per token and column block, as gather_rows: each thread owns VEC consecutive columns. The forward
// visits the levels in order and adds each level's entries into a float running sum; after level l the block
// reduces sum((acc - (y - b))^2) over its columns (warp butterflies, then the warps in order: deterministic) into
// sq_part[column block][n][l]. The backward walks the levels last to first from e = recon - y, keeping the suffix
// S_l = grad_recon + sum_{l' >= l} 2 grad_sq[l'] e_l' per column: each level-l entry's W_dec row, gathered once,
// gives its d value partial S_l . W_dec[i] (block-reduced into dv_part[column block][n][j]) and steps the error
// down to the previous prefix, e_{l-1} = e_l - value * W_dec[i]; S_l is stored per (token, level) for the per-latent
// sums of dW_dec (segment_sum_rows on the entries re-addressed to those rows). Each row of the code is in latent
// order, so a level is one run of slots [ends[l-1], ends[l]): the slots are walked once in all (their value and
// index are broadcast loads) and each W_dec row is gathered once per pass.
#include <algorithm>

#include "common.cuh"
#include "fusedsae.h"

namespace fusedsae {
namespace {

constexpr int kMatMaxThreads = 256;

// Sum of v over the block, returned to thread 0 (others get 0): warp butterflies, then the warps in order.
// blockDim.x is a multiple of the warp size. Every thread of the block must call it (two barriers).
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  if (threadIdx.x == 0) {
    const int warps = blockDim.x / kWarp;
    for (int w = 0; w < warps; ++w) total += scratch[w];
  }
  __syncthreads();  // scratch is reused by the next call
  return total;
}

template <typename T, typename IdxT, int VEC>
__global__ void __launch_bounds__(kMatMaxThreads)
    matryoshka_fwd_kernel(T* __restrict__ recon, int64_t recon_stride, float* __restrict__ sq_part,
                          MatryoshkaArgs<T, IdxT> a, const T* __restrict__ bias) {
  __shared__ float scratch[kMatMaxThreads / kWarp];
  const int64_t n = blockIdx.x;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  const bool active = c < a.d;  // no early return: every thread takes part in the block sums
  const T* v_row = a.values + n * a.values_stride;
  const IdxT* i_row = a.indices + n * a.indices_stride;
  const int32_t* e_row = a.ends + n * a.ends_stride;
  float acc[VEC], target[VEC], b[VEC];
#pragma unroll
  for (int u = 0; u < VEC; ++u) acc[u] = target[u] = b[u] = 0.f;
  if (active) {
    load_floats<T, VEC>(a.y + n * a.y_stride + c, target);
    if (bias != nullptr) load_floats<T, VEC>(bias + c, b);
#pragma unroll
    for (int u = 0; u < VEC; ++u) target[u] -= b[u];  // the running sum is compared with y - b_dec
  }
  int64_t start = 0;
  for (int64_t level = 0; level < a.n_levels; ++level) {
    const int64_t end = e_row[level];
    for (int64_t j = start; j < end; ++j) {
      const float v = to_float(v_row[j]);
      if (v == 0.f || !active) continue;  // padding adds nothing
      float w[VEC];
      load_floats<T, VEC>(a.table + static_cast<int64_t>(i_row[j]) * a.table_stride + c, w);
#pragma unroll
      for (int u = 0; u < VEC; ++u) acc[u] = fmaf(v, w[u], acc[u]);
    }
    start = end;
    float sq = 0.f;
    if (active) {
#pragma unroll
      for (int u = 0; u < VEC; ++u) {
        const float e = acc[u] - target[u];
        sq = fmaf(e, e, sq);
      }
    }
    sq = block_sum(sq, scratch);
    if (threadIdx.x == 0) sq_part[(static_cast<int64_t>(blockIdx.y) * a.n_rows + n) * a.n_levels + level] = sq;
  }
  if (active) {
#pragma unroll
    for (int u = 0; u < VEC; ++u) acc[u] += b[u];
    store_floats<T, VEC>(recon + n * recon_stride + c, acc);
  }
}

template <typename T, typename IdxT, int VEC>
__global__ void __launch_bounds__(kMatMaxThreads)
    matryoshka_bwd_kernel(float* __restrict__ dv_part, T* __restrict__ suffix, T* __restrict__ dy, int64_t dy_stride,
                          MatryoshkaArgs<T, IdxT> a, const T* __restrict__ recon, int64_t recon_stride,
                          const T* __restrict__ grad_recon, int64_t grad_recon_stride, const T* __restrict__ grad_sq,
                          int64_t grad_sq_stride) {
  __shared__ float scratch[kMatMaxThreads / kWarp];
  const int64_t n = blockIdx.x;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  const bool active = c < a.d;
  const T* v_row = a.values + n * a.values_stride;
  const IdxT* i_row = a.indices + n * a.indices_stride;
  const int32_t* e_row = a.ends + n * a.ends_stride;
  float err[VEC], s[VEC], d_y[VEC];
#pragma unroll
  for (int u = 0; u < VEC; ++u) err[u] = s[u] = d_y[u] = 0.f;
  if (active) {
    float y[VEC];
    load_floats<T, VEC>(recon + n * recon_stride + c, err);
    load_floats<T, VEC>(a.y + n * a.y_stride + c, y);
#pragma unroll
    for (int u = 0; u < VEC; ++u) err[u] -= y[u];
    if (grad_recon != nullptr) load_floats<T, VEC>(grad_recon + n * grad_recon_stride + c, s);
  }
  float* dv_row = dv_part + (static_cast<int64_t>(blockIdx.y) * a.n_rows + n) * a.m;
  for (int64_t level = a.n_levels - 1; level >= 0; --level) {
    const float g = 2.f * to_float(grad_sq[n * grad_sq_stride + level]);
    if (active) {
#pragma unroll
      for (int u = 0; u < VEC; ++u) {
        const float step = g * err[u];
        s[u] += step;
        d_y[u] -= step;
      }
      store_floats<T, VEC>(suffix + (n * a.n_levels + level) * a.d + c, s);
    }
    // the run is the same for the whole block (one token), so every thread reaches the barriers in block_sum
    for (int64_t j = level ? e_row[level - 1] : 0; j < e_row[level]; ++j) {
      float w[VEC];
      float dot = 0.f;
      if (active) {
        load_floats<T, VEC>(a.table + static_cast<int64_t>(i_row[j]) * a.table_stride + c, w);
#pragma unroll
        for (int u = 0; u < VEC; ++u) dot = fmaf(s[u], w[u], dot);
      }
      dot = block_sum(dot, scratch);
      if (threadIdx.x == 0) dv_row[j] = dot;
      // d value is S . W_dec[i] even at a zero value, so the row is gathered for padding too; the step is exact 0
      const float v = to_float(v_row[j]);
      if (active && v != 0.f) {
#pragma unroll
        for (int u = 0; u < VEC; ++u) err[u] = fmaf(-v, w[u], err[u]);
      }
    }
  }
  if (active) store_floats<T, VEC>(dy + n * dy_stride + c, d_y);
}

// Threads per block and column blocks: just enough warps to cover a row's VEC-wide vectors, at most 256 per
// block, so a column block spans at least 256 columns whenever there is more than one (matryoshka_column_blocks).
template <typename T, int VEC>
bool matryoshka_grid(int64_t n_rows, int64_t d, dim3& grid, unsigned& threads) {
  const int64_t vectors = ceil_div(d, VEC);
  const int64_t t = std::min<int64_t>(kMatMaxThreads, ceil_div(vectors, kWarp) * kWarp);
  const int64_t grid_y = ceil_div(vectors, t);
  if (n_rows > kMaxGridX || grid_y > kMaxGridY) return false;
  grid = dim3(static_cast<unsigned>(n_rows), static_cast<unsigned>(grid_y));
  threads = static_cast<unsigned>(t);
  return true;
}

template <typename T, typename IdxT>
bool rows_aligned(const MatryoshkaArgs<T, IdxT>& a) {
  return rows_vectorizable(a.table, a.table_stride, a.d) && rows_vectorizable(a.y, a.y_stride, a.d);
}

template <typename T, typename IdxT>
bool args_valid(const MatryoshkaArgs<T, IdxT>& a) {
  return a.n_rows >= 0 && a.m >= 0 && a.d >= 0 && a.n_levels >= 1;
}

}  // namespace

template <typename T, typename IdxT>
cudaError_t matryoshka_decode_loss(T* recon, int64_t recon_stride, float* sq_part, const MatryoshkaArgs<T, IdxT>& args,
                                   const T* bias, cudaStream_t stream) {
  if (!args_valid(args)) return cudaErrorInvalidValue;
  if (args.n_rows == 0 || args.d == 0) return cudaSuccess;
  dim3 grid;
  unsigned threads;
  const bool vec = rows_aligned(args) && rows_vectorizable(recon, recon_stride, args.d) &&
                   (bias == nullptr || aligned16(bias));
  if (vec) {
    if (!matryoshka_grid<T, kVec<T>>(args.n_rows, args.d, grid, threads)) return cudaErrorInvalidValue;
    matryoshka_fwd_kernel<T, IdxT, kVec<T>><<<grid, threads, 0, stream>>>(recon, recon_stride, sq_part, args, bias);
  } else {
    if (!matryoshka_grid<T, 1>(args.n_rows, args.d, grid, threads)) return cudaErrorInvalidValue;
    matryoshka_fwd_kernel<T, IdxT, 1><<<grid, threads, 0, stream>>>(recon, recon_stride, sq_part, args, bias);
  }
  return cudaGetLastError();
}

template <typename T, typename IdxT>
cudaError_t matryoshka_decode_loss_backward(float* dv_part, T* suffix, T* dy, int64_t dy_stride,
                                            const MatryoshkaArgs<T, IdxT>& args, const T* recon, int64_t recon_stride,
                                            const T* grad_recon, int64_t grad_recon_stride, const T* grad_sq,
                                            int64_t grad_sq_stride, cudaStream_t stream) {
  if (!args_valid(args)) return cudaErrorInvalidValue;
  if (args.n_rows == 0 || args.d == 0) return cudaSuccess;
  dim3 grid;
  unsigned threads;
  const bool vec = rows_aligned(args) && rows_vectorizable(suffix, args.d, args.d) &&
                   rows_vectorizable(dy, dy_stride, args.d) && rows_vectorizable(recon, recon_stride, args.d) &&
                   (grad_recon == nullptr || rows_vectorizable(grad_recon, grad_recon_stride, args.d));
  if (vec) {
    if (!matryoshka_grid<T, kVec<T>>(args.n_rows, args.d, grid, threads)) return cudaErrorInvalidValue;
    matryoshka_bwd_kernel<T, IdxT, kVec<T>><<<grid, threads, 0, stream>>>(
        dv_part, suffix, dy, dy_stride, args, recon, recon_stride, grad_recon, grad_recon_stride, grad_sq,
        grad_sq_stride);
  } else {
    if (!matryoshka_grid<T, 1>(args.n_rows, args.d, grid, threads)) return cudaErrorInvalidValue;
    matryoshka_bwd_kernel<T, IdxT, 1><<<grid, threads, 0, stream>>>(dv_part, suffix, dy, dy_stride, args, recon,
                                                                    recon_stride, grad_recon, grad_recon_stride,
                                                                    grad_sq, grad_sq_stride);
  }
  return cudaGetLastError();
}

#define FUSEDSAE_INSTANTIATE_MATRYOSHKA(T, IdxT)                                                                    \
  template cudaError_t matryoshka_decode_loss<T, IdxT>(T*, int64_t, float*, const MatryoshkaArgs<T, IdxT>&,        \
                                                       const T*, cudaStream_t);                                     \
  template cudaError_t matryoshka_decode_loss_backward<T, IdxT>(float*, T*, T*, int64_t,                           \
                                                                const MatryoshkaArgs<T, IdxT>&, const T*, int64_t, \
                                                                const T*, int64_t, const T*, int64_t, cudaStream_t);

FUSEDSAE_INSTANTIATE_MATRYOSHKA(float, int32_t)
FUSEDSAE_INSTANTIATE_MATRYOSHKA(float, int64_t)
FUSEDSAE_INSTANTIATE_MATRYOSHKA(__nv_bfloat16, int32_t)
FUSEDSAE_INSTANTIATE_MATRYOSHKA(__nv_bfloat16, int64_t)
FUSEDSAE_INSTANTIATE_MATRYOSHKA(__half, int32_t)
FUSEDSAE_INSTANTIATE_MATRYOSHKA(__half, int64_t)

}  // namespace fusedsae
