"""What moe_fast needs to know about one MoE model family, and how it finds the MoE blocks.

One subclass per family, each in its own small file. Everything family-specific (config key
names, whether top-k weights are renormalized, extra paths such as Qwen2-MoE's shared expert)
lives in the subclass; pruning, skipping and export only talk to this interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn


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

    def set_num_experts(self, config, num_experts: int) -> None:
        setattr(config, self.num_experts_key, num_experts)

    # --- modules ------------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        base = getattr(model, "model", model)
        return base.layers

    def moe_block(self, layer: nn.Module) -> nn.Module | None:
        """The layer's sparse MoE block, or None for a dense layer (Qwen's mlp_only_layers)."""
        block = getattr(layer, self.block_attr, None)
        if block is None or not hasattr(block, "gate") or not hasattr(block, "experts"):
            return None
        return block

    def moe_blocks(self, model: nn.Module) -> list[MoEBlockRef]:
        refs = []
        for i, layer in enumerate(self.decoder_layers(model)):
            block = self.moe_block(layer)
            if block is not None:
                refs.append(MoEBlockRef(i, block, block.gate, block.experts))
        return refs

    def extra_output(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
        """Output the block adds besides the routed experts (e.g. a shared expert), [T, H] or None.

        Routed-expert pruning leaves it unchanged, so it cancels in the reconstruction error.
        """
        return None

    def checkpoint_prefix(self, layer: int) -> str:
        """Key prefix of a layer's MoE block in a checkpoint, e.g. 'model.layers.3.mlp'."""
        return f"model.layers.{layer}.{self.block_attr}"
