"""Global knowledge distillation (GKD): train the whole realized child against the parent.

Loss (the paper's best setting): for every layer the cosine distance between the
child's and the parent's hidden states, summed over layers, plus KL(parent || child) of the
next-token distributions; no language-modelling loss by default (it hurt in the paper's Table 17)
but its weight is configurable. The parent's outputs are computed on the fly. By default the loss
is the fused one of :mod:`puzzle.child.gkd_loss` (logits ``gkd.loss_chunk`` tokens at a time, never
for the whole batch); ``gkd.loss_chunk: 0`` computes it the reference way.

Training: AdamW, linear warm-up then cosine decay to 10 % of the peak, gradient clipping at 1,
float32 master weights with bf16 compute on CUDA, optional activation checkpointing per layer and
gradient accumulation (``micro_batch_size``). ``batch_size`` is the global batch (in sequences), so
the number of steps depends only on the token budget, not on the number of GPUs.

Several processes: launched with ``torchrun`` (``WORLD_SIZE`` > 1) every rank calls
:func:`distill`; each trains on its slice of every global batch, under DDP or FSDP2
(``gkd.parallel``, :mod:`puzzle.child.parallel`); rank 0 writes the artifact. Checkpoints are
sharded (``torch.distributed.checkpoint``) in the phase's staging ``.work/`` directory (and beside an
``s3://`` output) every ``checkpoint_every`` steps; a killed run started again with the same inputs,
on the same or another number of processes, resumes from the last one and ends after the same
number of steps, with the same data order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import torch
from torch import nn
from tqdm import tqdm

from puzzle.child import parallel
from puzzle.child.gkd_loss import (
    cosine_distance_sum,
    fused_cosine,
    fused_head_loss,
    gkd_loss,
    kl_parent_child,
)
from puzzle.child.parallel import DistInfo, init_distributed
from puzzle.config import GKDConfig
from puzzle.data import load_split
from puzzle.errors import PuzzleError
from puzzle.io import artifacts, storage
from puzzle.modeling import DeciLMConfig, DeciLMForCausalLM
from puzzle.modeling.checkpoints import (
    CHILD_KIND,
    MODEL_KINDS,
    load_tokenizer,
    model_from_state,
    read_parent_info,
    save_model,
)
from puzzle.modeling.devices import resolve_device

__all__ = [
    "CHECKPOINT",
    "HISTORY",
    "DistInfo",
    "DistillError",
    "ModelSpec",
    "batch_indices",
    "cosine_distance_sum",
    "distill",
    "gkd_loss",
    "init_distributed",
    "kl_parent_child",
    "lr_at",
    "train",
]

log = logging.getLogger(__name__)

CHECKPOINT = "gkd-checkpoint"
"""The folder of the sharded checkpoints, under the phase's staging ``.work/``."""
HISTORY = "gkd_history.json"
RUN_ONLY = (
    "checkpoint_every",
    "grad_checkpointing",
    "parallel",
    "nodes",
    "micro_batch_size",
    "loss_chunk",
    "compile",
    "keep_steps",
)
"""GKD settings that change how the training runs, not what it computes: not part of the
artifact's identity (a run resumes across them)."""
STOP_ENV = "PUZZLE_GKD_STOP_AT_STEP"
"""Fault injection for tests and benchmarks: every process exits (code 75) right after the
checkpoint of this step is written, as a killed run would."""
STOP_EXIT_CODE = 75


