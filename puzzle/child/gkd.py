"""Global knowledge distillation (GKD): train the whole realized child against the parent.

Loss (the paper's best setting): for every layer the cosine distance between the
child's and the parent's hidden states, summed over layers, plus KL(parent || child) of the
next-token distributions; no language-modelling loss by default (it hurt in the paper's Table 17)
but its weight is configurable. The parent's outputs are computed on the fly.

Training: AdamW, linear warm-up then cosine decay to 10 % of the peak, gradient clipping at 1,
bf16 autocast on CUDA, optional gradient checkpointing. ``batch_size`` is the global batch (in
sequences), so the number of steps depends only on the token budget, not on the number of GPUs.

Data-parallel: launched with ``torchrun`` (``WORLD_SIZE`` > 1) every rank calls :func:`distill`;
each trains on its slice of every global batch under DDP, rank 0 checkpoints and writes the
artifact. Checkpoints go to the phase's staging ``.work/`` directory every ``checkpoint_every``
steps; a killed run started again with the same inputs resumes from the last one and ends after
the same number of steps, with the same data order.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from puzzle.config import GKDConfig
from puzzle.data import load_split
from puzzle.errors import PuzzleError
from puzzle.io import artifacts
from puzzle.modeling import DeciLMForCausalLM
from puzzle.modeling.checkpoints import (
    CHILD_KIND,
    MODEL_KINDS,
    load_model,
    load_tokenizer,
    read_parent_info,
    save_model,
)
from puzzle.modeling.devices import resolve_device

log = logging.getLogger(__name__)

CHECKPOINT = "gkd_checkpoint.pt"
HISTORY = "gkd_history.json"


class DistillError(PuzzleError, ValueError):
    """GKD cannot run with these inputs or settings; the message names the field and the fix."""


# --------------------------------------------------------------------------- loss


def kl_parent_child(parent_logits: torch.Tensor, child_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(parent || child) of next-token distributions, in float32."""
    p_log = F.log_softmax(parent_logits.float(), dim=-1)
    c_log = F.log_softmax(child_logits.float(), dim=-1)
    return (p_log.exp() * (p_log - c_log)).sum(-1).mean()


