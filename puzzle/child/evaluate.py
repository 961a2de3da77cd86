"""Evaluate children against the parent: quality on held-out tokens and measured speed.

Quality, per child, on a held-out split of a tokens artifact (every figure a mean over the
predicted tokens):

* ``kl_div``: KL(parent || child) of the next-token distributions;
* ``lm_loss`` and ``perplexity`` = exp(lm_loss): the child's loss on the text itself;
* ``accuracy``: next-token accuracy against the text; ``accuracy_kept`` = child / parent;
* ``top1_agreement``: child's argmax equals the parent's; ``top5_agreement``: the parent's
  argmax is among the child's 5 most likely tokens.

Speed, per model, at the configured workload (batch, prompt length, generated tokens) on the
current device through :func:`puzzle.modeling.engine.measure_throughput`: decode throughput (generated
tokens/s), ``speedup`` = child / parent, and memory (parameters + KV cache at the workload;
the peak allocated memory on CUDA).

The artifact (kind ``evaluation``) holds ``metrics.json``, ``report.md``, ``report.html`` and the
plots (``pareto.png``, ``architecture.png``) written by :mod:`puzzle.child.report`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from puzzle.config import EvaluateConfig, WorkloadConfig
from puzzle.data import load_split
from puzzle.errors import PuzzleError
from puzzle.io import artifacts
from puzzle.modeling.checkpoints import MODEL_KINDS, count_parameters, load_model, read_parent_info
from puzzle.modeling.devices import resolve_device

log = logging.getLogger(__name__)

EVALUATION_KIND = "evaluation"
METRICS_FILE = "metrics.json"
PARENT = "parent"
PUZZLE = "puzzle"
"""The name of the Puzzle child in a run's evaluation (beside the baselines, named by method)."""


class EvaluateError(PuzzleError, ValueError):
    """Evaluation cannot run with these inputs; the message names the field and the fix."""


# --------------------------------------------------------------------------- quality


class _Totals:
    """Running sums of the per-token quality figures of one model."""

    def __init__(self) -> None:
        self.tokens = 0
        self.kl = 0.0
        self.nll = 0.0
        self.correct = 0
        self.top1 = 0
        self.top5 = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor, parent_log: torch.Tensor | None) -> None:
        log_probs = F.log_softmax(logits.float(), dim=-1)
        self.tokens += targets.numel()
        self.nll += float(
            F.nll_loss(log_probs.reshape(-1, log_probs.shape[-1]), targets.reshape(-1), reduction="sum")
        )
        argmax = log_probs.argmax(-1)
        self.correct += int((argmax == targets).sum())
        if parent_log is not None:
            self.kl += float((parent_log.exp() * (parent_log - log_probs)).sum())
            parent_top = parent_log.argmax(-1)
            self.top1 += int((argmax == parent_top).sum())
            top5 = log_probs.topk(5, dim=-1).indices
            self.top5 += int((top5 == parent_top.unsqueeze(-1)).any(-1).sum())

    def result(self, *, with_parent: bool) -> dict[str, float]:
        n = max(1, self.tokens)
        lm_loss = self.nll / n
        out = {"lm_loss": lm_loss, "perplexity": math.exp(min(lm_loss, 50.0)), "accuracy": self.correct / n}
        if with_parent:
            out.update(
                {"kl_div": self.kl / n, "top1_agreement": self.top1 / n, "top5_agreement": self.top5 / n}
            )
        return out


