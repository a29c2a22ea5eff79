"""Smoke test of an installed ctxext_kernels wheel (run from outside the source tree, in a fresh venv).

Checks that the installed package (not the source tree) imports, that its extension was built with the expected CUDA
version, and that its host build rotates exactly like the reference; on a GPU also the CUDA and Triton kernels.
"""

import argparse
import sys

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda-version", help="expected CUDA major+minor of the extension, e.g. 130")
    args = parser.parse_args()

    import ctxext_kernels as ck
    import ctxext_kernels._C as ext

    assert "site-packages" in ck.__file__, f"testing the source tree, not the wheel: {ck.__file__}"
    built = ext.cuda_version.replace(".", "") if ext.has_cuda else None
    assert args.cuda_version is None or built == args.cuda_version, f"extension built with CUDA {ext.cuda_version}"
    spec = ck.RopeSpec.from_params(128, 500000.0, "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                   original_max_position_embeddings=8192)
    q, k = torch.randn(2, 8, 64, 128), torch.randn(2, 2, 64, 128)
    pos = torch.randint(0, 2**20, (2, 64))
    want = ck.apply_rope(q, k, pos, spec, backend="torch")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for backend in ("cpu",) if device == "cpu" else ("cuda", "triton"):
            got = ck.apply_rope(q.to(device), k.to(device), pos.to(device), spec.to(device), backend=backend)
            for g, w in zip(got, want):
                torch.testing.assert_close(g.cpu(), w, rtol=4e-6, atol=4e-6)
            print(f"ok: {backend} backend on {device} matches the reference")
    print(f"ok: ctxext_kernels {ck.__version__}, extension CUDA {ext.cuda_version or 'none'} for "
          f"{', '.join(ext.cuda_archs) or '-'}, torch {torch.__version__}, python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
