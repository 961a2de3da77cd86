"""Child artifacts: a heterogeneous model saved in our layout, plus its tokenizer.

A child artifact (kind ``child``) is a Hugging Face-style directory: ``config.json``
(:class:`DeciLMConfig` with ``block_configs``), ``model.safetensors``, the tokenizer files,
``generation_config.json`` and ``parent.json`` (where the parent came from and its family), with
a ``manifest.json`` written by :func:`puzzle.artifacts.run_phase`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from puzzle.io import artifacts
from puzzle.modeling import BlockConfig, DeciLMConfig, DeciLMForCausalLM

log = logging.getLogger(__name__)

CHILD_KIND = "child"
PARENT_INFO = "parent.json"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def save_child(
    model: DeciLMForCausalLM, tokenizer: Any, directory: Path, parent_info: dict[str, Any]
) -> None:
    """Write a child's files (weights, config, tokenizer, generation config, parent info)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="100GB")
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    (directory / PARENT_INFO).write_text(
        json.dumps(parent_info, indent=2, sort_keys=True, default=str) + "\n"
    )


def child_dir(uri: str) -> Path:
    """A verified local directory of the child artifact at ``uri`` (local path or s3://)."""
    return artifacts.materialize(uri, (CHILD_KIND, "export"))


def load_child(
    uri: str | Path, *, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu"
) -> DeciLMForCausalLM:
    """Load a child artifact (or an exported checkpoint) as :class:`DeciLMForCausalLM`."""
    local = (
        Path(uri)
        if Path(uri).is_dir() and not (Path(uri) / artifacts.MANIFEST).exists()
        else child_dir(str(uri))
    )
    config = DeciLMConfig.from_pretrained(local)
    model = DeciLMForCausalLM.from_pretrained(local, config=config, dtype=parse_dtype(dtype) or "auto")
    return model.to(device).eval()


def load_tokenizer(uri: str | Path) -> Any:
    from transformers import AutoTokenizer

    local = (
        Path(uri)
        if Path(uri).is_dir() and not (Path(uri) / artifacts.MANIFEST).exists()
        else child_dir(str(uri))
    )
    return AutoTokenizer.from_pretrained(local, trust_remote_code=True)


def read_parent_info(local: Path) -> dict[str, Any]:
    path = Path(local) / PARENT_INFO
    return json.loads(path.read_text()) if path.exists() else {}


def child_config_like(parent: DeciLMConfig, blocks: list[BlockConfig]) -> DeciLMConfig:
    """A config equal to ``parent`` except for the per-layer architecture."""
    data = parent.to_dict()
    data["block_configs"] = [
        b.to_json(hidden_size=parent.hidden_size, num_attention_heads=parent.num_attention_heads)
        for b in blocks
    ]
    data["num_hidden_layers"] = len(blocks)
    for key in ("model_type", "transformers_version", "architectures", "auto_map"):
        data.pop(key, None)
    return DeciLMConfig(**data)


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
