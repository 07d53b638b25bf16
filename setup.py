"""Builds moe_fast._C against the installed torch.

Install with ``pip install --no-build-isolation -e .`` so that the extension compiles against the
torch already in the environment (build isolation would fetch a different torch, on many machines
a CUDA build of several GB).

CUDA kernels are built when the installed torch has CUDA and nvcc is found. ``MOE_FAST_CUDA=1``
forces them (and fails if they cannot be built), ``MOE_FAST_CUDA=0`` skips them.

Rebuilds are incremental: object files live in ``build/temp-<python>-torch<version>-<cpu|cuda>``
(also for editable installs, which would otherwise compile everything in a fresh temporary
folder), ninja recompiles only the sources and headers that changed, and the link is skipped when
the extension is newer than every source, header and the build configuration.
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


def _build_key(cuda: bool) -> str:
    """Names one build configuration: objects of another torch or CUDA setting are never reused."""
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "native") if cuda else ""
    arch = "".join(c if c.isalnum() else "_" for c in arch)
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-{'cuda' + arch if cuda else 'cpu'}"
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in tag)


def _config_stamp(cuda: bool) -> str:
    """A file whose content is the build configuration, rewritten only when that changes.

    It is among the extension's dependencies, so switching torch, MOE_FAST_CUDA or the CUDA
    architectures relinks the extension even when no source changed.
    """
    config = f"{_build_key(cuda)}\ntorch {torch.__version__} at {os.path.dirname(torch.__file__)}\n"
    path = os.path.join(ROOT, "build", "config.stamp")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(path) as f:
            if f.read() == config:
                return os.path.relpath(path, ROOT)
    except OSError:
        pass
    with open(path, "w") as f:
        f.write(config)
    return os.path.relpath(path, ROOT)


class _BuildExt(BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension with a persistent object folder, so that rebuilds are incremental."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", f"temp-{_build_key(_want_cuda())}")
        # torch forces a relink on every run when it builds with ninja; ninja already recompiles
        # only what changed, and the sources, headers and config stamp in `depends` say when the
        # extension is out of date, so an up-to-date extension is neither recompiled nor relinked.
        self.force = False


def _extension():
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx_flags = ["-O3", "-fvisibility=hidden"]
    sources = ["csrc/registration.cpp", "csrc/bindings/cpu_bindings.cpp", *_sources("csrc/cpu/*.cpp")]
    cuda = _want_cuda()
    depends = [*_sources("csrc/include/moe_fast/*.h"), *_sources("csrc/bindings/*.h"), _config_stamp(cuda)]
    if cuda:
        sources += ["csrc/bindings/cuda_bindings.cpp", *_sources("csrc/cuda/*.cu")]
        # No -std: torch's cpp_extension passes the standard its headers need (C++17 up to torch
        # 2.11, C++20 from 2.13); overriding it makes its headers warn or fail.
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr"]
        return CUDAExtension(
            "moe_fast._C",
            sources,
            include_dirs=include_dirs,
            depends=depends,
            extra_compile_args={"cxx": cxx_flags + ["-DMOE_FAST_WITH_CUDA"], "nvcc": nvcc_flags},
        )
    return CppExtension(
        "moe_fast._C", sources, include_dirs=include_dirs, depends=depends, extra_compile_args={"cxx": cxx_flags}
    )


setup(
    packages=find_packages(include=["moe_fast", "moe_fast.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildExt},
)