class DistillError(PuzzleError, ValueError):
    """GKD cannot run with these inputs or settings; the message names the field and the fix."""


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up to ``peak``, then cosine decay to 10 % of it."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """The sequences of global batch ``step``: a fresh seeded permutation every epoch, so the
    order depends only on (seed, step) and a resumed run sees exactly the same batches."""
    per_epoch = max(1, n // batch_size) if n >= batch_size else 1
    epoch, within = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    if n < batch_size:
        return perm.repeat(math.ceil(batch_size / n))[:batch_size]
    return perm[within * batch_size : (within + 1) * batch_size]


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    """A model to train or distil from: its config and where its weights are (a model directory with
    safetensors files), or, with ``weights`` None, seeded random weights (benchmarks)."""

    config: DeciLMConfig
    weights: Path | None = None
    seed: int = 0

    @classmethod
    def from_dir(cls, directory: Path | str) -> ModelSpec:
        return cls(DeciLMConfig.from_pretrained(str(directory)), Path(directory))


class Student(nn.Module):
    """The child and its GKD loss as one module: the root that DDP or FSDP wraps, so that the child's
    LM head is gathered (FSDP) and its gradient synchronised (DDP) where the fused loss uses it.

    ``forward`` returns the weighted loss and a float32 tensor ``[loss, cosine, kl, lm]`` of its
    (detached) parts.
    """

    def __init__(self, child: DeciLMForCausalLM, settings: GKDConfig, *, compile_loss: bool) -> None:
        super().__init__()
        self.child = child
        self.weights = (settings.weight_cosine, settings.weight_kl, settings.weight_lm)
        self.loss_chunk = settings.loss_chunk
        self.compile_loss = compile_loss

    def forward(
        self,
        input_ids: torch.Tensor,
        parent_hidden: tuple[torch.Tensor, ...],
        parent_head: torch.Tensor | None,
        parent_logits: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        w_cos, w_kl, w_lm = self.weights
        out = self.child.model(input_ids=input_ids, output_hidden_states=bool(w_cos), use_cache=False)
        final = out.last_hidden_state
        zero = final.new_zeros((), dtype=torch.float32)
        cos = kl = lm = zero
        if self.loss_chunk > 0:
            if w_cos:
                cos = fused_cosine(out.hidden_states, parent_hidden, compile=self.compile_loss)
            head = zero
            if w_kl or w_lm:
                assert parent_head is not None
                head, kl, lm = fused_head_loss(
                    final,
                    self.child.lm_head.weight,
                    parent_hidden[-1],
                    parent_head,
                    input_ids,
                    weight_kl=w_kl,
                    weight_lm=w_lm,
                    chunk=self.loss_chunk,
                    compile=self.compile_loss,
                )
            loss = w_cos * cos + head
        else:
            child_out = SimpleNamespace(logits=self.child.lm_head(final), hidden_states=out.hidden_states)
            parent_out = SimpleNamespace(logits=parent_logits, hidden_states=parent_hidden)
            if w_cos:
                cos = cosine_distance_sum(child_out.hidden_states, parent_out.hidden_states)
            if w_kl:
                kl = kl_parent_child(parent_out.logits, child_out.logits)
            if w_lm:
                logits = child_out.logits[:, :-1].float()
                lm = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1).long()
                )
            loss = w_cos * cos + w_kl * kl + w_lm * lm
        stats = torch.stack([loss.detach(), cos.detach(), kl.detach(), lm.detach()]).float()
        return loss, stats


@dataclass
class Setup:
    """Everything :func:`train` built: the wrapped student, the parent, the optimizer, the mode."""

    model: nn.Module
    student: Student
    parent: DeciLMForCausalLM
    optimizer: torch.optim.Optimizer
    mode: str
    estimates: dict[str, parallel.MemoryEstimate]
    compile: str


def resolve_compile(setting: str, device: torch.device) -> str:
    """``auto``: ``all`` on CUDA, ``off`` elsewhere."""
    if setting == "auto":
        return "all" if device.type == "cuda" else "off"
    return setting


def build(
    child: ModelSpec,
    parent: ModelSpec,
    settings: GKDConfig,
    *,
    device: torch.device,
    info: DistInfo,
    seq_len: int,
) -> Setup:
    """The student (child + loss) and the parent, built on the meta device, wrapped for ``mode``
    and given their weights on ``device``; and the optimizer."""
    cuda = device.type == "cuda"
    local_batch = settings.batch_size // info.world_size
    micro = min(settings.micro_batch_size or local_batch, local_batch)
    mode, estimates = parallel.choose_mode(
        settings.parallel,
        info,
        device,
        parallel.ModelStats.of(child.config),
        parallel.ModelStats.of(parent.config),
        micro_tokens=micro * seq_len,
        grad_checkpointing=settings.grad_checkpointing,
        loss_chunk=settings.loss_chunk,
    )
    compile_mode = resolve_compile(settings.compile, device)
    compile_layers = compile_mode == "all"
    if compile_mode != "off":
        import torch._dynamo as dynamo

        # A layer or kernel that does not compile runs eagerly instead of failing the phase, and a
        # child of many different blocks is not capped at the default 8 compiled variants.
        dynamo.config.suppress_errors = True
        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)

    student_model = parallel.meta_model(child.config, dtype=torch.float32, trainable=True)
    parallel.wrap_layers(student_model, checkpoint=settings.grad_checkpointing, compile=compile_layers)
    student = Student(student_model, settings, compile_loss=compile_mode != "off")
    teacher = parallel.meta_model(
        parent.config, dtype=torch.bfloat16 if cuda else torch.float32, trainable=False
    )
    parallel.wrap_layers(teacher, checkpoint=False, compile=compile_layers)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        policy = parallel.mixed_precision(device)
        parallel.shard_layers(student_model, policy)
        fully_shard(student, mp_policy=policy)
        parallel.shard_layers(teacher, None)
        fully_shard(teacher)
    parallel.materialize(student_model, device, child.weights, seed=child.seed)
    parallel.materialize(teacher, device, parent.weights, seed=parent.seed)
    teacher.eval()
    student.train()
    model: nn.Module = student
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            student, device_ids=[device.index] if cuda else None, gradient_as_bucket_view=True
        )
    optimizer = torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad],
        lr=settings.lr,
        betas=(0.9, 0.95),
        weight_decay=0.0,
        fused=True if cuda else None,
    )
    return Setup(model, student, teacher, optimizer, mode, estimates, compile_mode)


@contextmanager
def _parent_head(parent: nn.Module, needed: bool) -> Iterator[torch.Tensor | None]:
    """The parent's LM-head weight, gathered for the duration when the parent is sharded."""
    if not needed:
        yield None
        return
    from torch.distributed.fsdp import FSDPModule

    head = parent.get_submodule("lm_head")
    if isinstance(parent, FSDPModule):
        parent.unshard()
        try:
            yield cast(torch.Tensor, head.weight)
        finally:
            parent.reshard()
        return
    yield cast(torch.Tensor, head.weight)


