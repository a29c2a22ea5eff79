// Python bindings of the fused RoPE-attention launchers: AttentionArgs filled by name, two launch functions.
// (A .cu file because CMake collects csrc/attention/*.cu; it holds host code only.)
#include <pybind11/pybind11.h>

#include "attention/attention.h"

namespace ctxext {

void register_attention(pybind11::module_& m) {
  namespace py = pybind11;
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
      .def_readwrite("grad_out", &AttentionArgs::grad_out)
      .def_readwrite("delta", &AttentionArgs::delta)
      .def_readwrite("grad_q", &AttentionArgs::grad_q)
      .def_readwrite("grad_k", &AttentionArgs::grad_k)
      .def_readwrite("grad_v", &AttentionArgs::grad_v)
      .def_readwrite("dtype", &AttentionArgs::dtype)
      .def_readwrite("positions_int64", &AttentionArgs::positions_int64)
      .def_readwrite("max_seqlen", &AttentionArgs::max_seqlen)
      .def_readwrite("scaling", &AttentionArgs::scaling)
      .def_readwrite("softmax_scale", &AttentionArgs::softmax_scale)
      .def_readwrite("causal", &AttentionArgs::causal)
      .def_readwrite("interleaved", &AttentionArgs::interleaved)
      .def_readwrite("exact", &AttentionArgs::exact)
      .def_readwrite("rotate", &AttentionArgs::rotate)
      .def_readwrite("device", &AttentionArgs::device)
      .def_readwrite("stream", &AttentionArgs::stream);
  m.def("rope_attention_forward_cuda", &rope_attention_forward_cuda, py::arg("args"),
        "Fused RoPE + attention forward into args.out and args.lse (asynchronous on args.stream).");
  m.def("rope_attention_backward_cuda", &rope_attention_backward_cuda, py::arg("args"),
        "Fused backward into args.grad_q, grad_k, grad_v (gradients of the unrotated q, k and of v).");
  m.attr("has_attention") = true;
}

}  // namespace ctxext
