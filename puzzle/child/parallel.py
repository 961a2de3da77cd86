"""How GKD spreads over processes: one process, DDP or FSDP2; building sharded models; memory
estimates; sharded checkpoints that resume on any number of processes.

* **Modes.** ``single`` (one process), ``ddp`` (every GPU a whole replica of the child with its
  float32 weights, gradients and AdamW state, and of the parent) and ``fsdp``
  (:func:`torch.distributed.fsdp.fully_shard`: every decoder layer and the rest of each model is
  sharded over all processes; the child keeps float32 master weights and optimizer state and
  computes in bf16 on CUDA through a ``MixedPrecisionPolicy``; the frozen parent is stored in bf16
  and has no gradients or optimizer state). :func:`choose_mode` picks one from
  :func:`estimate_memory`, which it logs.
* **Building.** Models are created on the meta device, wrapped (activation checkpointing per layer,
  ``torch.compile``, sharding) and only then given memory, on the target device, each process
  reading just its own rows of the safetensors files (:func:`materialize`), so no process ever holds
  a whole 70B parent. Benchmarks fill them with seeded random weights instead, the same for every
  number of processes.
* **Checkpoints** (:class:`Checkpoints`): ``torch.distributed.checkpoint`` writes every process's
  shards of the model and optimizer state; the state dict is the one of
  :mod:`torch.distributed.checkpoint.state_dict` (wrapper-free names), so a checkpoint written by
  DDP or FSDP on N processes loads into any mode on M processes. When the output is on S3, every
  process uploads its own files (and rank 0 the metadata) beside it, so a pod that lands on another
  node resumes too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from puzzle.errors import PuzzleError
from puzzle.modeling import DeciLMConfig, DeciLMForCausalLM

log = logging.getLogger(__name__)

MODES = ("single", "ddp", "fsdp")
GIB = 1024**3
FIT_FRACTION = 0.9
"""A mode fits when its estimate is at most this share of a GPU's memory (the rest: CUDA context,
NCCL buffers, allocator fragmentation)."""
AC_PREFIX = "_checkpoint_wrapped_module."


class ParallelError(PuzzleError, RuntimeError):
    """GKD cannot be spread this way; the message says why and what to change."""


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_node_main(self) -> bool:
        return self.local_rank == 0


def init_distributed() -> DistInfo:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=local_world,
    )


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def broadcast(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if info.world_size <= 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj: Any, info: DistInfo) -> list[Any]:
    if info.world_size <= 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class ModelStats:
    """Parameter counts of a model, from its config alone (built on the meta device)."""

    params: int
    largest_layer: int
    root: int
    layers: int
    hidden: int
    vocab: int
    largest_ffn: int

    @classmethod
    def of(cls, config: DeciLMConfig) -> ModelStats:
        with torch.device("meta"):
            model = DeciLMForCausalLM(config)
        layer_params = [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
        total = sum({id(p): p.numel() for p in model.parameters()}.values())
        ffn = [
            b.ffn.intermediate_size or 0 for b in config.blocks if not b.ffn.no_op and not b.ffn.linear
        ] or [0]
        return cls(
            params=total,
            largest_layer=max(layer_params, default=0),
            root=total - sum(layer_params),
            layers=len(layer_params),
            hidden=config.hidden_size,
            vocab=config.vocab_size,
            largest_ffn=max(ffn),
        )


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per process of one mode, by part; ``total`` is their sum."""

    mode: str
    processes: int
    parts: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in self.parts.items() if v)
        return f"{self.mode} on {self.processes}: {self.total / GIB:.1f} GiB per process ({parts})"


def estimate_memory(
    mode: str,
    processes: int,
    child: ModelStats,
    parent: ModelStats,
    *,
    micro_tokens: int,
    grad_checkpointing: bool,
    loss_chunk: int,
    cuda: bool = True,
) -> MemoryEstimate:
    """What one process holds at the peak of a GKD step (docs/scale.md has the arithmetic).

    Child: float32 weights, gradients and AdamW's two moments (16 bytes per parameter), sharded over
    ``processes`` by FSDP; FSDP also holds the bf16 copy of up to two layers being gathered (the
    current one and the prefetched next) and of the root (embeddings, LM head) with its gradient.
    Parent: bf16 on CUDA (float32 on CPU), sharded by FSDP. Activations: the hidden state entering
    every layer of both models (the cosine terms keep them), plus either every layer's internals
    or, with activation checkpointing, one layer's; the loss's logits (``loss_chunk`` tokens, or
    all of them for the reference loss: several float32 copies) and the LM head's gradient.
    """
    act = 2 if cuda else 4  # bytes of an activation / parent weight
    shard = processes if mode == "fsdp" else 1
    parts: dict[str, float] = {
        "child weights+grads+adam": 16.0 * child.params / shard,
        "parent weights": float(act * parent.params) / shard,
    }
    if mode == "fsdp":
        parts["gathered layers"] = float(2 * act * child.largest_layer * 2 + 2 * act * parent.largest_layer)
        parts["gathered root"] = float(2 * act * child.root + act * parent.root)
    d = child.hidden
    per_layer_internals = micro_tokens * (10 * d + 3 * max(child.largest_ffn, 1)) * act
    hidden_kept = micro_tokens * d * act * (child.layers + parent.layers + 2)
    layers_live = 1 if grad_checkpointing else child.layers
    parts["activations"] = float(hidden_kept + per_layer_internals * layers_live)
    logits_tokens = micro_tokens if loss_chunk <= 0 else min(loss_chunk, micro_tokens)
    copies = 6 if loss_chunk <= 0 else 4
    parts["loss"] = float(logits_tokens * child.vocab * 4 * copies + child.vocab * d * act)
    return MemoryEstimate(mode, processes, parts)