# --------------------------------------------------------------------------- training


def train(
    child: ModelSpec,
    parent: ModelSpec,
    input_ids: torch.Tensor,
    settings: GKDConfig,
    *,
    device: torch.device,
    work_dir: Path | None,
    dist_info: DistInfo = DistInfo(),
    split: str = "gkd",
    checkpoint_remote: str | None = None,
    request: str = "",
    return_model: bool = True,
) -> tuple[DeciLMForCausalLM | None, dict[str, Any]]:
    """Run GKD; returns the distilled child (on rank 0's CPU; None on other ranks, or everywhere
    without ``return_model``) and the summary (steps, tokens, losses, history with each step's
    seconds, mode, speed, peak memory).

    ``work_dir`` (on every rank) holds the sharded checkpoints, mirrored to ``checkpoint_remote``;
    a checkpoint found there for the same ``request`` is resumed from.
    """
    n, seq_len = input_ids.shape
    if n == 0:
        raise DistillError(f"split {split!r} is empty: give data.splits.{split} > 0 sequences")
    world = dist_info.world_size
    if settings.batch_size % world:
        raise DistillError(
            f"gkd.batch_size={settings.batch_size} must be divisible by the number of GPUs ({world})"
        )
    local_batch = settings.batch_size // world
    micro = min(settings.micro_batch_size or local_batch, local_batch)
    if local_batch % micro:
        raise DistillError(
            f"gkd.micro_batch_size={micro} must divide each GPU's share of the batch ({local_batch} = "
            f"gkd.batch_size {settings.batch_size} / {world} GPUs)"
        )
    steps = settings.token_budget // (settings.batch_size * seq_len)
    warmup = int(round(settings.warmup_fraction * steps))
    torch.manual_seed(settings.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    setup = build(child, parent, settings, device=device, info=dist_info, seq_len=seq_len)
    model, optimizer, teacher = setup.model, setup.optimizer, setup.parent
    fused = settings.loss_chunk > 0
    need_head = fused and bool(settings.weight_kl or settings.weight_lm)
    checkpoints = (
        parallel.Checkpoints(work_dir / CHECKPOINT, checkpoint_remote, request, dist_info)
        if work_dir is not None
        else None
    )
    start, history = 0, []
    state = checkpoints.latest() if checkpoints is not None else None
    if state is not None:
        assert checkpoints is not None
        checkpoints.load(state, model, optimizer)
        start, history = int(state["step"]), list(state["history"])
        log.info(
            "GKD: resuming from step %d of %d (written by %s processes)",
            start,
            steps,
            state.get("world_size"),
        )
    resumed_from = start
    stop_at = int(os.environ.get(STOP_ENV, "0") or 0)

    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and setup.mode != "fsdp"
        else nullcontext()
    )
    n_micro = local_batch // micro
    t0 = time.perf_counter()
    t_first: float | None = None  # after the first step: the steady-state rate leaves warm-up out
    bar = tqdm(
        range(start, steps),
        desc="GKD",
        unit="step",
        disable=None if dist_info.is_main else True,
        initial=start,
        total=steps,
    )
    t_step = time.perf_counter()
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, warmup, settings.lr)
        idx = batch_indices(step, n, settings.batch_size, settings.seed)
        idx = idx[dist_info.rank * local_batch : (dist_info.rank + 1) * local_batch]
        stats = torch.zeros(4, device=device)
        for m, part in enumerate(idx.split(micro)):
            batch = input_ids[part].long().to(device)
            last = m == n_micro - 1
            with _gradient_sync(model, setup.mode, last):
                with autocast:
                    with torch.no_grad():
                        p_out = teacher(
                            input_ids=batch,
                            output_hidden_states=True,
                            use_cache=False,
                            logits_to_keep=1 if fused else 0,
                        )
                    with _parent_head(teacher, need_head) as head:
                        loss, parts = model(batch, p_out.hidden_states, head, None if fused else p_out.logits)
                    del p_out
                (loss / n_micro).backward()
            stats += parts / n_micro
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(stats)
            stats /= world
        values = stats.tolist()
        record = {"step": step + 1, "loss": values[0], "lr": optimizer.param_groups[0]["lr"]}
        for i, name in ((1, "cosine"), (2, "kl"), (3, "lm")):
            if (settings.weight_cosine, settings.weight_kl, settings.weight_lm)[i - 1]:
                record[name] = values[i]
        record["grad_norm"] = float(
            grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        )
        now = time.perf_counter()
        record["seconds"] = now - t_step  # stats.tolist() above waited for the GPU
        t_step = now
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        done = step + 1
        if t_first is None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t_first = time.perf_counter()
        if checkpoints is not None and done % settings.checkpoint_every == 0 and done < steps:
            checkpoints.save(done, history, model, optimizer, mode=setup.mode)
            t_step = time.perf_counter()  # a step's seconds leave the checkpoint out
            if stop_at and done >= stop_at:
                log.warning("GKD: %s=%d: exiting after the checkpoint of step %d", STOP_ENV, stop_at, done)
                os._exit(STOP_EXIT_CODE)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    end = time.perf_counter()
    trained_steps = steps - resumed_from
    tokens_per_step = settings.batch_size * seq_len
    if trained_steps >= 2 and t_first is not None and end > t_first:
        tokens_per_s: float | None = (trained_steps - 1) * tokens_per_step / (end - t_first)
    elif trained_steps == 1 and end > t0:
        tokens_per_s = tokens_per_step / (end - t0)
    else:
        tokens_per_s = None
    peak = torch.cuda.max_memory_allocated(device) / parallel.GIB if device.type == "cuda" else None
    peaks = parallel.all_gather(peak, dist_info)
    distilled = None
    if return_model:
        state_dict = parallel.full_state_dict(model, dist_info)
    if return_model and dist_info.is_main:
        state_dict = {k.removeprefix("child."): v for k, v in state_dict.items()}
        distilled = model_from_state(
            child.config, state_dict, device=torch.device("cpu"), what="GKD's weights"
        )
        distilled.eval()
    summary = {
        "steps": steps,
        "resumed_from_step": resumed_from,
        "tokens": steps * tokens_per_step,
        "seq_len": seq_len,
        "world_size": world,
        "parallel": setup.mode,
        "micro_batch_size": micro,
        "compile": setup.compile,
        "device": str(device),
        "tokens_per_s": tokens_per_s,
        "train_seconds": end - t0,
        "peak_memory_gib": max(peaks) if all(p is not None for p in peaks) else None,
        "memory_estimate_gib": round(
            setup.estimates["ddp" if setup.mode == "single" else setup.mode].total / parallel.GIB, 2
        ),
        "first_loss": history[0]["loss"] if history else None,
        "final_loss": history[-1]["loss"] if history else None,
        "history": history,
    }
    return distilled, summary


