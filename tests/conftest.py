"""Test-wide setup: Triton runs in its CPU interpreter when no GPU is present (it must be set before triton loads)."""

import os

if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidia0"):
    os.environ["TRITON_INTERPRET"] = "1"
