"""moe_fast: expert pruning and dynamic expert skipping for Mixture-of-Experts LLMs.

After "Not All Experts are Equal" (Lu et al., ACL 2024). The kernels live in the compiled
extension and are reachable as ``torch.ops.moe_fast.*`` or through :mod:`moe_fast.ops`.
"""

from __future__ import annotations

from moe_fast import _extension  # noqa: F401  (loads the kernels first)
from moe_fast import ops, reference

__all__ = ["ops", "reference"]
__version__ = "0.1.0"
