"""Replace-1-block scoring: the parent with one layer's block swapped, against the parent itself.

For every (layer, block) row the child is the parent except for that layer, and is compared
with the parent on held-out tokens (a split of a tokens artifact). Metrics, each a mean over
the predicted tokens (every position but the last of each sequence):

* ``kl_div``: KL(parent || child) of the next-token distributions (the default score);
* ``lm_loss``: the child's cross-entropy on the text;
* ``cosine``: cosine similarity of the final (normalised) hidden states;
* ``top1``: the child's argmax equals the parent's; ``top5``: the parent's argmax is among the
  child's 5 most likely tokens (also written as ``top1_agreement`` / ``top5_agreement``, the
  names the run configuration and evaluation use).

Rows: in ``decoupled`` mode, per layer, the parent's own block once, every attention variant
with the parent's FFN and every FFN variant with the parent's attention, ``(m + n) * L`` rows
(coupled blocks trained by BLD are scored too); in ``full`` mode every (attention, FFN) pair.
The search combines a pair missing from the table additively from its two decoupled rows.

The parent's hidden states entering each layer and its logits are computed once; a row runs
only its own layer and the parent's layers after it. Work splits into shards (``shard="i/n"``)
written as partial ``scores`` artifacts and joined by :func:`merge`. The artifact (kind
``scores``) holds ``scores.csv``, ``scores.json`` and ``heatmap.png`` (layers x variants).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from puzzle.config import ScoringConfig
from puzzle.errors import PuzzleError
from puzzle.io import artifacts
from puzzle.io.artifacts import Manifest
from puzzle.library.bld import parse_shard
from puzzle.library.variants import Library, block_state
from puzzle.modeling import AttentionConfig, BlockConfig, DeciLMConfig, DeciLMForCausalLM, FFNConfig
from puzzle.modeling.checkpoints import MODEL_KINDS
from puzzle.modeling.devices import resolve_device
from puzzle.modeling.layers import LayerContext, LayerRunner, build_layer, load_verified_model, model_config

log = logging.getLogger(__name__)

SCORES_KIND = "scores"
SCORES_CSV = "scores.csv"
SCORES_JSON = "scores.json"
HEATMAP = "heatmap.png"
METRICS = ("kl_div", "lm_loss", "cosine", "top1", "top5")
METRIC_ALIASES = {"top1_agreement": "top1", "top5_agreement": "top5"}
COLUMNS = ("layer", "block", "attention", "ffn", *METRICS, "top1_agreement", "top5_agreement", "num_tokens")
MODES = ("decoupled", "full")


class ScoringError(PuzzleError, ValueError):
    """Bad scoring settings, an incomplete library, or shards that do not fit together."""


@dataclass(frozen=True)
class Row:
    """One scored block: ``layer`` with ``block`` swapped in."""

    layer: int
    block: BlockConfig

    @property
    def key(self) -> tuple[int, str]:
        return self.layer, self.block.name


def canonical_metrics(metrics: tuple[str, ...] | list[str]) -> list[str]:
    out = []
    for name in metrics:
        canonical = METRIC_ALIASES.get(name, name)
        if canonical not in METRICS:
            raise ScoringError(
                f"scoring.metrics: unknown metric {name!r}; choose from "
                f"{list(METRICS) + list(METRIC_ALIASES)}"
            )
        if canonical not in out:
            out.append(canonical)
    if not out:
        raise ScoringError(f"scoring.metrics must name at least one of {list(METRICS)}")
    return out


def plan_rows(
    lib: Library, *, mode: str = "decoupled", layers: list[int] | None = None, shard: str | None = None
) -> list[Row]:
    """The rows to score, in (layer, variant) order; a shard is a contiguous, balanced slice."""
    if mode not in MODES:
        raise ScoringError(f"scoring.mode must be one of {MODES}, got {mode!r}")
    chosen = lib.layers if layers is None else sorted(set(layers))
    missing = sorted(set(chosen) - set(lib.layers))
    if missing:
        raise ScoringError(f"layers {missing} are not in library {lib.uri} (it has layers {lib.layers})")
    rows: list[Row] = []
    for layer in chosen:
        parent = lib.parent_block(layer)
        attn = [AttentionConfig.from_name(n) for n in lib.attention_variants(layer)]
        ffn = [FFNConfig.from_name(n) for n in lib.ffn_variants(layer)]
        if mode == "decoupled":
            blocks = [parent]
            blocks += [BlockConfig(attention=a, ffn=parent.ffn) for a in attn if a != parent.attention]
            blocks += [BlockConfig(attention=parent.attention, ffn=f) for f in ffn if f != parent.ffn]
        else:
            blocks = [BlockConfig(attention=a, ffn=f) for a in attn for f in ffn]
        names = {b.name for b in blocks}
        blocks += [BlockConfig.from_name(n) for n in lib.coupled_blocks(layer) if n not in names]
        rows += [Row(layer, b) for b in blocks]
    parsed = parse_shard(shard)
    if parsed is not None:
        index, count = parsed
        rows = rows[index * len(rows) // count : (index + 1) * len(rows) // count]
    return rows


class _Accumulator:
    """Running sums of the per-token figures of one row."""

    def __init__(self) -> None:
        self.tokens = 0
        self.sums = dict.fromkeys(METRICS, 0.0)

    def add(self, final: torch.Tensor, logits: torch.Tensor, ref: _ParentChunk, metrics: list[str]) -> None:
        # Every position but the last: those have a next token for the LM loss.
        self.tokens += ref.targets.numel()
        if {"kl_div", "lm_loss"} & set(metrics):
            log_q = F.log_softmax(logits[:, :-1].float(), dim=-1)
            if "kl_div" in metrics:
                # KL(p || q) = sum p log p - sum p log q, with p and sum p log p cached per token.
                self.sums["kl_div"] += float((ref.neg_entropy - torch.linalg.vecdot(ref.probs, log_q)).sum())
            if "lm_loss" in metrics:
                self.sums["lm_loss"] -= float(log_q.gather(-1, ref.targets.unsqueeze(-1)).sum())
            del log_q
        z = logits[:, :-1]
        if "cosine" in metrics:
            self.sums["cosine"] += float(
                F.cosine_similarity(final[:, :-1].float(), ref.final.float(), dim=-1).sum()
            )
        if "top1" in metrics:
            self.sums["top1"] += int((z.argmax(-1) == ref.top).sum())
        if "top5" in metrics:
            self.sums["top5"] += int((z.topk(5, dim=-1).indices == ref.top.unsqueeze(-1)).any(-1).sum())

    def result(self, metrics: list[str]) -> dict[str, Any]:
        n = max(1, self.tokens)
        out: dict[str, Any] = {m: (self.sums[m] / n if m in metrics else None) for m in METRICS}
        out["top1_agreement"], out["top5_agreement"] = out["top1"], out["top5"]
        out["num_tokens"] = self.tokens
        return out


@dataclass
class _ParentChunk:
    """The parent's figures on one batch of sequences (cached once, compared with every row)."""

    input_ids: torch.Tensor
    context: LayerContext
    probs: torch.Tensor  # [b, s-1, vocab]
    neg_entropy: torch.Tensor  # [b, s-1]: sum p log p
    final: torch.Tensor  # [b, s-1, hidden]
    targets: torch.Tensor  # [b, s-1]
    top: torch.Tensor  # [b, s-1]


