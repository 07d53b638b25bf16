"""``moe_fast.ops``: the ops' public name (``moe_fast.ops``, ``import moe_fast.ops``); the code lives in :mod:`moe_fast.kernels.ops`.

An alias, not a copy: ``sys.modules`` maps this name to that module, so ``import moe_fast.ops``,
``from moe_fast.ops import ...`` and ``mock.patch("moe_fast.ops.NAME")`` all reach the same object.
moe_fast's own modules import moe_fast.kernels.ops.
"""

import sys

from moe_fast.kernels import ops as _ops

sys.modules[__name__] = _ops
