"""Model artifacts: the parent (converted) and its children, saved in our layout with a tokenizer.

A model artifact (kind ``parent`` for the converted parent, ``child`` for a realized or distilled
child) is a Hugging Face-style directory: ``config.json``
(:class:`DeciLMConfig` with ``block_configs``), ``model.safetensors``, the tokenizer files,
``generation_config.json`` and ``parent.json`` (where the parent came from and its family), with
a ``manifest.json`` written by :func:`puzzle.io.artifacts.run_phase`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from puzzle.io import artifacts
from puzzle.modeling import BlockConfig, DeciLMConfig, DeciLMForCausalLM
from puzzle.modeling.devices import parse_dtype

log = logging.getLogger(__name__)

PARENT_KIND = "parent"
CHILD_KIND = "child"
EXPORT_KIND = "export"
MODEL_KINDS = (PARENT_KIND, CHILD_KIND, EXPORT_KIND)
"""Artifact kinds a model can be loaded from."""
PARENT_INFO = "parent.json"


def save_model(
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


def model_dir(uri: str) -> Path:
    """A verified local directory of the model artifact at ``uri`` (local path or s3://)."""
    return artifacts.materialize(uri, MODEL_KINDS)


def load_model(
    uri: str | Path, *, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu"
) -> DeciLMForCausalLM:
    """Load a model artifact (parent, child or export) as :class:`DeciLMForCausalLM`."""
    local = (
        Path(uri)
        if Path(uri).is_dir() and not (Path(uri) / artifacts.MANIFEST).exists()
        else model_dir(str(uri))
    )
    config = DeciLMConfig.from_pretrained(local)
    model = DeciLMForCausalLM.from_pretrained(local, config=config, dtype=parse_dtype(dtype) or "auto")
    # transformers wraps PreTrainedModel.to with functools.wraps, whose typeshed type is unbound.
    return model.to(device).eval()  # type: ignore[arg-type]


def load_tokenizer(uri: str | Path) -> Any:
    from transformers import AutoTokenizer

    local = (
        Path(uri)
        if Path(uri).is_dir() and not (Path(uri) / artifacts.MANIFEST).exists()
        else model_dir(str(uri))
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


def model_from_state(
    config: DeciLMConfig, state: dict[str, torch.Tensor], *, device: torch.device, what: str
) -> DeciLMForCausalLM:
    """A :class:`DeciLMForCausalLM` of ``config`` holding ``state`` (the tensors themselves, no copy).

    Built on the meta device, so no memory is spent on an initialisation that is overwritten;
    tied embeddings are tied again and the RoPE tables rebuilt on ``device``. Raises ``ValueError``
    naming ``what`` when the state does not fit the config.
    """
    with torch.device("meta"):
        model = DeciLMForCausalLM(config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{what} do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    # RoPE inverse frequencies were created on the meta device: rebuild them, in float32 (casting
    # them to bf16 would shift every rotary angle).
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