def _row_layer(
    lib: Library,
    row: Row,
    parent_layer: torch.nn.Module,
    config: DeciLMConfig,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.nn.Module:
    state = block_state(lib, row.layer, row.block, parent_layer.state_dict())
    return build_layer(config, row.block, state, device=device, dtype=dtype).eval()


@torch.no_grad()
def score_rows(
    model: DeciLMForCausalLM,
    lib: Library,
    rows: list[Row],
    input_ids: torch.Tensor,
    *,
    metrics: list[str],
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """Score ``rows`` of ``lib`` with ``model`` (the parent) as the reference; returns table rows."""
    runner = LayerRunner(model)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    first = min((row.layer for row in rows), default=0)
    chunks: list[_ParentChunk] = []
    hidden: list[torch.Tensor] = []  # the parent's hidden states entering the layer being scored
    for start in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[start : start + batch_size].to(device)
        h, ctx = runner.embed(ids)
        h = runner.run(h, ctx, 0, first)
        hidden.append(h)
        final, logits = runner.head(runner.run(h, ctx, first))
        log_p = F.log_softmax(logits[:, :-1].float(), dim=-1)
        probs = log_p.exp()
        neg_entropy = torch.linalg.vecdot(probs, log_p)
        chunks.append(_ParentChunk(ids, ctx, probs, neg_entropy, final[:, :-1], ids[:, 1:], log_p.argmax(-1)))
        del log_p
    by_layer: dict[int, list[Row]] = {}
    for row in rows:
        by_layer.setdefault(row.layer, []).append(row)
    tokens_per_row = sum(c.targets.numel() for c in chunks)
    bar = tqdm(
        total=len(rows) * tokens_per_row,
        desc=f"scoring ({len(rows)} blocks)",
        unit="tok",
        unit_scale=True,
        leave=False,
    )
    out: list[dict[str, Any]] = []
    current = first
    for layer in sorted(by_layer):
        # Advance the cached parent hidden states to this layer's input.
        for i, chunk in enumerate(chunks):
            hidden[i] = runner.run(hidden[i], chunk.context, current, layer)
        current = layer
        for row in by_layer[layer]:
            block = _row_layer(lib, row, runner.layers[layer], model.config, device, dtype)
            acc = _Accumulator()
            for h, chunk in zip(hidden, chunks):
                x = block(
                    h,
                    attention_mask=chunk.context.attention_mask,
                    position_embeddings=chunk.context.position_embeddings,
                )
                final, logits = runner.head(runner.run(x, chunk.context, layer + 1))
                acc.add(final, logits, chunk, metrics)
                bar.update(chunk.targets.numel())
            result = acc.result(metrics)
            out.append(
                {
                    "layer": row.layer,
                    "block": row.block.name,
                    "attention": row.block.attention.name,
                    "ffn": row.block.ffn.name,
                    **result,
                }
            )
            bar.set_postfix(
                layer=layer, kl=f"{result['kl_div']:.4f}" if result["kl_div"] is not None else "-"
            )
    bar.close()
    return out


def score(
    library: str,
    parent: str,
    tokens: str,
    out: str,
    scoring: ScoringConfig,
    *,
    shard: str | None = None,
    layers: list[int] | None = None,
    rows: list[tuple[int, str]] | None = None,
    overlay: str | None = None,
    max_sequences: int | None = None,
    device: str = "auto",
) -> Manifest:
    """Phase ``scoring``: replace-1-block scores of a library's blocks; writes a ``scores`` artifact.

    Args:
        library: a complete (trained or untrained) library; a BLD shard must be merged first.
        parent: the parent artifact the library was built from.
        tokens: tokens artifact holding ``scoring.split`` (held-out text).
        out: output ``scores`` artifact (with ``shard``: that shard's rows only; join with :func:`merge`).
        scoring: mode (``full``: every attention x FFN pair; ``decoupled`` and ``hybrid``: (m+n)*L
            rows, the search scores the pairs it needs), metrics (``kl_div``, ``lm_loss``, ``cosine``,
            ``top1_agreement``, ``top5_agreement``; unrequested columns are left empty), split, batch
            size and dtype.
        shard: ``"i/n"``: score the i-th of n contiguous slices of the rows.
        layers: only these layers (default: every layer of the library).
        rows: instead, exactly these (layer, block) rows (the search's exact pair scores).
        overlay: a partial library trained from ``library`` whose blocks are scored too (coupled BLD).
        max_sequences: use only the split's first sequences.
        device: where to score.
    """
    from puzzle.data import read_splits

    metrics, split, batch_size, dtype = scoring.metrics, scoring.split, scoring.batch_size, scoring.dtype
    mode = "full" if scoring.mode == "full" else "decoupled"
    wanted = canonical_metrics(metrics)
    lib = Library.open(library, overlay=overlay)
    lib.check_parent(model_config(parent), artifacts.fingerprint(parent))
    planned = (
        [Row(layer, BlockConfig.from_name(name)) for layer, name in sorted(set(rows))]
        if rows is not None
        else plan_rows(lib, mode=mode, layers=layers, shard=shard)
    )
    splits = read_splits(tokens)["splits"]
    if split not in splits:
        raise ScoringError(f"tokens {tokens} have no {split!r} split (they have {sorted(splits)})")
    parameters = {
        "split": split,
        "metrics": wanted,
        "shard": shard,
        "mode": mode,
        "layers": layers,
        "rows": [list(r) for r in sorted(set(rows))] if rows is not None else None,
        "overlay": overlay,
        "batch_size": batch_size,
        "max_sequences": max_sequences,
        "dtype": dtype,
    }

    def body(staging: Path, local: dict[str, Path]) -> dict[str, Any]:
        from puzzle.data import load_split

        model = load_verified_model(local["parent"], dtype=dtype, device=resolve_device(device))
        ids = load_split(str(local["tokens"]), split)
        if max_sequences is not None:
            ids = ids[:max_sequences]
        started = time.perf_counter()
        # Layers the library offers nothing for keep the parent's block: their one row is the parent
        # itself, whose figures are the same at every layer, so it is scored once and copied (only
        # in a whole plan, or in shard 0, so that merged shards hold it once).
        fixed: list[int] = []
        if rows is None and layers is None and (shard is None or (parse_shard(shard) or (0, 1))[0] == 0):
            fixed = [i for i in range(model.config.num_hidden_layers) if i not in lib.layers]
        todo = list(planned)
        if fixed and not any(r.block == lib.parent_block(r.layer) for r in planned):
            todo.append(Row(lib.layers[0], lib.parent_block(lib.layers[0])))
        table = score_rows(model, lib, todo, ids, metrics=wanted, batch_size=batch_size)
        if fixed:
            own = next(r for r in table if r["block"] == lib.parent_block(int(r["layer"])).name)
            if len(todo) > len(planned):
                table.remove(own)
            for layer in fixed:
                block = lib.parent_block(layer)
                table.append(
                    {**own, "layer": layer, "block": block.name}
                    | {"attention": block.attention.name, "ffn": block.ffn.name}
                )
        seconds = time.perf_counter() - started
        info = {
            "mode": mode,
            "split": split,
            "metrics": wanted,
            "shard": shard,
            "library": library,
            "parent": parent,
            "parent_blocks": {
                str(layer): lib.parent_block(layer).name
                for layer in sorted({r.layer for r in planned} | set(fixed))
            },
            "fixed_layers": fixed,
            "seconds": seconds,
        }
        write_scores(staging, table, info)
        return _summary(table, wanted, seconds)

    return artifacts.run_phase(
        SCORES_KIND,
        out,
        {"library": library, "parent": parent, "tokens": tokens},
        parameters,
        body,
        input_kinds={"library": "library", "parent": MODEL_KINDS, "tokens": "tokens"},
    )


def _summary(table: list[dict[str, Any]], metrics: list[str], seconds: float | None) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "rows": len(table),
        "layers": len({r["layer"] for r in table}),
        "metrics": metrics,
    }
    if seconds is not None and table:
        summary["seconds_per_block"] = seconds / len(table)
    if "kl_div" in metrics and table:
        worst = max(table, key=lambda r: r["kl_div"])
        summary["max_kl_div"] = worst["kl_div"]
        summary["max_kl_block"] = f"layer {worst['layer']} {worst['block']}"
    return summary


def write_scores(directory: Path, table: list[dict[str, Any]], info: dict[str, Any]) -> None:
    """``scores.csv``, ``scores.json`` and ``heatmap.png`` for ``table``."""
    table = sorted(table, key=lambda r: r["layer"])  # stable: keeps the library's variant order
    with (directory / SCORES_CSV).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(COLUMNS))
        writer.writeheader()
        for row in table:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in COLUMNS})
    (directory / SCORES_JSON).write_text(
        json.dumps({**info, "columns": list(COLUMNS), "rows": table}, indent=1) + "\n"
    )
    metric = info["metrics"][0]
    plot_heatmap(table, directory / HEATMAP, metric=metric, parent_blocks=info.get("parent_blocks", {}))


