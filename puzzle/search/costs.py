"""Hardware cost tables: measured latency and memory of every sub-block variant.

Puzzle is hardware-aware: the search needs, for every variant a layer could take, what it costs
on the GPU the child will be served on, at the workload it will serve. :func:`measure` writes a
``costs`` artifact with, for each distinct sub-block of a block library (all layers share
shapes, so each name is measured once) and for the embeddings + final norm + LM head (the
``embeddings_lm_head`` entry, also under ``fixed``), at every batch size:

* ``prefill_ms``: latency of the prefill of ``prompt_len`` tokens per sequence;
* ``decode_ms``: latency of one decode step, averaged over the workload's ``gen_len - 1``
  steps (attention reads a context that grows from ``prompt_len + 1`` to
  ``prompt_len + gen_len - 1``; measured at the first and last step and interpolated, the
  cost being linear in the cache length read);
* ``runtime_ms`` = ``prefill_ms + (gen_len - 1) x decode_ms``: the sub-block's share of one
  batch's end-to-end time (the prefill yields the first generated token);
* ``params``, ``weight_bytes``, ``kv_bytes_per_token`` (KV heads x head dim x 2 x bytes) and
  ``memory_bytes`` = weights + KV cache at that batch (batch x (prompt_len + gen_len) x
  ``kv_bytes_per_token``).

How a sub-block is measured (backend ``torch``, :mod:`puzzle.modeling.engine`): a model made of N copies
of that sub-block alone (random weights of the real shapes; N large enough that the copies'
weights do not fit in the GPU's L2 cache, or 4x the CPU's last-level cache, as in the real model)
runs in the same engine loop as whole models (static KV cache, CUDA graphs, bf16 on GPU); its
time minus the time of the model with no layers (embeddings, norm, LM head, sampling), divided by
N, is the sub-block's time. The two models are timed one after the other in every repeat and the
median of the repeats' differences is kept; each entry records how the repeats spread
(``spread``: min, quartiles, median, max, the median's standard error; ``repeats``, ``rounds``,
``precise``). An estimate that is not positive or not precise enough is measured again (a bounded
number of rounds), then kept with its spread or, if still not positive, refused with an error
that names the fix: nothing is clipped. The sum of the table's entries for a child's blocks plus
the fixed part therefore predicts the child's measured time in that loop, which
:func:`calibrate` checks on realized children. No-op sub-blocks have no module and launch no
kernel: their time is exactly zero.

``costs.json`` records the hardware identity (device name, driver, torch, CUDA, dtype, backend,
host); :func:`check_same_hardware` refuses to mix tables (or a table and this machine) that
differ in any of device type, device name, driver, torch, dtype or backend. ``costs.csv`` holds
the same figures flat, one row per (sub-block, batch size).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import random
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from tqdm import tqdm

from puzzle.config import CostsConfig
from puzzle.errors import PuzzleError
from puzzle.io import artifacts, storage
from puzzle.modeling import AttentionConfig, BlockConfig, BlockConfigError, DeciLMConfig, FFNConfig, engine
from puzzle.modeling.checkpoints import MODEL_KINDS
from puzzle.modeling.devices import parse_dtype, resolve_device, resolve_dtype

log = logging.getLogger(__name__)

COSTS_KIND = "costs"
COSTS_FILE = "costs.json"
COSTS_CSV = "costs.csv"
COSTS_FORMAT = "puzzle-costs"
FORMAT_VERSION = 1
FIXED = "embeddings_lm_head"
TIMING = 2
"""How sub-blocks are timed, recorded in the stage's parameters so that a table timed another way
(1: stacked and base timed apart, negative times clipped to zero) is measured again, not resumed."""
IDENTITY_KEYS = ("device_type", "device_name", "driver", "torch", "dtype", "backend")
"""Hardware fields that must agree for two cost measurements to be comparable."""

CSV_COLUMNS = (
    "subblock",
    "kind",
    "batch_size",
    "params",
    "weight_bytes",
    "kv_bytes_per_token",
    "prefill_ms",
    "decode_ms",
    "runtime_ms",
    "memory_bytes",
    "memory_mib",
    "runtime_ms_q1",
    "runtime_ms_q3",
    "repeats",
)


class CostsError(PuzzleError, ValueError):
    """A cost table cannot be measured, read or used as asked; the message names the fix."""


# --------------------------------------------------------------------------- workload


def workload_json(workload: CostsConfig) -> dict[str, Any]:
    """The serving workload of a table, as recorded in ``costs.json``."""
    return {
        "batch_sizes": list(workload.batch_sizes),
        "prompt_len": workload.prompt_len,
        "gen_len": workload.gen_len,
        "decode_steps": workload.gen_len - 1,
    }


# --------------------------------------------------------------------------- shapes


def subblock_kind(name: str) -> str:
    if name == FIXED:
        return "fixed"
    if name.startswith("attn_"):
        return "attention"
    if name.startswith("ffn_"):
        return "ffn"
    raise CostsError(
        f"{name!r} is not a sub-block name (attn_kv<N>, attn_linear, attn_noop, ffn_<W>, ffn_linear, "
        "ffn_noop)"
    )


def subblock_as_block(name: str) -> BlockConfig:
    """The layer holding only this sub-block (the other side a no-op)."""
    try:
        if subblock_kind(name) == "attention":
            return BlockConfig(attention=AttentionConfig.from_name(name), ffn=FFNConfig(no_op=True))
        return BlockConfig(attention=AttentionConfig(no_op=True), ffn=FFNConfig.from_name(name))
    except BlockConfigError as exc:
        raise CostsError(str(exc)) from None


def subblock_params(config: DeciLMConfig, name: str) -> int:
    """Parameters of a sub-block (its norm included), counted on a weightless copy."""
    from puzzle.modeling.modeling_decilm import DeciLMDecoderLayer

    block = subblock_as_block(name)
    try:
        block.attention.validate_for(config.num_attention_heads)
    except BlockConfigError as exc:
        raise CostsError(f"sub-block {name}: {exc}") from None
    with torch.device("meta"):
        layer = DeciLMDecoderLayer(config, block, 0)
    return sum(p.numel() for p in layer.parameters())


def fixed_params(config: DeciLMConfig) -> int:
    """Embeddings + final norm + LM head (one matrix when tied)."""
    vocab, hidden = config.vocab_size, config.hidden_size
    return vocab * hidden * (1 if config.tie_word_embeddings else 2) + hidden


def kv_bytes_per_token(config: DeciLMConfig, name: str, dtype_bytes: int) -> int:
    if name.startswith("attn_kv"):
        kv = AttentionConfig.from_name(name).num_kv_heads or 0
        return kv * config.head_dim * 2 * dtype_bytes
    return 0


def config_to_json(config: DeciLMConfig) -> dict[str, Any]:
    return json.loads(config.to_json_string(use_diff=False))


def config_from_json(data: Mapping[str, Any]) -> DeciLMConfig:
    data = dict(data)
    for key in ("model_type", "transformers_version", "architectures", "auto_map"):
        data.pop(key, None)
    return DeciLMConfig(**data)


# --------------------------------------------------------------------------- backends


class CostBackend(Protocol):
    """How sub-blocks and whole models are timed on this machine (milliseconds per batch size)."""

    name: ClassVar[str]

    def hardware(self) -> dict[str, Any]: ...

    def measure_fixed(self, config: DeciLMConfig, workload: CostsConfig) -> dict[int, dict[str, Any]]: ...

    def measure_subblock(
        self, config: DeciLMConfig, name: str, workload: CostsConfig
    ) -> dict[int, dict[str, Any]]: ...

    def measure_model(
        self, config: DeciLMConfig, workload: CostsConfig, *, seed: int = 0
    ) -> dict[int, dict[str, Any]]: ...


def spread(samples: Sequence[float]) -> dict[str, float]:
    """How repeated timings of one quantity spread: min, quartiles, median, max, and ``se``, the
    median's standard error estimated robustly (1.25 x 1.4826 x MAD / sqrt(n))."""
    if not samples:
        raise CostsError("no timings to summarise")
    xs = sorted(float(x) for x in samples)
    median = statistics.median(xs)
    q1, q3 = (statistics.quantiles(xs, n=4, method="inclusive")[::2]) if len(xs) > 1 else (median, median)
    mad = statistics.median(abs(x - median) for x in xs)
    return {
        "min": xs[0],
        "q1": q1,
        "median": median,
        "q3": q3,
        "max": xs[-1],
        "n": len(xs),
        "se": 1.2533 * 1.4826 * mad / math.sqrt(len(xs)),
    }