@contextmanager
def _gradient_sync(model: nn.Module, mode: str, sync: bool) -> Iterator[None]:
    """DDP synchronises gradients only on the last micro-batch of a step. FSDP reduce-scatters every
    micro-batch's gradients into the shards: skipping that would keep whole unsharded gradients
    between micro-batches, the memory FSDP exists to save."""
    if mode == "ddp" and not sync:
        with model.no_sync():  # type: ignore[operator]
            yield
        return
    yield


# --------------------------------------------------------------------------- phase


NEMO_MODULES = ("nemo", "megatron.core", "modelopt")


def check_nemo_installed() -> None:
    """``gkd.backend: nemo`` needs NeMo, Megatron-core and ModelOpt; say so before anything loads."""
    import importlib.util

    missing = []
    for name in NEMO_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise DistillError(
            f"gkd.backend is 'nemo' but {', '.join(missing)} cannot be imported here: run in the puzzle-nemo "
            "image (a pipeline compiled with `puzzle pipeline compile --gkd-backend nemo`), install "
            "images/nemo-requirements.txt, or set gkd.backend: torch"
        )


def distill(
    child: str,
    parent: str,
    tokens: str,
    out: str,
    gkd: GKDConfig,
    *,
    split: str = "gkd",
    device: str = "auto",
) -> artifacts.Manifest:
    """Phase ``gkd``: distil the child at ``child`` against ``parent``; writes a ``child`` artifact.

    The settings of :data:`RUN_ONLY` and ``device`` do not change the result's identity (they are
    not part of the artifact's parameters). Under ``torchrun`` every rank calls this; rank 0 writes.
    """
    settings = gkd
    artifacts.require_manifest(child, MODEL_KINDS)
    artifacts.require_manifest(parent, MODEL_KINDS)
    artifacts.require_manifest(tokens, "tokens")
    if gkd.backend == "nemo":
        check_nemo_installed()
    dist_info = init_distributed()
    torch_device = resolve_device(device)
    inputs = {"child": child, "parent": parent, "tokens": tokens}
    parameters = {k: v for k, v in asdict(settings).items() if k not in RUN_ONLY}
    parameters["split"] = split
    remote = f"{out.rstrip('/')}.checkpoint" if storage.is_s3(out) else None

    def request() -> str:
        text = json.dumps(
            {"inputs": {k: artifacts.fingerprint(v) for k, v in inputs.items()}, "parameters": parameters},
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def run_training(
        local: dict[str, Path], work_dir: Path, request: str
    ) -> tuple[DeciLMForCausalLM | None, dict[str, Any]]:
        ids = load_split(str(local["tokens"]), split)
        student, teacher = ModelSpec.from_dir(local["child"]), ModelSpec.from_dir(local["parent"])
        _check_compatible(student.config, teacher.config)
        trainer = train
        if settings.backend == "nemo":
            from puzzle.child import gkd_nemo  # NeMo and Megatron-core: the puzzle-nemo image only

            trainer = gkd_nemo.train
        return trainer(
            student,
            teacher,
            ids,
            settings,
            device=torch_device,
            work_dir=work_dir,
            dist_info=dist_info,
            split=split,
            checkpoint_remote=remote,
            request=request,
        )

    if dist_info.world_size > 1:
        return _distill_distributed(out, inputs, parameters, run_training, request, dist_info, remote)

    def build_artifact(staging: Path, local: dict[str, Path]) -> dict[str, Any]:
        work = staging / ".work"
        work.mkdir(parents=True, exist_ok=True)
        student, summary = run_training(local, work, request())
        assert student is not None
        _save(student, local, staging, summary, child, settings.save_dtype)
        return {k: v for k, v in summary.items() if k != "history"}

    manifest = artifacts.run_phase(
        CHILD_KIND, out, inputs, parameters, build_artifact, input_kinds={"child": MODEL_KINDS}
    )
    parallel.Checkpoints(Path(), remote, "", dist_info).clear()
    return manifest


def _save(
    student: DeciLMForCausalLM,
    local: dict[str, Path],
    staging: Path,
    summary: dict[str, Any],
    child: str,
    dtype: str,
) -> None:
    """The distilled child, its weights in ``dtype`` (``gkd.save_dtype``)."""
    student.config.use_cache = True
    info = read_parent_info(local["child"])
    info["distilled_from"] = child
    save_model(student.cpu(), load_tokenizer(local["child"]), staging, info, dtype=dtype)
    (staging / HISTORY).write_text(json.dumps(summary["history"], indent=1) + "\n")


def _distill_distributed(
    out: str,
    inputs: dict[str, str],
    parameters: dict[str, Any],
    run_training: Any,
    request: Any,
    dist_info: DistInfo,
    remote: str | None,
) -> artifacts.Manifest:
    """Every rank trains; rank 0 materializes the inputs and owns the staging directory (through
    :func:`artifacts.run_phase`), the others wait until it is ready, then read the inputs (each
    node's first process downloads them once) and checkpoint into the same folder."""
    current = artifacts.is_current(out, CHILD_KIND, inputs, parameters)
    parallel.barrier(dist_info)
    if current is not None:
        return current
    manifest: artifacts.Manifest | None
    if dist_info.is_main:

        def build_artifact(staging: Path, local: dict[str, Path]) -> dict[str, Any]:
            work = staging / ".work"
            work.mkdir(parents=True, exist_ok=True)
            parallel.barrier(dist_info)  # the staging directory is ready
            student, summary = run_training(local, work, request())
            _save(student, local, staging, summary, inputs["child"], parameters["save_dtype"])
            return {k: v for k, v in summary.items() if k != "history"}

        manifest = artifacts.run_phase(CHILD_KIND, out, inputs, parameters, build_artifact, force=True)
        parallel.Checkpoints(Path(), remote, "", dist_info).clear()
        parallel.barrier(dist_info)
        return manifest

    def local_inputs() -> dict[str, Path]:
        return {
            name: artifacts.materialize(uri) if storage.is_s3(uri) else Path(uri)
            for name, uri in inputs.items()
        }

    local = local_inputs() if dist_info.is_node_main else {}
    parallel.barrier(dist_info)
    if not dist_info.is_node_main:
        local = local_inputs()  # downloaded and verified by this node's first process
    run_training(local, artifacts.work_dir_for(out) / ".work", "")
    parallel.barrier(dist_info)
    manifest = artifacts.read_manifest(out)
    assert manifest is not None
    return manifest


def _check_compatible(child: DeciLMConfig, parent: DeciLMConfig) -> None:
    if (child.num_hidden_layers, child.hidden_size, child.vocab_size) != (
        parent.num_hidden_layers,
        parent.hidden_size,
        parent.vocab_size,
    ):
        raise DistillError(
            f"child ({child.num_hidden_layers} layers, hidden {child.hidden_size}, vocab {child.vocab_size}) "
            f"does not match the parent ({parent.num_hidden_layers}, {parent.hidden_size}, "
            f"{parent.vocab_size}): pass the parent the child was realized from"
        )