@torch.no_grad()
def quality_metrics(
    models: Mapping[str, torch.nn.Module],
    parent: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> dict[str, dict[str, float]]:
    """Quality of every model in ``models`` and of the parent on ``input_ids`` [n, seq_len].

    The parent runs once per batch; every child is compared with its distributions.
    """
    totals = {name: _Totals() for name in models}
    parent_totals = _Totals()
    parent.to(device).eval()
    for model in models.values():
        model.to(device).eval()
    for start in tqdm(range(0, input_ids.shape[0], batch_size), desc="evaluate", unit="batch"):
        batch = input_ids[start : start + batch_size].long().to(device)
        targets = batch[:, 1:]
        parent_logits = parent(input_ids=batch, use_cache=False).logits[:, :-1]
        parent_log = F.log_softmax(parent_logits.float(), dim=-1)
        parent_totals.add(parent_logits, targets, None)
        for name, model in models.items():
            totals[name].add(model(input_ids=batch, use_cache=False).logits[:, :-1], targets, parent_log)
    out = {PARENT: parent_totals.result(with_parent=False)}
    out.update({name: t.result(with_parent=True) for name, t in totals.items()})
    return out


# --------------------------------------------------------------------------- speed


def kv_cache_bytes(config: Any, workload: WorkloadConfig, dtype_bytes: int) -> int:
    """KV-cache bytes at the workload: batch x tokens x KV heads x head dim x 2 (K and V) x bytes."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = sum(b.attention.num_kv_heads or 0 for b in config.blocks)
    tokens = workload.prompt_len + workload.gen_len
    return workload.batch_size * tokens * kv_heads * head_dim * 2 * dtype_bytes


def speed_metrics(
    model: torch.nn.Module, workload: WorkloadConfig, *, device: str, repeats: int
) -> dict[str, Any]:
    """Measured decode throughput and memory of ``model`` at ``workload`` on ``device``."""
    from puzzle.modeling import engine

    measured = engine.measure_throughput(
        model,
        batch_size=workload.batch_size,
        prompt_len=workload.prompt_len,
        gen_len=workload.gen_len,
        device=device,
        repeats=repeats,
    )
    result = measured if isinstance(measured, dict) else asdict(measured)
    dtype = next(model.parameters()).dtype
    params = count_parameters(model)
    out = {
        "throughput": float(result["throughput"]),
        "parameters": params,
        "memory_bytes": params * dtype.itemsize + kv_cache_bytes(model.config, workload, dtype.itemsize),
    }
    if result.get("parameter_bytes") is not None and result.get("kv_cache_bytes") is not None:
        # What the engine held at the workload, in its own dtype (bf16 on CUDA).
        out["memory_bytes"] = int(result["parameter_bytes"]) + int(result["kv_cache_bytes"])
    for key in ("prefill_s", "decode_s", "total_s", "peak_memory_bytes", "device_name"):
        if result.get(key) is not None:
            out[key] = result[key]
    return out


# --------------------------------------------------------------------------- lm-evaluation-harness


# --------------------------------------------------------------------------- phase


def evaluate_children(
    children: dict[str, str],
    parent: str,
    tokens: str,
    out: str,
    evaluate: EvaluateConfig,
    *,
    details: dict[str, dict[str, Any]] | None = None,
    primary: str | None = None,
    device: str = "auto",
) -> artifacts.Manifest:
    """Phase ``evaluate``: ``children`` (name -> model artifact URI) against ``parent``.

    ``details`` (optional, per child name) is shown in the report: e.g. ``{"role": "baseline",
    "method": "uniform_width", "predicted_speedup": 1.52}``. Names are free text; the report
    calls a child with ``role: baseline`` a baseline. ``primary`` (default: the first child) is
    the child whose ``accuracy_kept`` and ``speedup`` are also written at the top of
    ``metrics.json`` (what the registry gate reads).
    """
    split, batch_size, workload, repeats = (
        evaluate.split,
        evaluate.batch_size,
        evaluate.workload,
        evaluate.repeats,
    )
    if not children:
        raise EvaluateError("children is empty: pass at least one child artifact to evaluate")
    if PARENT in children:
        raise EvaluateError(f"{PARENT!r} is reserved for the parent; name the child differently")
    for uri in children.values():
        artifacts.require_manifest(uri, MODEL_KINDS)
    artifacts.require_manifest(parent, MODEL_KINDS)
    artifacts.require_manifest(tokens, "tokens")
    primary = primary or next(iter(children))
    if primary not in children:
        raise EvaluateError(f"primary={primary!r} is not one of the children ({', '.join(children)})")
    details = {name: dict((details or {}).get(name, {})) for name in children}
    run_device = str(resolve_device(device))
    inputs = {
        "parent": parent,
        "tokens": tokens,
        **{f"child:{name}": uri for name, uri in children.items()},
    }
    parameters = {
        "split": split,
        "batch_size": batch_size,
        "workload": asdict(workload),
        "device": run_device,
        "repeats": repeats,
        "details": details,
        "primary": primary,
    }

    def body(staging: Path, local: dict[str, Path]) -> dict[str, Any]:
        from puzzle.child import report

        ids = load_split(str(local["tokens"]), split)
        parent_model = load_model(str(local["parent"]), dtype=torch.float32)
        models = {name: load_model(str(local[f"child:{name}"]), dtype=torch.float32) for name in children}
        quality = quality_metrics(models, parent_model, ids, batch_size=batch_size, device=run_device)
        results: dict[str, dict[str, Any]] = {}
        for name, model in [(PARENT, parent_model), *models.items()]:
            log.info("evaluate: measuring the speed of %s", name)
            results[name] = {
                **quality[name],
                **speed_metrics(model, workload, device=run_device, repeats=repeats),
            }
            results[name]["blocks"] = [b.name for b in model.config.blocks]
        base = results[PARENT]
        for name in children:
            r = results[name]
            r["accuracy_kept"] = r["accuracy"] / base["accuracy"] if base["accuracy"] else None
            r["speedup"] = r["throughput"] / base["throughput"] if base["throughput"] else None
            r["parameters_kept"] = r["parameters"] / base["parameters"]
            r.update({k: v for k, v in details[name].items() if k not in r})
        metrics = {
            "primary": primary,
            "accuracy_kept": results[primary]["accuracy_kept"],
            "speedup": results[primary]["speedup"],
            "split": split,
            "tokens": int(ids.shape[0] * (ids.shape[1] - 1)),
            "workload": asdict(workload),
            "device": run_device,
            "device_name": results[PARENT].get("device_name") or _device_name(run_device),
            "parent": read_parent_info(local["parent"]).get("reference"),
            "models": results,
        }
        (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        report.write_report(
            staging, metrics, models={PARENT: parent_model.config, **{n: m.config for n, m in models.items()}}
        )
        summary = {}
        for name in children:
            for key in ("accuracy_kept", "speedup", "kl_div", "perplexity"):
                summary[f"{name}.{key}"] = results[name][key]
        return summary

    return artifacts.run_phase(
        EVALUATION_KIND,
        out,
        inputs,
        parameters,
        body,
        input_kinds={"parent": MODEL_KINDS, "tokens": "tokens"},
    )


def compare(
    child: str,
    baselines: dict[str, str],
    parent: str,
    tokens: str,
    out: str,
    evaluate: EvaluateConfig,
    *,
    device: str = "auto",
) -> artifacts.Manifest:
    """Phase ``evaluate`` of a run: the Puzzle child (the primary, whose figures the registry gate
    reads) and every baseline child (method -> URI) against the parent, in one report."""
    children = {PUZZLE: child, **baselines}
    details = {PUZZLE: {"role": "child", "method": PUZZLE}}
    details.update({name: {"role": "baseline", "method": name} for name in baselines})
    return evaluate_children(
        children, parent, tokens, out, evaluate, details=details, primary=PUZZLE, device=device
    )


def method_of(child: str) -> str:
    """How a child was chosen (``mip``, ``greedy``, ``layer_dropping``, ...), from its ``parent.json``."""
    info = read_parent_info(artifacts.materialize(child, MODEL_KINDS))
    method = (info.get("realized_from") or {}).get("method")
    if not method:
        raise EvaluateError(
            f"{child} does not record how it was chosen (realized_from.method in parent.json)"
        )
    return str(method)


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def read_metrics(uri: str) -> dict[str, Any]:
    """``metrics.json`` of an evaluation artifact."""
    local = artifacts.materialize(uri, EVALUATION_KIND)
    return json.loads((local / METRICS_FILE).read_text())