def last_level_cache_bytes(default: int = 32 * 2**20) -> int:
    """The CPU's largest cache (bytes), from sysfs; ``default`` where it cannot be read."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        if text[-1:] in units and text[:-1].isdigit():
            sizes.append(int(text[:-1]) * units[text[-1]])
        elif text.isdigit():
            sizes.append(int(text))
    return max(sizes) if sizes else default


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


class _Probe:
    """One model at one batch size, ready to be timed: its session, prompts and decode contexts.

    :meth:`once` is one repeat: a prefill and a decode step at the first and the last context of the
    workload (each ``decode_iters`` times), interpolated linearly to the mean step of the workload.
    """

    def __init__(
        self, meter: TorchBackend, weights: engine.EngineWeights, batch: int, workload: CostsConfig
    ) -> None:
        self.meter = meter
        self.contexts = workload.decode_contexts
        self.session = engine.Session(
            weights, batch_size=batch, max_len=workload.prompt_len + workload.gen_len
        )
        self.ids = engine.random_prompts(
            weights.config.vocab_size, batch, workload.prompt_len, meter.device, meter.seed
        )
        # Cache length read -> a context that reads it: the first and the last decode step.
        self.points = {self.session.bucket_for(c): c for c in (self.contexts[:1] + self.contexts[-1:])}
        self.session.prepare(workload.prompt_len, list(self.points.values()))
        if meter.device.type != "cuda":
            # First runs allocate and touch the cache and the kernels' buffers: never timed (the GPU
            # path warms up inside engine.time_prefill / time_decode).
            with torch.no_grad():
                self.session.prefill(self.ids)
                for context in self.points.values():
                    self.session.set_position(context - 1)
                    self.session.step()

    def once(self) -> tuple[float, float]:
        """Seconds of one prefill and of the workload's mean decode step."""
        meter, session = self.meter, self.session
        prefill = engine.time_prefill(session, self.ids, iters=meter.prefill_iters)
        at = {p: engine.time_decode(session, c, iters=meter.decode_iters) for p, c in self.points.items()}
        if not self.contexts:
            return prefill, 0.0
        lo, hi = min(at), max(at)
        slope = (at[hi] - at[lo]) / (hi - lo) if hi > lo else 0.0
        decode = sum(at[lo] + slope * (session.bucket_for(c) - lo) for c in self.contexts) / len(
            self.contexts
        )
        return prefill, decode


