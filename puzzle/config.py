"""The one run configuration: a YAML file loaded into frozen, validated dataclasses.

``puzzle run``, the Kubeflow pipeline and the trigger service all read this. Loading checks
everything that can be checked without loading a model, and fails with a :class:`ConfigError`
naming the field and the fix:

* unknown fields (``bld.lrr``: "unknown field bld.lrr; known fields: ..."), wrong types
  (``bld.lr must be a number, got 'fast'``), bad values (``bld.lr must be > 0, got -1``);
* the constraint syntax (``search.constraints[0]``: ``throughput>=1.5x``) and constraints no
  child can meet (``throughput>=2x`` with a search space that holds only the parent's blocks);
* that the output root (a local directory or ``s3://bucket/prefix``) and any ``s3://`` input
  can be reached, through :func:`puzzle.storage.check_access`.

Every field has a default; the embedded default (``puzzle/configs/default.yaml``) is what
``puzzle run`` uses without ``--config``. ``docs/config.md`` documents every field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from puzzle.errors import PuzzleError

DEFAULT_CONFIG = "default.yaml"


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


# --------------------------------------------------------------------------- constraints


def parse_constraint(text: Any, path: str) -> Any:
    """A search constraint (``throughput>=1.5x``, ``memory<=2GiB``, ...) parsed by the search
    itself (:class:`puzzle.search.Constraint`), so that the config accepts exactly what the search
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
class DataConfig:
    """Token data: where the text comes from and how it is cut into fixed-length sequences."""

    source: str = "stdlib"
    """``stdlib`` (the embedded corpus: Python standard library sources and docs), or a local
    path / ``s3://`` URI of a text file or a directory of ``.txt``/``.md`` files."""
    seq_len: int = 128
    splits: dict[str, int] = field(
        default_factory=lambda: {"calibration": 32, "bld": 256, "score": 32, "gkd": 256, "eval": 64}
    )
    """Number of sequences per split. ``calibration`` initialises the library, ``bld`` trains
    blocks, ``score`` scores them, ``gkd`` trains the child, ``eval`` is held out for evaluation."""
    seed: int = 0

    REQUIRED_SPLITS = ("calibration", "bld", "score", "gkd", "eval")

    def check(self, path: str) -> None:
        if not self.source:
            _fail(f"{path}.source", "must not be empty: use 'stdlib' or a path / s3:// URI of text files")
        _positive(f"{path}.seq_len", self.seq_len)
        if self.seq_len < 8:
            _fail(f"{path}.seq_len", f"must be >= 8, got {self.seq_len}")
        for name in self.REQUIRED_SPLITS:
            if name not in self.splits:
                _fail(
                    f"{path}.splits",
                    f"needs a '{name}' entry (number of sequences), got {sorted(self.splits)}",
                )
        for name, count in self.splits.items():
            _positive(f"{path}.splits.{name}", count)


@dataclass(frozen=True, kw_only=True)
class SearchSpaceConfig:
    """Which block variants the library holds for every layer (DESIGN §3.2)."""

    kv_heads: list[int] | None = None
    """KV-head counts of GQA attention variants; null = every divisor of the parent's count."""
    attention_linear: bool = True
    attention_noop: bool = True
    ffn_fractions: list[float] = field(default_factory=lambda: [1.0, 0.875, 0.75, 0.5, 0.25, 0.2, 0.1])
    """FFN intermediate sizes as fractions of the parent's (rounded to multiples of 256 when
    the parent's width is one; 1.0 is the parent's FFN)."""
    ffn_linear: bool = True
    ffn_noop: bool = True

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

    def only_parent_blocks(self, parent_kv_heads: int | None) -> bool:
        """True when no variant can be cheaper than the parent's (so no speedup is possible).

        ``parent_kv_heads`` None (the parent's shape is not known without loading it) counts any
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
class BLDConfig:
    """Blockwise local distillation: each variant trained alone on the parent's activations."""

    token_budget: int = 32768
    """Training tokens per block variant, at most ``data.splits.bld`` x ``data.seq_len``."""
    batch_size: int = 8
    lr: float = 1e-3
    warmup_fraction: float = 0.05
    seed: int = 0
    device: str = "auto"
    shards: int = 1
    """Independent shards (groups of layers x variants) trained separately and merged."""

    def check(self, path: str) -> None:
        _non_negative(f"{path}.token_budget", self.token_budget)
        _positive(f"{path}.batch_size", self.batch_size)
        _positive(f"{path}.lr", self.lr)
        _fraction(f"{path}.warmup_fraction", self.warmup_fraction, open_low=False)
        _positive(f"{path}.shards", self.shards)
        _check_device(f"{path}.device", self.device)


