"""Test-wide setup, before anything imports triton or ctxext_kernels:
- Triton runs in its CPU interpreter when no GPU is present;
- `import ctxext_kernels` leaves transformers stock (CTXEXT_NO_PATCH=1): many tests use stock transformers as the
  oracle, and the ones about the patch call patch()/unpatch() themselves (test_import_patch checks the import-time
  patch in fresh interpreters)."""

import os

if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidia0"):
    os.environ["TRITON_INTERPRET"] = "1"
os.environ["CTXEXT_NO_PATCH"] = "1"