class TorchBackend:
    """The project's own loop (:mod:`puzzle.modeling.engine`): static KV cache, CUDA graphs on GPU.

    A sub-block's time is the median, over repeats, of (stacked model - model without layers) / N,
    the two models timed one after the other in every repeat (in alternating order), so that a
    machine slowing down or speeding up between repeats moves both alike. An estimate that is not
    positive, or whose runtime's standard error exceeds ``precision`` of it, is measured again with
    as many repeats again (at most ``remeasure_rounds`` times; for precision alone, only while the
    table has been measuring for less than ``precision_budget_s``, so that a busy machine cannot
    make the stage run for ever); then a positive one is kept with its spread recorded and flagged
    ``precise: false``, and a non-positive one is an error naming the fix. Nothing is ever clipped.

    The defaults of ``min_repeats`` (on CPU), ``precision``, ``remeasure_rounds`` and
    ``precision_budget_s`` (``math.inf``: none) are the class attributes below.

    On CPU (the last-level cache is what a GPU's L2 is): N copies whose weights fill
    ``CPU_CACHE_MULTIPLE`` x the last-level cache (as in a real model, whose layers never stay
    cached; two copies would), at least ``CPU_MIN_STACK`` and at most ``CPU_MAX_STACK``; at least
    ``CPU_MIN_REPEATS`` repeats; an untimed warm-up of each model before its first repeat.
    """

    name: ClassVar[str] = "torch"
    CPU_MIN_REPEATS: ClassVar[int] = 5
    CPU_CACHE_MULTIPLE: ClassVar[int] = 4
    CPU_MIN_STACK: ClassVar[int] = 8
    CPU_MAX_STACK: ClassVar[int] = 64
    PRECISION: ClassVar[float] = 0.03
    REMEASURE_ROUNDS: ClassVar[int] = 2
    PRECISION_BUDGET_S: ClassVar[float] = 60.0

    def __init__(
        self,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype | None = None,
        repeats: int = 3,
        stack_layers: int | None = None,
        seed: int = 0,
        min_repeats: int | None = None,
        precision: float | None = None,
        remeasure_rounds: int | None = None,
        precision_budget_s: float | None = None,
    ) -> None:
        if not isinstance(repeats, int) or repeats <= 0:
            raise CostsError(f"repeats must be a positive integer, got {repeats!r}")
        if stack_layers is not None and stack_layers <= 0:
            raise CostsError(f"stack_layers must be a positive integer, got {stack_layers!r}")
        precision = self.PRECISION if precision is None else precision
        remeasure_rounds = self.REMEASURE_ROUNDS if remeasure_rounds is None else remeasure_rounds
        if not isinstance(remeasure_rounds, int) or remeasure_rounds < 0:
            raise CostsError(f"remeasure_rounds must be an integer >= 0, got {remeasure_rounds!r}")
        if not precision > 0:
            raise CostsError(f"precision must be > 0 (a relative standard error), got {precision!r}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.repeats = repeats
        self.seed = seed
        self._stack_layers = stack_layers
        gpu = self.device.type == "cuda"
        self.decode_iters = 10 if gpu else 1
        self.prefill_iters = 3 if gpu else 1
        if min_repeats is None:
            min_repeats = 1 if gpu else self.CPU_MIN_REPEATS
        self.timed_repeats = max(repeats, min_repeats)
        """Repeats of one measuring round (``repeats``, raised to at least ``min_repeats``)."""
        self.precision = precision
        self.remeasure_rounds = remeasure_rounds
        self.precision_budget_s = (
            self.PRECISION_BUDGET_S if precision_budget_s is None else precision_budget_s
        )
        self._started: float | None = None
        self._fixed: engine.EngineWeights | None = None
        self._fixed_key: str | None = None
        self._hardware: dict[str, Any] | None = None
        self._base_cache: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}

    def hardware(self) -> dict[str, Any]:
        if self._hardware is None:
            self._hardware = engine.hardware_identity(self.device, self.dtype, self.name)
        return dict(self._hardware)

    def stack_layers(self, weight_bytes: int) -> int:
        """How many copies of a sub-block to time together."""
        if self._stack_layers is not None:
            return self._stack_layers
        if self.device.type != "cuda":
            llc = last_level_cache_bytes()
            copies = math.ceil(self.CPU_CACHE_MULTIPLE * llc / max(1, weight_bytes))
            return int(min(self.CPU_MAX_STACK, max(self.CPU_MIN_STACK, copies)))
        l2 = int(getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 50 * 2**20))
        return int(min(128, max(8, math.ceil(4 * l2 / max(1, weight_bytes)))))

    def describe(self) -> dict[str, Any]:
        """How this backend times (recorded in ``costs.json``)."""
        return {
            "repeats_per_round": self.timed_repeats,
            "remeasure_rounds": self.remeasure_rounds,
            "precision_budget_s": self.precision_budget_s,
            "precision": self.precision,
            "prefill_iters": self.prefill_iters,
            "decode_iters": self.decode_iters,
            "stack_layers": self._stack_layers,
            "stack_rule": None
            if self._stack_layers is not None
            else (
                f"{self.CPU_CACHE_MULTIPLE} x the last-level cache ({last_level_cache_bytes()} bytes) "
                f"of weights, {self.CPU_MIN_STACK}..{self.CPU_MAX_STACK} copies"
                if self.device.type != "cuda"
                else "4 x the GPU's L2 cache of weights, 8..128 copies"
            ),
        }

    def _fixed_weights(self, config: DeciLMConfig) -> tuple[engine.EngineWeights, str]:
        """The model without layers for this parent shape (made once, shared by every stack)."""
        shape = config_to_json(config)
        shape.pop("block_configs", None)
        shape.pop("num_hidden_layers", None)
        key = json.dumps(shape, sort_keys=True)
        if self._fixed is None or self._fixed_key != key:
            from puzzle.modeling.checkpoints import child_config_like

            self._fixed = engine.EngineWeights.random(
                child_config_like(config, []), device=self.device, dtype=self.dtype, seed=self.seed
            )
            self._fixed_key = key
        return self._fixed, key

    def _probe(self, weights: engine.EngineWeights, batch: int, workload: CostsConfig) -> _Probe:
        return _Probe(self, weights, batch, workload)

    def _budget_spent(self) -> bool:
        """Whether re-measuring for precision alone has run out of time (a non-positive estimate is
        always measured again: it cannot be kept)."""
        if self._started is None:
            return False
        return time.perf_counter() - self._started > self.precision_budget_s

    def _base(self, config: DeciLMConfig, workload: CostsConfig) -> dict[int, dict[str, Any]]:
        """Timings of the model without layers (measured once per parent shape and workload)."""
        if self._started is None:
            self._started = time.perf_counter()
        weights, key = self._fixed_weights(config)
        cache_key = (key, json.dumps(workload_json(workload)))
        if cache_key not in self._base_cache:
            out: dict[int, dict[str, Any]] = {}
            for batch in workload.batch_sizes:
                probe = self._probe(weights, batch, workload)
                timed = [probe.once() for _ in range(self.timed_repeats)]
                del probe
                samples = {
                    "prefill_ms": [p * 1e3 for p, _ in timed],
                    "decode_ms": [d * 1e3 for _, d in timed],
                    "runtime_ms": [(p + (workload.gen_len - 1) * d) * 1e3 for p, d in timed],
                }
                out[batch] = {
                    "prefill_ms": statistics.median(samples["prefill_ms"]),
                    "decode_ms": statistics.median(samples["decode_ms"]),
                    "spread": {k: spread(v) for k, v in samples.items()},
                    "repeats": len(timed),
                }
            self._base_cache[cache_key] = out
        return self._base_cache[cache_key]

    def measure_fixed(self, config: DeciLMConfig, workload: CostsConfig) -> dict[int, dict[str, Any]]:
        return {b: dict(t) for b, t in self._base(config, workload).items()}

    def _problems(self, stats: Mapping[str, Mapping[str, float]]) -> list[str]:
        """Why an estimate is not yet good enough to keep (empty: it is)."""
        out = [
            f"{key.removesuffix('_ms')} time {stats[key]['median']:.4g} ms is not positive"
            for key in ("prefill_ms", "decode_ms", "runtime_ms")
            if stats[key]["median"] <= 0
        ]
        runtime = stats["runtime_ms"]
        if runtime["median"] > 0 and runtime["se"] > self.precision * runtime["median"]:
            out.append(
                f"runtime {runtime['median']:.4g} ms has a standard error of "
                f"{100 * runtime['se'] / runtime['median']:.1f} % (more than {100 * self.precision:.0f} %)"
            )
        return out

    def measure_subblock(
        self, config: DeciLMConfig, name: str, workload: CostsConfig
    ) -> dict[int, dict[str, Any]]:
        from puzzle.modeling.checkpoints import child_config_like

        if self._started is None:
            self._started = time.perf_counter()
        block = subblock_as_block(name)
        n = self.stack_layers(subblock_params(config, name) * self.dtype.itemsize)
        fixed, _ = self._fixed_weights(config)
        weights = engine.EngineWeights.random(
            child_config_like(config, [block] * n),
            device=self.device,
            dtype=self.dtype,
            seed=self.seed + 1,
            fixed_from=fixed,
        )
        out = {}
        for b in workload.batch_sizes:
            base, stack = self._probe(fixed, b, workload), self._probe(weights, b, workload)
            samples: dict[str, list[float]] = {"prefill_ms": [], "decode_ms": [], "runtime_ms": []}
            base_ms: dict[str, list[float]] = {"prefill_ms": [], "decode_ms": []}
            rounds = 0
            while True:
                rounds += 1
                for _ in range(self.timed_repeats):
                    # Alternate which model goes first, so that a drift in speed cancels out.
                    if len(samples["prefill_ms"]) % 2 == 0:
                        (bp, bd), (sp, sd) = base.once(), stack.once()
                    else:
                        (sp, sd), (bp, bd) = stack.once(), base.once()
                    prefill, decode = (sp - bp) / n * 1e3, (sd - bd) / n * 1e3
                    base_ms["prefill_ms"].append(bp * 1e3)
                    base_ms["decode_ms"].append(bd * 1e3)
                    samples["prefill_ms"].append(prefill)
                    samples["decode_ms"].append(decode)
                    samples["runtime_ms"].append(prefill + (workload.gen_len - 1) * decode)
                stats = {k: spread(v) for k, v in samples.items()}
                problems = self._problems(stats)
                if not problems or rounds > self.remeasure_rounds:
                    break
                if not any("not positive" in p for p in problems) and self._budget_spent():
                    log.warning(
                        "costs: %s at batch %d: %s; not measured again: the table has been measuring for "
                        "more than %.0f s (a busy machine?)",
                        name,
                        b,
                        "; ".join(problems),
                        self.precision_budget_s,
                    )
                    break
                log.info(
                    "costs: %s at batch %d: %s; measuring %d more repeats (round %d of at most %d)",
                    name,
                    b,
                    "; ".join(problems),
                    self.timed_repeats,
                    rounds + 1,
                    self.remeasure_rounds + 1,
                )
            del base, stack
            negative = [k for k in ("prefill_ms", "decode_ms", "runtime_ms") if stats[k]["median"] <= 0]
            if negative:
                key = negative[0]
                s = stats[key]
                raise CostsError(
                    f"costs: {name} at batch {b}: its {key.removesuffix('_ms')} time is "
                    f"{s['median']:.4g} ms per copy (quartiles {s['q1']:.4g} .. {s['q3']:.4g} ms over "
                    f"{int(s['n'])} repeats in {rounds} rounds): {n} stacked copies were not measurably "
                    "slower than the model without layers, so the machine's noise exceeds the sub-block's "
                    f"time. Measure on an idle machine (load average now {_load_average()}), or raise "
                    f"costs.repeats (now {self.repeats}) or costs.stack_layers (now {n})"
                )
            precise = not problems
            if not precise:
                log.warning(
                    "costs: %s at batch %d: %s after %d rounds of %d repeats; kept with its spread "
                    "recorded (raise costs.repeats or costs.stack_layers, or measure on an idle machine)",
                    name,
                    b,
                    "; ".join(problems),
                    rounds,
                    self.timed_repeats,
                )
            out[b] = {
                "stack_layers": n,
                "prefill_ms": stats["prefill_ms"]["median"],
                "decode_ms": stats["decode_ms"]["median"],
                "spread": stats,
                "repeats": len(samples["runtime_ms"]),
                "rounds": rounds,
                "precise": precise,
                # The model without layers as timed alongside (vs the fixed entry: the machine's drift).
                "base": {k: statistics.median(v) for k, v in base_ms.items()},
            }
        del weights
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return out

    def measure_model(
        self, config: DeciLMConfig, workload: CostsConfig, *, seed: int = 0
    ) -> dict[int, dict[str, Any]]:
        fixed, _ = self._fixed_weights(config)
        weights = engine.EngineWeights.random(
            config, device=self.device, dtype=self.dtype, seed=seed + 1, fixed_from=fixed
        )
        out = {}
        for b in workload.batch_sizes:
            result = engine.measure_weights(
                weights,
                batch_size=b,
                prompt_len=workload.prompt_len,
                gen_len=workload.gen_len,
                repeats=self.repeats,
            )
            result.pop("tokens", None)
            out[b] = result
        del weights
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return out


