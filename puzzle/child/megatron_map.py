"""Our heterogeneous child <-> a Megatron-core heterogeneous GPT model (``gkd.backend: nemo``).

Megatron-core reads the same Nemotron-NAS ``block_configs`` as our export
(``HeterogeneousTransformerConfig``): per layer, attention is GQA with its own number of query
groups, a single linear layer (``replace_with_linear``) or a no-op, and the FFN a SwiGLU MLP of its
own width, a linear layer or a no-op. This module maps, in both directions and without importing
Megatron (so CI tests it on CPU):

* the block configs to Megatron's (``num_query_groups`` and ``ffn_hidden_size`` written out, since
  Megatron derives a width from ``ffn_mult`` only for multiples of 256) and back;
* a :class:`DeciLMConfig` to the keyword arguments of Megatron's ``TransformerConfig`` and
  ``GPTModel`` (the features Megatron cannot represent are refused with the reason);
* the weights: our names to the parameter names of Megatron's *local* (no Transformer Engine)
  heterogeneous layer spec and back, bit for bit (Q, K and V interleaved per query group into
  ``linear_qkv``; gate and up stacked into ``linear_fc1``).
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch

from puzzle.errors import PuzzleError
from puzzle.modeling import DeciLMConfig
from puzzle.modeling.block_config import AttentionConfig, BlockConfig, FFNConfig

__all__ = [
    "MegatronMappingError",
    "blocks_from_heterogeneous",
    "from_megatron",
    "gpt_kwargs",
    "heterogeneous_json",
    "layer_outputs",
    "to_megatron",
    "transformer_kwargs",
]

# Megatron-core's Llama 3 RoPE scaling takes only the factor; the other three are fixed.
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


class MegatronMappingError(PuzzleError, ValueError):
    """The model cannot be represented as a Megatron-core heterogeneous GPT model."""


# --------------------------------------------------------------------------- block configs


def heterogeneous_json(config: DeciLMConfig) -> dict[str, Any]:
    """The ``block_configs`` document Megatron's ``HeterogeneousTransformerConfig`` reads
    (``heterogeneous_layers_config_encoded_json``), with every size explicit."""
    blocks = []
    for block in config.blocks:
        attn, ffn = block.attention, block.ffn
        blocks.append(
            {
                "attention": {
                    "no_op": attn.no_op,
                    "replace_with_linear": attn.linear,
                    "num_query_groups": attn.num_kv_heads,
                },
                "ffn": {
                    "no_op": ffn.no_op,
                    "replace_with_linear": ffn.linear,
                    "ffn_hidden_size": ffn.intermediate_size,
                },
            }
        )
    return {"block_configs": blocks}


def blocks_from_heterogeneous(data: dict[str, Any] | str) -> list[BlockConfig]:
    """Our block configs from Megatron's document (as :func:`heterogeneous_json` writes it)."""
    doc = json.loads(data) if isinstance(data, str) else data
    out = []
    for i, entry in enumerate(doc.get("block_configs") or []):
        attn, ffn = entry.get("attention") or {}, entry.get("ffn") or entry.get("mlp") or {}
        if "num_query_groups" not in attn or "ffn_hidden_size" not in ffn:
            raise MegatronMappingError(
                f"block_configs[{i}] has no explicit num_query_groups / ffn_hidden_size: not written by "
                "heterogeneous_json"
            )
        out.append(
            BlockConfig(
                attention=AttentionConfig(
                    no_op=bool(attn.get("no_op")),
                    linear=bool(attn.get("replace_with_linear")),
                    num_kv_heads=attn["num_query_groups"],
                ),
                ffn=FFNConfig(
                    no_op=bool(ffn.get("no_op")),
                    linear=bool(ffn.get("replace_with_linear")),
                    intermediate_size=ffn["ffn_hidden_size"],
                ),
            )
        )
    return out


# --------------------------------------------------------------------------- model configs


def _unsupported(config: DeciLMConfig) -> list[str]:
    reasons = []
    if config.hidden_act != "silu":
        reasons.append(f"hidden_act={config.hidden_act!r} (only SwiGLU with silu is mapped)")
    if config.sliding_window:
        reasons.append(f"sliding_window={config.sliding_window} (the local attention has no window)")
    if config.o_proj_bias or config.mlp_bias:
        reasons.append(
            "o_proj_bias / mlp_bias (Megatron's add_bias_linear also biases the linear sub-blocks)"
        )
    rope = dict(config.rope_parameters)
    kind = rope.get("rope_type", "default")
    if kind == "llama3":
        for key, value in _LLAMA3_FIXED.items():
            if float(rope.get(key, value)) != value:
                reasons.append(f"rope_parameters.{key}={rope.get(key)} (Megatron fixes it at {value:g})")
    elif kind != "default":
        reasons.append(f"rope_type={kind!r} (only default and llama3 RoPE are mapped)")
    return reasons


