"""The ``moe_fast`` experts implementation for transformers' ``ExpertsInterface``.

Why: transformers' built-in paths either loop over experts in Python (eager) or compute every
slot (grouped_mm has no notion of a skipped slot). This one runs the expert MLPs from a dispatch
plan (slots grouped by expert, skipped slots last) with grouped GEMMs, so a skipped slot (index
E, weight 0) costs nothing.

Where the plan comes from: the fused route op already computed it, so a patched router hands it
over through the block's :class:`PlanChannel` (``experts.moe_fast_plans``, set by ``patch``, one
per block): the router ``put``s the plan of its call next to the ``indices`` it returns, and this
implementation ``take``s it once, for exactly the ``top_k_index`` tensor it was given. Any other
call (no patched router, the block passed other indices, the experts run a second time) finds
nothing to take and rebuilds the plan from ``top_k_index`` with a stable sort (``build_plan``),
which gives the same plan.

Under ``torch.compile`` the plan's row counts would be data the graph cannot depend on, so the
experts sort the slots themselves and run every slot's row through ``moe_fast::grouped_matmul``
(``_static_forward``; skipped rows are zero and weigh 0), and the router puts no plan.

Registered as ``experts_implementation="moe_fast"`` on import of :mod:`moe_fast`, and by
:func:`register` (``moe_fast.register()``), which ``patch`` (and so ``moe_fast.from_pretrained``) calls.
Why a meta-path finder (``_RegisterOnImport``) does it on import: the README promises that
``AutoModelForCausalLM.from_pretrained(..., experts_implementation="moe_fast")`` works after a
bare ``import moe_fast``, while ``import moe_fast`` must not import transformers (a second or more
of start-up for every op user). transformers offers no hook that runs when its moe integration
loads, and ``ExpertsInterface`` is a class attribute of that module, so the only place to register
lazily is that module's own import: the finder wraps its loader's ``exec_module`` (nothing in
transformers is edited) and removes nothing else from the import path. Code that imports
transformers before moe_fast is registered at once instead.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

NAME = "moe_fast"


class DispatchPlan(NamedTuple):
    """Dispatch plan of one call: which slots each expert computes."""

    perm: torch.Tensor  # [T*k] int64: flat slots t*k+j grouped by expert, skipped last
    ends: torch.Tensor  # [E] int32: where each expert's rows end (grouped_mm's ``offs``), RouteResult.offsets[1:]
    active: int  # number of slots that are computed (ends[-1])


PLAN_CHANNEL_ATTR = "moe_fast_plans"  # the experts module's attribute that holds its block's PlanChannel


class PlanChannel:
    """The patched router's dispatch plan, on its way to the experts call of the same block.

    Why a channel and not a recomputation: the route op has already grouped the slots by expert;
    rebuilding the plan would sort them a second time in every layer. Why keyed by the ``indices``
    tensor: the plan belongs to the routing the router returned; a block that hands the experts
    other indices (or experts that run without their router first) must not get it. One plan at a
    time, taken once.
    """

    __slots__ = ("_indices", "_plan")

    def __init__(self) -> None:
        self._indices: torch.Tensor | None = None
        self._plan: DispatchPlan | None = None

    def put(self, indices: torch.Tensor, perm: torch.Tensor, offsets: torch.Tensor) -> None:
        """Leaves the plan of the router call that returned ``indices`` ([T, k], E = skipped).

        ``perm`` [T*k] and ``offsets`` [E + 1] (starting at 0) as the route op returns them.
        """
        ends = offsets[1:]
        self._indices = indices
        self._plan = DispatchPlan(perm.long(), ends, int(ends[-1]) if ends.numel() else 0)

    def take(self, top_k_index: torch.Tensor) -> DispatchPlan | None:
        """The plan put for exactly ``top_k_index`` (None otherwise); the channel is empty afterwards."""
        indices, plan = self._indices, self._plan
        self._indices = self._plan = None
        return plan if indices is top_k_index else None


def _plan_for(experts: nn.Module, top_k_index: torch.Tensor) -> DispatchPlan:
    """The router's plan when its channel holds one for these indices, else one built from them."""
    channel = getattr(experts, PLAN_CHANNEL_ATTR, None)
    plan = channel.take(top_k_index) if isinstance(channel, PlanChannel) else None
    return plan if plan is not None else build_plan(top_k_index, experts.num_experts)