def _entry(
    config: DeciLMConfig,
    name: str,
    measured: Mapping[int, Mapping[str, Any]] | None,
    workload: CostsConfig,
    dtype_bytes: int,
) -> dict[str, Any]:
    params = fixed_params(config) if name == FIXED else subblock_params(config, name)
    kv = 0 if name == FIXED else kv_bytes_per_token(config, name, dtype_bytes)
    weight_bytes = params * dtype_bytes
    entry: dict[str, Any] = {
        "kind": subblock_kind(name),
        "params": params,
        "weight_bytes": weight_bytes,
        "weight_mib": weight_bytes / 2**20,
        "kv_bytes_per_token": kv,
        "measured": measured is not None,
        "prefill_ms": {},
        "decode_ms": {},
        "runtime_ms": {},
        "memory_bytes": {},
        "batches": {},
    }
    for b in workload.batch_sizes:
        m = measured[b] if measured is not None else {"prefill_ms": 0.0, "decode_ms": 0.0}
        runtime = m["prefill_ms"] + (workload.gen_len - 1) * m["decode_ms"]
        memory = weight_bytes + b * (workload.prompt_len + workload.gen_len) * kv
        per_batch = {
            "prefill_ms": m["prefill_ms"],
            "decode_ms": m["decode_ms"],
            "runtime_ms": runtime,
            "memory_bytes": memory,
            "memory_mib": memory / 2**20,
        }
        # How the repeats spread (per copy for a sub-block: (stacked - base) / N of each repeat).
        for key in ("spread", "repeats", "rounds", "precise", "base"):
            if key in m:
                per_batch[key] = m[key]
        for key in ("prefill_ms", "decode_ms", "runtime_ms", "memory_bytes"):
            entry[key][str(b)] = per_batch[key]
        entry["batches"][str(b)] = per_batch
        if "stack_layers" in m:
            entry["stack_layers"] = int(m["stack_layers"])
    return entry


