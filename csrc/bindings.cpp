// The only pybind11 file: turns Python integers (data pointers, sizes, strides, a stream handle, dtype codes) into
// the typed launcher calls of fusedsae.h, and CUDA errors into Python RuntimeErrors. No torch header: the Python
// backend (fusedsae/backends/cuda.py) validates tensors, allocates outputs and passes their data_ptr().
//
// Dtype codes: 0 float32, 1 bfloat16, 2 float16. Index codes: 0 int32, 1 int64. A null pointer is 0.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "fusedsae.h"

#ifndef FUSEDSAE_ARCHS
#define FUSEDSAE_ARCHS ""
#endif

namespace py = pybind11;

namespace {

template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
void with_float_type(int dtype, F&& f) {
  switch (dtype) {
    case 0:
      f(Tag<float>{});
      return;
    case 1:
      f(Tag<__nv_bfloat16>{});
      return;
    case 2:
      f(Tag<__half>{});
      return;
    default:
      throw py::value_error("fusedsae._C: unknown dtype code " + std::to_string(dtype) +
                            " (0 float32, 1 bfloat16, 2 float16)");
  }
}

template <typename F>
void with_index_type(int index_dtype, F&& f) {
  switch (index_dtype) {
    case 0:
      f(Tag<int32_t>{});
      return;
    case 1:
      f(Tag<int64_t>{});
      return;
    default:
      throw py::value_error("fusedsae._C: unknown index dtype code " + std::to_string(index_dtype) +
                            " (0 int32, 1 int64)");
  }
}

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

cudaStream_t stream_of(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

void check(cudaError_t err, const char* launcher) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fusedsae._C.") + launcher + " failed: " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

py::dict runtime_info() {
  int runtime_version = 0, driver_version = 0, device_count = 0;
  cudaRuntimeGetVersion(&runtime_version);
  cudaDriverGetVersion(&driver_version);  // 0 when no NVIDIA driver is installed
  const cudaError_t err = cudaGetDeviceCount(&device_count);
  if (err != cudaSuccess) device_count = 0;
  cudaGetLastError();  // a failed query is an answer, not an error for the next launch to report
  py::dict info;
  info["runtime_version"] = runtime_version;
  info["driver_version"] = driver_version;
  info["device_count"] = device_count;
  info["error"] = err == cudaSuccess ? std::string() : std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  return info;
}

std::string kernel_image_error() {
  const cudaError_t err = fusedsae::probe_kernel_image();
  cudaGetLastError();
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

void gather_rows(int dtype, int index_dtype, uintptr_t out, int64_t out_stride, uintptr_t values,
                 int64_t values_stride, uintptr_t indices, int64_t indices_stride, uintptr_t table,
                 int64_t table_stride_latent, int64_t table_stride_feature, uintptr_t bias, int64_t n_rows, int64_t m,
                 int64_t d, uintptr_t stream) {
  with_float_type(dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    with_index_type(index_dtype, [&](auto i) {
      using IdxT = typename decltype(i)::type;
      check(fusedsae::gather_rows<T, IdxT>(ptr<T>(out), out_stride, ptr<const T>(values), values_stride,
                                           ptr<const IdxT>(indices), indices_stride, ptr<const T>(table),
                                           table_stride_latent, table_stride_feature, ptr<const T>(bias), n_rows, m,
                                           d, stream_of(stream)),
            "gather_rows");
    });
  });
}

void gather_dot(int dtype, int index_dtype, uintptr_t out, int64_t out_stride, uintptr_t vectors,
                int64_t vectors_stride, uintptr_t indices, int64_t indices_stride, uintptr_t table,
                int64_t table_stride_latent, int64_t table_stride_feature, int64_t n_rows, int64_t m, int64_t d,
                uintptr_t stream) {
  with_float_type(dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    with_index_type(index_dtype, [&](auto i) {
      using IdxT = typename decltype(i)::type;
      check(fusedsae::gather_dot<T, IdxT>(ptr<T>(out), out_stride, ptr<const T>(vectors), vectors_stride,
                                          ptr<const IdxT>(indices), indices_stride, ptr<const T>(table),
                                          table_stride_latent, table_stride_feature, n_rows, m, d,
                                          stream_of(stream)),
            "gather_dot");
    });
  });
}

fusedsae::Segments segments_of(uintptr_t order, uintptr_t keys, uintptr_t offsets, int64_t n_entries, uintptr_t part,
                               uintptr_t part_sum) {
  return {ptr<const int64_t>(order), ptr<const int32_t>(keys), ptr<const int64_t>(offsets),
          n_entries,                 ptr<float>(part),         ptr<float>(part_sum)};
}

void segment_sum_rows(int dtype, uintptr_t out, uintptr_t order, uintptr_t keys, uintptr_t offsets, int64_t n_entries,
                      uintptr_t part, uintptr_t weights, int64_t weights_stride, int64_t m, uintptr_t src,
                      int64_t src_stride, int64_t n_latents, int64_t d, uintptr_t stream) {
  const fusedsae::Segments segments = segments_of(order, keys, offsets, n_entries, part, 0);
  with_float_type(dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    check(fusedsae::segment_sum_rows<T>(ptr<T>(out), segments, ptr<const T>(weights), weights_stride, m,
                                        ptr<const T>(src), src_stride, n_latents, d, stream_of(stream)),
          "segment_sum_rows");
  });
}

