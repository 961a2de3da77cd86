"""The one run configuration: frozen, validated dataclasses, one per section.

Every setting is declared once, here: the dataclass defaults *are* the embedded default that
``puzzle run`` uses without ``--config`` (the real SmolLM2-135M parent at demo budgets), a field's
docstring is its documentation (``docs/config.md`` is generated from them), and the CLI, the local
runner and the Kubeflow components all hand the same section objects to the phases.

A YAML file (or a ``--set section.field=value`` override) is loaded with :func:`load_config`, which
checks everything that can be checked without loading a model and fails with a
:class:`ConfigError` naming the field and the fix: unknown fields, wrong types, values out of
range, the constraint syntax, constraints no child can meet, and (``check_storage``) that the
output root and any ``s3://`` input can be reached.
"""

from __future__ import annotations

import ast
import contextvars
import dataclasses
import difflib
import hashlib
import inspect
import json
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

import yaml

from puzzle.errors import PuzzleError


class ConfigError(PuzzleError, ValueError):
    """The run configuration is invalid; the message names the field path and the fix."""


def _fail(path: str, message: str) -> typing.NoReturn:
    raise ConfigError(f"{path} {message}")


def _positive(path: str, value: float) -> None:
    if value <= 0:
        _fail(path, f"must be > 0, got {value}")


def _non_negative(path: str, value: float) -> None:
    if value < 0:
        _fail(path, f"must be >= 0, got {value}")


def _fraction(path: str, value: float, *, open_low: bool = True) -> None:
    if not (0 < value <= 1 if open_low else 0 <= value <= 1):
        _fail(path, f"must be in {'(0' if open_low else '[0'}, 1], got {value}")


def _one_of(path: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _fail(path, f"must be one of {', '.join(allowed)}, got {value!r}")


DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?|mps)$")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SCORE_METRICS = ("kl_div", "lm_loss", "cosine", "top1_agreement", "top5_agreement")
BASELINES = ("uniform_width", "layer_dropping", "greedy", "noop_only")
SPLITS = ("calibration", "bld", "score", "gkd", "eval")

# The path of the section being built by :func:`_build` (so a nested section's own check names
# ``evaluate.workload.batch_size``, not ``workload.batch_size``).
_BUILD_PATH: contextvars.ContextVar[str | None] = contextvars.ContextVar("puzzle_config_path", default=None)


