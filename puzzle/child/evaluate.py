"""Evaluate children against the parent: quality on held-out tokens and measured speed.

Quality, per child, on the in-domain held-out split and on the out-of-domain ``eval_ood`` split
(text no phase trains on), both cut into sequences of the serving context (``evaluate.seq_len``);
every figure is a mean over the predicted tokens:

* ``kl_div``: KL(parent || child) of the next-token distributions;
* ``lm_loss`` and ``perplexity`` = exp(lm_loss): the child's loss on the text itself;
* ``accuracy``: next-token accuracy against the text; ``accuracy_kept`` = child / parent;
* ``top1_agreement``: child's argmax equals the parent's; ``top5_agreement``: the parent's
  argmax is among the child's 5 most likely tokens;
* ``accuracy_kept_ci`` and ``kl_div_ci``: 95 % percentile-bootstrap intervals, resampling the
  evaluated sequences (paired: parent and child see the same resample).

Speed, per model, at every workload the search priced (each batch size of ``costs`` with its
prompt and generated lengths) on the current device through
:func:`puzzle.modeling.engine.measure_throughput`: decode throughput (generated tokens/s),
``speedup`` = child / parent, and memory (parameters + KV cache at the workload; the peak allocated
memory on CUDA). Every ``search.constraints`` bound is checked on the measured figures of every
child (``constraints``, ``meets_targets``).

A baseline that could not reach the target has no child: its ``solutions`` artifact says why, and
the report lists it as unreachable instead of comparing it "at equal speed".

The artifact (kind ``evaluation``) holds ``metrics.json``, ``report.md``, ``report.html`` and the
plots (``pareto.png``, ``architecture.png``) written by :mod:`puzzle.child.report`.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from puzzle.config import OOD_SPLIT, CostsConfig, EvaluateConfig, SearchConfig
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
SOLUTIONS_KIND = "solutions"
QUALITY_KEYS = ("kl_div", "lm_loss", "perplexity", "accuracy", "top1_agreement", "top5_agreement")


class EvaluateError(PuzzleError, ValueError):
    """Evaluation cannot run with these inputs; the message names the field and the fix."""


class TargetMissedError(PuzzleError, RuntimeError):
    """The run's child misses a constraint when the evaluation measures it."""


# --------------------------------------------------------------------------- quality


