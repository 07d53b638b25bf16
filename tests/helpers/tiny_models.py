"""Tiny, randomly initialized MoE causal LMs (and a word-level tokenizer) that build in
milliseconds without downloads, so that every test can run real transformers code end to end.

``tiny_model`` gives one model of each supported family with clearly separated logits (stable
greedy tokens); ``tiny_mixtral`` a Mixtral whose larger router weights spread the routing
probabilities, as the pruning tests want.
"""

from __future__ import annotations

import torch
from transformers import MixtralConfig, MixtralForCausalLM, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
# Families routed by a RoutingSpec other than plain softmax (issue 13): patching, skipping and
# export are tested for them (tests/adapters/test_families_routing.py), their pruning search in
# tests/pruning/test_prune_routing_families.py and, with expert groups, tests/pruning/test_prune_grouped_routers.py;
# they stay out of FAMILIES, which the softmax pruning tests iterate.
ROUTING_FAMILIES = ["deepseek_v3", "glm4_moe", "gpt_oss"]
VOCAB = 96


def tiny_config(family: str, **overrides):
    """A two- or three-layer config of one family (see FAMILIES); overrides are set on it afterwards."""
    common = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    if family == "mixtral":
        cfg = MixtralConfig(**common, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)
    elif family == "qwen2_moe":
        cfg = Qwen2MoeConfig(
            **common | dict(num_hidden_layers=3), intermediate_size=40, moe_intermediate_size=24,
            shared_expert_intermediate_size=40, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
            mlp_only_layers=[1], decoder_sparse_step=1,
        )
    elif family == "qwen3_moe":
        cfg = Qwen3MoeConfig(
            **common, intermediate_size=40, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=4,
            norm_topk_prob=True, head_dim=8,
        )
    elif family == "olmoe":
        cfg = OlmoeConfig(**common, intermediate_size=24, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)
    elif family in ROUTING_FAMILIES:
        cfg = _routing_family_config(family, common)
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _routing_family_config(family: str, common: dict):
    """DeepSeek-V3 with 4 groups of 4 experts (2 eligible) and a dense first layer; GLM-4.5 with one
    group and a dense first layer; gpt-oss with sliding and full attention layers."""
    from transformers import DeepseekV3Config, Glm4MoeConfig, GptOssConfig

    if family == "deepseek_v3":
        return DeepseekV3Config(
            **common | dict(num_hidden_layers=3, num_key_value_heads=4), intermediate_size=40, moe_intermediate_size=16,
            n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
            routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
            qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
        )
    if family == "glm4_moe":
        return Glm4MoeConfig(
            **common | dict(num_hidden_layers=3), intermediate_size=40, moe_intermediate_size=16, n_routed_experts=8,
            num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1, routed_scaling_factor=1.5,
            norm_topk_prob=True, first_k_dense_replace=1, head_dim=8,
        )
    return GptOssConfig(
        **common, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2, head_dim=8, sliding_window=8,
    )


def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0, experts_implementation=None, **overrides):
    """A randomly initialized tiny causal LM with clearly separated logits (stable greedy tokens)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    kwargs = {} if experts_implementation is None else {"experts_implementation": experts_implementation}
    model = AutoModelForCausalLM.from_config(cfg, **kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.25 if "lm_head" in name or "embed" in name else 0.12)
            elif family in ROUTING_FAMILIES and name.endswith("bias"):  # gpt-oss' router and expert biases
                p.normal_(0.0, 0.1)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek / GLM selection bias, per layer
                buf.normal_(0.0, 0.05)
    return model.to(dtype).eval()


def moe_blocks(model):
    """(layer index, block) of every sparse block, found without moe_fast's adapters."""
    return [(i, layer.mlp) for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def tiny_mixtral(seed: int = 0, experts: int = 8, top_k: int = 2, layers: int = 2, hidden: int = 32, ffn: int = 48, vocab: int = 128) -> MixtralForCausalLM:
    cfg = MixtralConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=top_k,
        max_position_embeddings=512, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # larger router weights: a spread of routing probabilities
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5)
            layer.mlp.experts.gate_up_proj.normal_(0.0, 0.2)
            layer.mlp.experts.down_proj.normal_(0.0, 0.2)
    return model


def tiny_tokenizer(vocab: int = 128):
    """A word-level fast tokenizer over the words w0..w{vocab-2} plus [UNK] (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 1)}
    words["[UNK]"] = vocab - 1
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