def read_scores(uri: str) -> dict[str, Any]:
    """The ``scores.json`` of a scores artifact: ``rows`` plus mode, split, metrics, parent blocks."""
    local = artifacts.materialize(uri, SCORES_KIND)
    return json.loads((local / SCORES_JSON).read_text())


def _column_label(row: dict[str, Any], parent: str | None) -> str:
    """Decoupled rows are labelled by the sub-block that differs from the parent's."""
    if parent is None:
        return row["block"]
    p_attn, p_ffn = parent.split("+")
    if row["block"] == parent:
        return "parent"
    if row["ffn"] == p_ffn:
        return row["attention"]
    if row["attention"] == p_attn:
        return row["ffn"]
    return row["block"]


def plot_heatmap(
    table: list[dict[str, Any]], path: Path, *, metric: str, parent_blocks: dict[str, str]
) -> None:
    """Layers x variants, colour = ``metric`` (log scale for KL and LM loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    layers = sorted({r["layer"] for r in table})
    labels: list[str] = []
    cells: dict[tuple[int, str], float] = {}
    for row in table:
        label = _column_label(row, parent_blocks.get(str(row["layer"])))
        if label not in labels:
            labels.append(label)
        if row.get(metric) is not None:
            cells[(row["layer"], label)] = float(row[metric])
    grid = torch.full((len(layers), len(labels)), float("nan"))
    for (layer, label), value in cells.items():
        grid[layers.index(layer), labels.index(label)] = value
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(labels) + 2), max(3.0, 0.25 * len(layers) + 1.5)))
    values = grid[~grid.isnan()]
    norm = None
    if metric in ("kl_div",) and values.numel() and float(values.max()) > 0:
        positive = values[values > 0]
        low = float(positive.min()) if positive.numel() else 1e-6
        norm = LogNorm(vmin=max(low, 1e-6), vmax=max(float(values.max()), low * 10))
        grid = grid.clamp_min(max(low, 1e-6))
    image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    step = max(1, math.ceil(len(layers) / 30))
    ax.set_yticks(
        range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)], fontsize=8
    )
    ax.set_xlabel("variant (decoupled: the sub-block that differs from the parent)")
    ax.set_ylabel("layer")
    ax.set_title(f"replace-1-block {metric}")
    fig.colorbar(image, ax=ax, label=metric)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def merge(shard_uris: list[str], out: str) -> Manifest:
    """Phase: join scoring shards (same library, parent, data and settings) into one ``scores`` artifact."""
    if not shard_uris:
        raise ScoringError("merge needs at least one scores shard")
    manifests = [artifacts.require_manifest(uri, SCORES_KIND) for uri in shard_uris]
    settings = [{k: v for k, v in m.parameters.items() if k != "shard"} for m in manifests]
    sources = [
        {k: m.inputs[k]["hash"] for k in ("library", "parent", "tokens") if k in m.inputs} for m in manifests
    ]
    if any(s != settings[0] for s in settings) or any(s != sources[0] for s in sources):
        raise ScoringError(
            "the scoring shards differ in library, parent, tokens or settings; re-run them alike"
        )
    shards = [m.parameters.get("shard") for m in manifests]
    parsed = [parse_shard(s) for s in shards]
    complete = [p for p in parsed if p is not None]
    if len(complete) == len(parsed):
        counts = {p[1] for p in complete}
        indices = sorted(p[0] for p in complete)
        if len(counts) != 1 or indices != list(range(next(iter(counts)))):
            raise ScoringError(f"shards {shards} are not every shard i/n exactly once")

    def body(staging: Path, local: dict[str, Path]) -> dict[str, Any]:
        table: list[dict[str, Any]] = []
        seen: set[tuple[int, str]] = set()
        info: dict[str, Any] = {}
        seconds = 0.0
        order = sorted(range(len(shard_uris)), key=lambda i: p[0] if (p := parsed[i]) is not None else i)
        for name in (f"shard_{i}" for i in order):
            data = json.loads((local[name] / SCORES_JSON).read_text())
            for row in data["rows"]:
                key = (row["layer"], row["block"])
                if key in seen:
                    raise ScoringError(f"layer {key[0]} block {key[1]} is in more than one shard")
                seen.add(key)
                table.append(row)
            parents = {**info.get("parent_blocks", {}), **data.get("parent_blocks", {})}
            fixed = sorted({*info.get("fixed_layers", []), *data.get("fixed_layers", [])})
            info = {**data, "parent_blocks": parents, "fixed_layers": fixed}
            seconds += float(data.get("seconds") or 0.0)
        info.pop("rows", None)
        info.pop("columns", None)
        info.update({"shard": None, "merged_from": len(shard_uris), "seconds": seconds})
        write_scores(staging, table, info)
        return {**_summary(table, info["metrics"], seconds), "merged_shards": len(shard_uris)}

    inputs = {f"shard_{i}": uri for i, uri in enumerate(shard_uris)}
    return artifacts.run_phase(
        SCORES_KIND,
        out,
        inputs,
        {"shards": len(shard_uris)},
        body,
        input_kinds={k: SCORES_KIND for k in inputs},
    )