SCORE_METRICS = ("kl_div", "lm_loss", "cosine", "top1_agreement", "top5_agreement")


@dataclass(frozen=True, kw_only=True)
class ScoringConfig:
    """Replace-1-block scoring on held-out tokens (DESIGN §3.4)."""

    metrics: list[str] = field(default_factory=lambda: ["kl_div", "lm_loss", "cosine", "top1_agreement"])
    split: str = "score"
    batch_size: int = 8
    device: str = "auto"
    shards: int = 1

    def check(self, path: str) -> None:
        if not self.metrics:
            _fail(f"{path}.metrics", f"must list at least one of {', '.join(SCORE_METRICS)}")
        for i, metric in enumerate(self.metrics):
            if metric not in SCORE_METRICS:
                _fail(f"{path}.metrics[{i}]", f"must be one of {', '.join(SCORE_METRICS)}, got {metric!r}")
        _positive(f"{path}.batch_size", self.batch_size)
        _positive(f"{path}.shards", self.shards)
        _check_device(f"{path}.device", self.device)


@dataclass(frozen=True, kw_only=True)
class CostsConfig:
    """Measured per-block costs on the target hardware (DESIGN §3.5)."""

    batch_sizes: list[int] = field(default_factory=lambda: [1])
    prompt_len: int = 64
    gen_len: int = 64
    device: str = "auto"
    dtype: str = "auto"
    """``auto``: bfloat16 on CUDA, float32 on CPU."""
    repeats: int = 3

    def check(self, path: str) -> None:
        if not self.batch_sizes:
            _fail(f"{path}.batch_sizes", "must list at least one batch size")
        for i, b in enumerate(self.batch_sizes):
            _positive(f"{path}.batch_sizes[{i}]", b)
        _positive(f"{path}.prompt_len", self.prompt_len)
        _positive(f"{path}.gen_len", self.gen_len)
        _positive(f"{path}.repeats", self.repeats)
        _check_device(f"{path}.device", self.device)
        _check_dtype(f"{path}.dtype", self.dtype)


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """The MIP search (DESIGN §3.6)."""

    objective: str = "kl_div"
    """The score column to minimise (``top1_agreement``/``top5_agreement``/``cosine`` are maximised)."""
    constraints: list[str] = field(default_factory=lambda: ["throughput>=1.5x"])
    num_solutions: int = 1
    alpha: float = 0.8
    """Diversity: each next solution shares at most alpha * num_layers choices with earlier ones."""
    time_limit_s: float = 60.0

    def check(self, path: str) -> None:
        if self.objective not in SCORE_METRICS:
            _fail(f"{path}.objective", f"must be one of {', '.join(SCORE_METRICS)}, got {self.objective!r}")
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

    @property
    def parsed_constraints(self) -> list[Any]:
        """The constraints as :class:`puzzle.search.Constraint` objects."""
        return [parse_constraint(text, f"search.constraints[{i}]") for i, text in enumerate(self.constraints)]