void segment_sum_columns(int dtype, uintptr_t out, uintptr_t out_sum, uintptr_t order, uintptr_t keys,
                         uintptr_t offsets, int64_t n_entries, uintptr_t part, uintptr_t part_sum, uintptr_t weights,
                         int64_t weights_stride, int64_t m, uintptr_t src, int64_t src_stride, uintptr_t sub,
                         int64_t n_latents, int64_t d, uintptr_t stream) {
  const fusedsae::Segments segments = segments_of(order, keys, offsets, n_entries, part, part_sum);
  with_float_type(dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    check(fusedsae::segment_sum_columns<T>(ptr<T>(out), ptr<T>(out_sum), segments, ptr<const T>(weights),
                                           weights_stride, m, ptr<const T>(src), src_stride, ptr<const T>(sub),
                                           n_latents, d, stream_of(stream)),
          "segment_sum_columns");
  });
}

void row_topk_select(int dtype, uintptr_t values, uintptr_t indices, uintptr_t scores, int64_t scores_stride,
                     int64_t n_rows, int64_t width, int64_t k, uintptr_t stream) {
  with_float_type(dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    check(fusedsae::row_topk_select<T>(ptr<T>(values), ptr<int64_t>(indices), ptr<const T>(scores), scores_stride,
                                       n_rows, width, k, stream_of(stream)),
          "row_topk_select");
  });
}

void head_partial_sums(int dtype, int index_dtype, uintptr_t out, uintptr_t x, int64_t x_stride, uintptr_t sub,
                       uintptr_t indices, int64_t indices_stride, uintptr_t table, int64_t table_stride_latent,
                       int64_t table_stride_feature, int64_t n_rows, int64_t m, int64_t n_heads, int64_t d_head,
                       uintptr_t stream) {
  with_float_type(dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    with_index_type(index_dtype, [&](auto i) {
      using IdxT = typename decltype(i)::type;
      check(fusedsae::head_partial_sums<T, IdxT>(ptr<T>(out), ptr<const T>(x), x_stride, ptr<const T>(sub),
                                                 ptr<const IdxT>(indices), indices_stride, ptr<const T>(table),
                                                 table_stride_latent, table_stride_feature, n_rows, m, n_heads,
                                                 d_head, stream_of(stream)),
            "head_partial_sums");
    });
  });
}

// Each row of the code is in latent order with its level runs ending at `ends` (int32 [n_rows, n_levels]); values,
// table, bias, y, recon and the gradients share `dtype`.
template <typename T, typename IdxT>
fusedsae::MatryoshkaArgs<T, IdxT> matryoshka_args(uintptr_t values, int64_t values_stride, uintptr_t indices,
                                                  int64_t indices_stride, uintptr_t ends, int64_t ends_stride,
                                                  uintptr_t table, int64_t table_stride, uintptr_t y, int64_t y_stride,
                                                  int64_t n_rows, int64_t m, int64_t d, int64_t n_levels) {
  return {ptr<const T>(values), values_stride, ptr<const IdxT>(indices), indices_stride,
          ptr<const int32_t>(ends), ends_stride, ptr<const T>(table), table_stride,
          ptr<const T>(y), y_stride, n_rows, m, d, n_levels};
}

