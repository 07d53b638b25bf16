"""moe_fast: expert pruning and dynamic expert skipping for Mixture-of-Experts LLMs.

After "Not All Experts are Equal" (Lu et al., ACL 2024). The kernels live in the compiled
extension and are reachable as ``torch.ops.moe_fast.*`` or through :mod:`moe_fast.ops`.
"""

from __future__ import annotations

import os as _os
import sys as _sys

# Run as the `moe-fast` command (or `python -m moe_fast`) and before torch loads: let idle
# OpenMP threads sleep instead of spinning. On a machine whose cores are shared, spinning
# threads slowed generation about tenfold. Library users keep their own setting.
if "torch" not in _sys.modules and _sys.argv and (
    _sys.argv[0] == "-m" or _os.path.basename(_sys.argv[0]) == "moe-fast"
):
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from moe_fast.kernels import extension as _extension  # noqa: F401  (loads the kernels first)
from moe_fast.kernels import ops, reference
from moe_fast.serving.experts import register_when_transformers_loads as _register_experts

_register_experts()  # experts_implementation="moe_fast" in transformers

# Skipping and patching (imported lazily: they pull in transformers).
_LAZY = {
    "calibrate_skipping": "moe_fast.serving.skipping",
    "SkipCalibration": "moe_fast.serving.betas",
    "patch": "moe_fast.serving.patching",
    "unpatch": "moe_fast.serving.patching",
    "PatchHandle": "moe_fast.serving.patching",
    "save": "moe_fast.serving.saving",
    "from_pretrained": "moe_fast.serving.saving",
    # Expert pruning.
    "prune": "moe_fast.pruning",
    "PruneReport": "moe_fast.pruning",
    "PruneResult": "moe_fast.pruning",
    "load_calibration": "moe_fast.data.calibration",
    # experts_implementation="moe_fast" in transformers, explicitly (import already does it lazily).
    "register": "moe_fast.serving.experts",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moe_fast' has no attribute {name!r}")


__all__ = ["ops", "reference", *_LAZY]
__version__ = "0.1.0"
