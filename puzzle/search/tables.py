"""The per-(layer, block) table the search optimises over: scores joined with costs.

Three readers feed it:

* :class:`ScoreTable` - replace-1-block scores (``scores.csv`` / ``scores.json`` of a ``scores``
  artifact): one row per (layer, block) with ``kl_div``, ``lm_loss``, ``cosine``, ``top1``,
  ``top5``. In decoupled mode only blocks with one parent side are scored; a pair
  ``attn_a+ffn_f`` is then scored additively as ``s(a+pf) + s(pa+f) - s(pa+pf)``.
* :class:`puzzle.search.costs.CostTable` - measured sub-block costs (``costs.json`` of a ``costs``
  artifact): prefill and per-step decode latency per batch size, parameters, weight and
  KV-cache memory, and the hardware they were measured on.
* :func:`read_library` - the published Puzzle block-library JSON (``layer_N`` -> variant name ->
  ``stats``/``metrics``), whose costs are already per block.

:class:`BlockTable` holds, for one batch size, every candidate block of every layer with its
objective score and its cost in each constrained metric, plus the constant part of the model
(embeddings, final norm, LM head) and the parent's block in each layer.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from puzzle.errors import PuzzleError
from puzzle.io import storage

if TYPE_CHECKING:
    from puzzle.search.costs import CostTable

log = logging.getLogger(__name__)

SCORES_CSV = "scores.csv"
SCORES_JSON = "scores.json"

# Score columns where bigger is better; every other column is minimised.
MAXIMIZED = {"cosine", "top1", "top5", "top1_agreement", "top5_agreement", "accuracy"}
_ALIASES = {"top1_agreement": "top1", "top5_agreement": "top5"}
_NOT_SCORES = {"layer", "block", "attention", "ffn", "variant", "num_tokens", "shard"}


class TableError(PuzzleError, ValueError):
    """A score, cost or library table is missing, malformed, or does not fit the others."""


def metric_key(name: str) -> str:
    return _ALIASES.get(name, name)


def default_maximize(metric: str) -> bool:
    return metric in MAXIMIZED or metric_key(metric) in MAXIMIZED


def split_block(name: str) -> tuple[str, str]:
    attn, sep, ffn = name.partition("+")
    if not sep or not attn.startswith("attn_") or not ffn.startswith("ffn_"):
        raise TableError(
            f"block name {name!r} must look like 'attn_<variant>+ffn_<variant>', e.g. 'attn_kv1+ffn_768'"
        )
    return attn, ffn


# --------------------------------------------------------------------------- scores


@dataclass
class ScoreTable:
    """Replace-1-block scores: ``values[(layer, attention, ffn)][metric]``."""

    values: dict[tuple[int, str, str], dict[str, float]]
    metrics: list[str]
    num_layers: int
    parent: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def from_rows(
        cls, rows: list[dict[str, Any]], where: str, parent_blocks: list[str] | None = None
    ) -> ScoreTable:
        if not rows:
            raise TableError(f"{where}: no score rows")
        values: dict[tuple[int, str, str], dict[str, float]] = {}
        metrics: list[str] = []
        for i, row in enumerate(rows):
            try:
                layer = int(row["layer"])
                if row.get("attention") and row.get("ffn"):
                    attn, ffn = str(row["attention"]), str(row["ffn"])
                else:
                    attn, ffn = split_block(str(row["block"]))
            except (KeyError, ValueError) as exc:
                raise TableError(
                    f"{where}: row {i} needs 'layer' and 'block' (or 'attention' and 'ffn') columns, got "
                    f"{sorted(row)}"
                ) from exc
            scores = {}
            for key, raw in row.items():
                if key in _NOT_SCORES or raw in (None, ""):
                    continue
                try:
                    scores[metric_key(key)] = float(raw)
                except (TypeError, ValueError):
                    continue
                if metric_key(key) not in metrics:
                    metrics.append(metric_key(key))
            values[(layer, attn, ffn)] = scores
        num_layers = max(layer for layer, _, _ in values) + 1
        missing = sorted(set(range(num_layers)) - {layer for layer, _, _ in values})
        if missing:
            raise TableError(f"{where}: layers {missing[:10]} have no scores; re-run scoring for every layer")
        table = cls(values, metrics, num_layers)
        table.parent = [split_block(b) for b in parent_blocks] if parent_blocks else table._guess_parent()
        return table

    def _guess_parent(self) -> list[tuple[str, str]]:
        """Per layer, the attention and FFN that appear in most rows (the other side's partner in
        decoupled scoring), preferring the block whose KL is exactly 0."""
        parent = []
        for layer in range(self.num_layers):
            keys = [(a, f) for (lay, a, f) in self.values if lay == layer]
            zero = [(a, f) for (a, f) in keys if self.values[(layer, a, f)].get("kl_div") == 0.0]
            attn_counts = Counter(a for a, _ in keys)
            ffn_counts = Counter(f for _, f in keys)
            if len(zero) == 1:
                parent.append(zero[0])
                continue
            parent.append((attn_counts.most_common(1)[0][0], ffn_counts.most_common(1)[0][0]))
        return parent

    def score(self, layer: int, attention: str, ffn: str, metric: str) -> float | None:
        """The block's score; decoupled rows are combined additively when the pair was not scored."""
        metric = metric_key(metric)
        exact = self.values.get((layer, attention, ffn))
        if exact is not None and metric in exact:
            return exact[metric]
        pa, pf = self.parent[layer]
        a_side = self.values.get((layer, attention, pf), {}).get(metric)
        f_side = self.values.get((layer, pa, ffn), {}).get(metric)
        both = self.values.get((layer, pa, pf), {}).get(metric)
        if a_side is None or f_side is None:
            return None
        return a_side + f_side - (both if both is not None else 0.0)

    def variants(self, layer: int) -> tuple[list[str], list[str]]:
        """Attention and FFN variants scored in ``layer`` (parent first)."""
        keys = [(a, f) for (lay, a, f) in self.values if lay == layer]
        pa, pf = self.parent[layer]
        attns = [pa] + sorted({a for a, _ in keys} - {pa})
        ffns = [pf] + sorted({f for _, f in keys} - {pf})
        return attns, ffns