def _check(config: DeciLMConfig) -> None:
    reasons = _unsupported(config)
    if reasons:
        raise MegatronMappingError(
            "gkd.backend nemo cannot represent this model in Megatron-core: "
            + "; ".join(reasons)
            + " - use gkd.backend torch"
        )


def transformer_kwargs(config: DeciLMConfig) -> dict[str, Any]:
    """Keyword arguments of Megatron's ``HeterogeneousTransformerConfig`` for ``config`` (plus
    ``activation_func=F.silu``, dtypes and fusion switches, which the caller adds)."""
    _check(config)
    blocks = config.blocks
    groups = [b.attention.num_kv_heads for b in blocks if b.attention.num_kv_heads is not None]
    widths = [b.ffn.intermediate_size for b in blocks if b.ffn.intermediate_size is not None]
    return {
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        # Per-layer values come from the block configs; these are the defaults they override.
        "num_query_groups": groups[0] if groups else config.num_attention_heads,
        "ffn_hidden_size": widths[0] if widths else 4 * config.hidden_size,
        "kv_channels": config.head_dim,
        "normalization": "RMSNorm",
        "layernorm_epsilon": float(config.rms_norm_eps),
        "gated_linear_unit": True,
        "add_bias_linear": False,
        "add_qkv_bias": bool(config.qkv_bias),
        "qk_layernorm": bool(config.qk_norm),
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "heterogeneous_layers_config_encoded_json": json.dumps(heterogeneous_json(config)),
    }


def gpt_kwargs(config: DeciLMConfig) -> dict[str, Any]:
    """Keyword arguments of Megatron's ``GPTModel`` (besides ``config`` and the layer spec)."""
    _check(config)
    rope = dict(config.rope_parameters)
    llama3 = rope.get("rope_type", "default") == "llama3"
    return {
        "vocab_size": config.vocab_size,
        "max_sequence_length": config.max_position_embeddings,
        "position_embedding_type": "rope",
        "rotary_base": float(rope.get("rope_theta", 10000.0)),
        "rope_scaling": llama3,
        "rope_scaling_factor": float(rope.get("factor", 8.0)) if llama3 else 8.0,
        "share_embeddings_and_output_weights": bool(config.tie_word_embeddings),
    }


def layer_outputs(config: DeciLMConfig) -> list[str]:
    """The Megatron modules whose outputs are our GKD loss's hidden states: every decoder layer's
    but the last, then the final norm (ours: ``hidden_states[1:]``)."""
    return [f"decoder.layers.{i}" for i in range(config.num_hidden_layers - 1)] + ["decoder.final_layernorm"]


# --------------------------------------------------------------------------- weights

_OURS = "model.layers.{i}."
_THEIRS = "decoder.layers.{i}."


def _qkv_layout(config: DeciLMConfig, groups: int) -> tuple[int, int]:
    """(query heads per group, head dim) of a GQA layer with ``groups`` KV heads."""
    return config.num_attention_heads // groups, config.head_dim


def _merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, per_group: int, d: int) -> torch.Tensor:
    groups = k.shape[0] // d
    tail = q.shape[1:]
    parts = (
        q.reshape(groups, per_group * d, *tail),
        k.reshape(groups, d, *tail),
        v.reshape(groups, d, *tail),
    )
    return torch.cat(parts, dim=1).reshape(-1, *tail)


def _split_qkv(
    qkv: torch.Tensor, groups: int, per_group: int, d: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tail = qkv.shape[1:]
    grouped = qkv.reshape(groups, (per_group + 2) * d, *tail)
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    return (q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail))