class _Totals:
    """Per-sequence sums of the per-token quality figures of one model (means and bootstrap
    intervals are computed from them)."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.kl: list[float] = []
        self.nll: list[float] = []
        self.correct: list[int] = []
        self.top1: list[int] = []
        self.top5: list[int] = []

    def add(self, logits: torch.Tensor, targets: torch.Tensor, parent_log: torch.Tensor | None) -> None:
        log_probs = F.log_softmax(logits.float(), dim=-1)
        self.tokens += [targets.shape[1]] * targets.shape[0]
        nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        self.nll += nll.sum(-1).tolist()
        argmax = log_probs.argmax(-1)
        self.correct += (argmax == targets).sum(-1).tolist()
        if parent_log is not None:
            self.kl += (parent_log.exp() * (parent_log - log_probs)).sum(-1).sum(-1).tolist()
            parent_top = parent_log.argmax(-1)
            self.top1 += (argmax == parent_top).sum(-1).tolist()
            top5 = log_probs.topk(5, dim=-1).indices
            self.top5 += (top5 == parent_top.unsqueeze(-1)).any(-1).sum(-1).tolist()

    def result(self, *, with_parent: bool) -> dict[str, float]:
        n = max(1, sum(self.tokens))
        lm_loss = sum(self.nll) / n
        out = {
            "lm_loss": lm_loss,
            "perplexity": math.exp(min(lm_loss, 50.0)),
            "accuracy": sum(self.correct) / n,
        }
        if with_parent:
            out.update(
                {
                    "kl_div": sum(self.kl) / n,
                    "top1_agreement": sum(self.top1) / n,
                    "top5_agreement": sum(self.top5) / n,
                }
            )
        return out


def bootstrap_intervals(
    parent: _Totals, child: _Totals, *, resamples: int, seed: int = 0, level: float = 0.95
) -> dict[str, list[float] | None]:
    """Percentile-bootstrap intervals on ``accuracy_kept`` (child / parent accuracy) and ``kl_div``,
    resampling sequences with replacement (the same resample for parent and child)."""
    if resamples <= 0 or len(child.tokens) < 2:
        return {"accuracy_kept_ci": None, "kl_div_ci": None}
    rng = np.random.default_rng(seed)
    n = len(child.tokens)
    idx = rng.integers(0, n, size=(resamples, n))
    tokens = np.asarray(child.tokens, dtype=np.float64)[idx].sum(1)
    parent_correct = np.asarray(parent.correct, dtype=np.float64)[idx].sum(1)
    child_correct = np.asarray(child.correct, dtype=np.float64)[idx].sum(1)
    kl = np.asarray(child.kl, dtype=np.float64)[idx].sum(1) / tokens
    tail = 100 * (1 - level) / 2
    out: dict[str, list[float] | None] = {
        "kl_div_ci": [float(np.percentile(kl, tail)), float(np.percentile(kl, 100 - tail))]
    }
    valid = parent_correct > 0
    if valid.all():
        kept = child_correct / parent_correct
        out["accuracy_kept_ci"] = [float(np.percentile(kept, tail)), float(np.percentile(kept, 100 - tail))]
    else:
        out["accuracy_kept_ci"] = None
    return out


@torch.no_grad()
def collect_quality(
    models: Mapping[str, torch.nn.Module],
    parent: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    desc: str = "evaluate",
) -> tuple[_Totals, dict[str, _Totals]]:
    """Per-sequence quality sums of the parent and of every model in ``models`` on ``input_ids``
    [n, seq_len]; the parent runs once per batch and every child is compared with its distributions."""
    totals = {name: _Totals() for name in models}
    parent_totals = _Totals()
    parent.to(device).eval()
    for model in models.values():
        model.to(device).eval()
    for start in tqdm(range(0, input_ids.shape[0], batch_size), desc=desc, unit="batch"):
        batch = input_ids[start : start + batch_size].long().to(device)
        targets = batch[:, 1:]
        parent_logits = parent(input_ids=batch, use_cache=False).logits[:, :-1]
        parent_log = F.log_softmax(parent_logits.float(), dim=-1)
        parent_totals.add(parent_logits, targets, None)
        for name, model in models.items():
            totals[name].add(model(input_ids=batch, use_cache=False).logits[:, :-1], targets, parent_log)
    return parent_totals, totals


def quality_metrics(
    models: Mapping[str, torch.nn.Module],
    parent: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> dict[str, dict[str, float]]:
    """Mean quality figures of every model in ``models`` and of the parent on ``input_ids``."""
    parent_totals, totals = collect_quality(models, parent, input_ids, batch_size=batch_size, device=device)
    out = {PARENT: parent_totals.result(with_parent=False)}
    out.update({name: t.result(with_parent=True) for name, t in totals.items()})
    return out


def split_quality(
    models: Mapping[str, torch.nn.Module],
    parent: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    batch_size: int,
    device: str,
    resamples: int,
    desc: str,
) -> dict[str, dict[str, Any]]:
    """Quality of the parent and every child on one split, with ``accuracy_kept`` and its interval."""
    parent_totals, totals = collect_quality(
        models, parent, input_ids, batch_size=batch_size, device=device, desc=desc
    )
    base = parent_totals.result(with_parent=False)
    out: dict[str, dict[str, Any]] = {PARENT: {**base, "accuracy_kept": 1.0}}
    for name, t in totals.items():
        row: dict[str, Any] = t.result(with_parent=True)
        row["accuracy_kept"] = row["accuracy"] / base["accuracy"] if base["accuracy"] else None
        row.update(bootstrap_intervals(parent_totals, t, resamples=resamples))
        out[name] = row
    return out


# --------------------------------------------------------------------------- speed


def kv_cache_bytes(config: Any, batch_size: int, tokens: int, dtype_bytes: int) -> int:
    """KV-cache bytes: batch x tokens x KV heads x head dim x 2 (K and V) x bytes."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = sum(b.attention.num_kv_heads or 0 for b in config.blocks)
    return batch_size * tokens * kv_heads * head_dim * 2 * dtype_bytes