def _read_text(uri: str) -> str:
    return storage.read_bytes(uri).decode("utf-8")


def load_scores(uri: str, parent_blocks: list[str] | None = None) -> ScoreTable:
    """Read a scores artifact directory (``scores.json`` or ``scores.csv``) or one such file."""
    if uri.endswith((".csv", ".json")):
        candidates = [uri]
    else:
        candidates = [storage.join(uri, SCORES_JSON), storage.join(uri, SCORES_CSV)]
    for path in candidates:
        if not storage.exists(path):
            continue
        if path.endswith(".csv"):
            rows = list(csv.DictReader(io.StringIO(_read_text(path))))
        else:
            data = json.loads(_read_text(path))
            rows = data if isinstance(data, list) else data.get("rows") or data.get("scores")
            if isinstance(data, dict) and parent_blocks is None:
                parent_blocks = _parent_list(data.get("parent_blocks"))
            if not isinstance(rows, list):
                raise TableError(f"{path}: expected a list of rows (or {{'rows': [...]}})")
        return ScoreTable.from_rows(rows, path, parent_blocks)
    raise TableError(
        f"no {SCORES_CSV} or {SCORES_JSON} at {uri}: run `puzzle scoring` first (or pass the file itself)"
    )


def _parent_list(raw: Any) -> list[str] | None:
    """``parent_blocks`` as a list per layer (scores.json stores ``{"0": "attn_kv3+ffn_1536", ...}``)."""
    if isinstance(raw, list) and raw:
        return [str(b) for b in raw]
    if isinstance(raw, dict) and raw:
        layers = sorted(int(k) for k in raw)
        if layers == list(range(len(layers))):
            return [str(raw[str(k)]) for k in layers]
    return None


# --------------------------------------------------------------------------- the joined table


@dataclass
class BlockTable:
    """Every candidate block of every layer, with objective and cost arrays ``[L, V]``.

    ``cost`` holds the additive metrics (``latency`` ms per request, ``memory`` MiB,
    ``params``); ``base`` their constant part. Throughput is ``tokens_per_request_batch * 1000 /
    latency``, so a throughput bound is a latency bound at a fixed batch size.
    """

    names: list[list[str]]
    score: np.ndarray
    valid: np.ndarray
    cost: dict[str, np.ndarray]
    base: dict[str, float]
    parent: list[int]
    batch_size: int
    tokens_per_batch: float
    objective: str
    source: str
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.names)

    def index(self, layer: int, block: str) -> int:
        try:
            return self.names[layer].index(block)
        except ValueError:
            raise TableError(f"layer {layer} has no candidate block {block!r}") from None

    def totals(self, choice: list[int]) -> dict[str, float]:
        """Every metric of one architecture (throughput in tokens/s, latency ms, memory MiB)."""
        layers = np.arange(self.num_layers)
        idx = np.asarray(choice)
        out = {
            name: float(arr[layers, idx].sum() + self.base.get(name, 0.0)) for name, arr in self.cost.items()
        }
        for name, arr in self.extra.items():
            out[name] = float(arr[layers, idx].sum() + self.base.get(name, 0.0))
        out["throughput"] = (
            self.tokens_per_batch * 1000.0 / out["latency"] if out["latency"] > 0 else math.inf
        )
        return out

    def objective_value(self, choice: list[int]) -> float | None:
        vals = self.score[np.arange(self.num_layers), np.asarray(choice)]
        return float(vals.sum()) if np.all(np.isfinite(vals)) else None

    def blocks(self, choice: list[int]) -> list[str]:
        return [self.names[layer][c] for layer, c in enumerate(choice)]

    def restrict(self, keep: np.ndarray) -> BlockTable:
        """The same table with only the options where ``keep`` is True (plus the parent's)."""
        keep = keep.copy()
        keep[np.arange(self.num_layers), self.parent] = True
        return BlockTable(
            self.names,
            self.score,
            self.valid & keep,
            self.cost,
            self.base,
            self.parent,
            self.batch_size,
            self.tokens_per_batch,
            self.objective,
            self.source,
            self.extra,
        )


