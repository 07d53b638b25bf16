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
import platform
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


# Kernels that use instructions beyond baseline x86-64, each folder with its own flags. The rest
# of the build stays baseline, so one build runs on every x86 CPU; the kernels pick at run time
# (moe_fast/kernels.h, CpuLevel). Without the flags (another CPU or compiler) these files compile
# to stubs and the scalar code runs.
_ISA_SOURCES = {"csrc/cpu/avx2/*.cpp": ["-mavx2", "-mfma", "-mf16c"]}


def _isa_flags(compiler_type: str, flags: list[str]) -> list[str]:
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    return flags if x86 and compiler_type == "unix" else []


class _BuildExt(BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension with a persistent object folder, so that rebuilds are incremental,
    and per-folder instruction-set flags (_ISA_SOURCES), which torch's one set of flags lacks."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", f"temp-{_build_key(_want_cuda())}")
        # torch forces a relink on every run when it builds with ninja; ninja already recompiles
        # only what changed, and the sources, headers and config stamp in `depends` say when the
        # extension is out of date, so an up-to-date extension is neither recompiled nor relinked.
        self.force = False

    def build_extension(self, ext) -> None:
        # Compiled first, in their own ninja file (own folder), then linked in as extra objects.
        base = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) else ext.extra_compile_args
        for pattern, flags in _ISA_SOURCES.items():
            sources = _sources(pattern)
            if not sources:
                continue
            objects = self.compiler.compile(
                sources,
                output_dir=os.path.join(self.build_temp, "isa", os.path.basename(os.path.dirname(pattern))),
                include_dirs=ext.include_dirs,
                extra_postargs={"cxx": [*base, *_isa_flags(self.compiler.compiler_type, flags)]},
                depends=ext.depends,
            )
            ext.extra_objects = [o for o in ext.extra_objects if o not in objects] + objects
        super().build_extension(ext)


def _extension():
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx_flags = ["-O3", "-fvisibility=hidden"]
    sources = ["csrc/registration.cpp", "csrc/bindings/cpu_bindings.cpp", *_sources("csrc/cpu/*.cpp")]
    cuda = _want_cuda()
    isa_sources = [p for pattern in _ISA_SOURCES for p in (*_sources(pattern), *_sources(pattern[:-3] + "h"))]
    depends = [
        *_sources("csrc/include/moe_fast/*.h"),
        *_sources("csrc/bindings/*.h"),
        *isa_sources,
        _config_stamp(cuda),
    ]
    if cuda:
        sources += ["csrc/bindings/cuda_bindings.cpp", *_sources("csrc/cuda/*.cu")]
        depends += _sources("csrc/cuda/*.cuh")
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
