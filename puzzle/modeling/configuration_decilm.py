"""Configuration of a heterogeneous Llama-family decoder in the Nemotron-NAS (DeciLM) layout.

Copied verbatim into exported checkpoints (``auto_map``), so it imports only transformers and
its sibling ``block_config.py``.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import PretrainedConfig

from .block_config import BlockConfig, parse_block_configs


class DeciLMConfig(PretrainedConfig):
    """A Llama-style config whose layers each carry their own :class:`BlockConfig`.

    ``num_key_value_heads`` and ``intermediate_size`` are None: they live per layer in
    ``block_configs``. Family extras that the supported parents need to be represented
    exactly are explicit fields: ``qkv_bias`` (Qwen2), ``o_proj_bias`` and ``mlp_bias``
    (Llama with ``attention_bias``/``mlp_bias``), ``qk_norm`` (Qwen3) and ``sliding_window``
    (Mistral v0.1).
    """

    model_type = "nemotron-nas"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        tie_word_embeddings: bool = False,
        rope_parameters: dict[str, Any] | None = None,
        rope_theta: float | None = None,
        rope_scaling: dict[str, Any] | None = None,
        attention_dropout: float = 0.0,
        qkv_bias: bool = False,
        o_proj_bias: bool = False,
        mlp_bias: bool = False,
        qk_norm: bool = False,
        sliding_window: int | None = None,
        block_configs: list[dict[str, Any] | BlockConfig] | None = None,
        **kwargs: Any,
    ) -> None:
        # Fields engines read but that are per layer here; accept and drop them on load.
        kwargs.pop("num_key_value_heads", None)
        kwargs.pop("intermediate_size", None)
        kwargs.pop("attention_bias", None)
        self.num_key_value_heads = None
        self.intermediate_size = None
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.attention_dropout = attention_dropout
        self.qkv_bias = qkv_bias
        self.o_proj_bias = o_proj_bias
        self.mlp_bias = mlp_bias
        self.qk_norm = qk_norm
        self.sliding_window = sliding_window
        if rope_parameters is None:
            rope_parameters = copy.deepcopy(rope_scaling) if rope_scaling else {}
            rope_parameters.setdefault("rope_type", rope_parameters.pop("type", "default"))
            rope_parameters.setdefault("rope_theta", float(rope_theta) if rope_theta is not None else 10000.0)
        self.rope_parameters = dict(rope_parameters)
        if block_configs is None:
            block_configs = [
                {
                    "attention": {"n_heads_in_group": 1, "no_op": False, "replace_with_linear": False},
                    "ffn": {"ffn_mult": 4.0, "no_op": False, "replace_with_linear": False},
                }
            ] * num_hidden_layers
        blocks = parse_block_configs(
            block_configs,
            hidden_size=hidden_size,
            num_attention_heads=num_attention_heads,
            num_hidden_layers=num_hidden_layers,
        )
        self.block_configs = [
            b.to_json(hidden_size=hidden_size, num_attention_heads=num_attention_heads) for b in blocks
        ]
        # PreTrainedConfig's dataclass_transform signature lists only its dataclass fields, but its
        # runtime __init__ (strict(accept_kwargs=True)) hands the other keywords to __post_init__.
        super().__init__(  # type: ignore[call-arg]
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def blocks(self) -> list[BlockConfig]:
        """The per-layer architecture as validated dataclasses."""
        return parse_block_configs(
            self.block_configs,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_hidden_layers=self.num_hidden_layers,
        )
