"""Stock or patched: CTXEXT_SUITE_PATCHED=1 imports ctxext_kernels (the monkey-patch) before any test module, so
every family transformers loads afterwards is patched; otherwise transformers stays stock."""

import os

os.environ["CTXEXT_NO_PATCH"] = "0" if os.environ.get("CTXEXT_SUITE_PATCHED") == "1" else "1"
import ctxext_kernels  # noqa: E402,F401

if os.environ.get("CTXEXT_SUITE_ATTN"):
    # The tester's configs ask for CTXEXT_SUITE_ATTN; a reloaded model (save/load tests) asks for it too, as a user of
    # that backend does at every from_pretrained (transformers does not save the attention implementation).
    import functools

    import transformers

    _from_pretrained = transformers.PreTrainedModel.from_pretrained.__func__

    @functools.wraps(_from_pretrained)
    def _with_backend(cls, *args, **kwargs):
        kwargs.setdefault("attn_implementation", os.environ["CTXEXT_SUITE_ATTN"])
        return _from_pretrained(cls, *args, **kwargs)

    transformers.PreTrainedModel.from_pretrained = classmethod(_with_backend)
