// The sparse encoder's weight gradients (docs/architecture.md#maths): the loss reaches the pre-activation only at the N*m active
// entries, so dW_enc[:, i] = sum over latent i's entries of grad * (x[token] - b_dec) and db_enc[i] = sum of grad,
// reduced per latent from sorted segments (no float atomics, no [N*m, d_in] temporary). dx is gather_rows over
// W_enc's columns and db_dec = -W_enc @ db_enc a dense mat-vec, both launched by the Python backend.
#include "common.cuh"
#include "fusedsae.h"
#include "segment_sum.cuh"

namespace fusedsae {

template <typename T>
cudaError_t segment_sum_columns(T* out, T* out_sum, const Segments& segments, const T* weights, int64_t weights_stride,
                                int64_t m, const T* src, int64_t src_stride, const T* sub, int64_t n_latents, int64_t d,
                                cudaStream_t stream) {
  return launch_segment_sum<T, true>(out, out_sum, segments, weights, weights_stride, m, src, src_stride, sub,
                                     n_latents, d, stream);
}

#define FUSEDSAE_INSTANTIATE_SEGMENT_COLUMNS(T)                                                                    \
  template cudaError_t segment_sum_columns<T>(T*, T*, const Segments&, const T*, int64_t, int64_t, const T*, int64_t, \
                                              const T*, int64_t, int64_t, cudaStream_t);

FUSEDSAE_INSTANTIATE_SEGMENT_COLUMNS(float)
FUSEDSAE_INSTANTIATE_SEGMENT_COLUMNS(__nv_bfloat16)
FUSEDSAE_INSTANTIATE_SEGMENT_COLUMNS(__half)

}  // namespace fusedsae