def _pad(rows: list[list[float]], fill: float = 0.0) -> np.ndarray:
    width = max(len(r) for r in rows)
    return np.array([r + [fill] * (width - len(r)) for r in rows], dtype=np.float64)


NOOP_COSTS = {"runtime_ms": 0.0, "memory_mib": 0.0, "params": 0.0, "prefill_ms": 0.0, "decode_ms": 0.0}


def _subblock(costs: CostTable, name: str, batch_size: int) -> dict[str, Any]:
    """A sub-block's costs; a no-op costs nothing even when the table did not list it."""
    if name in ("attn_noop", "ffn_noop") and name not in costs.names:
        return NOOP_COSTS
    return costs.subblock(name, batch_size)


def build_table(
    scores: ScoreTable, costs: CostTable, *, objective: str, batch_size: int, include: tuple[str, ...] = ()
) -> BlockTable:
    """Join scores and costs for one batch size; candidates = scored attention x FFN variants.

    ``include``: blocks to add to every layer even when they cannot be scored (their score is
    NaN; baselines such as layer dropping use them, the MIP never does).
    """
    from puzzle.search.costs import CostsError

    gen_len = costs.gen_len
    parent_blocks = costs.parent_blocks
    if parent_blocks and len(parent_blocks) != scores.num_layers:
        raise TableError(
            f"scores cover {scores.num_layers} layers but the cost table's parent has {len(parent_blocks)}: "
            "they come from different parents"
        )
    if metric_key(objective) not in scores.metrics:
        raise TableError(f"objective {objective!r} is not a score column; the scores have {scores.metrics}")
    try:
        fixed = costs.fixed(batch_size)
        wanted = {
            n
            for layer in range(scores.num_layers)
            for n in (*scores.variants(layer)[0], *scores.variants(layer)[1])
        }
        wanted |= {part for block in include for part in split_block(block)}
        sub = {name: _subblock(costs, name, batch_size) for name in wanted}
    except CostsError as exc:
        raise TableError(f"the scores and the cost table do not fit: {exc}") from exc
    names: list[list[str]]
    rows: dict[str, list[list[float]]]
    names, rows = [], {k: [] for k in ("score", "latency", "memory", "params", "prefill_ms", "decode_ms")}
    parent = []
    for layer in range(scores.num_layers):
        attns, ffns = scores.variants(layer)
        layer_names: list[str] = []
        row: dict[str, list[float]] = {k: [] for k in rows}
        pairs = [(a, f) for a in attns for f in ffns]
        pairs += [split_block(b) for b in include if split_block(b) not in pairs]
        for attn, ffn in pairs:
            value = scores.score(layer, attn, ffn, objective)
            if value is None:
                if f"{attn}+{ffn}" not in include:
                    continue
                value = math.nan
            a, f = sub[attn], sub[ffn]
            layer_names.append(f"{attn}+{ffn}")
            row["score"].append(value)
            row["latency"].append(a["runtime_ms"] + f["runtime_ms"])
            row["memory"].append(a["memory_mib"] + f["memory_mib"])
            row["params"].append(a["params"] + f["params"])
            row["prefill_ms"].append(a["prefill_ms"] + f["prefill_ms"])
            row["decode_ms"].append(a["decode_ms"] + f["decode_ms"])
        pa, pf = scores.parent[layer]
        parent.append(layer_names.index(f"{pa}+{pf}"))
        names.append(layer_names)
        for k in rows:
            rows[k].append(row[k])
    valid = _pad([[1.0] * len(n) for n in names]).astype(bool)
    base = {
        "latency": float(fixed["runtime_ms"]),
        "memory": float(fixed["memory_mib"]),
        "params": float(fixed["params"]),
        "prefill_ms": float(fixed["prefill_ms"]),
        "decode_ms": float(fixed["decode_ms"]),
    }
    return BlockTable(
        names=names,
        score=np.where(valid, _pad(rows["score"], np.nan), np.nan),
        valid=valid,
        cost={
            "latency": _pad(rows["latency"]),
            "memory": _pad(rows["memory"]),
            "params": _pad(rows["params"]),
        },
        base=base,
        parent=parent,
        batch_size=batch_size,
        tokens_per_batch=float(batch_size * gen_len),
        objective=metric_key(objective),
        source=costs.where,
        extra={"prefill_ms": _pad(rows["prefill_ms"]), "decode_ms": _pad(rows["decode_ms"])},
    )


