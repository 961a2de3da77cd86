"""Run a DeciLM model one layer (or one sub-block) at a time, from cached hidden states.

The library's calibration, BLD and replace-1-block scoring all need the parent's activations
at a layer's input and its sub-blocks' outputs, and need to run a swapped layer followed by the
rest of the parent. :class:`LayerRunner` does exactly what ``DeciLMModel.forward`` does, in
pieces, so that running every piece in order gives the model's own logits bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from puzzle.io import artifacts, storage
from puzzle.modeling import BlockConfig, DeciLMConfig, DeciLMForCausalLM
from puzzle.modeling.modeling_decilm import DeciLMDecoderLayer


@dataclass
class LayerContext:
    """What every layer needs besides the hidden states: RoPE cos/sin and the causal mask."""

    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    attention_mask: Any


@dataclass
class SubBlockOutputs:
    """A layer's pieces: each sub-block's contribution to the residual stream, and its output."""

    attn_delta: torch.Tensor
    ffn_delta: torch.Tensor
    hidden_out: torch.Tensor

    @property
    def block_delta(self) -> torch.Tensor:
        return self.attn_delta + self.ffn_delta


class LayerRunner:
    """Piecewise forward of a :class:`DeciLMForCausalLM` (no KV cache, full sequences)."""

    def __init__(self, model: DeciLMForCausalLM) -> None:
        self.model = model
        self.config: DeciLMConfig = model.config
        self.layers = model.model.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def context(self, hidden: torch.Tensor) -> LayerContext:
        """RoPE and mask for sequences shaped like ``hidden`` ([batch, seq, hidden])."""
        inner = self.model.model
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask_fn = create_sliding_window_causal_mask if self.config.sliding_window else create_causal_mask
        mask = mask_fn(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=None,
            cache=None,
            position_ids=position_ids,
        )
        return LayerContext(inner.rotary_emb(hidden, position_ids), mask)

    def embed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, LayerContext]:
        hidden = self.model.model.embed_tokens(input_ids)
        return hidden, self.context(hidden)

    def layer(self, index: int, hidden: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        return run_layer(self.layers[index], hidden, ctx)

    def run(
        self, hidden: torch.Tensor, ctx: LayerContext, start: int, stop: int | None = None
    ) -> torch.Tensor:
        """Layers ``start`` .. ``stop - 1`` of the model."""
        for index in range(start, self.num_layers if stop is None else stop):
            hidden = self.layer(index, hidden, ctx)
        return hidden

    def head(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final norm and LM head: (normalised final hidden states, logits)."""
        final = self.model.model.norm(hidden)
        return final, self.model.lm_head(final)


def run_layer(layer: nn.Module, hidden: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
    return layer(hidden, attention_mask=ctx.attention_mask, position_embeddings=ctx.position_embeddings)


def sub_blocks(layer: DeciLMDecoderLayer, hidden: torch.Tensor, ctx: LayerContext) -> SubBlockOutputs:
    """The layer's attention and FFN contributions, computed as ``DeciLMDecoderLayer`` does."""
    attn = torch.zeros_like(hidden)
    if layer.self_attn is not None:
        attn = layer.self_attn(
            layer.input_layernorm(hidden),
            position_embeddings=ctx.position_embeddings,
            attention_mask=ctx.attention_mask,
        )
    mid = hidden + attn
    ffn = torch.zeros_like(hidden)
    if layer.mlp is not None:
        ffn = layer.mlp(layer.post_attention_layernorm(mid))
    return SubBlockOutputs(attn_delta=attn, ffn_delta=ffn, hidden_out=mid + ffn)


def build_layer(
    config: DeciLMConfig,
    block: BlockConfig,
    state: dict[str, torch.Tensor],
    *,
    device: Any = None,
    dtype: torch.dtype | None = None,
) -> DeciLMDecoderLayer:
    """A standalone decoder layer for ``block`` holding ``state`` (layer-relative Llama names)."""
    with torch.device("meta"):
        layer = DeciLMDecoderLayer(config, block, cache_index=0)
    expected = set(layer.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(
            f"weights for {block.name} do not fit the layer: missing {sorted(missing)[:4]}, unexpected "
            f"{sorted(unexpected)[:4]}"
        )
    layer.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
    return layer


def model_config(uri: str) -> DeciLMConfig:
    """The config of a model artifact (parent or child), checked to be one, without hashing its
    weights when local."""
    from puzzle.modeling.checkpoints import MODEL_KINDS

    if storage.is_s3(uri):
        return DeciLMConfig.from_pretrained(artifacts.materialize(uri, MODEL_KINDS))
    artifacts.require_manifest(uri, MODEL_KINDS)
    return DeciLMConfig.from_pretrained(uri)


def load_verified_model(local: Path, *, dtype: str, device: Any) -> DeciLMForCausalLM:
    """Load a model from a directory :func:`puzzle.io.artifacts.run_phase` has already verified."""
    from puzzle.modeling.devices import parse_dtype

    model = DeciLMForCausalLM.from_pretrained(
        local, config=DeciLMConfig.from_pretrained(local), dtype=parse_dtype(dtype)
    )
    return model.to(device).eval()
