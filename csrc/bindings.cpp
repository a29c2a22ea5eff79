// The one binding file: module ctxext_kernels._C. Free of torch's C++ ABI: every argument is a plain value (data
// pointers and the CUDA stream as Python ints, shapes and strides as int lists, a dtype tag), so one build serves
// every torch version with the same CUDA major. The launcher signature is stated once, as RopeArgs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <string>
#include <vector>

#include "ctxext/rope_math.h"
#include "rope.h"

// The fused-attention launchers are bound when CMake compiled their sources (csrc/attention/).
#if CTXEXT_WITH_CUDA && CTXEXT_WITH_ATTENTION && __has_include("attention/attention.h")
#include "attention/attention.h"
#define CTXEXT_HAS_ATTENTION 1
#endif

namespace py = pybind11;

namespace ctxext {
namespace {

// cos/sin of rope_cos_sin for every (position, frequency) pair, evaluated by the host build of the header.
py::tuple host_cos_sin(py::array_t<int64_t, py::array::c_style | py::array::forcecast> positions,
                       py::array_t<float, py::array::c_style | py::array::forcecast> inv_freq, float scaling,
                       bool exact, bool conjugate) {
  if (positions.ndim() != 1) throw std::invalid_argument("positions: expected a 1-D array [P]");
  if (inv_freq.ndim() != 1) throw std::invalid_argument("inv_freq: expected a 1-D array [F]");
  const auto n_pos = positions.shape(0), n_freq = inv_freq.shape(0);
  const int64_t* pos = positions.data();
  for (py::ssize_t i = 0; i < n_pos; ++i) {
    if (pos[i] < 0 || pos[i] > kMaxPosition) {
      throw std::invalid_argument("positions: values must lie in [0, 2^24), got " + std::to_string(pos[i]));
    }
  }
  py::array_t<float> cos({n_pos, n_freq}), sin({n_pos, n_freq});
  float* cos_out = cos.mutable_data();
  float* sin_out = sin.mutable_data();
  const float* freq = inv_freq.data();
  for (py::ssize_t i = 0; i < n_pos; ++i) {
    for (py::ssize_t j = 0; j < n_freq; ++j) {
      const CosSin cs = rope_cos_sin(pos[i], freq[j], scaling, exact, conjugate);
      cos_out[i * n_freq + j] = cs.cos;
      sin_out[i * n_freq + j] = cs.sin;
    }
  }
  return py::make_tuple(cos, sin);
}

py::list cuda_archs() {
  py::list archs;
#ifdef CTXEXT_CUDA_ARCHS
  const std::string list = CTXEXT_CUDA_ARCHS;  // "80,86,90" from CMake
  size_t start = 0;
  while (start < list.size()) {
    const size_t end = std::min(list.find(',', start), list.size());
    if (end > start) archs.append(list.substr(start, end - start));
    start = end + 1;
  }
#endif
  return archs;
}

#if CTXEXT_HAS_ATTENTION
// The fused RoPE-attention launchers (csrc/attention/): AttentionArgs filled by name, two launch functions.
void register_attention(py::module_& m) {
  py::class_<AttentionArgs>(m, "AttentionArgs",
                            "Arguments of the fused RoPE-attention launchers, filled by name (see "
                            "csrc/attention/attention.h).")
      .def(py::init<>())
      .def_readwrite("q", &AttentionArgs::q)
      .def_readwrite("k", &AttentionArgs::k)
      .def_readwrite("v", &AttentionArgs::v)
      .def_readwrite("out", &AttentionArgs::out)
      .def_readwrite("lse", &AttentionArgs::lse)
      .def_readwrite("positions", &AttentionArgs::positions)
      .def_readwrite("inv_freq", &AttentionArgs::inv_freq)
      .def_readwrite("cu_seqlens", &AttentionArgs::cu_seqlens)
      .def_readwrite("cu_seqlens_k", &AttentionArgs::cu_seqlens_k)
      .def_readwrite("grad_out", &AttentionArgs::grad_out)
      .def_readwrite("delta", &AttentionArgs::delta)
      .def_readwrite("grad_q", &AttentionArgs::grad_q)
      .def_readwrite("grad_k", &AttentionArgs::grad_k)
      .def_readwrite("grad_v", &AttentionArgs::grad_v)
      .def_readwrite("dtype", &AttentionArgs::dtype)
      .def_readwrite("positions_int64", &AttentionArgs::positions_int64)
      .def_readwrite("max_seqlen_q", &AttentionArgs::max_seqlen_q)
      .def_readwrite("max_seqlen_k", &AttentionArgs::max_seqlen_k)
      .def_readwrite("scaling", &AttentionArgs::scaling)
      .def_readwrite("softmax_scale", &AttentionArgs::softmax_scale)
      .def_readwrite("causal", &AttentionArgs::causal)
      .def_readwrite("interleaved", &AttentionArgs::interleaved)
      .def_readwrite("exact", &AttentionArgs::exact)
      .def_readwrite("rotate", &AttentionArgs::rotate)
      .def_readwrite("device", &AttentionArgs::device)
      .def_readwrite("stream", &AttentionArgs::stream);
  m.def("rope_attention_forward_cuda", &rope_attention_forward_cuda, py::arg("args"),
        "Fused RoPE + attention forward into args.out and args.lse, k given rotated (asynchronous on args.stream).");
  m.def("rope_attention_backward_cuda", &rope_attention_backward_cuda, py::arg("args"),
        "Fused backward into args.grad_q, grad_k, grad_v (gradients of the unrotated q, the rotated k and v; q "
        "given rotated).");
  m.attr("has_attention") = true;
}
#endif

void register_module(py::module_& m) {
  py::enum_<DType>(m, "DType", "Element type tag of q, k, q_out and k_out.")
      .value("float32", DType::kFloat32)
      .value("float16", DType::kFloat16)
      .value("bfloat16", DType::kBFloat16);

  py::class_<TensorView>(m, "TensorView", "A strided tensor: data pointer (int), shape and strides in elements.")
      .def(py::init<>())
      .def(py::init([](uintptr_t data, std::vector<int64_t> shape, std::vector<int64_t> strides) {
             return TensorView{data, std::move(shape), std::move(strides)};
           }),
           py::arg("data"), py::arg("shape"), py::arg("strides"))
      .def_readwrite("data", &TensorView::data)
      .def_readwrite("shape", &TensorView::shape)
      .def_readwrite("strides", &TensorView::strides);

  py::class_<RopeArgs>(m, "RopeArgs", "Arguments of the RoPE launcher, filled by name (see csrc/rope.h).")
      .def(py::init<>())
      .def_readwrite("q", &RopeArgs::q)
      .def_readwrite("k", &RopeArgs::k)
      .def_readwrite("q_out", &RopeArgs::q_out)
      .def_readwrite("k_out", &RopeArgs::k_out)
      .def_readwrite("positions", &RopeArgs::positions)
      .def_readwrite("inv_freq", &RopeArgs::inv_freq)
      .def_readwrite("dtype", &RopeArgs::dtype)
      .def_readwrite("positions_int64", &RopeArgs::positions_int64)
      .def_readwrite("scaling", &RopeArgs::scaling)
      .def_readwrite("interleaved", &RopeArgs::interleaved)
      .def_readwrite("conjugate", &RopeArgs::conjugate)
      .def_readwrite("exact", &RopeArgs::exact)
      .def_readwrite("device", &RopeArgs::device)
      .def_readwrite("stream", &RopeArgs::stream);

  m.def("rope_host", &rope_host, py::arg("args"), py::call_guard<py::gil_scoped_release>(),
        "Rotate CPU tensors (the host build of the CUDA kernel's work items).");
#if CTXEXT_WITH_CUDA
  m.def("rope_cuda", &rope_cuda, py::arg("args"), "Launch the RoPE kernel on args.stream (asynchronous).");
  m.attr("has_cuda") = true;
  m.attr("cuda_version") = CTXEXT_CUDA_VERSION;  // the toolkit it was built with (its runtime is linked statically)
#else
  m.def(
      "rope_cuda", [](const RopeArgs&) { throw std::runtime_error("ctxext_kernels._C was built without CUDA"); },
      py::arg("args"));
  m.attr("has_cuda") = false;
  m.attr("cuda_version") = py::none();
#endif
  m.attr("cuda_archs") = cuda_archs();
  m.def("host_cos_sin", &host_cos_sin, py::arg("positions"), py::arg("inv_freq"), py::arg("scaling") = 1.0f,
        py::arg("exact") = true, py::arg("conjugate") = false,
        "rope_cos_sin of the math header for positions [P] x inv_freq [F]: (cos, sin), fp32 arrays [P, F].");
  m.attr("max_position") = kMaxPosition;
#if CTXEXT_HAS_ATTENTION
  register_attention(m);
#endif
}

}  // namespace
}  // namespace ctxext

PYBIND11_MODULE(_C, m) {
  m.doc() = "ctxext_kernels native extension: RoPE launcher (CUDA and host build) and math-header test hooks.";
  ctxext::register_module(m);
}