@dataclass(frozen=True, kw_only=True)
class GKDConfig:
    """Global knowledge distillation of the realized child against the parent (DESIGN §3.8)."""

    token_budget: int = 32768
    batch_size: int = 8
    lr: float = 1e-4
    warmup_fraction: float = 0.05
    weight_cosine: float = 1.0
    """Weight of sum over layers of (1 - cos(h_child, h_parent))."""
    weight_kl: float = 1.0
    """Weight of KL(parent || child) on next-token distributions."""
    weight_lm: float = 0.0
    """Weight of the language-modelling loss; 0 as in the paper (it hurt, Table 17)."""
    checkpoint_every: int = 50
    """Steps between checkpoints (a killed run resumes from the last one)."""
    grad_checkpointing: bool = False
    seed: int = 0
    device: str = "auto"

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
        _check_device(f"{path}.device", self.device)


@dataclass(frozen=True, kw_only=True)
class WorkloadConfig:
    """The inference workload speed is measured at: batch, prompt length, generated tokens."""

    batch_size: int = 1
    prompt_len: int = 64
    gen_len: int = 64

    def check(self, path: str) -> None:
        _positive(f"{path}.batch_size", self.batch_size)
        _positive(f"{path}.prompt_len", self.prompt_len)
        _positive(f"{path}.gen_len", self.gen_len)


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    """Evaluation of the children (and baselines) against the parent (DESIGN §3.9)."""

    split: str = "eval"
    batch_size: int = 8
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    device: str = "auto"
    repeats: int = 3
    lm_eval_tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks, run only when ``lm_eval`` and the task data are available."""

    def check(self, path: str) -> None:
        _positive(f"{path}.batch_size", self.batch_size)
        _positive(f"{path}.repeats", self.repeats)
        self.workload.check(f"{path}.workload")
        _check_device(f"{path}.device", self.device)


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """The exported Hugging Face checkpoint (Nemotron-NAS layout)."""

    dtype: str = "auto"
    """``auto`` keeps the child's dtype; or ``float32``, ``bfloat16``, ``float16``."""

    def check(self, path: str) -> None:
        _check_dtype(f"{path}.dtype", self.dtype)


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    """MLflow tracking; nothing is logged when ``uri`` is null and MLFLOW_TRACKING_URI is unset."""

    uri: str | None = None
    """``http://host:5000``, ``sqlite:///path/mlflow.db``, ``file:./mlruns``, or ``run-dir`` for a
    SQLite store under the run's output root (local output only)."""
    experiment: str = "puzzle"

    def check(self, path: str) -> None:
        if self.uri is not None and not self.uri:
            _fail(f"{path}.uri", "must be null (no tracking) or a tracking URI, got ''")
        if not self.experiment:
            _fail(f"{path}.experiment", "must not be empty")


@dataclass(frozen=True, kw_only=True)
class GatesConfig:
    """Promotion gates: the child becomes ``champion`` only when it meets both."""

    min_accuracy_kept: float = 0.9
    """Child next-token accuracy / parent's, on the eval split."""
    min_speedup: float = 1.3
    """Child measured throughput / parent's, at the evaluation workload."""

    def check(self, path: str) -> None:
        _fraction(f"{path}.min_accuracy_kept", self.min_accuracy_kept, open_low=False)
        _non_negative(f"{path}.min_speedup", self.min_speedup)


@dataclass(frozen=True, kw_only=True)
class RegistryConfig:
    """MLflow Model Registry: where the exported child is registered (null name: not registered)."""

    model_name: str | None = None
    gates: GatesConfig = field(default_factory=GatesConfig)

    def check(self, path: str) -> None:
        if self.model_name is not None and not self.model_name.strip():
            _fail(f"{path}.model_name", "must be null (do not register) or a registered model name")
        self.gates.check(f"{path}.gates")


BASELINES = ("uniform_width", "layer_dropping", "greedy", "noop_only")


