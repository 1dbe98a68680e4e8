// Exact row-wise TopK over wide rows (d_sae up to 1M and beyond): the unfused path's selection from a
// pre-activation buffer, and the comparison point for the fused Triton encoder.
//
// One block per row, radix select on order-preserving integer keys (a float's bits with the sign folded so that
// unsigned order is numeric order; NaN above +inf as in torch.topk, -0.0 equal to +0.0):
//   1. Histogram the top 8 bits of every key into 256 bins (shared-memory atomics, one per group of equal digits
//      in a warp), walk the bins from the top to find the bin holding the k-th largest key, and keep only keys in
//      that bin for the next 8 bits. After 4 passes (fp32) or 2 (bf16/fp16) the k-th largest key K is known
//      exactly, with `remaining` = how many keys equal to K belong to the top k. A pass stops early when the whole
//      bin is taken.
//   2. One more pass writes, in index order, every key above K and the first `remaining` keys equal to K (a block
//      prefix sum ranks them), which is exactly "ties go to the lower index".
// Cost: 5 reads of the row for fp32, 3 for bf16/fp16, plus about k writes; no sort of the row and no temporary.
// The k winners come out in index order; the Python backend sorts them by value (a stable sort of [N, k]).
// Rows are independent blocks, so N >= 2 x (number of SMs) rows fill the GPU; a handful of very wide rows use only
// that many SMs.
#include <climits>

#include "common.cuh"
#include "fusedsae.h"

