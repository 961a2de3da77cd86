"""GKD with NeMo's distillation on Megatron-core models (``gkd.backend: nemo``).

The parent and the child become Megatron-core ``GPTModel``s with the heterogeneous Llama-Nemotron
layer spec (``HeterogeneousTransformerConfig`` reads the child's ``block_configs``; every sub-block
kind of ours: GQA of any number of KV heads, linear, no-op; SwiGLU of any width, linear, no-op),
through :mod:`puzzle.child.megatron_map`. Megatron's *local* spec is used (plain PyTorch layers), so
neither Transformer Engine nor Apex is needed. The child is wrapped in ModelOpt's
``DistillationModel`` (``mtd.convert(..., mode="kd_loss")``), as NeMo's ``DistillationGPTModel``
does, with NeMo's criteria and NeMo's Megatron adjustments (``adjust_distillation_model_for_mcore``):

* ``LogitsKLLoss`` on ``output_layer``: KL(parent || child) of the next-token distributions per
  token (temperature 1), which is our KL term;
* ``HiddenStateCosineLoss`` on ``decoder.layers.i`` (i < L-1) and ``decoder.final_layernorm``:
  1 - cos per token, which is our per-layer cosine term (summed over layers);
* the LM loss (``gkd.weight_lm``): cross-entropy of the child's logits (not Megatron's in-place
  cross-entropy, which would overwrite the logits the KL criterion holds).

What NeMo's distillation does not do as ours does, and how this backend handles it: its loss
balancer (``LogitsAndIntermediatesLossBalancer``) *averages* the intermediate losses and rescales
them, every step, to the size of the KL term (and the KD loss to the size of the LM loss); our loss
has fixed weights. Here the criteria's values are taken unbalanced (``compute_kd_loss(skip_balancer=
True)``) and weighted with ``gkd.weight_cosine``, ``gkd.weight_kl`` and ``gkd.weight_lm``, so both
backends minimise the same number. NeMo computes the cosine in the activations' dtype (bf16 under
autocast), ours in float32. NeMo's Lightning entry point (``llm.distill``) is not used: it needs NeMo
checkpoints of both models and a NeMo data module; this loop reads our tokens artifact, keeps our
data order (:func:`puzzle.child.gkd.batch_indices`), learning-rate schedule, AdamW settings,
gradient clipping, checkpoints (``parallel.Checkpoints``: resume, S3 mirror) and summary, and the
caller (:func:`puzzle.child.gkd.distill`) writes the same artifact, manifest and MLflow records.

Limits of this version: one process and one GPU (tensor and pipeline parallelism of Megatron are
not wired); ``gkd.compile`` and ``gkd.grad_checkpointing`` are ignored. The packages (NeMo 2.7.3,
Megatron-core 0.16.1, ModelOpt 0.37.0 and their needs) are those of the ``puzzle-nemo`` image; they
are imported inside the functions here, so the rest of the package never needs them.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from puzzle.child import megatron_map, parallel
from puzzle.child.parallel import DistInfo
from puzzle.config import GKDConfig
from puzzle.modeling import DeciLMConfig, DeciLMForCausalLM
from puzzle.modeling.checkpoints import model_from_state

__all__ = ["CHECKPOINT", "build_gpt", "distillation_model", "kd_losses", "megatron_state", "train"]

log = logging.getLogger(__name__)

CHECKPOINT = "gkd-nemo-checkpoint"
"""The folder of this backend's checkpoints, under the phase's staging ``.work/``."""

MEGATRON_FLAGS: dict[str, Any] = {
    # Fused kernels that need Apex or Transformer Engine (neither is required here).
    "bias_activation_fusion": False,
    "masked_softmax_fusion": False,
    "persist_layer_norm": False,
    "bias_dropout_fusion": False,
    "apply_rope_fusion": False,
    "gradient_accumulation_fusion": False,
    "cross_entropy_loss_fusion": False,
}


def versions() -> dict[str, str]:
    """The versions of the packages this backend runs on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("nemo_toolkit", "megatron_core", "nvidia_modelopt", "lightning"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def init_megatron(seed: int) -> None:
    """A one-process group and Megatron's model-parallel state (tensor and pipeline size 1)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(seed)


def build_gpt(config: DeciLMConfig, *, dtype: torch.dtype, cpu: bool = False) -> nn.Module:
    """Megatron-core's heterogeneous ``GPTModel`` of ``config`` (local layer spec), uninitialised
    (its weights come from :func:`megatron_state`)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.heterogeneous.heterogeneous_layer_specs import (
        get_gpt_heterogeneous_layer_spec,
    )
    from megatron.core.transformer.heterogeneous.heterogeneous_config import HeterogeneousTransformerConfig

    mcfg = HeterogeneousTransformerConfig(
        **megatron_map.transformer_kwargs(config),
        **MEGATRON_FLAGS,
        activation_func=F.silu,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=cpu,
        perform_initialization=cpu,
    )
    spec = get_gpt_heterogeneous_layer_spec(mcfg, use_te=False)
    model = GPTModel(config=mcfg, transformer_layer_spec=spec, **megatron_map.gpt_kwargs(config))
    if not cpu and torch.cuda.is_available():
        # As Megatron's own get_model does: modules it does not initialise itself (the local spec's
        # norms) are made on the CPU.
        model.cuda(torch.cuda.current_device())
    return model


def megatron_state(model: nn.Module, config: DeciLMConfig, state: dict[str, torch.Tensor]) -> None:
    """Load our state dict ``state`` into the Megatron model ``model`` (in place)."""
    mstate = megatron_map.to_megatron(state, config)
    missing, unexpected = model.load_state_dict(mstate, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise megatron_map.MegatronMappingError(
            f"Megatron model and mapped weights differ: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def our_state(model: nn.Module, config: DeciLMConfig) -> dict[str, torch.Tensor]:
    """The Megatron model's weights as our state dict (CPU tensors)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    return megatron_map.from_megatron(state, config)


def load_ours(spec: Any) -> dict[str, torch.Tensor]:
    """The float32 weights of a :class:`puzzle.child.gkd.ModelSpec` on the CPU (from its directory, or
    the same seeded random weights the torch backend uses)."""
    model = parallel.meta_model(spec.config, dtype=torch.float32, trainable=False)
    parallel.materialize(model, torch.device("cpu"), spec.weights, seed=spec.seed)
    return {k: v for k, v in model.state_dict().items()}


def distillation_model(
    student: nn.Module, teacher: nn.Module, config: DeciLMConfig, settings: GKDConfig
) -> nn.Module:
    """``student`` converted in place into ModelOpt's ``DistillationModel`` with NeMo's criteria (see
    the module's docstring) and NeMo's Megatron-core adjustments."""
    import modelopt.torch.distill as mtd
    from nemo.collections.llm.modelopt.distill.loss import (
        HiddenStateCosineLoss,
        LogitsAndIntermediatesLossBalancer,
        LogitsKLLoss,
    )
    from nemo.collections.llm.modelopt.distill.utils import (
        DistillationConfig,
        adjust_distillation_model_for_mcore,
    )

    mcfg = student.config
    criterion: dict[tuple[str, str], nn.Module] = {}
    if settings.weight_kl:
        criterion[("output_layer", "output_layer")] = LogitsKLLoss(mcfg)
    if settings.weight_cosine:
        for name in megatron_map.layer_outputs(config):
            criterion[(name, name)] = HiddenStateCosineLoss(mcfg)
    if not criterion:  # LM loss alone: keep one (unweighted) criterion so ModelOpt has something to hook
        criterion[("output_layer", "output_layer")] = LogitsKLLoss(mcfg)
    balancer = LogitsAndIntermediatesLossBalancer(skip_original_loss=True) if len(criterion) > 1 else None
    kd_config = {"teacher_model": teacher, "criterion": criterion, "loss_balancer": balancer}
    model = mtd.convert(student, mode=[("kd_loss", kd_config)])
    distill_cfg = DistillationConfig(
        intermediate_layer_pairs=[k for k in criterion if k[0] != "output_layer"]
    )
    adjust_distillation_model_for_mcore(model, distill_cfg=distill_cfg)
    return model


def _token_mean(loss: Any) -> torch.Tensor:
    """NeMo's criteria return ``(per-token loss [b, s], tp_reduce, sequence_parallel)``: the mean."""
    if isinstance(loss, tuple):
        loss = loss[0]
    return loss.float().mean()


def kd_losses(
    model: nn.Module, input_ids: torch.Tensor, settings: GKDConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass of parent and child; the weighted loss and ``[loss, cosine, kl, lm]``."""
    b, s = input_ids.shape
    position_ids = torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, -1)
    # Logits, not Megatron's LM loss: its cross-entropy works in place on the logits tensor that the
    # KL criterion's hook holds (labels= would turn the child's captured logits into exponentials).
    logits = model(input_ids=input_ids, position_ids=position_ids, attention_mask=None)
    lm = torch.zeros((), device=input_ids.device)
    if settings.weight_lm:
        shifted = logits[:, :-1].float()
        lm = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), input_ids[:, 1:].reshape(-1))
    parts = model.compute_kd_loss(loss_reduction_fn=_token_mean, skip_balancer=True)  # type: ignore[operator]
    zero = torch.zeros((), device=input_ids.device)
    kl = sum((v for k, v in parts.items() if k.startswith("LogitsKLLoss")), zero)
    cos = sum((v for k, v in parts.items() if k.startswith("HiddenStateCosineLoss")), zero)
    loss = settings.weight_cosine * cos + settings.weight_kl * kl + settings.weight_lm * lm
    stats = torch.stack([loss.detach(), cos.detach(), kl.detach(), lm.detach()]).float()
    return loss, stats


class _Trainable(nn.Module):
    """The student's trainable parameters under flat names: what the checkpoints hold (no Megatron
    ``_extra_state``, no teacher)."""

    def __init__(self, named: list[tuple[str, nn.Parameter]]) -> None:
        super().__init__()
        for name, p in named:
            self.register_parameter(name.replace(".", "__"), p)


def train(
    child: Any,
    parent: Any,
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
    """:func:`puzzle.child.gkd.train` with NeMo's distillation on Megatron-core (same arguments,
    same returns; ``child`` and ``parent`` are :class:`puzzle.child.gkd.ModelSpec`)."""
    from puzzle.child.gkd import STOP_ENV, STOP_EXIT_CODE, DistillError, batch_indices, lr_at

    n, seq_len = input_ids.shape
    if n == 0:
        raise DistillError(f"split {split!r} is empty: give data.splits.{split} > 0 sequences")
    if dist_info.world_size > 1:
        raise DistillError(
            "gkd.backend nemo runs on one GPU in this version (Megatron's tensor and pipeline parallelism "
            "are not wired): use gkd.backend torch for several GPUs"
        )
    if device.type != "cuda":
        raise DistillError(f"gkd.backend nemo needs a CUDA device (Megatron-core), got {device}")
    torch.cuda.set_device(device)
    micro = min(settings.micro_batch_size or settings.batch_size, settings.batch_size)
    if settings.batch_size % micro:
        raise DistillError(f"gkd.micro_batch_size={micro} must divide gkd.batch_size={settings.batch_size}")
    steps = settings.token_budget // (settings.batch_size * seq_len)
    warmup = int(round(settings.warmup_fraction * steps))
    torch.manual_seed(settings.seed)
    torch.cuda.reset_peak_memory_stats(device)
    init_megatron(settings.seed)

    student = build_gpt(child.config, dtype=torch.float32)
    megatron_state(student, child.config, load_ours(child))
    teacher = build_gpt(parent.config, dtype=torch.bfloat16)
    megatron_state(teacher, parent.config, {k: v.to(torch.bfloat16) for k, v in load_ours(parent).items()})
    teacher.requires_grad_(False)
    named = [(name, p) for name, p in student.named_parameters() if p.requires_grad]
    trainable = _Trainable(named)
    model = distillation_model(student, teacher, child.config, settings)
    model.train()
    optimizer = torch.optim.AdamW(
        [p for _, p in named], lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True
    )
    checkpoints = (
        parallel.Checkpoints(work_dir / CHECKPOINT, checkpoint_remote, request, dist_info)
        if work_dir is not None
        else None
    )
    start, history = 0, []
    state = checkpoints.latest() if checkpoints is not None else None
    if state is not None:
        assert checkpoints is not None
        checkpoints.load(state, trainable, optimizer)
        start, history = int(state["step"]), list(state["history"])
        log.info("GKD (nemo): resuming from step %d of %d", start, steps)
    resumed_from = start
    stop_at = int(os.environ.get(STOP_ENV, "0") or 0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    n_micro = settings.batch_size // micro
    t0 = time.perf_counter()
    t_first: float | None = None
    t_step = time.perf_counter()
    for step in range(start, steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, warmup, settings.lr)
        idx = batch_indices(step, n, settings.batch_size, settings.seed)
        stats = torch.zeros(4, device=device)
        for part in idx.split(micro):
            batch = input_ids[part].long().to(device)
            with autocast:
                loss, parts = kd_losses(model, batch, settings)
            (loss / n_micro).backward()
            stats += parts / n_micro
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        values = stats.tolist()
        record: dict[str, Any] = {"step": step + 1, "loss": values[0], "lr": optimizer.param_groups[0]["lr"]}
        for i, name in ((1, "cosine"), (2, "kl"), (3, "lm")):
            if (settings.weight_cosine, settings.weight_kl, settings.weight_lm)[i - 1]:
                record[name] = values[i]
        record["grad_norm"] = float(grad_norm)
        now = time.perf_counter()
        record["seconds"] = now - t_step
        t_step = now
        history.append(record)
        done = step + 1
        if done % max(1, steps // 10) == 0 or done == steps:
            log.info("GKD (nemo): step %d/%d loss %.4f", done, steps, record["loss"])
        if t_first is None:
            torch.cuda.synchronize(device)
            t_first = time.perf_counter()
        if checkpoints is not None and done % settings.checkpoint_every == 0 and done < steps:
            checkpoints.save(done, history, trainable, optimizer, mode="nemo")
            t_step = time.perf_counter()
            if stop_at and done >= stop_at:
                log.warning("GKD: %s=%d: exiting after the checkpoint of step %d", STOP_ENV, stop_at, done)
                os._exit(STOP_EXIT_CODE)
    torch.cuda.synchronize(device)
    end = time.perf_counter()
    trained_steps = steps - resumed_from
    tokens_per_step = settings.batch_size * seq_len
    tokens_per_s: float | None = None
    if trained_steps >= 2 and t_first is not None and end > t_first:
        tokens_per_s = (trained_steps - 1) * tokens_per_step / (end - t_first)
    elif trained_steps == 1 and end > t0:
        tokens_per_s = tokens_per_step / (end - t0)
    distilled = None
    if return_model:
        distilled = model_from_state(
            child.config,
            megatron_map.from_megatron({name: p.detach().cpu() for name, p in named}, child.config),
            device=torch.device("cpu"),
            what="GKD's (nemo) weights",
        )
        distilled.eval()
    summary = {
        "backend": "nemo",
        "packages": versions(),
        "steps": steps,
        "resumed_from_step": resumed_from,
        "tokens": steps * tokens_per_step,
        "seq_len": seq_len,
        "world_size": 1,
        "parallel": "single",
        "micro_batch_size": micro,
        "compile": "off",
        "device": str(device),
        "tokens_per_s": tokens_per_s,
        "train_seconds": end - t0,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / parallel.GIB,
        "first_loss": history[0]["loss"] if history else None,
        "final_loss": history[-1]["loss"] if history else None,
        "history": history,
    }
    return distilled, summary
