"""The heterogeneous child model (Nemotron-NAS / DeciLM layout).

The three modules here are copied verbatim into every exported checkpoint, so they import only
torch, transformers and each other.
"""

from puzzle.modeling.block_config import AttentionConfig, BlockConfig, BlockConfigError, FFNConfig
from puzzle.modeling.configuration_decilm import DeciLMConfig
from puzzle.modeling.modeling_decilm import DeciLMForCausalLM

__all__ = [
    "AttentionConfig",
    "BlockConfig",
    "BlockConfigError",
    "DeciLMConfig",
    "DeciLMForCausalLM",
    "FFNConfig",
]