def speed_metrics(
    model: torch.nn.Module,
    *,
    batch_size: int,
    prompt_len: int,
    gen_len: int,
    device: str,
    repeats: int,
) -> dict[str, Any]:
    """Measured decode throughput, request latency and memory of ``model`` at one workload."""
    from puzzle.modeling import engine

    measured = engine.measure_throughput(
        model,
        batch_size=batch_size,
        prompt_len=prompt_len,
        gen_len=gen_len,
        device=device,
        repeats=repeats,
    )
    result = measured if isinstance(measured, dict) else asdict(measured)
    dtype = next(model.parameters()).dtype
    params = count_parameters(model)
    out = {
        "throughput": float(result["throughput"]),
        "memory_bytes": params * dtype.itemsize
        + kv_cache_bytes(model.config, batch_size, prompt_len + gen_len, dtype.itemsize),
    }
    if result.get("total_s") is not None:
        out["latency"] = float(result["total_s"]) * 1e3
    if result.get("parameter_bytes") is not None and result.get("kv_cache_bytes") is not None:
        # What the engine held at the workload, in its own dtype (bf16 on CUDA).
        out["memory_bytes"] = int(result["parameter_bytes"]) + int(result["kv_cache_bytes"])
    for key in ("prefill_s", "decode_s", "total_s", "peak_memory_bytes", "device_name"):
        if result.get(key) is not None:
            out[key] = result[key]
    return out