def build_plan(top_k_index: torch.Tensor, num_experts: int) -> DispatchPlan:
    """The plan from indices alone ([T, k], E = skipped): a stable sort by expert."""
    flat = top_k_index.reshape(-1)
    sorted_ids, perm = torch.sort(flat, stable=True)
    counts = torch.bincount(flat.clamp(max=num_experts), minlength=num_experts + 1)[:num_experts]
    ends = torch.cumsum(counts, 0, dtype=torch.int32)
    active = int(ends[-1]) if num_experts else 0
    return DispatchPlan(perm, ends, active)


# CPU float32: BLAS runs a 1-row product as a matrix-vector kernel at memory speed, but a 2..8-row
# one through a GEMM path that is several times slower per call (measured with torch 2.13 / MKL,
# 1024 x 7168: 1 row 1.8 ms, 2 rows 24 ms). Decode-sized groups are therefore run row by row.
SMALL_GROUP_ROWS = 4


def _grouped_mm_strides_ok(t: torch.Tensor) -> bool:
    """Whether ``grouped_mm`` takes this operand: one of its last two strides 1, the other a
    multiple of 16 bytes (and, off the CPU, a 16-byte aligned start).

    Why: expert sizes are the model's (e.g. moe_intermediate_size 12 in bf16 is a 24-byte row);
    torch refuses those with "strides should be multiple of 16 bytes", the loop below does not.
    """
    if t.dim() < 2:
        return False
    align = max(1, 16 // t.element_size())
    strides, sizes = t.stride(), t.shape
    if strides[-2] == 1 and strides[-1] >= max(1, sizes[-2]):
        lead = strides[-1]
    elif strides[-1] == 1 and strides[-2] >= max(1, sizes[-1]):
        lead = strides[-2]
    else:
        return False
    return lead % align == 0 and (t.device.type == "cpu" or t.data_ptr() % 16 == 0)


def _grouped_mm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not hasattr(torch.nn.functional, "grouped_mm"):
        return False
    if not (_grouped_mm_strides_ok(x) and _grouped_mm_strides_ok(weight)):
        return False
    if weight.device.type == "cuda":  # the CUDA kernel is bf16 only
        return weight.dtype == torch.bfloat16 and torch.cuda.get_device_capability(weight.device) >= (8, 0)
    return weight.device.type == "cpu"


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows ``ends[e-1]:ends[e]`` of x times ``weight[e]`` ([E, in, out]); x has ends[-1] rows."""
    x = x.to(weight.dtype)
    cpu_fp32 = weight.device.type == "cpu" and weight.dtype == torch.float32
    if not cpu_fp32 and _grouped_mm_ok(x, weight):
        return torch.nn.functional.grouped_mm(x, weight, offs=ends)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):  # out= has no autograd
        pieces, start = [], 0
        for e, end in enumerate(ends.tolist()):
            pieces.append(x[start:end] @ weight[e])
            start = end
        return torch.cat(pieces) if pieces else x.new_empty(0, weight.shape[-1])
    out = x.new_empty(x.shape[0], weight.shape[-1])
    start = 0
    for e, end in enumerate(ends.tolist()):
        rows = end - start
        if rows > SMALL_GROUP_ROWS or (rows > 1 and not cpu_fp32):
            torch.mm(x[start:end], weight[e], out=out[start:end])
        else:
            for r in range(start, end):
                torch.mm(x[r : r + 1], weight[e], out=out[r : r + 1])
        start = end
    return out


# --- torch.compile: the same computation with static shapes -----------------------------------
# The eager path slices by data-dependent row counts (``ends.tolist()``, ``int(ends[-1])``), which
# torch.compile(fullgraph=True) cannot trace. Under compile the experts run every slot's row
# (skipped ones last, zero rows, weight 0) through the two ops below, which hide the per-expert
# loop behind a fake kernel whose output shape follows from the input shapes alone.


def _check_grouped(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> None:
    """The shapes both grouped ops (and their fake kernels) need, with messages naming the problem."""
    torch._check(x.dim() == 2 and weight.dim() == 3 and ends.dim() == 1,
                 lambda: f"grouped_matmul: need x [R, in], weight [E, in, out], ends [E]; got {x.dim()}, {weight.dim()}, {ends.dim()} dims")
    torch._check(x.shape[1] == weight.shape[1], lambda: f"grouped_matmul: x has {x.shape[1]} columns, weight {weight.shape[1]} rows")
    torch._check(ends.shape[0] == weight.shape[0],
                 lambda: f"grouped_matmul: ends must have one entry per expert ({weight.shape[0]}), got {ends.shape[0]}")


@torch.library.custom_op("moe_fast::grouped_matmul", mutates_args=())
def grouped_matmul_op(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """x [R, in] (rows grouped by expert), weight [E, in, out], ends [E] (non-decreasing, at most R)
    -> [R, out] in weight's dtype: rows ``ends[e-1]:ends[e]`` times ``weight[e]``; rows from
    ``ends[-1]`` on (skipped slots) are 0. Spec: ``reference.grouped_matmul``."""
    _check_grouped(x, weight, ends)
    active = int(ends[-1]) if ends.numel() else 0
    torch._check(active <= x.shape[0], lambda: f"grouped_matmul: ends[-1] = {active} exceeds the {x.shape[0]} rows of x")
    out = x.new_zeros(x.shape[0], weight.shape[-1], dtype=weight.dtype)
    if active:
        out[:active] = grouped_matmul(x[:active], weight, ends)
    return out


@grouped_matmul_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    _check_grouped(x, weight, ends)
    return x.new_empty(x.shape[0], weight.shape[-1], dtype=weight.dtype)


@torch.library.custom_op("moe_fast::grouped_matmul_weight_grad", mutates_args=())
def grouped_matmul_weight_grad(x: torch.Tensor, grad: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """The gradient of ``grouped_matmul_op`` for its weight: [E, in, out] in grad's dtype, expert e's
    ``x[rows_e]^T @ grad[rows_e]``. Spec: ``reference.grouped_matmul_weight_grad``."""
    torch._check(x.dim() == 2 and grad.dim() == 2 and x.shape[0] == grad.shape[0],
                 lambda: f"grouped_matmul_weight_grad: x [R, in] and grad [R, out] must share R, got {tuple(x.shape)}, {tuple(grad.shape)}")
    out = x.new_zeros(ends.shape[0], x.shape[1], grad.shape[1], dtype=grad.dtype)
    start = 0
    for e, end in enumerate(ends.tolist()):
        if end > start:
            out[e] = x[start:end].to(grad.dtype).transpose(0, 1) @ grad[start:end]
        start = end
    return out


@grouped_matmul_weight_grad.register_fake
def _(x: torch.Tensor, grad: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return x.new_empty(ends.shape[0], x.shape[1], grad.shape[1], dtype=grad.dtype)


def _grouped_matmul_setup(ctx, inputs, output) -> None:
    x, weight, ends = inputs
    ctx.save_for_backward(x, weight, ends)


def _grouped_matmul_backward(ctx, grad: torch.Tensor):
    x, weight, ends = ctx.saved_tensors
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = grouped_matmul_op(grad, weight.transpose(-2, -1), ends).to(x.dtype)
    if ctx.needs_input_grad[1]:
        grad_w = grouped_matmul_weight_grad(x, grad, ends).to(weight.dtype)
    return grad_x, grad_w, None


grouped_matmul_op.register_autograd(_grouped_matmul_backward, setup_context=_grouped_matmul_setup)


def _static_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """``moe_fast_experts_forward`` with shapes that depend on T and k only (for torch.compile).

    Every slot gets a row, grouped by expert with the skipped ones (index E) last; the grouped
    products leave those rows 0 and their weight is 0, so the result is the eager one.
    """
    T, H = hidden_states.shape
    k = top_k_index.shape[-1]
    E = self.num_experts
    sorted_ids, slots = torch.sort(top_k_index.reshape(-1), stable=True)
    ends = torch.searchsorted(sorted_ids, torch.arange(E, device=sorted_ids.device, dtype=sorted_ids.dtype), right=True)
    ends = ends.to(torch.int32)
    computed = (sorted_ids < E).unsqueeze(-1)
    x = hidden_states.index_select(0, torch.div(slots, k, rounding_mode="floor"))

    transposed = getattr(self, "is_transposed", False)
    has_gate = getattr(self, "has_gate", True)
    up_w = self.gate_up_proj if has_gate else self.up_proj
    up_w = up_w if transposed else up_w.transpose(-2, -1)
    down_w = self.down_proj if transposed else self.down_proj.transpose(-2, -1)
    row_expert = sorted_ids.clamp(max=E - 1) if getattr(self, "has_bias", False) else None

    h = grouped_matmul_op(x, up_w, ends)
    if row_expert is not None:
        h = h + (self.gate_up_proj_bias if has_gate else self.up_proj_bias).index_select(0, row_expert).to(h.dtype)
    h = self._apply_gate(h) if has_gate else self.act_fn(h)
    y = grouped_matmul_op(h, down_w, ends)
    if row_expert is not None:
        y = y + self.down_proj_bias.index_select(0, row_expert).to(y.dtype)
    y = torch.where(computed, y * top_k_weights.reshape(-1).index_select(0, slots).unsqueeze(-1), 0.0)
    per_slot = y.new_zeros(T * k, H).index_copy(0, slots, y)
    out = per_slot.view(T, k, H).sum(dim=1) if k > 1 else per_slot
    return out.to(hidden_states.dtype)


def _row_experts(plan: DispatchPlan) -> torch.Tensor:
    """[active] int64: the expert of each computed row (rows are grouped by expert)."""
    ends = plan.ends.long()
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    return torch.repeat_interleave(torch.arange(ends.numel(), device=ends.device), counts)


def moe_fast_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """``fn(experts, hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``.

    Slots whose index is E (``experts.num_experts``) are skipped: never gathered, never computed.
    The weighted slot outputs are summed per token in the weights' dtype (float32 for Mixtral),
    in slot order, so the result is deterministic.
    """
    if getattr(self, "has_post_expert_norm", False):
        raise NotImplementedError("moe_fast experts: post-expert norms are not supported")
    if getattr(self, "_is_expert_parallel", False):
        raise NotImplementedError("moe_fast experts: expert parallelism is not supported")
    if torch.compiler.is_compiling():
        return _static_forward(self, hidden_states, top_k_index, top_k_weights)
    T, H = hidden_states.shape
    k = top_k_index.shape[-1]
    plan = _plan_for(self, top_k_index)
    slots = plan.perm[: plan.active]
    x = hidden_states.index_select(0, torch.div(slots, k, rounding_mode="floor"))

    transposed = getattr(self, "is_transposed", False)
    up_w = self.gate_up_proj if getattr(self, "has_gate", True) else self.up_proj
    up_w = up_w if transposed else up_w.transpose(-2, -1)
    down_w = self.down_proj if transposed else self.down_proj.transpose(-2, -1)

    has_gate = getattr(self, "has_gate", True)
    row_expert = _row_experts(plan) if getattr(self, "has_bias", False) else None
    h = grouped_matmul(x, up_w, plan.ends)
    if row_expert is not None:  # gpt-oss: per-expert biases, one row each
        h = h + (self.gate_up_proj_bias if has_gate else self.up_proj_bias).index_select(0, row_expert).to(h.dtype)
    h = self._apply_gate(h) if has_gate else self.act_fn(h)
    y = grouped_matmul(h, down_w, plan.ends)
    if row_expert is not None:
        y = y + self.down_proj_bias.index_select(0, row_expert).to(y.dtype)
    y = y * top_k_weights.reshape(-1).index_select(0, slots).unsqueeze(-1)

    if plan.active == T * k:
        per_slot = y.new_empty(T * k, H)
    else:
        per_slot = y.new_zeros(T * k, H)
    per_slot.index_copy_(0, slots, y)
    out = per_slot.view(T, k, H).sum(dim=1) if k > 1 else per_slot
    return out.to(hidden_states.dtype)


def register() -> None:
    """Makes ``experts_implementation="moe_fast"`` selectable in transformers (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(NAME, moe_fast_experts_forward)


class _RegisterOnImport:
    """Meta-path finder that registers ``moe_fast`` right after transformers' moe integration loads.

    Why: ``from_pretrained(..., experts_implementation="moe_fast")`` must work after ``import
    moe_fast`` without making every ``import moe_fast`` pay for importing transformers.
    """

    target = "transformers.integrations.moe"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.target:
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            module.ExpertsInterface.register(NAME, moe_fast_experts_forward)

        spec.loader.exec_module = exec_and_register
        return spec


def register_when_transformers_loads() -> None:
    """Registers now if transformers' moe integration is loaded, else as soon as it is."""
    import sys

    if _RegisterOnImport.target in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