void matryoshka_decode_loss(int dtype, int index_dtype, uintptr_t recon, int64_t recon_stride, uintptr_t sq_part,
                            uintptr_t values, int64_t values_stride, uintptr_t indices, int64_t indices_stride,
                            uintptr_t ends, int64_t ends_stride, uintptr_t table, int64_t table_stride,
                            uintptr_t y, int64_t y_stride, uintptr_t bias, int64_t n_rows, int64_t m, int64_t d,
                            int64_t n_levels, uintptr_t stream) {
  with_float_type(dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    with_index_type(index_dtype, [&](auto i) {
      using IdxT = typename decltype(i)::type;
      const auto args = matryoshka_args<T, IdxT>(values, values_stride, indices, indices_stride, ends,
                                                 ends_stride, table, table_stride, y, y_stride, n_rows, m, d,
                                                 n_levels);
      check(fusedsae::matryoshka_decode_loss<T, IdxT>(ptr<T>(recon), recon_stride, ptr<float>(sq_part), args,
                                                      ptr<const T>(bias), stream_of(stream)),
            "matryoshka_decode_loss");
    });
  });
}

void matryoshka_decode_loss_backward(int dtype, int index_dtype, uintptr_t dv_part, uintptr_t suffix, uintptr_t dy,
                                     int64_t dy_stride, uintptr_t values, int64_t values_stride, uintptr_t indices,
                                     int64_t indices_stride, uintptr_t ends, int64_t ends_stride, uintptr_t table,
                                     int64_t table_stride, uintptr_t y, int64_t y_stride, uintptr_t recon,
                                     int64_t recon_stride, uintptr_t grad_recon, int64_t grad_recon_stride,
                                     uintptr_t grad_sq, int64_t grad_sq_stride, int64_t n_rows, int64_t m, int64_t d,
                                     int64_t n_levels, uintptr_t stream) {
  with_float_type(dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    with_index_type(index_dtype, [&](auto i) {
      using IdxT = typename decltype(i)::type;
      const auto args = matryoshka_args<T, IdxT>(values, values_stride, indices, indices_stride, ends,
                                                 ends_stride, table, table_stride, y, y_stride, n_rows, m, d,
                                                 n_levels);
      check(fusedsae::matryoshka_decode_loss_backward<T, IdxT>(
                ptr<float>(dv_part), ptr<T>(suffix), ptr<T>(dy), dy_stride, args, ptr<const T>(recon), recon_stride,
                ptr<const T>(grad_recon), grad_recon_stride, ptr<const T>(grad_sq), grad_sq_stride,
                stream_of(stream)),
            "matryoshka_decode_loss_backward");
    });
  });
}

}  // namespace

