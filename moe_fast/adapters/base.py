"""What moe_fast needs to know about one MoE model family, and how it finds the MoE blocks.

One subclass per family, each in its own small file. Everything family-specific (config key
names, whether top-k weights are renormalized, extra paths such as Qwen2-MoE's shared expert)
lives in the subclass; pruning, skipping and export only talk to this interface. Where a new
family's pieces go: docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from moe_fast.kernels.routing_spec import RoutingSpec, softmax_routing


@dataclass
class MoEBlockRef:
    """One sparse MoE block of a loaded model."""

    layer: int  # decoder layer index
    block: nn.Module  # the family's SparseMoeBlock
    router: nn.Module  # <Family>TopKRouter: forward(h) -> (router_logits, scores, indices)
    experts: nn.Module  # 3-D weights gate_up_proj [E, 2I, H], down_proj [E, H, I]


class MoEAdapter:
    """Base adapter; subclasses set the class attributes and override what differs."""

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()  # config.model_type values served
    num_experts_key: ClassVar[str] = "num_experts"  # config attribute holding E
    top_k_key: ClassVar[str] = "num_experts_per_tok"
    block_attr: ClassVar[str] = "mlp"  # attribute of a decoder layer holding its MoE block
    router_attr: ClassVar[str] = "gate"  # attribute of the MoE block holding its router
    router_scores_float32: ClassVar[bool] = False  # stock router returns float32 scores (else logits' dtype)
    # The router's buffer holding the per-layer selection bias (DeepSeek's e_score_correction_bias),
    # or None. A patched router reads it at every forward, so that a reloaded, reassigned or moved
    # buffer routes as the stock router would.
    selection_bias_attr: ClassVar[str | None] = None
    # Checkpoint (hub) layout, used to stream one layer from safetensors and to export a pruned
    # checkpoint without loading the model: the block's key segment and per-expert projection
    # names (gate, up, down); the router is "<hub_block_attr>.gate.weight" with one row per expert.
    hub_block_attr: ClassVar[str] = "mlp"
    hub_expert_proj: ClassVar[tuple[str, str, str]] = ("gate_proj", "up_proj", "down_proj")
    # Tensors with one row per expert that pruning slices: the router's (a selection bias, a
    # router bias where the family has them) and the fused experts module's.
    router_expert_tensors: ClassVar[tuple[str, ...]] = ("weight",)
    fused_expert_tensors: ClassVar[tuple[str, ...]] = ("gate_up_proj", "down_proj")

    def __init__(self, config) -> None:
        self.config = config

    # --- config -------------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return int(getattr(self.config, self.num_experts_key))

    @property
    def top_k(self) -> int:
        return int(getattr(self.config, self.top_k_key))

    @property
    def renormalize(self) -> bool:
        """Whether the top-k weights are renormalized to sum to 1."""
        return bool(getattr(self.config, "norm_topk_prob", True))

    def routing(self, block: nn.Module | None = None) -> RoutingSpec:
        """How the family's router chooses and weights experts (docs/ROUTING.md).

        ``block`` (an MoE block of a loaded model) supplies per-layer routing data such as a
        selection bias; without it the spec is the config's alone. Softmax families need none.
        """
        return softmax_routing(self.top_k, self.renormalize)

    def set_num_experts(self, config, num_experts: int) -> None:
        setattr(config, self.num_experts_key, num_experts)

    def serving_config_keys(self) -> dict:
        """config.json keys that other engines need to route as transformers does, which
        transformers itself neither needs nor writes; an export adds those its config lacks.
        None for most families."""
        return {}

    def add_serving_keys(self, config) -> None:
        """Sets the ``serving_config_keys`` that ``config`` lacks (values it has are kept), so that
        vLLM routes an export or a saved model as transformers does."""
        for key, value in self.serving_config_keys().items():
            if getattr(config, key, None) is None:
                setattr(config, key, value)

    # --- modules ------------------------------------------------------------------------------
    def base_model(self, model: nn.Module) -> nn.Module:
        """The bare decoder (embeddings, layers, rotary) of any model class of the family.

        Head classes keep it under their ``base_model_prefix`` (``.model`` for most,
        ``.transformer`` for Qwen3-MoE's question answering); transformers' ``base_model``
        resolves that, and is the model itself for the bare class.
        """
        base = getattr(model, "base_model", None)
        if not isinstance(base, nn.Module):
            base = getattr(model, "model", model)
        return base

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        base = self.base_model(model)
        layers = getattr(base, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(
                f"moe_fast: found no decoder layers in {type(model).__name__} "
                f"(looked for {type(base).__name__}.layers)"
            )
        return layers

    def moe_block(self, layer: nn.Module) -> nn.Module | None:
        """The layer's sparse MoE block, or None for a dense layer (Qwen's mlp_only_layers)."""
        block = getattr(layer, self.block_attr, None)
        if block is None or not hasattr(block, self.router_attr) or not hasattr(block, "experts"):
            return None
        return block

    def moe_blocks(self, model: nn.Module) -> list[MoEBlockRef]:
        refs = []
        for i, layer in enumerate(self.decoder_layers(model)):
            block = self.moe_block(layer)
            if block is not None:
                refs.append(MoEBlockRef(i, block, getattr(block, self.router_attr), block.experts))
        return refs

    def extra_output(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
        """Output the block adds besides the routed experts (e.g. a shared expert), [T, H] or None.

        Routed-expert pruning leaves it unchanged, so it cancels in the reconstruction error.
        """
        return None

    def block_return(self, output: torch.Tensor):
        """What the stock block's forward returns, given its output [.., H]: a replacement forward
        (pruning's recorders, ``MaskedForward``) must return the same shape of value to the layer."""
        return output

    def checkpoint_prefix(self, layer: int) -> str:
        """Key prefix of a layer's MoE block in a checkpoint, e.g. 'model.layers.3.mlp'."""
        return f"model.layers.{layer}.{self.block_attr}"

    # --- pruning hooks (moe_fast.pruning, moe_fast.pruning.export) --------------------------------------
    def router_logits(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Router logits [T, E] of the block's router on hidden [T, H] (the router's index 0)."""
        return getattr(block, self.router_attr)(hidden)[0]

    def compute_router_logits(self, router: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """What the stock router computes as its output 0, from hidden [T, H]: the patched router's logits."""
        return nn.functional.linear(hidden, router.weight)

    def check_keep(self, keep: list[int]) -> None:
        """Refuses a keep set the family's router cannot be pruned to (grouped routers override)."""
        E = self.num_experts
        if not keep or len(set(keep)) != len(keep) or min(keep) < 0 or max(keep) >= E:
            raise ValueError(f"keep must be distinct expert indices in 0..{E - 1}, got {keep}")
        if len(keep) < self.top_k:
            raise ValueError(f"keep has {len(keep)} experts, fewer than top-k = {self.top_k}")

    def expert_forward(self, experts: nn.Module, expert: int, hidden: torch.Tensor) -> torch.Tensor:
        """One expert's output on hidden [N, H] -> [N, H], computed as the stock experts module does."""
        gate, up = nn.functional.linear(hidden, experts.gate_up_proj[expert]).chunk(2, dim=-1)
        return nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[expert])

    def layer_call_kwargs(self, config, rotary: nn.Module, inputs_embeds: torch.Tensor) -> dict:
        """Keyword arguments of a decoder layer's forward for full sequences without padding.

        The same mask and position embeddings the model's own forward builds (Llama-style
        families); override for families whose layers take something else.
        """
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        seq_len = inputs_embeds.shape[1]
        position_ids = torch.arange(seq_len, device=inputs_embeds.device).unsqueeze(0)
        sliding = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
        mask_fn = create_sliding_window_causal_mask if sliding else create_causal_mask
        # The cache argument is `past_key_values` up to transformers 5.17 and `cache` in later releases.
        cache_arg = "cache" if "cache" in inspect.signature(mask_fn).parameters else "past_key_values"
        mask = mask_fn(
            config=config, inputs_embeds=inputs_embeds, attention_mask=None, position_ids=position_ids, **{cache_arg: None}
        )
        return {
            "attention_mask": mask,
            "position_ids": position_ids,
            "position_embeddings": rotary(inputs_embeds, position_ids=position_ids),
        }

    def layer_kwargs_for(self, kwargs: dict, layer: nn.Module) -> dict:
        """``layer_call_kwargs`` as one decoder layer takes them (families whose layers differ in
        their attention mask choose it here)."""
        return kwargs

    def _hub_expert_key(self, rel_key: str) -> tuple[int, str] | None:
        """(expert, projection) of a per-expert checkpoint key relative to a decoder layer, else None."""
        prefix = f"{self.hub_block_attr}.experts."
        if not rel_key.startswith(prefix):
            return None
        num, _, rest = rel_key[len(prefix) :].partition(".")
        if not num.isdigit():
            return None
        return int(num), rest

    def layer_state_from_checkpoint(self, tensors) -> dict[str, torch.Tensor]:
        """Module state of one decoder layer from its checkpoint tensors (keys relative to the layer).

        ``tensors`` is a mapping, possibly lazy (read on ``[]``): per-expert projections of the hub
        layout are copied one at a time into gate_up_proj [E, 2I, H] and down_proj [E, H, I], so
        that the peak is one layer plus one expert. The fused module layout is taken as is.
        """
        gate_name, up_name, down_name = (f"{p}.weight" for p in self.hub_expert_proj)
        state: dict[str, torch.Tensor] = {}
        per_expert: dict[str, dict[int, str]] = {gate_name: {}, up_name: {}, down_name: {}}
        for key in list(tensors.keys()):
            hit = self._hub_expert_key(key)
            if hit is not None and hit[1] in per_expert:
                per_expert[hit[1]][hit[0]] = key
                continue
            name = key
            if key.startswith(f"{self.hub_block_attr}."):
                name = f"{self.block_attr}." + key[len(self.hub_block_attr) + 1 :]
            state[name] = tensors[key]
        if per_expert[gate_name]:
            n = len(per_expert[gate_name])
            for name in per_expert:
                if sorted(per_expert[name]) != list(range(n)):
                    raise ValueError(f"checkpoint layer has experts {sorted(per_expert[name])} for {name}, expected 0..{n - 1}")
            gate_up = down = None
            for e in range(n):
                g, u, d = (tensors[per_expert[name][e]] for name in (gate_name, up_name, down_name))
                if gate_up is None:
                    gate_up = g.new_empty(n, g.shape[0] + u.shape[0], g.shape[1])
                    down = d.new_empty(n, *d.shape)
                gate_up[e, : g.shape[0]] = g
                gate_up[e, g.shape[0] :] = u
                down[e] = d
                del g, u, d
            state[f"{self.block_attr}.experts.gate_up_proj"] = gate_up
            state[f"{self.block_attr}.experts.down_proj"] = down
        return state

    def prune_checkpoint_tensor(self, rel_key: str, tensor: torch.Tensor, keep: list[int]) -> tuple[str, torch.Tensor] | None:
        """A layer's checkpoint tensor after pruning to the experts ``keep`` (sorted), or None to drop it.

        Per-expert keys are renumbered in order, the router keeps its rows ``keep``, fused expert
        tensors keep those entries of dim 0; everything else is unchanged.
        """
        hit = self._hub_expert_key(rel_key)
        if hit is not None:
            if hit[0] not in keep:
                return None
            return f"{self.hub_block_attr}.experts.{keep.index(hit[0])}.{hit[1]}", tensor
        index = torch.tensor(keep, dtype=torch.long)
        for block in {self.hub_block_attr, self.block_attr}:
            if rel_key in {f"{block}.{self.router_attr}.{name}" for name in self.router_expert_tensors}:
                return rel_key, tensor.index_select(0, index).contiguous()
            if rel_key in {f"{block}.experts.{name}" for name in self.fused_expert_tensors}:
                return rel_key, tensor.index_select(0, index).contiguous()
        return rel_key, tensor

    def prune_block(self, block: nn.Module, keep: list[int]) -> None:
        """Removes the experts outside ``keep`` (sorted) from a loaded block, in place."""
        router = getattr(block, self.router_attr)
        index = torch.tensor(keep, dtype=torch.long)
        with torch.no_grad():
            for module, names in ((router, self.router_expert_tensors), (block.experts, self.fused_expert_tensors)):
                for name in names:
                    old = getattr(module, name, None)
                    if old is None:
                        continue
                    new = old.index_select(0, index.to(old.device)).contiguous()
                    if isinstance(old, nn.Parameter):
                        new = nn.Parameter(new, requires_grad=False)
                    setattr(module, name, new)  # a buffer stays a buffer (nn.Module.__setattr__)
        for module in (router, block.experts, block):
            if hasattr(module, "num_experts"):
                module.num_experts = len(keep)
