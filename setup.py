"""Build and install ctxext_kernels.

The native module `ctxext_kernels._C` is built by CMake (CMakeLists.txt, ninja): its host part always, its CUDA
kernels when nvcc is found and CTXEXT_BUILD_CUDA is not "0". If no C++ toolchain works at all, the package still
installs (Triton kernels + the PyTorch reference) and says so.

Environment:
    CTXEXT_BUILD_CUDA   "0" skips the CUDA kernels; "1" requires them (no nvcc or a compile error fails the build);
                        default: build them when nvcc is found, and fall back to the host part if that fails
    CTXEXT_CUDA_ARCHS   CUDA archs, e.g. "90", "80;90" or torch's "8.0 9.0+PTX" (default: 80;86;89;90, plus 100;120 on
                        CUDA >= 12.8)
    CUDACXX / CUDA_HOME where nvcc lives, when it is not on PATH
    MAX_JOBS            parallel compile jobs
    CTXEXT_LOCAL_VERSION  a PEP 440 local version appended to the version, e.g. "cu130" -> 0.1.0+cu130
                          (scripts/build_wheels.sh sets it per CUDA toolkit)
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def read_version() -> str:
    namespace: dict = {}
    exec((ROOT / "ctxext_kernels" / "_version.py").read_text(), namespace)
    local = os.environ.get("CTXEXT_LOCAL_VERSION")
    return f"{namespace['__version__']}+{local}" if local else namespace["__version__"]


def find_nvcc() -> str | None:
    for candidate in (os.environ.get("CUDACXX"), os.environ.get("CUDA_HOME") and
                      os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"), shutil.which("nvcc"),
                      "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def cuda_archs_from_env() -> str:
    """CTXEXT_CUDA_ARCHS as CMake's list ("80;90a"), also accepting torch's spelling ("8.0 9.0a+PTX", commas).

    Every arch is built as SASS + PTX anyway, so "+PTX" adds nothing. Empty means CMakeLists.txt's default.
    """
    archs = []
    for entry in re.split(r"[;,\s]+", os.environ.get("CTXEXT_CUDA_ARCHS", "").strip()):
        if not entry:
            continue
        arch = entry.removesuffix("+PTX").replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", arch):
            raise ValueError(f"CTXEXT_CUDA_ARCHS: cannot read {entry!r} as a CUDA arch (e.g. 90, 9.0, 90a, 8.6+PTX)")
        archs.append(arch)
    return ";".join(archs)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt into the extension's output folder (in-place for editable installs)."""

    def run(self):
        try:
            super().run()
        except ValueError:  # a misconfigured CTXEXT_CUDA_ARCHS: say so instead of quietly installing without _C
            raise
        except Exception as exc:  # noqa: BLE001 - any toolchain failure: the pure-python package still works
            if os.environ.get("CTXEXT_BUILD_CUDA") == "1":
                raise
            self.warn("\n" + "=" * 100 + f"\nctxext_kernels: the native extension failed to build ({exc}).\n"
                      "Installing without it: the 'cuda' and 'cpu' RoPE backends are unavailable; Triton and the "
                      "PyTorch reference still work.\n" + "=" * 100)

    def build_extension(self, ext: Extension):
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        target.unlink(missing_ok=True)  # a failed build must not ship the module left in build/ by an earlier one
        output_dir = target.parent
        want_cuda = os.environ.get("CTXEXT_BUILD_CUDA", "auto")
        nvcc = find_nvcc() if want_cuda != "0" else None
        if want_cuda == "1" and not nvcc:
            raise RuntimeError("CTXEXT_BUILD_CUDA=1 but no nvcc was found (set CUDACXX or CUDA_HOME)")
        if nvcc:
            try:
                self.cmake_build(output_dir, nvcc)
                return
            except subprocess.CalledProcessError as exc:
                if want_cuda == "1":  # asked for explicitly: a CUDA compile error must not pass silently
                    raise
                self.warn(f"ctxext_kernels: the CUDA build failed ({exc}); building the host part only")
        self.cmake_build(output_dir, None)

    def cmake_build(self, output_dir: Path, nvcc: str | None):
        import pybind11

        build_dir = Path(self.build_temp).resolve() / ("cmake-cuda" if nvcc else "cmake-host")
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCTXEXT_OUTPUT_DIR={output_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCTXEXT_WITH_CUDA={'ON' if nvcc else 'OFF'}",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        if nvcc:
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCTXEXT_CUDA_ARCHS={cuda_archs_from_env()}"]
        cuda_note = f"enabled, nvcc {nvcc}" if nvcc else "disabled (no nvcc, CTXEXT_BUILD_CUDA=0 or its build failed)"
        print(f"ctxext_kernels: building _C, CUDA {cuda_note}", flush=True)
        start = time.perf_counter()
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)
        print(f"ctxext_kernels: _C built in {time.perf_counter() - start:.0f} s", flush=True)


POSE_EXTRAS = ["gguf", "matplotlib", "pyarrow", "datasets", "peft"]

setup(
    name="ctxext_kernels",
    version=read_version(),
    description="Exact-angle RoPE kernels (CUDA, Triton), fused RoPE + FlashAttention, a transformers drop-in and "
                "PoSE context-window extension",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ctxext_kernels", "ctxext_kernels.*"]),
    ext_modules=[CMakeExtension("ctxext_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch>=2.4",
        "triton; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "transformers>=4.57",
        "tqdm",
        "numpy",
    ],
    extras_require={
        # what ctxext-train / ctxext-eval load only when asked: .gguf models, eval plots, .parquet and datasets data
        "pose": POSE_EXTRAS,
        "dev": ["pytest", *POSE_EXTRAS, "accelerate", "mpmath", "pybind11>=2.12", "ninja", "trl"],
        "flash": ["flash-attn"],
    },
    entry_points={
        "console_scripts": [
            "ctxext-train = ctxext_kernels.pose.train:main",
            "ctxext-eval = ctxext_kernels.pose.eval:main",
            "ctxext-env = ctxext_kernels.env:main",
        ],
    },
    zip_safe=False,
)
