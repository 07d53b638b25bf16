"""Builds moe_fast._C against the installed torch.

Install with ``pip install --no-build-isolation -e .`` so that the extension compiles against the
torch already in the environment (build isolation would fetch a different torch, on many machines
a CUDA build of several GB).

CUDA kernels are built when the installed torch has CUDA and nvcc is found. ``MOE_FAST_CUDA=1``
forces them (and fails if they cannot be built), ``MOE_FAST_CUDA=0`` skips them.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - a message for people, not a code path to test
    sys.exit(
        "moe_fast needs torch installed before it is built: pip install torch, then "
        "pip install --no-build-isolation -e ."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    switch = os.environ.get("MOE_FAST_CUDA", "auto").lower()
    if switch in ("0", "false", "no", "off"):
        return False
    found = torch.version.cuda is not None and (CUDA_HOME is not None or shutil.which("nvcc") is not None)
    if switch in ("1", "true", "yes", "on"):
        if not found:
            sys.exit(
                f"MOE_FAST_CUDA=1 but torch {torch.__version__} has no CUDA or nvcc is missing "
                f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})"
            )
        return True
    return found


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extension():
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx_flags = ["-O3", "-std=c++17", "-fvisibility=hidden"]
    sources = ["csrc/registration.cpp", "csrc/bindings/cpu_bindings.cpp", *_sources("csrc/cpu/*.cpp")]
    if _want_cuda():
        sources += ["csrc/bindings/cuda_bindings.cpp", *_sources("csrc/cuda/*.cu")]
        nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]
        return CUDAExtension(
            "moe_fast._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags + ["-DMOE_FAST_WITH_CUDA"], "nvcc": nvcc_flags},
        )
    return CppExtension("moe_fast._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags})


setup(
    packages=find_packages(include=["moe_fast", "moe_fast.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