def device_memory(device: torch.device, local_processes: int) -> float:
    """Bytes one process may use: the GPU's memory, or this machine's RAM shared by its processes."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return math.inf
    return float(ram) / max(1, local_processes)


def choose_mode(
    requested: str,
    info: DistInfo,
    device: torch.device,
    child: ModelStats,
    parent: ModelStats,
    *,
    micro_tokens: int,
    grad_checkpointing: bool,
    loss_chunk: int,
) -> tuple[str, dict[str, MemoryEstimate]]:
    """The mode to train in (``single``, ``ddp`` or ``fsdp``) and the estimates it was chosen from.

    ``auto`` takes DDP when its estimate fits :data:`FIT_FRACTION` of the device's memory and FSDP
    otherwise; one process is always ``single`` (sharding over one process saves nothing).
    """
    cuda = device.type == "cuda"

    def estimate(mode: str) -> MemoryEstimate:
        return estimate_memory(
            mode,
            info.world_size,
            child,
            parent,
            micro_tokens=micro_tokens,
            grad_checkpointing=grad_checkpointing,
            loss_chunk=loss_chunk,
            cuda=cuda,
        )

    estimates = {m: estimate(m) for m in ("ddp", "fsdp")}
    capacity = device_memory(device, info.local_world_size)
    for est in estimates.values():
        log.info("GKD memory estimate: %s", est.describe())
    if info.world_size <= 1:
        mode = "single"
        if requested == "fsdp":
            log.info("GKD: gkd.parallel=fsdp on one process shards nothing; training unsharded")
    elif requested == "auto":
        mode = "ddp" if estimates["ddp"].total <= FIT_FRACTION * capacity else "fsdp"
    else:
        mode = requested
    chosen = estimates["ddp" if mode == "single" else mode]
    log.info(
        "GKD: %s on %d process(es) (gkd.parallel=%s); %.1f GiB estimated of %.1f GiB per process",
        mode,
        info.world_size,
        requested,
        chosen.total / GIB,
        capacity / GIB,
    )
    if chosen.total > capacity:
        log.warning(
            "GKD: the %s estimate (%.1f GiB) exceeds this device's %.1f GiB: expect out-of-memory; use "
            "more GPUs (gkd_gpus, gkd.nodes) with gkd.parallel=fsdp, gkd.grad_checkpointing or a smaller "
            "gkd.micro_batch_size (docs/scale.md)",
            mode,
            chosen.total / GIB,
            capacity / GIB,
        )
    return mode, estimates


# --------------------------------------------------------------------------- building models


def clean_name(name: str) -> str:
    """A parameter name without wrapper segments (activation checkpointing, DDP, ``torch.compile``)."""
    return name.replace(AC_PREFIX, "").replace("_orig_mod.", "").removeprefix("module.")


def meta_model(config: DeciLMConfig, *, dtype: torch.dtype, trainable: bool) -> DeciLMForCausalLM:
    """The model of ``config`` on the meta device (no memory), in ``dtype``."""
    with torch.device("meta"):
        model = DeciLMForCausalLM(config)
    model.config.use_cache = False
    nn.Module.to(model, dtype=dtype)  # transformers' wrapped `to` has no typed signature
    model.requires_grad_(trainable)
    return model


def wrap_layers(model: DeciLMForCausalLM, *, checkpoint: bool, compile: bool) -> None:
    """Activation checkpointing (non-reentrant, per decoder layer) and ``torch.compile`` of each layer,
    in that order (the compiled region holds the checkpoint), in place."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )

    layers = model.model.layers
    for i, layer in enumerate(layers):
        wrapped: nn.Module = layer
        if checkpoint:
            wrapped = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        if compile:
            wrapped.compile()
        layers[i] = wrapped