def cosine_distance_sum(
    child_hidden: tuple[torch.Tensor, ...], parent_hidden: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """Sum over layers of the mean (over tokens) of 1 - cos(h_child, h_parent).

    The models return the hidden state entering every layer plus the final (normed) output;
    the first entry (the embeddings) is skipped, so there is one term per layer.
    """
    total = child_hidden[1].new_zeros((), dtype=torch.float32)
    for hc, hp in zip(child_hidden[1:], parent_hidden[1:], strict=True):
        total = total + (1.0 - F.cosine_similarity(hc.float(), hp.float(), dim=-1)).mean()
    return total


def gkd_loss(
    child_out: Any, parent_out: Any, input_ids: torch.Tensor, settings: GKDConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted GKD loss and its parts (as floats, for logging)."""
    parts: dict[str, torch.Tensor] = {}
    if settings.weight_cosine:
        parts["cosine"] = cosine_distance_sum(child_out.hidden_states, parent_out.hidden_states)
    if settings.weight_kl:
        parts["kl"] = kl_parent_child(parent_out.logits, child_out.logits)
    if settings.weight_lm:
        logits = child_out.logits[:, :-1].float()
        parts["lm"] = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1).long()
        )
    weights = {"cosine": settings.weight_cosine, "kl": settings.weight_kl, "lm": settings.weight_lm}
    loss = sum(weights[name] * value for name, value in parts.items())
    if not isinstance(loss, torch.Tensor):
        raise DistillError("every GKD loss weight is 0: at least one of weight_cosine/kl/lm must be > 0")
    return loss, {name: float(value.detach()) for name, value in parts.items()}


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up to ``peak``, then cosine decay to 10 % of it."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


# --------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


# --------------------------------------------------------------------------- data


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """The sequences of global batch ``step``: a fresh seeded permutation every epoch, so the
    order depends only on (seed, step) and a resumed run sees exactly the same batches."""
    per_epoch = max(1, n // batch_size) if n >= batch_size else 1
    epoch, within = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    if n < batch_size:
        return perm.repeat(math.ceil(batch_size / n))[:batch_size]
    return perm[within * batch_size : (within + 1) * batch_size]


# --------------------------------------------------------------------------- training


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(
    child: DeciLMForCausalLM,
    parent: torch.nn.Module,
    input_ids: torch.Tensor,
    settings: GKDConfig,
    *,
    device: torch.device,
    work_dir: Path | None,
    dist_info: DistInfo = DistInfo(),
    split: str = "gkd",
) -> dict[str, Any]:
    """Run GKD in place on ``child``; returns the summary (steps, tokens, losses, history).

    ``work_dir`` (rank 0 only) holds the checkpoint; a checkpoint found there is resumed from.
    """
    n, seq_len = input_ids.shape
    if n == 0:
        raise DistillError(f"split {split!r} is empty: give data.splits.{split} > 0 sequences")
    if settings.batch_size % dist_info.world_size:
        raise DistillError(
            f"gkd.batch_size={settings.batch_size} must be divisible by the number of GPUs "
            f"({dist_info.world_size})"
        )
    steps = settings.token_budget // (settings.batch_size * seq_len)
    warmup = int(round(settings.warmup_fraction * steps))
    local_batch = settings.batch_size // dist_info.world_size
    torch.manual_seed(settings.seed)

    # transformers wraps PreTrainedModel.to with functools.wraps, whose typeshed type is unbound.
    child.to(device).train()  # type: ignore[arg-type]
    parent.to(device).eval()
    for p in parent.parameters():
        p.requires_grad_(False)
    if settings.grad_checkpointing:
        child.gradient_checkpointing_enable()
    child.config.use_cache = False
    model: torch.nn.Module = child
    if dist_info.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(child, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(
        [p for p in child.parameters() if p.requires_grad],
        lr=settings.lr,
        betas=(0.9, 0.95),
        weight_decay=0.0,
    )

    start, history = 0, []
    state = _load_resume_state(work_dir, dist_info)
    if state is not None:
        child.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = int(state["step"]), list(state["history"])
        log.info("GKD: resuming from step %d of %d", start, steps)
    resumed_from = start

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
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
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, warmup, settings.lr)
        idx = batch_indices(step, n, settings.batch_size, settings.seed)
        idx = idx[dist_info.rank * local_batch : (dist_info.rank + 1) * local_batch]
        batch = input_ids[idx].long().to(device)
        with autocast:
            with torch.no_grad():
                parent_out = parent(input_ids=batch, output_hidden_states=True, use_cache=False)
            child_out = model(input_ids=batch, output_hidden_states=True, use_cache=False)
            loss, parts = gkd_loss(child_out, parent_out, batch, settings)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(child.parameters(), 1.0)
        optimizer.step()
        record = {
            "step": step + 1,
            "loss": float(loss.detach()),
            "lr": optimizer.param_groups[0]["lr"],
            **parts,
        }
        record["grad_norm"] = float(grad_norm)
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        done = step + 1
        if t_first is None:
            t_first = time.perf_counter()
        if (
            work_dir is not None
            and dist_info.is_main
            and (done % settings.checkpoint_every == 0)
            and done < steps
        ):
            save_checkpoint(
                work_dir / CHECKPOINT,
                {
                    "step": done,
                    "model": child.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "history": history,
                },
            )
    end = time.perf_counter()
    if settings.grad_checkpointing:
        child.gradient_checkpointing_disable()
    child.eval()
    trained_steps = steps - resumed_from
    if trained_steps >= 2 and t_first is not None and end > t_first:
        tokens_per_s = (trained_steps - 1) * settings.batch_size * seq_len / (end - t_first)
    elif trained_steps == 1 and end > t0:
        tokens_per_s = settings.batch_size * seq_len / (end - t0)
    else:
        tokens_per_s = None
    return {
        "steps": steps,
        "resumed_from_step": resumed_from,
        "tokens": steps * settings.batch_size * seq_len,
        "seq_len": seq_len,
        "world_size": dist_info.world_size,
        "device": str(device),
        "tokens_per_s": tokens_per_s,
        "train_seconds": end - t0,
        "first_loss": history[0]["loss"] if history else None,
        "final_loss": history[-1]["loss"] if history else None,
        "history": history,
    }


def _load_resume_state(work_dir: Path | None, dist_info: DistInfo) -> dict[str, Any] | None:
    """Rank 0 reads the checkpoint; under torchrun it is broadcast, so nodes need no shared disk."""
    state = None
    if dist_info.is_main and work_dir is not None and (work_dir / CHECKPOINT).exists():
        state = torch.load(work_dir / CHECKPOINT, map_location="cpu", weights_only=False)
    if dist_info.world_size > 1:
        import torch.distributed as dist

        box = [state]
        dist.broadcast_object_list(box, src=0)
        state = box[0]
    return state


# --------------------------------------------------------------------------- phase


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

    ``gkd.checkpoint_every`` and ``device`` do not change the result's identity (they are not part
    of the artifact's parameters). Under ``torchrun`` every rank calls this; rank 0 writes.
    """
    settings = gkd
    artifacts.require_manifest(child, MODEL_KINDS)
    artifacts.require_manifest(parent, MODEL_KINDS)
    artifacts.require_manifest(tokens, "tokens")
    dist_info = init_distributed()
    torch_device = resolve_device(device)
    inputs = {"child": child, "parent": parent, "tokens": tokens}
    parameters = {k: v for k, v in asdict(settings).items() if k != "checkpoint_every"}
    parameters["split"] = split

    def run_training(
        local: dict[str, Path], work_dir: Path | None
    ) -> tuple[DeciLMForCausalLM, dict[str, Any]]:
        ids = load_split(str(local["tokens"]), split)
        student = load_model(str(local["child"]), dtype=torch.float32)
        teacher = load_model(str(local["parent"]), dtype=torch.float32)
        _check_compatible(student, teacher)
        summary = train(
            student,
            teacher,
            ids,
            settings,
            device=torch_device,
            work_dir=work_dir,
            dist_info=dist_info,
            split=split,
        )
        return student, summary

    if dist_info.world_size > 1:
        return _distill_distributed(out, inputs, parameters, run_training, dist_info)

    def build(staging: Path, local: dict[str, Path]) -> dict[str, Any]:
        work = staging / ".work"
        work.mkdir(parents=True, exist_ok=True)
        student, summary = run_training(local, work)
        _save(student, local, staging, summary, child)
        return {k: v for k, v in summary.items() if k != "history"}

    return artifacts.run_phase(CHILD_KIND, out, inputs, parameters, build, input_kinds={"child": MODEL_KINDS})


def _save(
    student: DeciLMForCausalLM, local: dict[str, Path], staging: Path, summary: dict[str, Any], child: str
) -> None:
    student.config.use_cache = True
    info = read_parent_info(local["child"])
    info["distilled_from"] = child
    save_model(student.cpu(), load_tokenizer(local["child"]), staging, info)
    (staging / HISTORY).write_text(json.dumps(summary["history"], indent=1) + "\n")


def _distill_distributed(
    out: str, inputs: dict[str, str], parameters: dict[str, Any], run_training: Any, dist_info: DistInfo
) -> artifacts.Manifest:
    import torch.distributed as dist

    current = artifacts.is_current(out, CHILD_KIND, inputs, parameters)
    dist.barrier()
    if current is not None:
        return current
    manifest: artifacts.Manifest | None
    if dist_info.is_main:

        def build(staging: Path, local: dict[str, Path]) -> dict[str, Any]:
            work = staging / ".work"
            work.mkdir(parents=True, exist_ok=True)
            student, summary = run_training(local, work)
            _save(student, local, staging, summary, inputs["child"])
            return {k: v for k, v in summary.items() if k != "history"}

        manifest = artifacts.run_phase(CHILD_KIND, out, inputs, parameters, build, force=True)
        dist.barrier()
        return manifest
    local = {name: artifacts.materialize(uri) for name, uri in inputs.items()}
    run_training(local, None)
    dist.barrier()
    manifest = artifacts.read_manifest(out)
    assert manifest is not None
    return manifest


def _check_compatible(child: DeciLMForCausalLM, parent: DeciLMForCausalLM) -> None:
    cc, pc = child.config, parent.config
    if (cc.num_hidden_layers, cc.hidden_size, cc.vocab_size) != (
        pc.num_hidden_layers,
        pc.hidden_size,
        pc.vocab_size,
    ):
        raise DistillError(
            f"child ({cc.num_hidden_layers} layers, hidden {cc.hidden_size}, vocab {cc.vocab_size}) does not "
            f"match the parent ({pc.num_hidden_layers}, {pc.hidden_size}, {pc.vocab_size}): pass the parent "
            "the "
            "child was realized from"
        )
