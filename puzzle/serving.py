"""Which serving engines can load a Nemotron-NAS (DeciLM) model, and why not: the one set of rules.

Two readers use them. The export report (:func:`puzzle.child.export.engine_verdicts`) says, for
an exported child, which engines can serve it and why not; ``export.serve_with`` restricts the
block library (:func:`puzzle.library.variants.build_library`) to sub-blocks every named engine can
load, so the search never picks a child one of them cannot serve.

A rule is either

* model-level (:class:`ModelRule`): a feature of the whole model that an engine does not read
  (q/k norm, sliding window, biases); it comes from the parent and every child inherits it;
* sub-block (:class:`SubBlockRule`): an attention or FFN variant an engine cannot load (a linear
  layer, an FFN width that ``ffn_mult`` cannot express).

This module imports nothing heavy: the run configuration checks engine names with it before
anything loads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from puzzle.modeling import AttentionConfig, BlockConfig, DeciLMConfig, FFNConfig


@dataclass(frozen=True)
class Engine:
    """A serving engine that reads the Nemotron-NAS layout."""

    key: str
    """Its name in ``export.serve_with``."""
    name: str
    """How reports name it (the engine and the architecture it loads the checkpoint as)."""


ENGINES = (
    Engine("vllm", "vLLM (nemotron_nas)"),
    Engine("trtllm", "TensorRT-LLM (NemotronNASForCausalLM)"),
    Engine("llama.cpp", "llama.cpp (DECI)"),
    Engine("mlx", "mlx-lm (nemotron-nas)"),
)
ENGINE_KEYS = tuple(e.key for e in ENGINES)
_EVERY = frozenset(ENGINE_KEYS)

Part = Literal["attention", "ffn"]
Feature = Literal["linear", "odd_width"]

_FEATURES: dict[str, Callable[[Any], bool]] = {
    "linear": lambda sub: bool(sub.linear),
    "odd_width": lambda sub: not sub.engine_expressible,
}
"""What each sub-block feature is, on an AttentionConfig / FFNConfig."""


@dataclass(frozen=True)
class ModelRule:
    """A model-level feature some engines do not read."""

    reason: Callable[[DeciLMConfig], str | None]
    """Why the engines cannot load a model with this config, or None when the feature is absent."""
    engines: frozenset[str]


@dataclass(frozen=True)
class SubBlockRule:
    """A kind of attention or FFN sub-block some engines cannot load."""

    part: Part
    feature: Feature
    one: str
    """What a sub-block with the feature is, e.g. ``a linear FFN (...)``."""
    engines: frozenset[str]
    many: str = ""
    """The same for several layers (``layers 2, 5 use <many>``); empty: ``one``."""

    def applies(self, sub: AttentionConfig | FFNConfig) -> bool:
        return sub.LABEL == self.part and _FEATURES[self.feature](sub)


def _sliding_window(config: DeciLMConfig) -> str | None:
    window = config.sliding_window
    return f"sliding window {window} (Mistral) is not read" if window else None


def _biases(config: DeciLMConfig) -> str | None:
    return (
        "attention/MLP biases are not read"
        if config.qkv_bias or config.o_proj_bias or config.mlp_bias
        else None
    )


_LINEAR_NOT_READ = "replace_with_linear is not read"

RULES: tuple[ModelRule | SubBlockRule, ...] = (
    SubBlockRule(
        "ffn",
        "odd_width",
        one="an FFN width that ffn_mult cannot express (not a multiple of 256)",
        many="FFN widths that ffn_mult cannot express (not multiples of 256)",
        engines=_EVERY,
    ),
    ModelRule(lambda c: "q/k RMSNorm (Qwen3) is not read" if c.qk_norm else None, _EVERY),
    ModelRule(_sliding_window, _EVERY),
    ModelRule(_biases, frozenset({"trtllm", "llama.cpp", "mlx"})),
    SubBlockRule(
        "attention",
        "linear",
        one=f"a linear attention ({_LINEAR_NOT_READ})",
        engines=frozenset({"vllm"}),
    ),
    SubBlockRule(
        "ffn",
        "linear",
        one=f"a linear FFN ({_LINEAR_NOT_READ})",
        engines=frozenset({"vllm"}),
    ),
    SubBlockRule(
        "ffn",
        "linear",
        one="a linear FFN (the DECI converter supports only linear attention)",
        engines=frozenset({"llama.cpp"}),
    ),
)
"""Every rule, in the order reports list the reasons."""


def engine(key: str) -> Engine:
    """The engine called ``key`` in ``export.serve_with``."""
    for e in ENGINES:
        if e.key == key:
            return e
    raise ValueError(f"unknown serving engine {key!r}; engines: {', '.join(ENGINE_KEYS)}")


def _rules(key: str) -> list[ModelRule | SubBlockRule]:
    engine(key)  # an unknown key is an error, not "no rules"
    return [rule for rule in RULES if key in rule.engines]


def fmt_layers(layers: list[int]) -> str:
    """``layer 3`` or ``layers 0, 1, 2`` (at most 8 listed)."""
    return (
        ("layer " if len(layers) == 1 else "layers ")
        + ", ".join(map(str, layers[:8]))
        + (", ..." if len(layers) > 8 else "")
    )


def model_reasons(key: str, config: DeciLMConfig) -> list[str]:
    """Why engine ``key`` cannot load any model with ``config``'s model-level features (empty: it can)."""
    found = (rule.reason(config) for rule in _rules(key) if isinstance(rule, ModelRule))
    return [reason for reason in found if reason]


def sub_block_reasons(key: str, sub: AttentionConfig | FFNConfig) -> list[str]:
    """Why engine ``key`` cannot load the attention or FFN sub-block ``sub`` (empty: it can)."""
    return [rule.one for rule in _rules(key) if isinstance(rule, SubBlockRule) and rule.applies(sub)]


def feature_reasons(key: str, part: Part, feature: Feature) -> list[str]:
    """Why engine ``key`` cannot load any ``part`` sub-block with ``feature`` (``linear``, ``odd_width``);
    for checks made before a model exists (the run configuration)."""
    return [
        rule.one
        for rule in _rules(key)
        if isinstance(rule, SubBlockRule) and (rule.part, rule.feature) == (part, feature)
    ]


def block_reasons(key: str, block: BlockConfig) -> list[str]:
    """Why engine ``key`` cannot load a layer that is ``block`` (empty: it can)."""
    return [
        f"{sub.name}: {rule.one}"
        for rule in _rules(key)
        if isinstance(rule, SubBlockRule)
        for sub in (block.attention, block.ffn)
        if rule.applies(sub)
    ]


def reasons(key: str, config: DeciLMConfig) -> list[str]:
    """Why engine ``key`` cannot load the model ``config`` describes, every layer included (empty: it
    can); the reasons the export report gives."""
    blocks = config.blocks
    out: list[str] = []
    for rule in _rules(key):
        if isinstance(rule, ModelRule):
            reason = rule.reason(config)
            if reason:
                out.append(reason)
            continue
        layers = [i for i, b in enumerate(blocks) if rule.applies(b.attention) or rule.applies(b.ffn)]
        if layers:
            out.append(f"{fmt_layers(layers)} use {rule.many or rule.one}")
    return out