class Section:
    """Base of every section: validated on construction (``check``), named by ``SECTION``."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.check(_BUILD_PATH.get() or self.SECTION)

    def check(self, path: str) -> None:  # overridden by sections with rules
        """Raise :class:`ConfigError` naming ``path.field`` when a value is out of range."""


def _check_device(path: str, value: str) -> None:
    if not DEVICE_PATTERN.match(value):
        _fail(path, f"must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {value!r}")


# --------------------------------------------------------------------------- constraints


def parse_constraint(text: Any, path: str) -> Any:
    """A search constraint (``throughput>=1.5x``, ``memory<=2GiB``, ...) parsed by the search
    itself (:class:`puzzle.search.mip.Constraint`), so the config accepts exactly what the search
    does; errors name the field."""
    from puzzle.search.mip import Constraint, SearchError

    if not isinstance(text, str):
        _fail(path, f"must be a string like 'throughput>=1.5x', got {text!r}")
    try:
        return Constraint.parse(text)
    except SearchError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True, kw_only=True)
class DataConfig(Section):
    """Token data: where the text comes from and how it is cut into fixed-length sequences."""

    SECTION: ClassVar[str] = "data"

    source: str = "stdlib"
    """`stdlib` (the Python standard library's sources and docs, offline everywhere), a text/JSONL
    file or directory, an `s3://` prefix, or `hf:NAME[:CONFIG]:SPLIT` (needs the hub)."""
    seq_len: int = 128
    """Tokens per sequence (at least 8)."""
    splits: dict[str, int] = field(
        default_factory=lambda: {"calibration": 16, "bld": 32, "score": 4, "gkd": 64, "eval": 16}
    )
    """Sequences per split, carved disjointly: `calibration` initialises the library, `bld` trains
    blocks, `score` scores them, `gkd` trains the child, `eval` is held out for evaluation."""
    seed: int = 0
    """Shuffles documents and sequences."""
    text_field: str = "text"
    """The JSONL / dataset field holding the text."""

    def check(self, path: str) -> None:
        if not self.source:
            _fail(f"{path}.source", "must not be empty: use 'stdlib' or a path / s3:// URI of text files")
        if self.seq_len < 8:
            _fail(f"{path}.seq_len", f"must be >= 8, got {self.seq_len}")
        if not self.splits:
            _fail(f"{path}.splits", "must name at least one split, e.g. {bld: 256, score: 16}")
        for name, count in self.splits.items():
            _positive(f"{path}.splits.{name}", count)


@dataclass(frozen=True, kw_only=True)
class LibraryConfig(Section):
    """The block library: which variants every layer gets, and how they are initialised from the
    parent. The parent's own blocks are always in it."""

    SECTION: ClassVar[str] = "library"

    kv_heads: list[int] | None = None
    """KV-head counts of the GQA attention variants (each must divide the parent's attention heads
    and be at most its KV heads); null = every such divisor."""
    attention_linear: bool = False
    """Offer attention replaced by one linear layer (H x H: each token attends to itself, W_O W_V)."""
    attention_noop: bool = True
    """Offer skipping attention."""
    ffn_fractions: list[float] = field(default_factory=lambda: [1.0, 0.5])
    """FFN widths as fractions of the parent's, in (0, 1]; channels kept by channel contribution."""
    ffn_multiple: int = 256
    """FFN widths are rounded to multiples of this when the parent's width is one (serving engines
    expect multiples of 256)."""
    ffn_linear: bool = False
    """Offer the FFN replaced by one linear layer (least squares on calibration activations)."""
    ffn_noop: bool = True
    """Offer skipping the FFN."""
    ffn_init: Literal["channel_contribution", "random"] = "channel_contribution"
    """How narrower FFNs pick their channels: `channel_contribution` (the method) or `random`
    (seeded; an ablation)."""
    batch_size: int = 8
    """Calibration sequences per forward pass."""
    seed: int = 0
    """Seed of `ffn_init: random`."""

    def check(self, path: str) -> None:
        if self.kv_heads is not None:
            if not self.kv_heads:
                _fail(
                    f"{path}.kv_heads", "must not be empty: list KV-head counts or use null for every divisor"
                )
            for i, n in enumerate(self.kv_heads):
                _positive(f"{path}.kv_heads[{i}]", n)
        if not self.ffn_fractions:
            _fail(f"{path}.ffn_fractions", "must not be empty: include at least 1.0 (the parent's FFN)")
        for i, frac in enumerate(self.ffn_fractions):
            _fraction(f"{path}.ffn_fractions[{i}]", frac)
        _positive(f"{path}.ffn_multiple", self.ffn_multiple)
        _one_of(f"{path}.ffn_init", self.ffn_init, ("channel_contribution", "random"))
        _positive(f"{path}.batch_size", self.batch_size)

    def only_parent_blocks(self, parent_kv_heads: int | None) -> bool:
        """True when no variant can be cheaper than the parent's (so no speedup is possible).

        ``parent_kv_heads`` None (the parent's shape is unknown without loading it) counts any
        explicit KV-head count as possibly fewer than the parent's.
        """
        fewer_kv = self.kv_heads is None or any(
            parent_kv_heads is None or n < parent_kv_heads for n in self.kv_heads
        )
        return not (
            fewer_kv
            or self.attention_linear
            or self.attention_noop
            or self.ffn_linear
            or self.ffn_noop
            or any(f < 1.0 for f in self.ffn_fractions)
        )


@dataclass(frozen=True, kw_only=True)
class BLDConfig(Section):
    """Blockwise local distillation: each variant trained alone on the parent's activations
    (normalised MSE of the block's output)."""

    SECTION: ClassVar[str] = "bld"

    token_budget: int = 4096
    """Training tokens per block variant (0 keeps the initialisation); at most `data.splits.bld` x
    `data.seq_len` (each token is seen once)."""
    batch_size: int = 8
    """Sequences per step."""
    lr: float = 1e-3
    """Peak AdamW learning rate (linear warm-up, then cosine decay)."""
    warmup_fraction: float = 0.05
    """Share of steps spent warming up."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    objective: Literal["block", "subblock"] = "block"
    """`block`: match the parent block's output; `subblock`: match the sub-block's own output."""
    val_sequences: int = 4
    """Held-out `score` sequences on which every variant's loss is measured before and after."""
    autocast: bool = True
    """bf16 autocast on CUDA."""
    seed: int = 0
    """Orders the training sequences."""
    shards: int = 1
    """Independent shards of (layers x variants), trained separately (one per GPU or pod) and merged."""
    checkpoint_every: int = 50
    """Steps between checkpoints (a killed run resumes from the last one)."""

    def check(self, path: str) -> None:
        _non_negative(f"{path}.token_budget", self.token_budget)
        _positive(f"{path}.batch_size", self.batch_size)
        _positive(f"{path}.lr", self.lr)
        _fraction(f"{path}.warmup_fraction", self.warmup_fraction, open_low=False)
        _non_negative(f"{path}.weight_decay", self.weight_decay)
        _one_of(f"{path}.objective", self.objective, ("block", "subblock"))
        _positive(f"{path}.val_sequences", self.val_sequences)
        _positive(f"{path}.shards", self.shards)
        _positive(f"{path}.checkpoint_every", self.checkpoint_every)


@dataclass(frozen=True, kw_only=True)
class ScoringConfig(Section):
    """Replace-1-block scoring: the parent with one block swapped, against the parent, on
    held-out tokens."""

    SECTION: ClassVar[str] = "scoring"

    metrics: list[str] = field(default_factory=lambda: ["kl_div", "lm_loss", "cosine", "top1_agreement"])
    """Figures per (layer, variant): any of kl_div, lm_loss, cosine, top1_agreement, top5_agreement."""
    split: str = "score"
    """The held-out split scored on (a `data.splits` key)."""
    batch_size: int = 8
    """Sequences per forward pass."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Precision of the forward passes (bfloat16 halves memory on a GPU)."""
    shards: int = 1
    """Independent shards of the rows, scored separately and merged."""

    def check(self, path: str) -> None:
        if not self.metrics:
            _fail(f"{path}.metrics", f"must list at least one of {', '.join(SCORE_METRICS)}")
        for i, metric in enumerate(self.metrics):
            _one_of(f"{path}.metrics[{i}]", metric, SCORE_METRICS)
        _positive(f"{path}.batch_size", self.batch_size)
        _one_of(f"{path}.dtype", self.dtype, ("float32", "bfloat16"))
        _positive(f"{path}.shards", self.shards)


@dataclass(frozen=True, kw_only=True)
class CostsConfig(Section):
    """Measured per-block costs on the target hardware, at the serving workload."""

    SECTION: ClassVar[str] = "costs"

    batch_sizes: list[int] = field(default_factory=lambda: [1])
    """Batch sizes the per-block prefill and decode latencies are measured at."""
    prompt_len: int = 64
    """Prompt tokens per sequence of the serving workload."""
    gen_len: int = 32
    """Generated tokens per sequence of the serving workload."""
    dtype: str = "auto"
    """`auto` (bfloat16 on CUDA, float32 on CPU), `float32`, `bfloat16` or `float16`."""
    repeats: int = 3
    """Timing repeats; medians are kept."""
    stack_layers: int | None = None
    """Copies of a sub-block timed together; null = enough to exceed the GPU's L2 cache (2 on CPU)."""

    def check(self, path: str) -> None:
        if not self.batch_sizes:
            _fail(f"{path}.batch_sizes", "must list at least one batch size")
        for i, b in enumerate(self.batch_sizes):
            _positive(f"{path}.batch_sizes[{i}]", b)
        _positive(f"{path}.prompt_len", self.prompt_len)
        _positive(f"{path}.gen_len", self.gen_len)
        _one_of(f"{path}.dtype", self.dtype, DTYPES)
        _positive(f"{path}.repeats", self.repeats)
        if self.stack_layers is not None:
            _positive(f"{path}.stack_layers", self.stack_layers)

    @property
    def decode_contexts(self) -> list[int]:
        """The context lengths decode steps are timed at (first, middle and last step)."""
        from puzzle.modeling.engine import decode_contexts

        return decode_contexts(self.prompt_len, self.gen_len)


@dataclass(frozen=True, kw_only=True)
class SearchConfig(Section):
    """The MIP search: one block per layer, best summed score under the constraints."""

    SECTION: ClassVar[str] = "search"

    objective: str = "kl_div"
    """The score column to optimise (kl_div and lm_loss are minimised; cosine and the agreements
    maximised)."""
    constraints: list[str] = field(default_factory=lambda: ["throughput>=1.5x"])
    """Limits, any combination: `throughput>=1.5x` (tokens/s, or x the parent's), `latency<=900`
    (ms per request; also `2s`, `0.5x`), `memory<=2GiB` (weights + KV cache; MiB by default),
    `params<=1e8` (also `100M`, `0.5x`)."""
    num_solutions: int = 1
    """Diverse solutions to return."""
    alpha: float = 0.8
    """Diversity: each next solution shares at most alpha x layers choices with every earlier one."""
    time_limit_s: float = 60.0
    """Seconds for the best solution."""
    diverse_time_limit_s: float = 0.8
    """Seconds for each further diverse solution."""

    def check(self, path: str) -> None:
        _one_of(f"{path}.objective", self.objective, SCORE_METRICS)
        if not self.constraints:
            _fail(f"{path}.constraints", "must list at least one constraint, e.g. 'throughput>=1.5x'")
        parsed = [
            parse_constraint(text, f"{path}.constraints[{i}]") for i, text in enumerate(self.constraints)
        ]
        seen: dict[tuple[str, bool], int] = {}
        for i, c in enumerate(parsed):
            key = (c.metric, c.relative)
            if key in seen:
                _fail(
                    f"{path}.constraints[{i}]",
                    f"repeats a {c.metric} bound (also constraints[{seen[key]}]); keep one",
                )
            seen[key] = i
        _positive(f"{path}.num_solutions", self.num_solutions)
        if not 0 < self.alpha < 1:
            _fail(f"{path}.alpha", f"must be in (0, 1), got {self.alpha}")
        _positive(f"{path}.time_limit_s", self.time_limit_s)
        _positive(f"{path}.diverse_time_limit_s", self.diverse_time_limit_s)

    @property
    def parsed_constraints(self) -> list[Any]:
        """The constraints as :class:`puzzle.search.mip.Constraint` objects."""
        return [parse_constraint(text, f"search.constraints[{i}]") for i, text in enumerate(self.constraints)]


@dataclass(frozen=True, kw_only=True)
class GKDConfig(Section):
    """Global knowledge distillation of the realized child against the parent."""

    SECTION: ClassVar[str] = "gkd"

    token_budget: int = 4096
    """Training tokens (steps = budget / (batch_size x data.seq_len))."""
    batch_size: int = 4
    """Global batch in sequences (split across GPUs when data-parallel)."""
    lr: float = 1e-4
    """Peak AdamW learning rate (linear warm-up, then cosine decay to 10 %)."""
    warmup_fraction: float = 0.05
    """Share of steps spent warming up."""
    weight_cosine: float = 1.0
    """Weight of the sum over layers of (1 - cos(h_child, h_parent))."""
    weight_kl: float = 1.0
    """Weight of KL(parent || child) of the next-token distributions."""
    weight_lm: float = 0.0
    """Weight of the language-modelling loss; 0 as in the paper (it hurt, Table 17)."""
    checkpoint_every: int = 4
    """Steps between checkpoints (a killed run resumes from the last one)."""
    grad_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    seed: int = 0
    """Data order and initialisation seed."""

    def check(self, path: str) -> None:
        _non_negative(f"{path}.token_budget", self.token_budget)
        _positive(f"{path}.batch_size", self.batch_size)
        _positive(f"{path}.lr", self.lr)
        _fraction(f"{path}.warmup_fraction", self.warmup_fraction, open_low=False)
        for name in ("weight_cosine", "weight_kl", "weight_lm"):
            _non_negative(f"{path}.{name}", getattr(self, name))
        if self.weight_cosine + self.weight_kl + self.weight_lm <= 0:
            _fail(
                f"{path}.weight_kl",
                "and weight_cosine / weight_lm are all 0: at least one loss weight must be > 0",
            )
        _positive(f"{path}.checkpoint_every", self.checkpoint_every)


@dataclass(frozen=True, kw_only=True)
class WorkloadConfig(Section):
    """One serving workload: batch size, prompt length, generated tokens."""

    SECTION: ClassVar[str] = "workload"

    batch_size: int = 1
    """Sequences served together."""
    prompt_len: int = 64
    """Prompt tokens per sequence."""
    gen_len: int = 32
    """Generated tokens per sequence."""

    def check(self, path: str) -> None:
        for name in ("batch_size", "prompt_len", "gen_len"):
            _positive(f"{path}.{name}", getattr(self, name))
        if self.prompt_len + self.gen_len > 32768:
            _fail(path, "prompt_len + gen_len must be <= 32768")


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(Section):
    """Evaluation of the children (and baselines) against the parent: quality on held-out text and
    measured speed."""

    SECTION: ClassVar[str] = "evaluate"

    split: str = "eval"
    """The held-out split (a `data.splits` key)."""
    batch_size: int = 8
    """Sequences per forward pass."""
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    """The workload speed is measured at."""
    repeats: int = 3
    """Speed measurements per model (median)."""

    def check(self, path: str) -> None:
        _positive(f"{path}.batch_size", self.batch_size)
        _positive(f"{path}.repeats", self.repeats)


@dataclass(frozen=True, kw_only=True)
class ExportConfig(Section):
    """The exported Hugging Face checkpoint (Nemotron-NAS layout)."""

    SECTION: ClassVar[str] = "export"

    dtype: str = "auto"
    """`auto` keeps the child's dtype; or `float32`, `bfloat16`, `float16`."""
    max_shard_size: str = "2GB"
    """Largest safetensors file, e.g. `2GB`, `500MB`."""

    def check(self, path: str) -> None:
        _one_of(f"{path}.dtype", self.dtype, DTYPES)
        if not re.match(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|KiB|MiB|GiB)$", self.max_shard_size):
            _fail(f"{path}.max_shard_size", f"must look like '2GB' or '500MB', got {self.max_shard_size!r}")


@dataclass(frozen=True, kw_only=True)
class BaselinesConfig(Section):
    """Simpler ways to shrink the parent, at the same constraints and token budgets."""

    SECTION: ClassVar[str] = "baselines"

    methods: list[str] = field(default_factory=lambda: ["uniform_width", "layer_dropping"])
    """Any of uniform_width, layer_dropping, greedy, noop_only; empty: no baselines."""
    gkd: bool = True
    """Give each baseline the same GKD as the Puzzle child."""

    def check(self, path: str) -> None:
        for i, method in enumerate(self.methods):
            _one_of(f"{path}.methods[{i}]", method, BASELINES)
        if len(set(self.methods)) != len(self.methods):
            _fail(f"{path}.methods", f"lists a method twice: {self.methods}")


@dataclass(frozen=True, kw_only=True)
class TrackingConfig(Section):
    """MLflow tracking; nothing is logged when `uri` is null and MLFLOW_TRACKING_URI is unset."""

    SECTION: ClassVar[str] = "tracking"

    uri: str | None = "run-dir"
    """`http://host:5000`, `sqlite:///path/mlflow.db`, `file:./mlruns`, `run-dir` (a SQLite store
    under a local output root) or null (MLFLOW_TRACKING_URI, else no tracking)."""
    experiment: str = "puzzle"
    """MLflow experiment name."""

    def check(self, path: str) -> None:
        if self.uri is not None and not self.uri:
            _fail(f"{path}.uri", "must be null (no tracking) or a tracking URI, got ''")
        if not self.experiment:
            _fail(f"{path}.experiment", "must not be empty")


@dataclass(frozen=True, kw_only=True)
class GatesConfig(Section):
    """Promotion gates: the registered child becomes `champion` only when it meets both."""

    SECTION: ClassVar[str] = "gates"

    min_accuracy_kept: float = 0.9
    """Child next-token accuracy / parent's, on the evaluation split."""
    min_speedup: float = 1.3
    """Child measured throughput / parent's, at the evaluation workload."""

    def check(self, path: str) -> None:
        _fraction(f"{path}.min_accuracy_kept", self.min_accuracy_kept, open_low=False)
        _non_negative(f"{path}.min_speedup", self.min_speedup)


@dataclass(frozen=True, kw_only=True)
class RegistryConfig(Section):
    """MLflow Model Registry: where the exported child is registered (null name: not registered)."""

    SECTION: ClassVar[str] = "registry"

    model_name: str | None = None
    """Registered model the child becomes a version of (alias `candidate`; `champion` when it
    passes the gates); null: not registered."""
    gates: GatesConfig = field(default_factory=GatesConfig)
    """The promotion gates."""

    def check(self, path: str) -> None:
        if self.model_name is not None and not self.model_name.strip():
            _fail(f"{path}.model_name", "must be null (do not register) or a registered model name")


@dataclass(frozen=True, kw_only=True)
class RunConfig(Section):
    """Everything ``puzzle run`` needs, from the parent to the registry gate."""

    parent: str = "smollm2"
    """The model to compress: `smollm2` (the real SmolLM2-135M-Instruct, shipped offline), a Hugging
    Face directory, a `.gguf` file, an `s3://` prefix, `models:/NAME/VERSION` or a hub id."""
    output: str = "./puzzle-runs/default"
    """Root of every phase's output: a local directory or `s3://bucket/prefix`."""
    device: str = "auto"
    """Where the phases run: `auto` (CUDA when available, else CPU), `cpu`, `cuda`, `cuda:N`, `mps`."""
    data: DataConfig = field(default_factory=DataConfig)
    library: LibraryConfig = field(default_factory=LibraryConfig)
    bld: BLDConfig = field(default_factory=BLDConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    costs: CostsConfig = field(default_factory=CostsConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    gkd: GKDConfig = field(default_factory=GKDConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)

    def check(self, path: str = "") -> None:
        if not self.parent:
            _fail("parent", "must not be empty: use 'smollm2', a directory, a .gguf file or an s3:// URI")
        if not self.output:
            _fail("output", "must not be empty: a local directory or s3://bucket/prefix")
        _check_device("device", self.device)
        for name in SPLITS:
            if name not in self.data.splits:
                _fail(
                    "data.splits",
                    f"needs a '{name}' entry (number of sequences), got {sorted(self.data.splits)}",
                )
        for name in ("scoring", "evaluate"):
            split = getattr(self, name).split
            if split not in self.data.splits:
                _fail(
                    f"{name}.split",
                    f"must be one of data.splits ({', '.join(self.data.splits)}), got {split!r}",
                )
        bld_sequences = -(-self.bld.token_budget // self.data.seq_len)
        if bld_sequences > self.data.splits["bld"]:
            _fail(
                "bld.token_budget",
                f"({self.bld.token_budget}) needs {bld_sequences} sequences of "
                f"data.seq_len={self.data.seq_len} "
                f"(each variant sees every training token once), but data.splits.bld is "
                f"{self.data.splits['bld']}: raise data.splits.bld or lower bld.token_budget",
            )
        self._check_feasible()

    def _check_feasible(self) -> None:
        shape = parent_shape(self.parent)
        heads = shape.get("num_attention_heads")
        kv = shape.get("num_key_value_heads") or heads
        groups = [
            (b.get("attention") or {}).get("n_heads_in_group") for b in shape.get("block_configs") or []
        ]
        if heads and groups and all(isinstance(g, int) and g > 0 for g in groups):
            kv = max(heads // g for g in groups)  # a converted parent
        if heads and self.library.kv_heads:
            for i, n in enumerate(self.library.kv_heads):
                if heads % n or (kv and n > kv):
                    _fail(
                        f"library.kv_heads[{i}]",
                        f"must divide the parent's {heads} attention heads and be <= its {kv} KV heads, got "
                        f"{n}",
                    )
        only_parent = self.library.only_parent_blocks(kv)
        for i, c in enumerate(self.search.parsed_constraints):
            where = f"search.constraints[{i}]"
            if not c.relative:
                continue
            cheaper = (c.metric == "throughput" and c.value > 1.0) or (
                c.metric in ("memory", "params", "latency") and c.value < 1.0
            )
            if cheaper and only_parent:
                _fail(
                    where,
                    f"{c.text!r} is infeasible: the library holds only the parent's blocks, so no child is "
                    "cheaper than the parent; allow fewer kv_heads, ffn_fractions < 1, linear or no-op "
                    "variants",
                )
            if c.metric == "params" and c.value < 0.01:
                _fail(
                    where, f"{c.text!r} is infeasible: embeddings alone exceed 1% of any parent's parameters"
                )

    # ------------------------------------------------------------------ helpers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def digest(self) -> str:
        """A short hash of the whole configuration (for tags and run names)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def section_names() -> list[str]:
    """The names of the sections of :class:`RunConfig`, in order."""
    hints = typing.get_type_hints(RunConfig)
    return [f.name for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(hints[f.name])]


def section_type(name: str) -> type:
    """The dataclass of section ``name`` (``gkd`` -> :class:`GKDConfig`)."""
    hints = typing.get_type_hints(RunConfig)
    if name not in hints or not dataclasses.is_dataclass(hints[name]):
        raise ConfigError(f"unknown config section {name!r}; sections: {', '.join(section_names())}")
    return hints[name]


def parse_section(name: str, data: dict[str, Any] | None) -> Any:
    """Section ``name`` built and validated from a mapping (fields left out take their defaults);
    how a Kubeflow component turns its ``*_config`` dict back into the typed section."""
    return _build(section_type(name), data or {}, name)


# --------------------------------------------------------------------------- shared checks


def parent_shape(parent: str) -> dict[str, Any]:
    """The parent's ``config.json`` when it is a local directory (read as JSON, no model load)."""
    path = Path(parent)
    try:
        if (path / "config.json").is_file():
            data = json.loads((path / "config.json").read_text())
            return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}
    return {}


# --------------------------------------------------------------------------- typed parsing


_YAML11_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def type_name(tp: Any) -> str:
    """How a field's type reads in errors and in docs/config.md."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of name to {type_name(get_args(tp)[1])}"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "section"
    return {int: "integer", float: "number", bool: "true/false", str: "string"}.get(tp, str(tp))


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; dataclasses are built recursively."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError:
                continue
        _fail(path, f"must be {type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            _fail(path, f"must be {type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            _fail(path, f"must be a {type_name(tp)}, got {value!r}")
        (item,) = get_args(tp)
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            _fail(path, f"must be a {type_name(tp)}, got {value!r}")
        _, item = get_args(tp)
        return {str(k): _coerce(item, v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(tp, type):
            raise TypeError(f"{path}: annotation {tp!r} is a dataclass instance, not a dataclass type")
        return _build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            _fail(path, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            _fail(path, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT.match(value.strip()):
            return float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(path, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {path}")  # a bug in this module


def _build(cls: type, data: Any, path: str) -> Any:
    label = path or "the configuration"
    if data is None:
        data = {}
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        _fail(label, f"must be a mapping of fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in known:
            where = f"{path}.{key}" if path else str(key)
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown field {where}{hint}; known fields{' of ' + path if path else ''}: "
                f"{', '.join(known)}"
            )
    kwargs = {}
    for name in known:
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], f"{path}.{name}" if path else name)
        elif dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], {}, f"{path}.{name}" if path else name)
    token = _BUILD_PATH.set(path)
    try:
        return cls(**kwargs)
    finally:
        _BUILD_PATH.reset(token)


# --------------------------------------------------------------------------- documentation


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a config dataclass (its documentation), base classes first."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        if not tree.body or not isinstance(tree.body[0], ast.ClassDef):
            continue
        body = tree.body[0].body
        for node, after in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def describe_section(cls: type, prefix: str) -> list[tuple[str, str, Any, str]]:
    """``(path, type, default, doc)`` for every field of a section, nested sections flattened."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    defaults = _build(cls, {}, prefix)
    rows: list[tuple[str, str, Any, str]] = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe_section(hints[f.name], path))
            continue
        rows.append((path, type_name(hints[f.name]), getattr(defaults, f.name), docs.get(f.name, "")))
    return rows


def reference_markdown() -> str:
    """``docs/config.md``: every field of every section, generated from the dataclasses."""

    def cell(value: Any) -> str:
        return "`" + (json.dumps(value) if not isinstance(value, str) else value) + "`"

    lines = [
        "# Run configuration reference",
        "",
        "<!-- Generated from puzzle/config.py: `python -m puzzle.config > docs/config.md`; a test fails when "
        "stale. -->",
        "",
        "`puzzle run`, every phase command, the Kubeflow pipeline and the trigger service read one YAML file",
        "of the sections below. Fields left out take the defaults shown here, which are the embedded default",
        "(`puzzle run --print-config`); override one field with `--set section.field=value`. Loading "
        "validates",
        "every field before any model is loaded and names the field and the fix on error.",
        "",
        "| field | type | default | meaning |",
        "|---|---|---|---|",
    ]
    hints = typing.get_type_hints(RunConfig)
    top_docs = field_docs(RunConfig)
    defaults = RunConfig()
    for f in dataclasses.fields(RunConfig):
        if not dataclasses.is_dataclass(hints[f.name]):
            lines.append(
                f"| `{f.name}` | {type_name(hints[f.name])} | {cell(getattr(defaults, f.name))} | "
                f"{top_docs[f.name]} |"
            )
    for name in section_names():
        cls = section_type(name)
        lines += ["", f"## `{name}`", "", inspect.cleandoc(cls.__doc__ or ""), ""]
        lines += ["| field | type | default | meaning |", "|---|---|---|---|"]
        for path, tname, default, doc in describe_section(cls, name):
            lines.append(f"| `{path}` | {tname} | {cell(default)} | {doc} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- loading


def apply_overrides(
    data: dict[str, Any], overrides: list[str] | tuple[str, ...], *, base: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a raw config mapping.

    A mapping the raw data leaves out starts from ``base`` (the defaults, when None), so
    ``--set data.splits.score=16`` changes one split and keeps the others.
    """
    out = json.loads(json.dumps(data))
    defaults = base if base is not None else RunConfig().to_dict()
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r} must look like key.sub=value, e.g. --set gkd.lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: cannot parse value {raw!r} as YAML ({exc})") from exc
        default: Any
        node, default = out, defaults
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            default = default.get(part) if isinstance(default, dict) else None
            child = node.get(part)
            if child is None:
                child = node[part] = json.loads(json.dumps(default)) if isinstance(default, dict) else {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: depth + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def parse_config(data: dict[str, Any] | None) -> RunConfig:
    """Build and validate a :class:`RunConfig` from a mapping (no storage checks); fields left out
    take the dataclass defaults."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"the configuration must be a mapping of sections, got {data!r}")
    config = _build(RunConfig, data or {}, "")
    return config


def read_yaml(path: str) -> dict[str, Any]:
    """A config file (local path or s3:// URI) as a mapping, with clear errors."""
    from puzzle.io import storage

    try:
        text = storage.read_bytes(path).decode()
    except storage.StorageError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def check_storage(config: RunConfig) -> None:
    """Fail now, not hours in, when the output root or an s3:// input cannot be reached."""
    import os

    from puzzle.io import storage

    if (
        config.tracking.uri == "run-dir"
        and storage.is_s3(config.output)
        and not os.environ.get("MLFLOW_TRACKING_URI")
    ):
        raise ConfigError(
            "tracking.uri 'run-dir' keeps a SQLite MLflow store under the output root, which must then be "
            "local "
            f"(output is {config.output!r}): set tracking.uri to an MLflow server (http://host:5000), null, "
            "or set MLFLOW_TRACKING_URI"
        )
    try:
        storage.check_access(config.output, write=True)
    except storage.StorageError as exc:
        raise ConfigError(f"output {config.output!r} is not reachable: {exc}") from exc
    for name, uri in (("parent", config.parent), ("data.source", config.data.source)):
        if storage.is_s3(uri):
            try:
                storage.check_access(uri)
            except storage.StorageError as exc:
                raise ConfigError(f"{name} {uri!r} is not reachable: {exc}") from exc
        elif (
            name == "data.source" and uri != "stdlib" and not uri.startswith("hf:") and not Path(uri).exists()
        ):
            raise ConfigError(
                f"data.source {uri!r} does not exist: use 'stdlib' or a path / s3:// URI of text files"
            )


def load_config(
    path: str | None = None, overrides: list[str] | tuple[str, ...] = (), *, check_access: bool = True
) -> RunConfig:
    """Load, validate and (by default) check the storage of a run configuration.

    ``path`` None means the embedded default (the dataclass defaults). ``overrides`` are
    ``key.sub=value`` strings applied last.
    """
    data = read_yaml(path) if path else {}
    data = apply_overrides(data, overrides)
    config = parse_config(data)
    if check_access:
        check_storage(config)
    return config


if __name__ == "__main__":
    print(reference_markdown(), end="")
