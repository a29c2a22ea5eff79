// CUDA runtime helpers shared by the launchers (rope_kernels.cu, attention/): errors turned into readable exceptions
// and a guard that runs a launch on the tensors' device. Host code only; include from .cu files.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace ctxext {

// Throw std::runtime_error "<op>: <what> failed: cudaErrorX (description)" when `status` is an error.
inline void check_cuda(cudaError_t status, const char* op, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("ctxext ") + op + ": " + what + " failed: " + cudaGetErrorName(status) +
                             " (" + cudaGetErrorString(status) + ")");
  }
}

// Make `device` current for the guard's lifetime and restore the caller's device afterwards (torch's current device
// may differ from the tensors' device).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "DeviceGuard", "cudaGetDevice");
    if (device != previous_) check_cuda(cudaSetDevice(device), "DeviceGuard", "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace ctxext