def _renames(config: DeciLMConfig, i: int) -> list[tuple[str, str]]:
    """Layer ``i``'s weights that move one to one: (our name, Megatron's name)."""
    ours, theirs = _OURS.format(i=i), _THEIRS.format(i=i)
    attn, ffn = config.blocks[i].attention, config.blocks[i].ffn
    pairs: list[tuple[str, str]] = []
    if attn.num_kv_heads is not None or attn.linear:
        pairs.append(("input_layernorm.weight", "input_layernorm.weight"))
    if attn.num_kv_heads is not None:
        pairs.append(("self_attn.o_proj.weight", "self_attention.linear_proj.weight"))
        if config.qk_norm:
            pairs += [
                ("self_attn.q_norm.weight", "self_attention.q_layernorm.weight"),
                ("self_attn.k_norm.weight", "self_attention.k_layernorm.weight"),
            ]
    elif attn.linear:
        pairs.append(("self_attn.linear_attn.weight", "self_attention.weight"))
    if ffn.intermediate_size is not None or ffn.linear:
        pairs.append(("post_attention_layernorm.weight", "pre_mlp_layernorm.weight"))
    if ffn.intermediate_size is not None:
        pairs.append(("mlp.down_proj.weight", "mlp.linear_fc2.weight"))
    elif ffn.linear:
        pairs.append(("mlp.linear_mlp.weight", "mlp.weight"))
    return [(ours + o, theirs + t) for o, t in pairs]


def _taker(src: dict[str, torch.Tensor], what: str) -> Any:
    def take(name: str) -> torch.Tensor:
        if name not in src:
            raise MegatronMappingError(f"the {what} has no {name!r}: not a model of this config")
        return src.pop(name)

    return take


def to_megatron(state: dict[str, torch.Tensor], config: DeciLMConfig) -> dict[str, torch.Tensor]:
    """Our state dict (``DeciLMForCausalLM`` names) as the state dict of Megatron's local-spec
    heterogeneous ``GPTModel``; raises on a weight it does not expect or one that is missing."""
    _check(config)
    src = dict(state)
    take = _taker(src, "state dict")
    out: dict[str, torch.Tensor] = {"embedding.word_embeddings.weight": take("model.embed_tokens.weight")}
    for i, block in enumerate(config.blocks):
        ours, theirs = _OURS.format(i=i), _THEIRS.format(i=i)
        out.update({t: take(o) for o, t in _renames(config, i)})
        if block.attention.num_kv_heads is not None:
            per_group, d = _qkv_layout(config, block.attention.num_kv_heads)
            for part, suffix in (("weight", "weight"), ("bias", "bias"))[: 1 + bool(config.qkv_bias)]:
                q, k, v = (take(ours + f"self_attn.{p}_proj.{part}") for p in "qkv")
                out[theirs + f"self_attention.linear_qkv.{suffix}"] = _merge_qkv(q, k, v, per_group, d)
        if block.ffn.intermediate_size is not None:
            gate, up = take(ours + "mlp.gate_proj.weight"), take(ours + "mlp.up_proj.weight")
            out[theirs + "mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)
    out["decoder.final_layernorm.weight"] = take("model.norm.weight")
    if config.tie_word_embeddings:
        src.pop("lm_head.weight", None)
    else:
        out["output_layer.weight"] = take("lm_head.weight")
    if src:
        raise MegatronMappingError(f"weights Megatron has no place for: {sorted(src)[:5]}")
    return out


def from_megatron(state: dict[str, torch.Tensor], config: DeciLMConfig) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_megatron` (``_extra_state`` entries are ignored)."""
    _check(config)
    src = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    take = _taker(src, "Megatron state dict")
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": take("embedding.word_embeddings.weight")}
    for i, block in enumerate(config.blocks):
        ours, theirs = _OURS.format(i=i), _THEIRS.format(i=i)
        out.update({o: take(t) for o, t in _renames(config, i)})
        kv = block.attention.num_kv_heads
        if kv is not None:
            per_group, d = _qkv_layout(config, kv)
            for part in ("weight", "bias")[: 1 + bool(config.qkv_bias)]:
                q, k, v = _split_qkv(take(theirs + f"self_attention.linear_qkv.{part}"), kv, per_group, d)
                for p, tensor in zip("qkv", (q, k, v), strict=True):
                    out[ours + f"self_attn.{p}_proj.{part}"] = tensor
        if block.ffn.intermediate_size is not None:
            gate, up = take(theirs + "mlp.linear_fc1.weight").chunk(2, dim=0)
            out[ours + "mlp.gate_proj.weight"], out[ours + "mlp.up_proj.weight"] = gate, up
    out["model.norm.weight"] = take("decoder.final_layernorm.weight")
    if config.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    else:
        out["lm_head.weight"] = take("output_layer.weight")
    leftover = [k for k in src if not re.search(r"(^|\.)_?(inv_freq|rotary_pos_emb)", k)]
    if leftover:
        raise MegatronMappingError(f"Megatron weights with no place in our model: {sorted(leftover)[:5]}")
    return out