def _rows(subblocks: Mapping[str, Mapping[str, Any]], workload: CostsConfig) -> list[dict[str, Any]]:
    rows = []
    for name, entry in subblocks.items():
        for b in workload.batch_sizes:
            per = entry["batches"][str(b)]
            rows.append(
                {
                    "subblock": name,
                    "kind": entry["kind"],
                    "batch_size": b,
                    "params": entry["params"],
                    "weight_bytes": entry["weight_bytes"],
                    "kv_bytes_per_token": entry["kv_bytes_per_token"],
                    **{
                        k: per[k]
                        for k in ("prefill_ms", "decode_ms", "runtime_ms", "memory_bytes", "memory_mib")
                    },
                    "runtime_ms_q1": per["spread"]["runtime_ms"]["q1"] if "spread" in per else None,
                    "runtime_ms_q3": per["spread"]["runtime_ms"]["q3"] if "spread" in per else None,
                    "repeats": per.get("repeats"),
                }
            )
    return rows


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def build_table(
    config: DeciLMConfig,
    names: Sequence[str],
    workload: CostsConfig,
    backend: CostBackend,
    *,
    parent_blocks: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Measure the fixed part and every sub-block in ``names``: the ``costs.json`` document."""
    names = list(dict.fromkeys(names))
    for name in names:
        subblock_params(config, name)  # every name valid for this parent, before measuring
    hardware = backend.hardware()
    dtype_bytes = resolve_dtype(hardware["dtype"], torch.device(hardware["device"])).itemsize
    started, cpu_started, load_before = time.perf_counter(), time.process_time(), _load_average()
    cpus = os.cpu_count() or 1
    if hardware["device_type"] != "cuda" and load_before and load_before[0] >= cpus:
        log.warning(
            "costs: this machine is busy (load average %.1f on %d CPUs): CPU timings include the other "
            "work's contention (the spread of every entry is recorded); measure on an idle machine for a "
            "table that predicts idle speed",
            load_before[0],
            cpus,
        )
    subblocks: dict[str, Any] = {
        FIXED: _entry(config, FIXED, backend.measure_fixed(config, workload), workload, dtype_bytes)
    }
    for name in tqdm(names, desc="costs", unit="sub-block", leave=False):
        # A no-op sub-block has no module and launches no kernel: exactly zero time.
        measured = None if name.endswith("_noop") else backend.measure_subblock(config, name, workload)
        subblocks[name] = _entry(config, name, measured, workload, dtype_bytes)
        if measured is not None:
            log.info(
                "costs: %-14s %s",
                name,
                "; ".join(
                    f"bs {b}: prefill {m['prefill_ms']:.3f} ms, decode {m['decode_ms']:.4f} ms"
                    for b, m in measured.items()
                ),
            )
    parent = list(parent_blocks or [b.name for b in config.blocks])
    counts: dict[str, int] = {}
    for block in parent:
        counts[block] = counts.get(block, 0) + 1
    return {
        "format": COSTS_FORMAT,
        "format_version": FORMAT_VERSION,
        "hardware": hardware,
        "workload": workload_json(workload),
        "measurement": {
            "backend": backend.name,
            "runtime_ms": "prefill_ms + (gen_len - 1) * decode_ms",
            "decode_ms": "mean per decode step over the workload (first and last context measured, linear "
            "between)",
            "method": "N copies of the sub-block alone in the engine loop, minus the model without layers, "
            "over N: the median over repeats of the two timed one after the other (alternating order); "
            "each batch's 'spread' holds the repeats' min, quartiles, median, max and the median's "
            "standard error",
            "repeats": getattr(backend, "repeats", None),
            **(backend.describe() if hasattr(backend, "describe") else {}),
            "bucket": engine.BUCKET if hardware["device_type"] == "cuda" else 1,
            "build_seconds": time.perf_counter() - started,
            "cpu_seconds": time.process_time() - cpu_started,
            "load_average": {"before": load_before, "after": _load_average()},
            "imprecise": [
                f"{name}@bs{b}"
                for name, entry in subblocks.items()
                for b, per in entry["batches"].items()
                if per.get("precise") is False
            ],
        },
        "model": {
            "config": config_to_json(config),
            "parent_blocks": parent,
            "num_layers": len(parent),
            "hidden_size": config.hidden_size,
            "num_attention_heads": config.num_attention_heads,
            "head_dim": config.head_dim,
            "vocab_size": config.vocab_size,
        },
        "parent": {
            "block": max(counts, key=lambda k: counts[k]) if counts else None,
            "num_layers": len(parent),
        },
        "subblocks": subblocks,
        "fixed": subblocks[FIXED],
        "rows": _rows(subblocks, workload),
    }


def _read_parent_config(parent: str) -> DeciLMConfig:
    """The parent's config.json alone (measuring costs needs shapes, not weights)."""
    artifacts.require_manifest(parent, MODEL_KINDS)
    return config_from_json(storage.read_json(storage.join(parent, "config.json")))


def library_subblocks(library: str, config: DeciLMConfig) -> list[str]:
    """Every distinct sub-block name of a library (attention first), checked against the parent.

    Reads ``library.json`` only: the variants' weights are not needed to time their shapes.
    """
    from puzzle.library.variants import LIBRARY_FILE, LIBRARY_KIND, Library, LibraryError

    artifacts.require_manifest(library, LIBRARY_KIND)
    lib = Library(library, Path("."), storage.read_json(storage.join(library, LIBRARY_FILE)))
    try:
        lib.check_parent(config)
    except LibraryError as exc:
        raise CostsError(str(exc)) from None
    attention: dict[str, None] = {}
    ffn: dict[str, None] = {}
    for layer in lib.layers:
        attention.update(dict.fromkeys(lib.attention_variants(layer)))
        ffn.update(dict.fromkeys(lib.ffn_variants(layer)))
    for block in config.blocks:
        attention[block.attention.name] = None
        ffn[block.ffn.name] = None
    return [*attention, *ffn]


def measure(
    library: str, parent: str, out: str, costs: CostsConfig, *, device: str = "auto"
) -> artifacts.Manifest:
    """Phase ``costs``: the cost table of every sub-block of ``library`` on this machine.

    Args:
        library: block library artifact (its variant names; weights are not read).
        parent: the parent artifact (shapes, and the parent's blocks).
        out: where to write the ``costs`` artifact (local directory or ``s3://``).
        costs: the serving workload (batch sizes, prompt and generated tokens), dtype, repeats.
        device: the device measured (the target hardware).

    A re-run with the same inputs, parameters and hardware is skipped; on other hardware (or
    another driver, torch or dtype) the table is measured afresh.
    """
    workload = costs
    meter = TorchBackend(
        device=device, dtype=parse_dtype(costs.dtype), repeats=costs.repeats, stack_layers=costs.stack_layers
    )
    config = _read_parent_config(parent)
    names = library_subblocks(library, config)
    hardware = meter.hardware()
    parameters = {
        **workload_json(workload),
        "repeats": costs.repeats,
        "backend": meter.name,
        "timing": TIMING,
        "stack_layers": costs.stack_layers,
        "hardware": {k: hardware.get(k) for k in (*IDENTITY_KEYS, "device")},
    }

    def body(staging: Path, _local: dict[str, Path]) -> dict[str, Any]:
        table = build_table(config, names, workload, meter)
        (staging / COSTS_FILE).write_text(json.dumps(table, indent=2) + "\n")
        (staging / COSTS_CSV).write_text(_csv(table["rows"]))
        ct = CostTable(table, out)
        summary: dict[str, Any] = {
            "device_name": hardware["device_name"],
            "dtype": hardware["dtype"],
            "subblocks": len(names),
            "build_seconds": table["measurement"]["build_seconds"],
        }
        for b in workload.batch_sizes:
            summary[f"parent_throughput_bs{b}"] = ct.throughput(ct.parent_blocks, b)
        return summary

    return artifacts.run_phase(
        COSTS_KIND, out, {"library": library, "parent": parent}, parameters, body, materialize_inputs=False
    )


# --------------------------------------------------------------------------- reading tables


def check_same_hardware(
    a: CostTable | Mapping[str, Any], b: CostTable | Mapping[str, Any], *, what: str = "cost tables"
) -> None:
    """Raise :class:`CostsError` unless ``a`` and ``b`` (tables or hardware dicts) were measured alike."""
    ha = a.hardware if isinstance(a, CostTable) else a
    hb = b.hardware if isinstance(b, CostTable) else b
    wa = a.where if isinstance(a, CostTable) else "this machine"
    wb = b.where if isinstance(b, CostTable) else "this machine"
    diffs = [f"{k} {ha.get(k)!r} vs {hb.get(k)!r}" for k in IDENTITY_KEYS if ha.get(k) != hb.get(k)]
    if diffs:
        raise CostsError(
            f"refusing to mix {what} from different hardware: {wa} was measured on {ha.get('device_name')!r} "
            f"and {wb} "
            f"on {hb.get('device_name')!r} ({'; '.join(diffs)}); costs are only valid where they were "
            "measured: "
            "re-measure with `puzzle costs` on the target machine"
        )


class CostTable:
    """A ``costs.json`` document with lookups by sub-block, block and architecture."""

    def __init__(self, data: dict[str, Any], where: str = "") -> None:
        if not isinstance(data, dict) or data.get("format") != COSTS_FORMAT:
            raise CostsError(
                f"{where or 'the document'} is not a puzzle cost table (format {COSTS_FORMAT!r})"
            )
        for key in ("hardware", "workload", "subblocks", "model"):
            if key not in data:
                raise CostsError(f"{where}: the cost table has no {key!r} section; re-run `puzzle costs`")
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise CostsError(
                f"{where}: cost table format {data['format_version']} is newer than this package's"
            )
        self.data = data
        self.where = where or "(unsaved table)"

    @property
    def hardware(self) -> dict[str, Any]:
        return self.data["hardware"]

    @property
    def workload(self) -> dict[str, Any]:
        return self.data["workload"]

    @property
    def batch_sizes(self) -> list[int]:
        return [int(b) for b in self.workload["batch_sizes"]]

    @property
    def gen_len(self) -> int:
        return int(self.workload["gen_len"])

    @property
    def prompt_len(self) -> int:
        return int(self.workload["prompt_len"])

    @property
    def names(self) -> list[str]:
        """Measured sub-block names (without the fixed part)."""
        return [n for n in self.data["subblocks"] if n != FIXED]

    @property
    def parent_blocks(self) -> list[str]:
        return list(self.data["model"]["parent_blocks"])

    @property
    def num_layers(self) -> int:
        return len(self.parent_blocks)

    def config(self) -> DeciLMConfig:
        """The parent's config the table was measured for."""
        return config_from_json(self.data["model"]["config"])

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size not in self.batch_sizes:
            raise CostsError(
                f"cost table {self.where} was not measured at batch size {batch_size} "
                f"(it has {self.batch_sizes}); re-run `puzzle costs` with that batch size in "
                "costs.batch_sizes"
            )

    def subblock(self, name: str, batch_size: int) -> dict[str, Any]:
        """One sub-block's costs at ``batch_size``."""
        entry = self.data["subblocks"].get(name)
        if entry is None:
            raise CostsError(
                f"cost table {self.where} has no sub-block {name!r} (it has {self.names}); measure a "
                "library that contains it"
            )
        self.check_batch_size(batch_size)
        per = entry["batches"][str(batch_size)]
        return {
            "name": name,
            "kind": entry["kind"],
            "params": entry["params"],
            "weight_bytes": entry["weight_bytes"],
            "kv_bytes_per_token": entry["kv_bytes_per_token"],
            **per,
        }

    def fixed(self, batch_size: int) -> dict[str, Any]:
        """Embeddings + final norm + LM head."""
        return self.subblock(FIXED, batch_size)

    def block(self, block_name: str, batch_size: int) -> dict[str, float]:
        """A layer's costs: the sum of its attention and FFN sub-blocks."""
        attn, sep, ffn = block_name.partition("+")
        if not sep:
            raise CostsError(f"block name {block_name!r} must look like '<attention>+<ffn>'")
        a, f = self.subblock(attn, batch_size), self.subblock(ffn, batch_size)
        keys = (
            "runtime_ms",
            "prefill_ms",
            "decode_ms",
            "params",
            "memory_bytes",
            "memory_mib",
            "weight_bytes",
        )
        return {k: a[k] + f[k] for k in keys}

    def totals(self, blocks: Sequence[str], batch_size: int) -> dict[str, float]:
        """A whole model's predicted costs: fixed part + every layer's block, and its throughput."""
        fixed = self.fixed(batch_size)
        keys = ("runtime_ms", "prefill_ms", "decode_ms", "params", "memory_bytes", "memory_mib")
        out = {k: float(fixed[k]) for k in keys}
        for block in blocks:
            b = self.block(block, batch_size)
            for k in keys:
                out[k] += b[k]
        out["throughput"] = (
            batch_size * self.gen_len / (out["runtime_ms"] / 1e3) if out["runtime_ms"] > 0 else math.inf
        )
        return out

    def runtime_ms(self, blocks: Sequence[str], batch_size: int) -> float:
        return self.totals(blocks, batch_size)["runtime_ms"]

    def throughput(self, blocks: Sequence[str], batch_size: int) -> float:
        """Predicted generated tokens/s: batch x gen_len over the workload's runtime."""
        return self.totals(blocks, batch_size)["throughput"]

    def parent_runtime_ms(self, batch_size: int) -> float:
        return self.runtime_ms(self.parent_blocks, batch_size)


def load_costs(uri: str | Path) -> CostTable:
    """A cost table from a ``costs`` artifact (local or ``s3://``) or a ``costs.json`` file."""
    uri = str(uri)
    if uri.endswith(".json"):
        if not storage.exists(uri):
            raise CostsError(f"no cost table at {uri}")
        return CostTable(storage.read_json(uri), uri)
    local = artifacts.materialize(uri, COSTS_KIND)
    return CostTable(json.loads((local / COSTS_FILE).read_text()), uri)


# --------------------------------------------------------------------------- calibration


def random_children(table: CostTable, count: int, *, seed: int = 0) -> list[list[str]]:
    """``count`` architectures drawing each layer's attention and FFN at random from the table."""
    if not isinstance(count, int) or count <= 0:
        raise CostsError(f"the number of children to calibrate must be a positive integer, got {count!r}")
    rng = random.Random(seed)
    attention = [n for n in table.names if n.startswith("attn_")]
    ffn = [n for n in table.names if n.startswith("ffn_")]
    if not attention or not ffn:
        raise CostsError(
            f"cost table {table.where} has no attention or no FFN sub-blocks to draw children from"
        )
    return [
        [f"{rng.choice(attention)}+{rng.choice(ffn)}" for _ in range(table.num_layers)] for _ in range(count)
    ]


def calibrate(
    table_uri: str | CostTable,
    children: Sequence[Sequence[str]] | int,
    *,
    batch_sizes: Sequence[int] | None = None,
    device: str = "auto",
    repeats: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Predicted (sum of the table) vs measured throughput of whole children on this machine.

    ``children``: architectures (one block name per layer) or a number of random ones. Each is
    realized with random weights of the table's shapes and run through the same loop at the
    table's workload (``batch_sizes``: default all of the table's). Refused when this machine
    differs from the table's hardware. ``error_pct`` = (predicted - measured) / measured.
    """
    from puzzle.modeling.checkpoints import child_config_like

    table = table_uri if isinstance(table_uri, CostTable) else load_costs(table_uri)
    sizes = list(batch_sizes) if batch_sizes is not None else table.batch_sizes
    for b in sizes:
        table.check_batch_size(b)
    archs = (
        random_children(table, children, seed=seed)
        if isinstance(children, int)
        else [list(c) for c in children]
    )
    for arch in archs:
        if len(arch) != table.num_layers:
            raise CostsError(
                f"a child has {len(arch)} blocks but the table's parent has {table.num_layers} layers"
            )
        for block in arch:
            table.block(block, sizes[0])  # every name must be in the table
    if table.hardware.get("backend", "torch") != TorchBackend.name:
        raise CostsError(f"cost table {table.where} was measured with backend {table.hardware['backend']!r}")
    meter = TorchBackend(device=device, dtype=table.hardware["dtype"], repeats=repeats, seed=seed)
    check_same_hardware(table, meter.hardware(), what="a cost table and a measurement")
    config = table.config()
    workload = CostsConfig(batch_sizes=list(sizes), prompt_len=table.prompt_len, gen_len=table.gen_len)
    results = []
    for index, arch in enumerate(tqdm(archs, desc="calibrate", unit="child", leave=False)):
        child_config = child_config_like(config, [BlockConfig.from_name(b) for b in arch])
        measured = meter.measure_model(child_config, workload, seed=seed + index)
        per_batch = {}
        for b in sizes:
            predicted, got = table.totals(arch, b), measured[b]
            per_batch[str(b)] = {
                "predicted_throughput": predicted["throughput"],
                "measured_throughput": got["throughput"],
                "error_pct": 100.0 * (predicted["throughput"] - got["throughput"]) / got["throughput"],
                "predicted_ms": predicted["runtime_ms"],
                "measured_ms": got["total_s"] * 1e3,
                "predicted_prefill_ms": predicted["prefill_ms"],
                "measured_prefill_ms": got["prefill_s"] * 1e3,
                "predicted_decode_ms": predicted["decode_ms"],
                "measured_decode_ms": got["decode_s"] * 1e3 / max(1, table.gen_len - 1),
            }
        results.append({"blocks": arch, "batches": per_batch})
    errors = [abs(r["batches"][str(b)]["error_pct"]) for r in results for b in sizes]
    return {
        "table": table.where,
        "hardware": table.hardware,
        "workload": workload_json(workload),
        "children": results,
        "summary": {
            "children": len(results),
            "mean_abs_error_pct": sum(errors) / len(errors) if errors else None,
            "max_abs_error_pct": max(errors) if errors else None,
            "within_5pct": sum(e <= 5.0 for e in errors) / len(errors) if errors else None,
        },
    }