def measure_speeds(
    models: dict[str, torch.nn.Module],
    batch_sizes: list[int],
    *,
    prompt_len: int,
    gen_len: int,
    device: str,
    repeats: int,
) -> dict[str, dict[int, dict[str, Any]]]:
    """:func:`speed_metrics` of every model at every batch size, measured in ``repeats`` interleaved
    rounds (each round times every model once), so that a slow drift of the machine's speed falls on
    every model alike instead of on whichever was measured last; per model and batch size the run of
    median throughput is kept, with the median latency."""
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {n: {b: [] for b in batch_sizes} for n in models}
    for round_ in range(repeats):
        for name, model in models.items():
            for b in batch_sizes:
                log.info("evaluate: speed of %s at batch %d (round %d of %d)", name, b, round_ + 1, repeats)
                runs[name][b].append(
                    speed_metrics(
                        model, batch_size=b, prompt_len=prompt_len, gen_len=gen_len, device=device, repeats=1
                    )
                )
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for name, by_batch in runs.items():
        out[name] = {}
        for b, measured in by_batch.items():
            ordered = sorted(measured, key=lambda m: m["throughput"])
            figures = dict(ordered[len(ordered) // 2])
            if all("latency" in m for m in measured):
                figures["latency"] = float(statistics.median(m["latency"] for m in measured))
            figures["rounds"] = len(measured)
            out[name][b] = figures
    return out


def check_constraints(
    constraints: list[str], child: dict[str, Any], parent: dict[str, Any], default_batch: int
) -> list[dict[str, Any]]:
    """Every bound of ``search.constraints`` on a child's measured figures (relative bounds against
    the parent's measured figures): the value, the bound, met or not, and by how much."""
    from puzzle.search.mip import Constraint

    out = []
    for text in constraints:
        c = Constraint.parse(text)
        batch = c.batch_size or default_batch
        if c.metric == "params":
            value, reference = float(child["parameters"]), float(parent["parameters"])
        else:
            key = "memory_bytes" if c.metric == "memory" else c.metric
            speed_child, speed_parent = child["speed"].get(str(batch)), parent["speed"].get(str(batch))
            if speed_child is None or speed_parent is None or key not in speed_child:
                out.append({"constraint": text, "batch_size": batch, "measured": False})
                continue
            value, reference = float(speed_child[key]), float(speed_parent[key])
            if c.metric == "memory":
                value, reference = value / 2**20, reference / 2**20  # MiB, the constraint's unit
        measured = value / reference if c.relative else value
        lower = c.op == ">="
        met = measured >= c.value if lower else measured <= c.value
        short = (1 - measured / c.value) if lower else (measured / c.value - 1)
        out.append(
            {
                "constraint": text,
                "batch_size": batch,
                "measured": True,
                "value": measured,
                "bound": c.value,
                "satisfied": bool(met),
                "shortfall_pct": 0.0 if met else 100.0 * short,
            }
        )
    return out


# --------------------------------------------------------------------------- phase


def evaluate_children(
    children: dict[str, str],
    parent: str,
    tokens: str,
    out: str,
    evaluate: EvaluateConfig,
    costs: CostsConfig,
    search: SearchConfig,
    *,
    details: dict[str, dict[str, Any]] | None = None,
    primary: str | None = None,
    unreachable: dict[str, str] | None = None,
    device: str = "auto",
) -> artifacts.Manifest:
    """Phase ``evaluate``: ``children`` (name -> model artifact URI) against ``parent``.

    Quality on ``evaluate.split`` (and ``eval_ood`` with ``evaluate.ood``) at ``evaluate.seq_len``;
    speed at every batch size of ``evaluate.workload_batch_sizes(costs)`` with the cost table's
    prompt and generated lengths; ``search.constraints`` checked on what was measured.

    ``details`` (optional, per child name) is shown in the report: e.g. ``{"role": "baseline",
    "method": "uniform_width"}``; a child with ``role: baseline`` is a baseline. ``primary``
    (default: the first child) is the child whose ``accuracy_kept``, ``speedup`` and constraint
    checks are also written at the top of ``metrics.json`` (what the registry gate reads).
    ``unreachable`` (name -> reason) lists baselines that have no child because they cannot reach
    the target.
    """
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
    unsearched = [b for b in evaluate.batch_sizes if b not in costs.batch_sizes]
    if unsearched:
        raise EvaluateError(
            f"evaluate.batch_sizes {unsearched} were never searched for (costs.batch_sizes "
            f"{costs.batch_sizes}): add them to costs.batch_sizes or drop them"
        )
    details = {name: dict((details or {}).get(name, {})) for name in children}
    run_device = str(resolve_device(device))
    batch_sizes = evaluate.workload_batch_sizes(costs)
    seq_len = evaluate.context(costs)
    splits = [evaluate.split] + ([OOD_SPLIT] if evaluate.ood else [])
    inputs = {
        "parent": parent,
        "tokens": tokens,
        **{f"child:{name}": uri for name, uri in children.items()},
    }
    parameters = {
        "evaluate": asdict(evaluate),
        "workload": {"batch_sizes": batch_sizes, "prompt_len": costs.prompt_len, "gen_len": costs.gen_len},
        "constraints": list(search.constraints),
        "device": run_device,
        "details": details,
        "primary": primary,
        "unreachable": dict(unreachable or {}),
    }

    def body(staging: Path, local: dict[str, Path]) -> dict[str, Any]:
        from puzzle.child import report

        split_ids = {name: load_split(str(local["tokens"]), name, seq_len=seq_len) for name in splits}
        parent_model = load_model(str(local["parent"]), dtype=torch.float32)
        models = {name: load_model(str(local[f"child:{name}"]), dtype=torch.float32) for name in children}
        quality = {
            name: split_quality(
                models,
                parent_model,
                ids,
                batch_size=evaluate.batch_size,
                device=run_device,
                resamples=evaluate.bootstrap,
                desc=f"evaluate {name}",
            )
            for name, ids in split_ids.items()
        }
        results: dict[str, dict[str, Any]] = {}
        speeds = measure_speeds(
            {PARENT: parent_model, **models},
            batch_sizes,
            prompt_len=costs.prompt_len,
            gen_len=costs.gen_len,
            device=run_device,
            repeats=evaluate.repeats,
        )
        for name, model in [(PARENT, parent_model), *models.items()]:
            speed = {str(b): figures for b, figures in speeds[name].items()}
            results[name] = {
                **quality[evaluate.split][name],
                "quality": {split: quality[split][name] for split in splits},
                "speed": speed,
                "parameters": count_parameters(model),
                "blocks": [b.name for b in model.config.blocks],
            }
        base = results[PARENT]
        workload_batch = _primary_batch(local[f"child:{primary}"], batch_sizes, search)
        for name in [PARENT, *children]:
            r = results[name]
            for b, figures in r["speed"].items():
                figures["speedup"] = figures["throughput"] / base["speed"][b]["throughput"]
            r.update(
                {k: v for k, v in r["speed"][str(workload_batch)].items() if k in ("throughput", "speedup")}
            )
            r["memory_bytes"] = r["speed"][str(workload_batch)]["memory_bytes"]
            if name == PARENT:
                continue
            r["parameters_kept"] = r["parameters"] / base["parameters"]
            r["constraints"] = check_constraints(list(search.constraints), r, base, workload_batch)
            r["meets_targets"] = all(c.get("satisfied", False) for c in r["constraints"])
            r.update({k: v for k, v in details[name].items() if k not in r})
        candidates = (read_parent_info(local[f"child:{primary}"]).get("realized_from") or {}).get(
            "candidates"
        )
        top = results[primary]
        metrics = {
            "primary": primary,
            "accuracy_kept": top["accuracy_kept"],
            "accuracy_kept_ci": top.get("accuracy_kept_ci"),
            "speedup": top["speedup"],
            "meets_targets": top["meets_targets"],
            "constraints": top["constraints"],
            "split": evaluate.split,
            "splits": {
                name: {
                    "sequences": int(ids.shape[0]),
                    "seq_len": seq_len,
                    "tokens": int(ids.shape[0] * (seq_len - 1)),
                }
                for name, ids in split_ids.items()
            },
            "tokens": int(split_ids[evaluate.split].shape[0] * (seq_len - 1)),
            "workload": {
                "batch_size": workload_batch,
                "prompt_len": costs.prompt_len,
                "gen_len": costs.gen_len,
            },
            "batch_sizes": batch_sizes,
            "device": run_device,
            "device_name": next(iter(base["speed"].values())).get("device_name") or _device_name(run_device),
            "parent": read_parent_info(local["parent"]).get("reference"),
            "unreachable": dict(unreachable or {}),
            "candidates": candidates,
            "models": results,
        }
        (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        report.write_report(
            staging, metrics, models={PARENT: parent_model.config, **{n: m.config for n, m in models.items()}}
        )
        for name in children:
            if not results[name]["meets_targets"]:
                misses = [c for c in results[name]["constraints"] if not c.get("satisfied")]
                log.warning(
                    "evaluate: %s misses %s when measured",
                    name,
                    "; ".join(_miss(c) for c in misses),
                )
        summary: dict[str, Any] = {"meets_targets": top["meets_targets"]}
        if not top["meets_targets"]:
            summary["misses"] = "; ".join(_miss(c) for c in top["constraints"] if not c.get("satisfied"))
        for name in children:
            for key in ("accuracy_kept", "speedup", "kl_div", "perplexity"):
                summary[f"{name}.{key}"] = results[name][key]
            if evaluate.ood:
                summary[f"{name}.ood_accuracy_kept"] = results[name]["quality"][OOD_SPLIT]["accuracy_kept"]
        return summary

    return artifacts.run_phase(
        EVALUATION_KIND,
        out,
        inputs,
        parameters,
        body,
        input_kinds={"parent": MODEL_KINDS, "tokens": "tokens"},
    )


def _miss(check: dict[str, Any]) -> str:
    if not check.get("measured"):
        return f"{check['constraint']} (not measured at batch {check['batch_size']})"
    return (
        f"{check['constraint']}: measured {check['value']:.4g} vs bound {check['bound']:.4g} "
        f"({check['shortfall_pct']:.1f} % short)"
    )


def _primary_batch(child: Path, batch_sizes: list[int], search: SearchConfig) -> int:
    """The batch size the headline speedup is quoted at: where the search solved the primary child,
    else the first batch size a throughput bound is pinned to, else the first measured."""
    realized = read_parent_info(child).get("realized_from") or {}
    solved = realized.get("batch_size")
    if isinstance(solved, int) and solved in batch_sizes:
        return solved
    from puzzle.search.mip import Constraint

    for text in search.constraints:
        c = Constraint.parse(text)
        if c.metric == "throughput" and c.batch_size in batch_sizes:
            return int(c.batch_size)
    return batch_sizes[0]


def compare(
    child: str,
    baselines: dict[str, str],
    parent: str,
    tokens: str,
    out: str,
    evaluate: EvaluateConfig,
    costs: CostsConfig,
    search: SearchConfig,
    *,
    device: str = "auto",
) -> artifacts.Manifest:
    """Phase ``evaluate`` of a run: the Puzzle child (the primary, whose figures the registry gate
    reads) and every baseline child (method -> URI) against the parent, in one report. A baseline
    whose output is a ``solutions`` artifact could not reach the target: it is listed, with why."""
    children = {PUZZLE: child}
    unreachable: dict[str, str] = {}
    for name, uri in baselines.items():
        manifest = artifacts.require_manifest(uri, (*MODEL_KINDS, SOLUTIONS_KIND))
        if manifest.kind == SOLUTIONS_KIND:
            from puzzle.io import storage

            data = storage.read_json(storage.join(uri, "solutions.json"))
            unreachable[name] = str(data.get("unreachable") or "no solution")
        else:
            children[name] = uri
    details = {PUZZLE: {"role": "child", "method": PUZZLE}}
    details.update({name: {"role": "baseline", "method": name} for name in children if name != PUZZLE})
    manifest = evaluate_children(
        children,
        parent,
        tokens,
        out,
        evaluate,
        costs,
        search,
        details=details,
        primary=PUZZLE,
        unreachable=unreachable,
        device=device,
    )
    if manifest.summary.get("meets_targets") is False:
        raise TargetMissedError(
            f"the child misses search.constraints when measured on {device}: "
            f"{manifest.summary.get('misses')} "
            f"(the report is at {out}); relax search.constraints or raise search.speed_margin, so that the "
            "search leaves more headroom"
        )
    return manifest


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
