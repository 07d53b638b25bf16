"""``moe_fast.reference``: the documented specification (``moe_fast.reference``); the code lives in :mod:`moe_fast.kernels.reference`.

An alias, not a copy: ``sys.modules`` maps this name to that module, so ``import moe_fast.reference``,
``from moe_fast.reference import ...`` and ``mock.patch("moe_fast.reference.NAME")`` all reach the same object.
moe_fast's own modules import moe_fast.kernels.reference.
"""

import sys

from moe_fast.kernels import reference as _reference

sys.modules[__name__] = _reference