@dataclass(frozen=True, kw_only=True)
class BaselinesConfig:
    """Simpler ways to shrink the parent, at the same speed target and token budgets."""

    methods: list[str] = field(default_factory=lambda: ["uniform_width", "layer_dropping"])
    gkd: bool = True
    """Give each baseline the same GKD token budget as the Puzzle child."""

    def check(self, path: str) -> None:
        for i, method in enumerate(self.methods):
            if method not in BASELINES:
                _fail(f"{path}.methods[{i}]", f"must be one of {', '.join(BASELINES)}, got {method!r}")
        if len(set(self.methods)) != len(self.methods):
            _fail(f"{path}.methods", f"lists a method twice: {self.methods}")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything ``puzzle run`` needs, from the parent to the registry gate."""

    parent: str = "smollm2"
    """``smollm2`` (the real SmolLM2-135M-Instruct), a Hugging Face directory, a ``.gguf`` file,
    an ``s3://`` prefix, ``models:/NAME/VERSION`` or a hub id."""
    output: str = "./puzzle-runs/default"
    """Root directory (or ``s3://bucket/prefix``) that holds every phase's output."""
    data: DataConfig = field(default_factory=DataConfig)
    search_space: SearchSpaceConfig = field(default_factory=SearchSpaceConfig)
    bld: BLDConfig = field(default_factory=BLDConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    costs: CostsConfig = field(default_factory=CostsConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    gkd: GKDConfig = field(default_factory=GKDConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)

    def check(self, path: str = "") -> None:
        if not self.parent:
            _fail("parent", "must not be empty: use 'smollm2', a directory, a .gguf file or an s3:// URI")
        if not self.output:
            _fail("output", "must not be empty: a local directory or s3://bucket/prefix")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.check(f.name)
        if self.scoring.split not in self.data.splits:
            _fail(
                "scoring.split",
                f"must be one of data.splits ({', '.join(self.data.splits)}), got {self.scoring.split!r}",
            )
        if self.evaluate.split not in self.data.splits:
            _fail(
                "evaluate.split",
                f"must be one of data.splits ({', '.join(self.data.splits)}), got {self.evaluate.split!r}",
            )
        bld_sequences = -(-self.bld.token_budget // self.data.seq_len)
        if bld_sequences > self.data.splits["bld"]:
            _fail(
                "bld.token_budget",
                f"({self.bld.token_budget}) needs {bld_sequences} sequences of data.seq_len={self.data.seq_len} "
                f"(each variant sees every training token once), but data.splits.bld is {self.data.splits['bld']}: "
                "raise data.splits.bld or lower bld.token_budget",
            )
        if self.evaluate.workload.prompt_len + self.evaluate.workload.gen_len > 32768:
            _fail("evaluate.workload", "prompt_len + gen_len must be <= 32768")
        self._check_feasible()

    def _check_feasible(self) -> None:
        shape = parent_shape(self.parent)
        heads = shape.get("num_attention_heads")
        kv = shape.get("num_key_value_heads") or heads
        groups = [
            (b.get("attention") or {}).get("n_heads_in_group") for b in shape.get("block_configs") or []
        ]
        if heads and groups and all(isinstance(g, int) and g > 0 for g in groups):
            kv = max(heads // g for g in groups)  # a converted parent (child artifact)
        if heads and self.search_space.kv_heads:
            for i, n in enumerate(self.search_space.kv_heads):
                if heads % n or (kv and n > kv):
                    _fail(
                        f"search_space.kv_heads[{i}]",
                        f"must divide the parent's {heads} attention heads and be <= its {kv} KV heads, got {n}",
                    )
        only_parent = self.search_space.only_parent_blocks(kv)
        for i, c in enumerate(self.search.parsed_constraints):
            where = f"search.constraints[{i}]"
            if not c.relative:
                continue
            if c.metric == "throughput" and c.value > 1.0 and only_parent:
                _fail(
                    where,
                    f"{c.text!r} is infeasible: search_space holds only the parent's blocks, so no child is "
                    "faster than the parent; allow fewer kv_heads, ffn_fractions < 1, linear or no-op variants",
                )
            if c.metric in ("memory", "params") and c.value < 1.0 and only_parent:
                _fail(where, f"{c.text!r} is infeasible: search_space holds only the parent's blocks")
            if c.metric == "latency" and c.value < 1.0 and only_parent:
                _fail(where, f"{c.text!r} is infeasible: search_space holds only the parent's blocks")
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

    def phase_uri(self, phase: str) -> str:
        """Where a phase's output lives under the output root (``child``, ``tokens``, ...)."""
        from puzzle.io import storage

        return storage.join(self.output, phase)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


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


DEVICES = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?|mps)$")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _check_device(path: str, value: str) -> None:
    if not DEVICES.match(value):
        _fail(path, f"must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {value!r}")


def _check_dtype(path: str, value: str) -> None:
    if value not in DTYPES:
        _fail(path, f"must be one of {', '.join(DTYPES)}, got {value!r}")


# --------------------------------------------------------------------------- typed parsing


_YAML11_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of name to {_type_name(get_args(tp)[1])}"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


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
        _fail(path, f"must be {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            _fail(path, f"must be {_type_name(tp)}, got {value!r}")
        (item,) = get_args(tp)
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            _fail(path, f"must be {_type_name(tp)}, got {value!r}")
        _, item = get_args(tp)
        return {str(k): _coerce(item, v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
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
    if not isinstance(data, dict):
        _fail(label, f"must be a mapping of fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in known:
            where = f"{path}.{key}" if path else str(key)
            close = _closest(str(key), known)
            hint = f" (did you mean {close!r}?)" if close else ""
            raise ConfigError(
                f"unknown field {where}{hint}; known fields{' of ' + path if path else ''}: {', '.join(known)}"
            )
    kwargs = {}
    for name in known:
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], f"{path}.{name}" if path else name)
    return cls(**kwargs)


def _closest(name: str, candidates: list[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return match[0] if match else None


# --------------------------------------------------------------------------- loading


def default_config_text() -> str:
    """The embedded default configuration (``puzzle/configs/default.yaml``)."""
    return resources.files("puzzle").joinpath("configs", DEFAULT_CONFIG).read_text()


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a raw config mapping."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r} must look like key.sub=value, e.g. --set gkd.lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: cannot parse value {raw!r} as YAML ({exc})") from exc
        node = out
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: depth + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def parse_config(data: dict[str, Any] | None, *, base: dict[str, Any] | None = None) -> RunConfig:
    """Build and validate a :class:`RunConfig` from a mapping (no storage checks).

    ``base`` (the embedded default when None) supplies every field ``data`` leaves out.
    """
    merged = _deep_merge(base if base is not None else yaml.safe_load(default_config_text()), data or {})
    config = _build(RunConfig, merged, "")
    config.check()
    return config


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(top, dict):
        raise ConfigError(f"the configuration must be a mapping of sections, got {top!r}")
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "splits":
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


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
            "tracking.uri 'run-dir' keeps a SQLite MLflow store under the output root, which must then be local "
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
        elif name == "data.source" and uri != "stdlib" and not Path(uri).exists():
            raise ConfigError(
                f"data.source {uri!r} does not exist: use 'stdlib' or a path / s3:// URI of text files"
            )


def load_config(
    path: str | None = None, overrides: list[str] | tuple[str, ...] = (), *, check_access: bool = True
) -> RunConfig:
    """Load, validate and (by default) check the storage of a run configuration.

    ``path`` None means the embedded default. Fields a file leaves out take the embedded
    default's values. ``overrides`` are ``key.sub=value`` strings applied last.
    """
    data = read_yaml(path) if path else {}
    data = apply_overrides(data, overrides)
    config = parse_config(data)
    if check_access:
        check_storage(config)
    return config
