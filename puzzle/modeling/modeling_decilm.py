"""A heterogeneous Llama-family decoder in the Nemotron-NAS (DeciLM) layout.

Each layer builds its attention and FFN from its :class:`BlockConfig`: grouped-query attention
with the layer's own number of KV heads, a single linear layer, or nothing; a SwiGLU FFN of the
layer's own width, a single linear layer, or nothing. A no-op sub-block has no module, no
weights and no norm, so the residual stream passes it unchanged.

Copied verbatim into exported checkpoints (``auto_map`` / ``trust_remote_code=True``); it uses
transformers' own RoPE, mask and attention functions so that a model of the parent's blocks computes
exactly what ``LlamaForCausalLM`` (or Mistral/Qwen2/Qwen3) computes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .block_config import AttentionConfig, BlockConfig, FFNConfig
from .configuration_decilm import DeciLMConfig

# transformers renamed the cache argument/output from `past_key_values` to `cache` during 5.x;
# accept both and answer with whichever name the installed version's outputs use.
_OUTPUT_CACHE_FIELD = (
    "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
)


class DeciLMRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class DeciLMRotaryEmbedding(nn.Module):
    inv_freq: torch.Tensor

    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__()
        self.config = config
        inv_freq, self.attention_scaling = self.compute_inv_freq()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def compute_inv_freq(self) -> tuple[torch.Tensor, float]:
        """Inverse frequencies from the config (default RoPE or one of transformers' scalings)."""
        rope_type = self.config.rope_parameters.get("rope_type", "default")
        if rope_type == "default":
            dim = self.config.head_dim
            base = self.config.rope_parameters["rope_theta"]
            return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0
        return ROPE_INIT_FUNCTIONS[rope_type](self.config, None)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    batch, num_kv, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_kv, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_kv * n_rep, slen, head_dim)


def eager_attention_forward(
    module: DeciLMAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask[:, :, :, : key_states.shape[-2]]
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class DeciLMAttention(nn.Module):
    """Grouped-query attention with this layer's own number of KV heads."""

    def __init__(self, config: DeciLMConfig, attention: AttentionConfig, cache_index: int) -> None:
        super().__init__()
        assert attention.num_kv_heads is not None
        self.config = config
        self.layer_idx = cache_index  # index of this layer's slot in the KV cache
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = attention.num_kv_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.sliding_window = config.sliding_window
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=config.o_proj_bias)
        if config.qk_norm:
            self.q_norm = DeciLMRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = DeciLMRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape)
        key_states = self.k_proj(hidden_states).view(hidden_shape)
        if self.config.qk_norm:
            query_states = self.q_norm(query_states)
            key_states = self.k_norm(key_states)
        query_states = query_states.transpose(1, 2)
        key_states = key_states.transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, _ = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output)


class DeciLMLinearAttention(nn.Module):
    """Attention replaced by one H x H linear layer: each token attends only to itself."""

    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__()
        self.linear_attn = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.linear_attn(hidden_states)


class DeciLMMLP(nn.Module):
    """SwiGLU FFN of this layer's own width."""

    def __init__(self, config: DeciLMConfig, ffn: FFNConfig) -> None:
        super().__init__()
        assert ffn.intermediate_size is not None
        hidden, width = config.hidden_size, ffn.intermediate_size
        self.intermediate_size = width
        self.gate_proj = nn.Linear(hidden, width, bias=config.mlp_bias)
        self.up_proj = nn.Linear(hidden, width, bias=config.mlp_bias)
        self.down_proj = nn.Linear(width, hidden, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DeciLMLinearMLP(nn.Module):
    """FFN replaced by one H x H linear layer."""

    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__()
        self.linear_mlp = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_mlp(x)


def build_attention(config: DeciLMConfig, attention: AttentionConfig, cache_index: int) -> nn.Module | None:
    """The attention module for a sub-block config; None for no-op (no weights, no norm)."""
    if attention.no_op:
        return None
    if attention.linear:
        return DeciLMLinearAttention(config)
    return DeciLMAttention(config, attention, cache_index)


def build_ffn(config: DeciLMConfig, ffn: FFNConfig) -> nn.Module | None:
    """The FFN module for a sub-block config; None for no-op (no weights, no norm)."""
    if ffn.no_op:
        return None
    if ffn.linear:
        return DeciLMLinearMLP(config)
    return DeciLMMLP(config, ffn)


class DeciLMDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm residual layer; a no-op sub-block has neither module nor norm (checkpoint names
    follow Llama's, so a missing ``self_attn``/``mlp`` is how the layout says "no-op")."""

    def __init__(self, config: DeciLMConfig, block: BlockConfig, cache_index: int) -> None:
        super().__init__()
        self.block = block
        self.self_attn = build_attention(config, block.attention, cache_index)
        if self.self_attn is not None:
            self.input_layernorm = DeciLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = build_ffn(config, block.ffn)
        if self.mlp is not None:
            self.post_attention_layernorm = DeciLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if self.self_attn is not None:
            hidden_states = hidden_states + self.self_attn(
                self.input_layernorm(hidden_states),
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                cache=cache,
            )
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class DeciLMPreTrainedModel(PreTrainedModel):
    config_class = DeciLMConfig
    config: DeciLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeciLMDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, DeciLMRotaryEmbedding):
            # Non-persistent buffer: never in a checkpoint, so it is recomputed on every load.
            with torch.no_grad():
                module.inv_freq.copy_(module.compute_inv_freq()[0])
            return
        super()._init_weights(module)


def _cache_kwarg(kwargs: dict[str, Any], cache: Cache | None) -> Cache | None:
    legacy = kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


class DeciLMModel(DeciLMPreTrainedModel):
    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        layers = []
        cache_index = 0
        # KV-cache slots are numbered over the layers that have GQA attention only, so the
        # cache's "first layer" (which generate() asks for the sequence length) always exists.
        for block in config.blocks:
            layers.append(DeciLMDecoderLayer(config, block, cache_index))
            cache_index += int(block.attention.is_gqa)
        self.layers = nn.ModuleList(layers)
        self.num_cache_layers = cache_index
        self.norm = DeciLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DeciLMRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        cache = _cache_kwarg(kwargs, cache)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.training and self.gradient_checkpointing:
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache()
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
            position_ids = position_ids.unsqueeze(0)

        mask_fn = create_sliding_window_causal_mask if self.config.sliding_window else create_causal_mask
        causal_mask = mask_fn(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden_states: list[torch.Tensor] | None = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
            hidden_states = layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                cache=cache,
            )
        hidden_states = self.norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)
        cache_output: dict[str, Any] = {_OUTPUT_CACHE_FIELD: cache if use_cache else None}
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden_states) if all_hidden_states is not None else None,
            **cache_output,
        )


class DeciLMForCausalLM(DeciLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__(config)
        self.model = DeciLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        cache = _cache_kwarg(kwargs, cache)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{_OUTPUT_CACHE_FIELD: getattr(outputs, _OUTPUT_CACHE_FIELD)},
        )


DeciLMConfig.register_for_auto_class()
DeciLMForCausalLM.register_for_auto_class("AutoModelForCausalLM")
