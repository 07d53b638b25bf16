"""Loads the compiled kernels; without them nothing in moe_fast can run, so fail loudly."""

from __future__ import annotations

import torch  # noqa: F401  (the extension links against torch's libraries)

try:
    from moe_fast import _C  # noqa: F401  (importing it registers torch.ops.moe_fast.*)
except ImportError as err:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "moe_fast's compiled extension (moe_fast._C) is missing or does not match the installed torch "
        f"({torch.__version__}). Build it from the source tree with:\n"
        "    pip install --no-build-isolation -e .\n"
        f"Original error: {err}"
    ) from err

HAS_CUDA_KERNELS: bool = torch._C._dispatch_has_kernel_for_dispatch_key("moe_fast::route", "CUDA")