PYBIND11_MODULE(_C, module) {
  module.doc() =
      "fusedsae's CUDA kernels (csrc/). Launchers take data pointers, sizes and strides in elements, a dtype code "
      "(0 float32, 1 bfloat16, 2 float16; indices 0 int32, 1 int64) and a cudaStream_t handle, all as Python "
      "ints; they launch asynchronously and raise RuntimeError on a CUDA error. Use them through "
      "fusedsae.backends.cuda, which validates tensors first.";
  module.attr("ARCHS") = FUSEDSAE_ARCHS;
  module.attr("SEGMENT_CHUNK") = fusedsae::kSegmentChunk;
  module.attr("MATRYOSHKA_COLUMNS") = fusedsae::kMatryoshkaColumns;
  module.attr("CUDA_VERSION") = CUDART_VERSION;
  module.def("runtime_info", &runtime_info,
             "{runtime_version, driver_version, device_count, error}: what the CUDA runtime linked into the "
             "extension sees (driver_version 0 means no NVIDIA driver); never raises");
  module.def("kernel_image_error", &kernel_image_error,
             "'' if the extension has code for the current device, else the CUDA error a launch would raise");
  // Keyword names are part of the interface: the Python backend passes every argument by name.
  const auto release = py::call_guard<py::gil_scoped_release>();
  module.def("gather_rows", &gather_rows, release, py::arg("dtype"), py::arg("index_dtype"), py::arg("out"),
             py::arg("out_stride"), py::arg("values"), py::arg("values_stride"), py::arg("indices"),
             py::arg("indices_stride"), py::arg("table"), py::arg("table_stride_latent"),
             py::arg("table_stride_feature"), py::arg("bias"), py::arg("n_rows"), py::arg("m"), py::arg("d"),
             py::arg("stream"));
  module.def("gather_dot", &gather_dot, release, py::arg("dtype"), py::arg("index_dtype"), py::arg("out"),
             py::arg("out_stride"), py::arg("vectors"), py::arg("vectors_stride"), py::arg("indices"),
             py::arg("indices_stride"), py::arg("table"), py::arg("table_stride_latent"),
             py::arg("table_stride_feature"), py::arg("n_rows"), py::arg("m"), py::arg("d"), py::arg("stream"));
  module.def("segment_sum_rows", &segment_sum_rows, release, py::arg("dtype"), py::arg("out"), py::arg("order"),
             py::arg("keys"), py::arg("offsets"), py::arg("n_entries"), py::arg("part"), py::arg("weights"),
             py::arg("weights_stride"), py::arg("m"), py::arg("src"), py::arg("src_stride"), py::arg("n_latents"),
             py::arg("d"), py::arg("stream"));
  module.def("segment_sum_columns", &segment_sum_columns, release, py::arg("dtype"), py::arg("out"),
             py::arg("out_sum"), py::arg("order"), py::arg("keys"), py::arg("offsets"), py::arg("n_entries"),
             py::arg("part"), py::arg("part_sum"), py::arg("weights"), py::arg("weights_stride"), py::arg("m"),
             py::arg("src"), py::arg("src_stride"), py::arg("sub"), py::arg("n_latents"), py::arg("d"),
             py::arg("stream"));
  module.def("row_topk_select", &row_topk_select, release, py::arg("dtype"), py::arg("values"), py::arg("indices"),
             py::arg("scores"), py::arg("scores_stride"), py::arg("n_rows"), py::arg("width"), py::arg("k"),
             py::arg("stream"));
  module.def("head_partial_sums", &head_partial_sums, release, py::arg("dtype"), py::arg("index_dtype"),
             py::arg("out"), py::arg("x"), py::arg("x_stride"), py::arg("sub"), py::arg("indices"),
             py::arg("indices_stride"), py::arg("table"), py::arg("table_stride_latent"),
             py::arg("table_stride_feature"), py::arg("n_rows"), py::arg("m"), py::arg("n_heads"), py::arg("d_head"),
             py::arg("stream"));
  module.def("matryoshka_decode_loss", &matryoshka_decode_loss, release, py::arg("dtype"), py::arg("index_dtype"),
             py::arg("recon"), py::arg("recon_stride"), py::arg("sq_part"), py::arg("values"),
             py::arg("values_stride"), py::arg("indices"), py::arg("indices_stride"), py::arg("ends"),
             py::arg("ends_stride"), py::arg("table"), py::arg("table_stride"), py::arg("y"), py::arg("y_stride"),
             py::arg("bias"), py::arg("n_rows"), py::arg("m"), py::arg("d"), py::arg("n_levels"), py::arg("stream"));
  module.def("matryoshka_decode_loss_backward", &matryoshka_decode_loss_backward, release, py::arg("dtype"),
             py::arg("index_dtype"), py::arg("dv_part"), py::arg("suffix"), py::arg("dy"), py::arg("dy_stride"),
             py::arg("values"), py::arg("values_stride"), py::arg("indices"), py::arg("indices_stride"),
             py::arg("ends"), py::arg("ends_stride"), py::arg("table"), py::arg("table_stride"), py::arg("y"),
             py::arg("y_stride"), py::arg("recon"), py::arg("recon_stride"), py::arg("grad_recon"),
             py::arg("grad_recon_stride"), py::arg("grad_sq"), py::arg("grad_sq_stride"), py::arg("n_rows"),
             py::arg("m"), py::arg("d"), py::arg("n_levels"), py::arg("stream"));
}
