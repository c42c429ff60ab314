// The Python module jax_nvrar._C: runtime control and the FFI targets.
// jax_nvrar/_runtime.py is its only user and registers the targets with
// jax.ffi.register_ffi_target once the runtime is up.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "runtime.h"
#include "xla/ffi/api/api.h"

namespace py = pybind11;

XLA_FFI_DECLARE_HANDLER_SYMBOL(NvrarAllReduce);

PYBIND11_MODULE(_C, m) {
  m.doc() = "jax_nvrar native runtime: NVSHMEM start-up and FFI targets";
  m.def("device_count", &jax_nvrar::device_count,
        "CUDA devices visible to this process (0 without a driver)");
  m.def("get_unique_id",
        [] { return py::bytes(jax_nvrar::unique_id()); },
        "A new NVSHMEM unique id (process 0 creates it, all share it)");
  m.def("init", &jax_nvrar::init, py::arg("uid"), py::arg("rank"),
        py::arg("nranks"), py::arg("device"), py::arg("slot_bytes"),
        py::arg("slots"), py::arg("timeout_s"),
        py::call_guard<py::gil_scoped_release>(),
        "Selects the GPU, starts NVSHMEM with the unique id, allocates and "
        "zeroes the symmetric workspace (collective over all PEs)");
  m.def("finalize", &jax_nvrar::finalize,
        py::call_guard<py::gil_scoped_release>(),
        "Frees the workspace and stops NVSHMEM (collective)");
  m.def("my_pe", [] { return jax_nvrar::runtime().pe; });
  m.def("n_pes", [] { return jax_nvrar::runtime().n_pes; });
  m.def("node_pes", [] { return jax_nvrar::runtime().node_pes; },
        "PEs of NVSHMEM's node team (this host)");
  m.def("max_message_bytes", &jax_nvrar::max_message_bytes,
        py::arg("slot_bytes"), py::arg("node_size"), py::arg("num_nodes"),
        "Largest message one kernel launch reduces");
  m.def("trace_rows", [] {
    std::vector<uint64_t> rows;
    if (!jax_nvrar::trace_rows(&rows))
      throw std::runtime_error(
          "jax_nvrar: no kernel trace: build with "
          "JAX_NVRAR_NVCC_FLAGS=-DJAX_NVRAR_TRACE=1 (or the copy failed)");
    return rows;
  }, "The kernel's trace ring, flattened rows (seq, entry, sent, waited, exit)");
  m.def("ffi_targets", [] {
    py::dict targets;
    targets["nvrar_allreduce"] =
        py::capsule(reinterpret_cast<void*>(NvrarAllReduce));
    return targets;
  });
}