# --------------------------------------------------------------------------- the published library

_ATTN_KV = re.compile(r"attention\s*=\s*(\d+)\s*kv heads", re.IGNORECASE)


def _library_block_name(variant: str, stats: dict[str, Any]) -> str:
    attn_text, _, ffn_text = variant.partition("&&")
    attn_text, ffn_text = attn_text.strip().lower(), ffn_text.strip().lower()
    if "no_op" in attn_text:
        attn = "attn_noop"
    elif "linear" in attn_text:
        attn = "attn_linear"
    else:
        match = _ATTN_KV.search(attn_text)
        kv = stats.get("num_kv_heads") or (int(match.group(1)) if match else None)
        if not kv:
            raise TableError(f"cannot read the attention of library variant {variant!r}")
        attn = f"attn_kv{int(kv)}"
    if "no_op" in ffn_text:
        ffn = "ffn_noop"
    elif "linear" in ffn_text:
        ffn = "ffn_linear"
    else:
        width = stats.get("ffn_intermediate_size")
        if not width:
            raise TableError(
                f"cannot read the FFN width of library variant {variant!r} (no stats.ffn_intermediate_size)"
            )
        ffn = f"ffn_{int(width)}"
    return f"{attn}+{ffn}"


def read_library(path: str, *, objective: str = "kl_div") -> BlockTable:
    """The published Puzzle block library (``layer_N`` -> variant -> ``stats``/``metrics``).

    Costs are the library's own: ``runtime_ms`` (latency), ``memory_mib``, ``num_params``. A
    ``measurement_info.json`` beside the file gives the batch size and sequence length, so that
    throughput is ``batch * sequence_length`` tokens over the runtime.
    """
    data = json.loads(_read_text(path))
    if not isinstance(data, dict) or not data:
        raise TableError(f"{path}: expected an object mapping 'layer_N' to variants")
    try:
        layers = sorted(data, key=lambda k: int(k.rsplit("_", 1)[1]))
    except (IndexError, ValueError) as exc:
        raise TableError(f"{path}: layer keys must look like 'layer_0', got {list(data)[:3]}") from exc
    info: dict[str, Any] = {}
    info_path = str(Path(path).with_name("measurement_info.json")) if not storage.is_s3(path) else None
    if info_path and Path(info_path).exists():
        info = json.loads(Path(info_path).read_text())
    names, score_rows, lat, mem, params, parent = [], [], [], [], [], []
    for key in layers:
        layer_names, s_row, l_row, m_row, p_row = [], [], [], [], []
        parent_idx = None
        for variant, entry in data[key].items():
            stats, metrics = entry.get("stats", {}), entry.get("metrics", {})
            if objective not in metrics:
                raise TableError(
                    f"{path}: {key} variant {variant!r} has no metric {objective!r} (has {sorted(metrics)})"
                )
            layer_names.append(_library_block_name(variant, stats))
            s_row.append(float(metrics[objective]))
            l_row.append(float(stats["runtime_ms"]))
            m_row.append(float(stats["memory_mib"]))
            p_row.append(float(stats["num_params"]))
            if variant.count("parent * 100%") == 2:
                parent_idx = len(layer_names) - 1
        if parent_idx is None:  # the biggest block stands for the parent
            parent_idx = int(np.argmax(p_row))
        names.append(layer_names)
        score_rows.append(s_row)
        lat.append(l_row)
        mem.append(m_row)
        params.append(p_row)
        parent.append(parent_idx)
    valid = _pad([[1.0] * len(n) for n in names]).astype(bool)
    batch = int(info.get("batch_size", 1))
    return BlockTable(
        names=names,
        score=np.where(valid, _pad(score_rows, np.nan), np.nan),
        valid=valid,
        cost={"latency": _pad(lat), "memory": _pad(mem), "params": _pad(params)},
        base={},
        parent=parent,
        batch_size=batch,
        tokens_per_batch=float(batch * int(info.get("sequence_length", 1))),
        objective=metric_key(objective),
        source=path,
    )