def shard_layers(
    model: DeciLMForCausalLM, mp_policy: Any | None, *, reshard_after_forward: bool = True
) -> None:
    """FSDP2 on every decoder layer (the caller shards the root, which gets the rest)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = mp_policy or MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy, reshard_after_forward=reshard_after_forward)


def mixed_precision(device: torch.device) -> Any:
    """bf16 compute and float32 gradient reduction on CUDA; float32 everywhere else."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def materialize(
    model: DeciLMForCausalLM, device: torch.device, weights: Path | None, *, seed: int = 0
) -> None:
    """Give a meta-device model (wrapped and sharded or not) memory on ``device`` and its weights:
    from the safetensors files of the model directory ``weights`` (each process reads only its own
    rows), or seeded random weights when ``weights`` is None (benchmarks; the same values whatever
    the number of processes)."""
    model.to_empty(device=device)
    if model.config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        model.lm_head.weight = model.model.embed_tokens.weight  # to_empty unties them (FSDP keeps them)
    rope = model.model.rotary_emb
    inv_freq, _ = type(rope).compute_inv_freq(rope)
    rope.register_buffer("inv_freq", inv_freq.to(device=device, dtype=torch.float32), persistent=False)
    params = {clean_name(name): p for name, p in model.named_parameters()}
    with torch.no_grad():
        if weights is None:
            for name, p in params.items():
                _fill(p, lambda rows, name=name, p=p: _random_rows(name, p, rows, device, seed))
            return
        with _safetensors(weights) as tensors:
            tied = bool(model.config.tie_word_embeddings)
            missing = [n for n in params if n not in tensors and not (tied and n == "lm_head.weight")]
            if missing:
                raise ParallelError(
                    f"{weights} has no weights for {missing[:5]}: not this model's checkpoint"
                )
            for name, p in params.items():
                if name in tensors:
                    _fill(p, lambda rows, name=name: tensors.rows(name, rows))


def _fill(p: torch.Tensor, rows_of: Any) -> None:
    """Copy rows ``[start, end)`` of the full tensor (``rows_of((start, end))``) into this process's
    part of ``p`` (all of it when ``p`` is not sharded)."""
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(p, DTensor):
        local = p.to_local()
        (placement,) = p.placements
        if not isinstance(placement, Shard) or placement.dim != 0:
            raise ParallelError(f"unexpected sharding {p.placements} of a parameter")
        n, parts = p.shape[0], p.device_mesh.size()
        per = math.ceil(n / parts)
        start = min(n, p.device_mesh.get_local_rank() * per)
        end = start + local.shape[0]
        if local.shape[0]:
            local.copy_(rows_of((start, end)))
        return
    p.copy_(rows_of((0, p.shape[0])))


def _random_rows(
    name: str, p: torch.Tensor, rows: tuple[int, int], device: torch.device, seed: int
) -> torch.Tensor:
    if name.endswith("norm.weight") or p.dim() == 1:
        return torch.ones(rows[1] - rows[0], *p.shape[1:], device=device)
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    full = torch.empty(tuple(p.shape), dtype=torch.float32, device=device).normal_(0.0, 0.02, generator=gen)
    return full[rows[0] : rows[1]]


class _Tensors:
    def __init__(self, handles: dict[str, Any]) -> None:
        self.handles = handles

    def __contains__(self, name: str) -> bool:
        return name in self.handles

    def rows(self, name: str, rows: tuple[int, int]) -> torch.Tensor:
        sliced = self.handles[name].get_slice(name)
        return sliced[rows[0] : rows[1]]


@contextmanager
def _safetensors(directory: Path) -> Iterator[_Tensors]:
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise ParallelError(f"{directory} holds no .safetensors weights")
    opened = [safe_open(str(directory / f), framework="pt", device="cpu") for f in files]
    handles = {key: h for h in opened for key in h.keys()}  # noqa: SIM118 - safe_open has no __iter__
    yield _Tensors(handles)


