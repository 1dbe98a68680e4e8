// Launchers of the fusedsae CUDA kernels. Torch-free: typed raw pointers, 64-bit sizes and strides (in elements),
// the stream last, and a cudaError_t back (cudaErrorInvalidValue for arguments no launch can take, else the launch
// error). Launches are asynchronous on `stream`; outputs are allocated by the caller (destination passing) and
// every element of them is written. bindings.cpp turns Python integers into these arguments.
//
// T is float, __nv_bfloat16 or __half (every sum is accumulated in float and rounded once); IdxT is int32_t or
// int64_t. A "table" is a matrix of latent rows addressed as table[i * stride_latent + c * stride_feature], so the
// decoder W_dec [d_sae, d_in] (strides d_in, 1) and the encoder W_enc [d_in, d_sae] read by columns (strides 1,
// d_sae) are served without a copy; rows are loaded 16 bytes at a time when stride_feature == 1 and every row is
// 16-byte aligned, one element at a time otherwise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fusedsae {

// ---- sparse_decode.cu: the sparse decoder, forward and backward --------------------------------------------------

// out[n, c] = sum_j values[n, j] * table[indices[n, j], c] (+ bias[c] when bias is not null), for n < n_rows,
// c < d. Slots whose value is exactly 0 are skipped (BatchTopK padding costs no gather). Also the sparse encoder's
// dx (values = the gradient at the active entries, table = W_enc read by columns).
template <typename T, typename IdxT>
cudaError_t gather_rows(T* out, int64_t out_stride, const T* values, int64_t values_stride, const IdxT* indices,
                        int64_t indices_stride, const T* table, int64_t table_stride_latent,
                        int64_t table_stride_feature, const T* bias, int64_t n_rows, int64_t m, int64_t d,
                        cudaStream_t stream);

// out[n, j] = sum_c table[indices[n, j], c] * vectors[n, c]: the decoder's d_values = (grad_out @ W_dec^T) at the
// active entries only. One warp per (n, j); deterministic.
template <typename T, typename IdxT>
cudaError_t gather_dot(T* out, int64_t out_stride, const T* vectors, int64_t vectors_stride, const IdxT* indices,
                       int64_t indices_stride, const T* table, int64_t table_stride_latent,
                       int64_t table_stride_feature, int64_t n_rows, int64_t m, int64_t d, cudaStream_t stream);

// Segmented sums over entries grouped by latent. The caller sorts the flat positions p = n * m + j of an [N, m]
// index array by latent (stably: token order within a latent) into `order`, with each entry's latent in `keys`
// (int32, sorted), and gives each latent i its segment [offsets[i], offsets[i + 1]) (offsets has n_latents + 1
// entries). For each latent i and column c < d:
//   out_i[c] = sum over the segment of weights[n, j] * (src[n, c] - sub[c])     (sub may be null)
// Latents with an empty segment get zeros. The list is summed in chunks of kSegmentChunk entries and the pieces of
// latents that cross chunks are added in chunk order, in the caller's float scratch `part` ([chunks, 2, d]) and
// `part_sum` ([chunks, 2], segment_sum_columns only), chunks = segment_chunks(n_entries): a latent with many
// entries costs what as many entries spread over many latents cost. No float atomics: bitwise reproducible.
// Entries whose weight is exactly 0 add nothing (their src row is not read).
constexpr int64_t kSegmentChunk = 64;

inline constexpr int64_t segment_chunks(int64_t n_entries) { return (n_entries + kSegmentChunk - 1) / kSegmentChunk; }

struct Segments {
  const int64_t* order;    // [n_entries]
  const int32_t* keys;     // [n_entries]
  const int64_t* offsets;  // [n_latents + 1]
  int64_t n_entries;
  float* part;      // [segment_chunks(n_entries) * 2 * d]
  float* part_sum;  // [segment_chunks(n_entries) * 2], may be null when no out_sum is asked for
};

// segment_sum_rows writes out[i, c] = out_i[c] ([n_latents, d], row-major): the decoder's dW_dec.
template <typename T>
cudaError_t segment_sum_rows(T* out, const Segments& segments, const T* weights, int64_t weights_stride, int64_t m,
                             const T* src, int64_t src_stride, int64_t n_latents, int64_t d, cudaStream_t stream);

// Status of the kernels' images on the current device: cudaSuccess when this build has code for it, else the
// error a launch would give (cudaErrorNoKernelImageForDevice, cudaErrorInsufficientDriver, ...).
cudaError_t probe_kernel_image();

// ---- sparse_encode_backward.cu: the sparse encoder's weight gradients -------------------------------------------

