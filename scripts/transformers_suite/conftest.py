"""Stock or patched: CTXEXT_SUITE_PATCHED=1 imports ctxext_kernels (the monkey-patch) before any test module, so
every family transformers loads afterwards is patched; otherwise transformers stays stock."""

import os

os.environ["CTXEXT_NO_PATCH"] = "0" if os.environ.get("CTXEXT_SUITE_PATCHED") == "1" else "1"
import ctxext_kernels  # noqa: E402,F401