def full_state_dict(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """The whole model's state on rank 0's CPU (empty elsewhere), wrapper-free names; a collective
    under DDP and FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=info.world_size > 1)
    state = {
        k: v for k, v in get_model_state_dict(model, options=options).items() if isinstance(v, torch.Tensor)
    }
    if info.world_size <= 1:
        state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
    return state if info.is_main else {}


# --------------------------------------------------------------------------- checkpoints


class Checkpoints:
    """Sharded checkpoints of a model and its optimizer (``torch.distributed.checkpoint``).

    ``local`` is a folder every process can write (on one node: the phase's staging ``.work``);
    ``remote`` (an ``s3://`` prefix, or None) mirrors it, so that processes on other nodes or a
    restarted pod find it. ``request`` identifies the inputs and settings: a checkpoint of another
    request is ignored. Every method is a collective: all processes call it.
    """

    STATE = "latest.json"

    def __init__(self, local: Path, remote: str | None, request: str, info: DistInfo) -> None:
        self.local, self.remote, self.request, self.info = local, remote, request, info

    # -- what is there

    def latest(self) -> dict[str, Any] | None:
        """The newest complete checkpoint's state (step, history, files), or None."""
        state = None
        if self.info.is_main:
            state = self._read_state()
            if state is not None and state.get("request") != self.request:
                log.info("GKD: ignoring a checkpoint of other inputs or settings")
                state = None
        return broadcast(state, self.info)

    def _read_state(self) -> dict[str, Any] | None:
        from puzzle.io import storage

        try:
            if self.remote is not None:
                uri = storage.join(self.remote, self.STATE)
                return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None
            path = self.local / self.STATE
            return json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError, storage.StorageError) as exc:
            log.warning("GKD: unreadable checkpoint state (%s); starting afresh", exc)
            return None

    # -- writing

    def save(
        self, step: int, history: list[dict[str, Any]], model: nn.Module, optimizer: Any, **extra: Any
    ) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        from puzzle.io import storage

        name = f"step-{step:08d}"
        folder = self.local / name
        if self.info.is_node_main:
            shutil.rmtree(folder, ignore_errors=True)
        barrier(self.info)
        model_state, optim_state = get_state_dict(model, optimizer)
        with warnings.catch_warnings():  # "assuming ... a single process": yes, without torchrun
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))
        mine = self._own_files(folder)
        if self.remote is not None:
            for rel in mine:
                storage.upload_file(folder / rel, storage.join(self.remote, name, rel))
        files = {k: v for part in all_gather(mine, self.info) for k, v in part.items()}
        barrier(self.info)
        if self.info.is_main:
            state = {
                "step": step,
                "dir": name,
                "files": files,
                "history": history,
                "request": self.request,
                "world_size": self.info.world_size,
                **extra,
            }
            text = json.dumps(state, default=str)
            tmp = self.local / f".{self.STATE}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.local / self.STATE)
            if self.remote is not None:
                storage.write_bytes(storage.join(self.remote, self.STATE), text.encode())
                for old in _step_dirs_remote(self.remote):
                    if old != name:
                        storage.delete_tree(storage.join(self.remote, old))
        barrier(self.info)
        if self.info.is_node_main:
            for stale in self.local.glob("step-*"):
                if stale.name != name:
                    shutil.rmtree(stale, ignore_errors=True)
        log.info("GKD: checkpoint of step %d written (%d files)", step, len(files))

    def _own_files(self, folder: Path) -> dict[str, int]:
        """The files this process wrote: its shards (``__<rank>_*.distcp``) and, on rank 0, the metadata."""
        own = {}
        for path in folder.iterdir():
            if path.name.startswith(f"__{self.info.rank}_") or (
                self.info.is_main and path.name == ".metadata"
            ):
                own[path.name] = path.stat().st_size
        return own

    # -- reading

    def load(self, state: dict[str, Any], model: nn.Module, optimizer: Any) -> None:
        """Load the checkpoint of ``state`` (from :meth:`latest`) into ``model`` and ``optimizer``,
        whatever the number of processes that wrote it."""
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        from puzzle.io import storage
        from puzzle.modeling.checkpoints import load_sharded_state

        # Names from latest.json (possibly on S3) never leave the checkpoint folder.
        folder = storage.local_path_in(self.local, state["dir"], f"{self.local}/{self.STATE}")
        for rel in state["files"]:
            storage.local_path_in(folder, rel, f"{self.local}/{self.STATE}")
        if self.info.is_node_main and not _complete(folder, state["files"]):
            if self.remote is None:
                raise ParallelError(
                    f"checkpoint {folder} is incomplete on this node and has no remote copy: resume on the "
                    "machine that wrote it, or write the output to s3:// so every node can read it"
                )
            for rel in state["files"]:
                storage.download_file(storage.join(self.remote, state["dir"], rel), folder / rel)
        barrier(self.info)
        model_state, optim_state = get_state_dict(model, optimizer)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            load_sharded_state({"model": model_state, "optim": optim_state}, folder)  # no pickled code
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)

    def clear(self) -> None:
        """Remove the remote copy (after the artifact is published); the local one goes with staging."""
        from puzzle.io import storage

        if self.info.is_main and self.remote is not None:
            storage.delete_tree(self.remote)


def _complete(folder: Path, files: dict[str, int]) -> bool:
    return all(
        (folder / rel).is_file() and (folder / rel).stat().st_size == size for rel, size in files.items()
    )


def _step_dirs_remote(remote: str) -> set[str]:
    from puzzle.io import storage

    return {rel.split("/", 1)[0] for rel in storage.list_files(remote) if rel.startswith("step-")}
