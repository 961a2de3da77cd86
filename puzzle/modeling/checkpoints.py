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
import re
from pathlib import Path
from typing import Any

import torch

from puzzle.errors import PuzzleError
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


class CheckpointError(PuzzleError, ValueError):
    """A resume checkpoint cannot be loaded safely; the message names the file and the fix."""


def load_training_state(path: Path, *, map_location: Any = "cpu") -> dict[str, Any]:
    """A resume checkpoint (BLD, GKD) read without pickle: ``torch.load(weights_only=True)``
    accepts tensors, numbers, strings, lists, tuples and dicts only, so a checkpoint planted in
    a staging folder cannot run code. Anything else is refused with the fix."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"refusing the resume checkpoint {path}: it is not a plain tensor checkpoint "
            f"({type(exc).__name__}: {first[:200]}); delete it (or its .partial folder) to start this "
            "phase afresh"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"resume checkpoint {path} holds a {type(state).__name__}, not a dict; delete it to start afresh"
        )
    return state


# What the ``.metadata`` pickle of a ``torch.distributed.checkpoint`` folder may name: its own
# dataclasses, torch.Size, dtypes and layouts (what torch 2.13 writes), nothing that runs code.
_DCP_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


def _dcp_metadata_class(module: str, name: str) -> Any:
    import importlib

    if (module, name) in _DCP_METADATA_CLASSES:
        return getattr(importlib.import_module(module), name)
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    raise CheckpointError(f"{module}.{name} may not appear in a checkpoint's metadata")


def load_sharded_state(state: dict[str, Any], folder: Path) -> None:
    """``torch.distributed.checkpoint.load(state, folder)`` without running pickled code: the
    folder's ``.metadata`` is read by an unpickler that knows only the checkpoint's own metadata
    classes, and non-tensor entries (optimizer settings) by ``torch.load(weights_only=True)``,
    where torch's own reader uses ``pickle.load`` and ``weights_only=False``."""
    import pickle

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            return _dcp_metadata_class(module, name)

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as fh:
                metadata = Unpickler(fh).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    try:
        dcp.load(state, storage_reader=Reader(str(folder)), planner=Planner())
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - dcp wraps a rank's failure
        text = str(exc)
        found = re.search(
            r"\S+ may not appear in a checkpoint's metadata|Weights only load failed[^\n]*", text
        )
        if found is None and not isinstance(exc, pickle.UnpicklingError):
            raise
        raise CheckpointError(
            f"refusing the resume checkpoint {folder}: it holds more than tensors and plain values "
            f"({found.group(0)[:200] if found else text[:200]}); delete it (or its .partial folder) to start "
            "this phase afresh"
        ) from None


STORAGE_DTYPES = ("float32", "bfloat16", "float16")
"""Dtypes weights may be written in (``library.save_dtype``, ``gkd.save_dtype``)."""


def storage_tensors(
    tensors: dict[str, torch.Tensor], dtype: str | torch.dtype | None, *, what: str
) -> tuple[dict[str, torch.Tensor], torch.dtype | None]:
    """``tensors`` as they are written at ``dtype`` (floating tensors cast, tensors that share
    storage still sharing it, so tied weights stay tied), and the dtype they got.

    ``dtype`` None keeps them as they are. Values beyond float16's range (65,504) would become
    infinite: then every tensor stays as it is (float32), with a warning naming ``what``.
    """
    target = parse_dtype(dtype)
    floating = [t for t in tensors.values() if t.is_floating_point()]
    if target is None or all(t.dtype == target for t in floating):
        return tensors, target if floating else None
    if target == torch.float16:
        limit = torch.finfo(torch.float16).max
        big = next(
            (
                k
                for k, t in tensors.items()
                if t.is_floating_point() and t.numel() and float(t.detach().abs().max()) > limit
            ),
            None,
        )
        if big is not None:
            log.warning(
                "%s: %s holds values beyond float16's range; written in %s",
                what,
                big,
                str(floating[0].dtype).removeprefix("torch."),
            )
            return tensors, None
    cast: dict[tuple[Any, ...], torch.Tensor] = {}

    def one(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key not in cast:
            cast[key] = t.detach().to(target)
        return cast[key]

    return {k: one(t) for k, t in tensors.items()}, target


def save_model(
    model: DeciLMForCausalLM,
    tokenizer: Any,
    directory: Path,
    parent_info: dict[str, Any],
    *,
    dtype: str | torch.dtype | None = None,
) -> None:
    """Write a model's files (weights, config, tokenizer, generation config, parent info).

    ``dtype``: the weights are written in it (``config.json`` says so; loaders cast them to the
    dtype they compute in); None: in the model's own dtype."""
    directory.mkdir(parents=True, exist_ok=True)
    own = model.state_dict()
    state, stored = storage_tensors(own, dtype, what=str(directory))
    cast = state is not own
    model.save_pretrained(
        directory, safe_serialization=True, max_shard_size="100GB", state_dict=state if cast else None
    )
    if cast and stored is not None:
        config_file = directory / "config.json"
        config = json.loads(config_file.read_text())
        config["dtype"] = str(stored).removeprefix("torch.")
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
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