namespace fusedsae {
namespace {

constexpr int kTopkThreads = 512;
constexpr int kTopkWarps = kTopkThreads / kWarp;
constexpr int kRadixBits = 8;
constexpr int kBins = 1 << kRadixBits;
constexpr int kUnroll = 4;  // elements per thread per step: four independent loads in flight
static_assert(kTopkThreads >= kBins, "the bin scan gives each of the first kBins threads one bin");

template <typename T>
struct Keys;

template <>
struct Keys<float> {
  static constexpr int kBits = 32;
  __device__ static uint32_t of(float v) {
    uint32_t u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0xffffffffu;
    if (u == 0x80000000u) u = 0u;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
};

template <>
struct Keys<__nv_bfloat16> {
  static constexpr int kBits = 16;
  __device__ static uint32_t of(__nv_bfloat16 v) {
    uint32_t u = __bfloat16_as_ushort(v);
    if ((u & 0x7fffu) > 0x7f80u) return 0xffffu;
    if (u == 0x8000u) u = 0u;
    return (u & 0x8000u) ? (~u & 0xffffu) : (u | 0x8000u);
  }
};

template <>
struct Keys<__half> {
  static constexpr int kBits = 16;
  __device__ static uint32_t of(__half v) {
    uint32_t u = __half_as_ushort(v);
    if ((u & 0x7fffu) > 0x7c00u) return 0xffffu;
    if (u == 0x8000u) u = 0u;
    return (u & 0x8000u) ? (~u & 0xffffu) : (u | 0x8000u);
  }
};

// Inclusive sum of v over the block's threads in thread order; *total gets the block's sum. Every thread must
// call it (it synchronises twice, so `scratch`, one int per warp, is free again on return).
__device__ __forceinline__ int block_inclusive_sum(int v, int* scratch, int* total) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
#pragma unroll
  for (int offset = 1; offset < kWarp; offset <<= 1) {
    const int up = __shfl_up_sync(kFullMask, v, offset);
    if (lane >= offset) v += up;
  }
  if (lane == kWarp - 1) scratch[warp] = v;
  __syncthreads();
  int before = 0, all = 0;
#pragma unroll
  for (int w = 0; w < kTopkWarps; ++w) {
    const int s = scratch[w];
    before += w < warp ? s : 0;
    all += s;
  }
  __syncthreads();
  *total = all;
  return v + before;
}

template <typename T>
__global__ void __launch_bounds__(kTopkThreads)
    row_topk_kernel(T* __restrict__ out_values, int64_t* __restrict__ out_indices, const T* __restrict__ scores,
                    int64_t scores_stride, int64_t width, int64_t k) {
  __shared__ int hist[kBins];
  __shared__ int scratch[kTopkWarps];
  __shared__ int chosen[3];  // the bin holding the k-th key, the count above it, the count in it

  const int tid = threadIdx.x;
  const int lane = tid % kWarp;
  const T* x = scores + static_cast<int64_t>(blockIdx.x) * scores_stride;

  // Keys whose determined digits (mask) equal prefix are the candidates; `remaining` of them are in the top k.
  uint32_t prefix = 0u, mask = 0u;
  int remaining = static_cast<int>(k);
  for (int shift = Keys<T>::kBits - kRadixBits; shift >= 0; shift -= kRadixBits) {
    for (int b = tid; b < kBins; b += kTopkThreads) hist[b] = 0;
    __syncthreads();
    for (int64_t base = 0; base < width; base += kTopkThreads * kUnroll) {
      uint32_t keys[kUnroll];
      bool live[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + u * kTopkThreads + tid;
        keys[u] = i < width ? Keys<T>::of(x[i]) : 0u;
        live[u] = i < width && (keys[u] & mask) == prefix;
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const uint32_t digit = (keys[u] >> shift) & (kBins - 1);
        const unsigned voters = __ballot_sync(kFullMask, live[u]);
        if (live[u]) {
          // Pre-activations share a few exponents, so most of a warp often lands in one bin: one atomic per
          // distinct digit instead of 32 serialised ones.
          const unsigned peers = __match_any_sync(voters, digit);
          if (lane == __ffs(peers) - 1) atomicAdd(&hist[digit], __popc(peers));
        }
      }
    }
    __syncthreads();
    // Thread t < kBins holds bin kBins - 1 - t, so its inclusive sum counts the candidates whose digit is at or
    // above that bin; the target bin is the first where that count reaches `remaining` (exactly one thread).
    const int bin = kBins - 1 - tid;
    const int count = tid < kBins ? hist[bin] : 0;
    int candidates;
    const int at_or_above = block_inclusive_sum(count, scratch, &candidates);
    if (tid < kBins && at_or_above >= remaining && at_or_above - count < remaining) {
      chosen[0] = bin;
      chosen[1] = at_or_above - count;
      chosen[2] = count;
    }
    __syncthreads();
    remaining -= chosen[1];
    prefix |= static_cast<uint32_t>(chosen[0]) << shift;
    mask |= static_cast<uint32_t>(kBins - 1) << shift;
    if (chosen[2] == remaining) break;  // the whole bin is in the top k: its lower digits do not matter
  }
  __syncthreads();  // every thread has read `chosen` before the scans below reuse shared memory

  const int need_equal = remaining;
  T* values_row = out_values + static_cast<int64_t>(blockIdx.x) * k;
  int64_t* indices_row = out_indices + static_cast<int64_t>(blockIdx.x) * k;
  int taken = 0, equal_seen = 0;
  for (int64_t base = 0; base < width && taken < k; base += kTopkThreads * kUnroll) {
    T v[kUnroll];
    int above[kUnroll], equal[kUnroll];
    int any = 0;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kTopkThreads + tid;
      above[u] = 0;
      equal[u] = 0;
      v[u] = from_float<T>(0.f);
      if (i < width) {
        v[u] = x[i];
        const uint32_t key = Keys<T>::of(v[u]) & mask;
        above[u] = key > prefix;
        equal[u] = key == prefix;
      }
      any |= above[u] | equal[u];
    }
    if (__syncthreads_or(any) == 0) continue;  // the common case far from the k-th value: one barrier
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      int equal_total, taken_total;
      const int equal_rank = block_inclusive_sum(equal[u], scratch, &equal_total) - equal[u];
      const int take = above[u] | (equal[u] & (equal_seen + equal_rank < need_equal ? 1 : 0));
      const int slot = taken + block_inclusive_sum(take, scratch, &taken_total) - take;
      if (take) {
        values_row[slot] = v[u];
        indices_row[slot] = base + u * kTopkThreads + tid;
      }
      taken += taken_total;
      equal_seen += equal_total;
    }
  }
}

}  // namespace

template <typename T>
cudaError_t row_topk_select(T* values, int64_t* indices, const T* scores, int64_t scores_stride, int64_t n_rows,
                            int64_t width, int64_t k, cudaStream_t stream) {
  if (n_rows < 0 || k < 1 || width < k || width > INT_MAX || n_rows > kMaxGridX) return cudaErrorInvalidValue;
  if (n_rows == 0) return cudaSuccess;
  row_topk_kernel<T><<<static_cast<unsigned>(n_rows), kTopkThreads, 0, stream>>>(values, indices, scores,
                                                                                  scores_stride, width, k);
  return cudaGetLastError();
}

#define FUSEDSAE_INSTANTIATE_TOPK(T) \
  template cudaError_t row_topk_select<T>(T*, int64_t*, const T*, int64_t, int64_t, int64_t, int64_t, cudaStream_t);

FUSEDSAE_INSTANTIATE_TOPK(float)
FUSEDSAE_INSTANTIATE_TOPK(__nv_bfloat16)
FUSEDSAE_INSTANTIATE_TOPK(__half)

}  // namespace fusedsae