// The segmented sum above written transposed, out[c, i] = out_i[c] ([d, n_latents], the layout of W_enc), plus
// out_sum[i] = sum over the segment of weights[n, j]: dW_enc and db_enc (src = x, sub = b_dec).
template <typename T>
cudaError_t segment_sum_columns(T* out, T* out_sum, const Segments& segments, const T* weights, int64_t weights_stride,
                                int64_t m, const T* src, int64_t src_stride, const T* sub, int64_t n_latents, int64_t d,
                                cudaStream_t stream);

// ---- matryoshka.cu: the Matryoshka decoder + per-prefix squared errors, and their backward ---------------------

// The code [n_rows, m] with each row in latent order, so that level l's entries (widths[l-1] <= index < widths[l])
// are the slots [ends[n, l-1], ends[n, l]) (ends int32 [n_rows, n_levels], level 0 from slot 0, the last end m);
// the decoder table W_dec [d_sae, d] (unit column stride) and the target y [n_rows, d].
template <typename T, typename IdxT>
struct MatryoshkaArgs {
  const T* values;
  int64_t values_stride;
  const IdxT* indices;
  int64_t indices_stride;
  const int32_t* ends;
  int64_t ends_stride;
  const T* table;
  int64_t table_stride;
  const T* y;
  int64_t y_stride;
  int64_t n_rows;
  int64_t m;
  int64_t d;
  int64_t n_levels;
};

// Column blocks of the two kernels never exceed ceil(d / kMatryoshkaColumns): the caller sizes the float partial
// buffers below with that many blocks, zero-filled (blocks a vectorised launch leaves out add nothing).
constexpr int64_t kMatryoshkaColumns = 256;

// recon[n, c] = sum_j values[n, j] * table[indices[n, j], c] + bias[c] (bias may be null), and for every level l
// sq_part[b, n, l] = sum over column block b's columns of (prefix_l[n, c] + bias[c] - y[n, c])^2, prefix_l summing
// the entries of level <= l. The caller sums sq_part over b. Entries with value exactly 0 are skipped.
template <typename T, typename IdxT>
cudaError_t matryoshka_decode_loss(T* recon, int64_t recon_stride, float* sq_part, const MatryoshkaArgs<T, IdxT>& args,
                                   const T* bias, cudaStream_t stream);

// From e_{L-1} = recon - y, levels last to first: S_l = grad_recon + sum_{l' >= l} 2 grad_sq[n, l'] e_l' (grad_recon
// may be null), e_{l-1} = e_l - (level-l entries of the code). Writes suffix[n, l, c] = S_l (contiguous
// [n_rows, n_levels, d]), dy[n, c] = -sum_l 2 grad_sq[n, l] e_l and, for each entry j of level l,
// dv_part[b, n, j] = sum over column block b of S_l[c] * table[indices[n, j], c] (the caller sums over b).
template <typename T, typename IdxT>
cudaError_t matryoshka_decode_loss_backward(float* dv_part, T* suffix, T* dy, int64_t dy_stride,
                                            const MatryoshkaArgs<T, IdxT>& args, const T* recon, int64_t recon_stride,
                                            const T* grad_recon, int64_t grad_recon_stride, const T* grad_sq,
                                            int64_t grad_sq_stride, cudaStream_t stream);

// ---- row_topk.cu: exact row-wise TopK over wide rows --------------------------------------------------------------

// For each row, the k largest of scores[row, :width] (ties at the cut-off go to the lower index; NaN ranks above
// +inf; -0.0 equals +0.0), written in increasing index order to values[row, :k] and indices[row, :k] (rows of
// length k, contiguous). Needs 1 <= k <= width <= INT32_MAX. The caller sorts the k by value.
template <typename T>
cudaError_t row_topk_select(T* values, int64_t* indices, const T* scores, int64_t scores_stride, int64_t n_rows,
                            int64_t width, int64_t k, cudaStream_t stream);

// ---- head_partial_sums.cu: per-head attribution at selected (token, latent) pairs ---------------------------------

// out[n, j, h] = sum over c in [h * d_head, (h + 1) * d_head) of (x[n, c] - sub[c]) * table[indices[n, j], c]
// (sub may be null): out is [n_rows, m, n_heads] contiguous, n_rows * m * n_heads * d_head multiply-adds.
template <typename T, typename IdxT>
cudaError_t head_partial_sums(T* out, const T* x, int64_t x_stride, const T* sub, const IdxT* indices,
                              int64_t indices_stride, const T* table, int64_t table_stride_latent,
                              int64_t table_stride_feature, int64_t n_rows, int64_t m, int64_t n_heads,
                              int64_t d_head, cudaStream_t stream);

}  // namespace fusedsae
