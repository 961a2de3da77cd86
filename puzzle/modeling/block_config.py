"""Per-layer architecture of a heterogeneous (Nemotron-NAS / DeciLM layout) child.

This file is copied verbatim into every exported checkpoint next to the modeling code, so it
imports nothing but the standard library.

A layer is an attention sub-block and an FFN sub-block. Each is one of:

* attention: grouped-query attention with its own number of KV heads, a single linear layer
  (H x H: every token attends only to itself), or no-op (no weights, no norm);
* FFN: a SwiGLU MLP with its own intermediate size, a single linear layer (H x H), or no-op.

They convert exactly to and from the ``block_configs`` entries of ``config.json`` that vLLM,
TensorRT-LLM, llama.cpp and mlx-lm read::

    {"attention": {"n_heads_in_group": 8, "no_op": false, "replace_with_linear": false},
     "ffn": {"ffn_mult": 5.25, "no_op": false, "replace_with_linear": false}}

Engines compute the FFN width as ``round_up(int(2 * ffn_mult * hidden / 3), 256)``. A width the
formula cannot reproduce (one that is not a multiple of 256) is written with an extra
``intermediate_size`` key that our modeling code reads and that those engines do not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # typing.Self is Python 3.11+; exported checkpoints may load on 3.10
    from typing import Self

FFN_WIDTH_MULTIPLE = 256


class BlockConfigError(ValueError):
    """A block configuration is invalid; the message names the field and the fix."""


def engine_ffn_width(ffn_mult: float, hidden_size: int) -> int:
    """The FFN width serving engines derive from ``ffn_mult`` (vLLM ``nemotron_nas``, TRT-LLM)."""
    width = int(2 * ffn_mult * hidden_size / 3)
    return int(math.ceil(width / FFN_WIDTH_MULTIPLE) * FFN_WIDTH_MULTIPLE)


def ffn_mult_for_width(width: int, hidden_size: int) -> float | None:
    """The shortest decimal ``ffn_mult`` for which the engines' formula gives ``width``.

    Returns None when no ``ffn_mult`` can express the width (it is not a multiple of 256).
    """
    if width <= 0 or width % FFN_WIDTH_MULTIPLE:
        return None
    exact = 1.5 * width / hidden_size
    # The exact multiplier when it is a short decimal (5.25 for 28672/8192), else the shortest
    # decimal that still maps back to the width.
    if abs(round(exact, 6) - exact) < 1e-12 and engine_ffn_width(round(exact, 6), hidden_size) == width:
        return float(round(exact, 6))
    for digits in range(0, 13):
        for candidate in (round(exact, digits), math.ceil(exact * 10**digits) / 10**digits):
            if candidate > 0 and engine_ffn_width(candidate, hidden_size) == width:
                return float(candidate)
    return None


@dataclass(frozen=True, kw_only=True)
class SubBlockConfig:
    """A sub-block: sized (GQA / SwiGLU, its size in the subclass's ``SIZE`` field), a linear layer,
    or no-op; named ``<PREFIX><SIZE_TAG><size>``, ``<PREFIX>linear`` or ``<PREFIX>noop``."""

    LABEL: ClassVar[str]
    """How errors name it (``attention``, ``ffn``)."""
    PREFIX: ClassVar[str]
    SIZE: ClassVar[str]
    SIZE_TAG: ClassVar[str]
    SIZE_HINT: ClassVar[str]

    linear: bool = False
    no_op: bool = False

    def __init_subclass__(
        cls, *, label: str, prefix: str, size: str, tag: str, hint: str, **kwargs: Any
    ) -> None:
        super().__init_subclass__(**kwargs)
        cls.LABEL, cls.PREFIX, cls.SIZE, cls.SIZE_TAG, cls.SIZE_HINT = label, prefix, size, tag, hint

    @property
    def size(self) -> int | None:
        value: int | None = getattr(self, self.SIZE)
        return value

    def __post_init__(self) -> None:
        size = self.size
        if int(size is not None) + int(self.linear) + int(self.no_op) != 1:
            raise BlockConfigError(
                f"{self.LABEL} must be exactly one of {self.SIZE}=<int>, linear=True or no_op=True, "
                f"got {self.SIZE}={size}, linear={self.linear}, no_op={self.no_op}"
            )
        if size is not None and (not isinstance(size, int) or size <= 0):
            raise BlockConfigError(f"{self.LABEL}.{self.SIZE} must be a positive integer, got {size!r}")

    @property
    def name(self) -> str:
        """Stable short name used in libraries, score tables and reports."""
        if self.no_op:
            return f"{self.PREFIX}noop"
        if self.linear:
            return f"{self.PREFIX}linear"
        return f"{self.PREFIX}{self.SIZE_TAG}{self.size}"

    @classmethod
    def from_name(cls, name: str) -> Self:
        if name == f"{cls.PREFIX}noop":
            return cls(no_op=True)
        if name == f"{cls.PREFIX}linear":
            return cls(linear=True)
        sized = f"{cls.PREFIX}{cls.SIZE_TAG}"
        if name.startswith(sized) and name[len(sized) :].isdigit():
            sizes: dict[str, Any] = {cls.SIZE: int(name[len(sized) :])}
            return cls(**sizes)
        kind = "FFN" if cls.LABEL == "ffn" else cls.LABEL
        raise BlockConfigError(
            f"unknown {kind} variant name {name!r}: expected {sized}{cls.SIZE_HINT}, {cls.PREFIX}linear or "
            f"{cls.PREFIX}noop"
        )

    @classmethod
    def _unsized_from_json(cls, data: Any) -> Self | None:
        """The no-op or linear sub-block a ``block_configs`` entry describes, else None (sized)."""
        if not isinstance(data, dict):
            raise BlockConfigError(f"block_configs[].{cls.LABEL} must be an object, got {data!r}")
        if data.get("no_op"):
            return cls(no_op=True)
        if data.get("replace_with_linear"):
            return cls(linear=True)
        return None


@dataclass(frozen=True, kw_only=True)
class AttentionConfig(
    SubBlockConfig, label="attention", prefix="attn_", size="num_kv_heads", tag="kv", hint="<N>"
):
    """One layer's attention: GQA with ``num_kv_heads``, a linear layer, or no-op."""

    num_kv_heads: int | None = None

    @property
    def is_gqa(self) -> bool:
        return self.num_kv_heads is not None

    def validate_for(self, num_attention_heads: int) -> None:
        if self.num_kv_heads is not None and num_attention_heads % self.num_kv_heads:
            raise BlockConfigError(
                f"attention.num_kv_heads={self.num_kv_heads} does not divide "
                f"num_attention_heads={num_attention_heads}; use one of "
                f"{divisors(num_attention_heads)}"
            )

    def to_json(self, num_attention_heads: int) -> dict[str, Any]:
        self.validate_for(num_attention_heads)
        return {
            "n_heads_in_group": (
                num_attention_heads // self.num_kv_heads if self.num_kv_heads is not None else None
            ),
            "no_op": self.no_op,
            "replace_with_linear": self.linear,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], num_attention_heads: int) -> AttentionConfig:
        unsized = cls._unsized_from_json(data)
        if unsized is not None:
            return unsized
        group = data.get("n_heads_in_group")
        if not isinstance(group, int) or group <= 0 or num_attention_heads % group:
            raise BlockConfigError(
                f"block_configs[].attention.n_heads_in_group must be a positive divisor of "
                f"num_attention_heads={num_attention_heads}, got {group!r}"
            )
        return cls(num_kv_heads=num_attention_heads // group)


@dataclass(frozen=True, kw_only=True)
class FFNConfig(SubBlockConfig, label="ffn", prefix="ffn_", size="intermediate_size", tag="", hint="<width>"):
    """One layer's FFN: SwiGLU with ``intermediate_size``, a linear layer, or no-op."""

    intermediate_size: int | None = None

    @property
    def is_mlp(self) -> bool:
        return self.intermediate_size is not None

    def to_json(self, hidden_size: int) -> dict[str, Any]:
        out: dict[str, Any] = {"ffn_mult": None, "no_op": self.no_op, "replace_with_linear": self.linear}
        if self.intermediate_size is not None:
            mult = ffn_mult_for_width(self.intermediate_size, hidden_size)
            if mult is None:
                # Not expressible by the engines' formula: keep the exact width for our code and
                # the nearest multiplier for readers that only know ffn_mult.
                out["ffn_mult"] = round(1.5 * self.intermediate_size / hidden_size, 6)
                out["intermediate_size"] = self.intermediate_size
            else:
                out["ffn_mult"] = mult
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], hidden_size: int) -> FFNConfig:
        unsized = cls._unsized_from_json(data)
        if unsized is not None:
            return unsized
        if data.get("intermediate_size") is not None:
            return cls(intermediate_size=int(data["intermediate_size"]))
        mult = data.get("ffn_mult")
        if not isinstance(mult, (int, float)) or mult <= 0:
            raise BlockConfigError(f"block_configs[].ffn.ffn_mult must be a positive number, got {mult!r}")
        return cls(intermediate_size=engine_ffn_width(float(mult), hidden_size))

    @property
    def engine_expressible(self) -> bool:
        return self.intermediate_size is None or self.intermediate_size % FFN_WIDTH_MULTIPLE == 0


@dataclass(frozen=True, kw_only=True)
class BlockConfig:
    """One decoder layer: an attention sub-block and an FFN sub-block."""

    attention: AttentionConfig
    ffn: FFNConfig

    @property
    def name(self) -> str:
        return f"{self.attention.name}+{self.ffn.name}"

    @classmethod
    def from_name(cls, name: str) -> BlockConfig:
        attn, sep, ffn = name.partition("+")
        if not sep:
            raise BlockConfigError(f"block name {name!r} must look like '<attention>+<ffn>'")
        return cls(attention=AttentionConfig.from_name(attn), ffn=FFNConfig.from_name(ffn))

    def to_json(self, *, hidden_size: int, num_attention_heads: int) -> dict[str, Any]:
        return {
            "attention": self.attention.to_json(num_attention_heads),
            "ffn": self.ffn.to_json(hidden_size),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], *, hidden_size: int, num_attention_heads: int) -> BlockConfig:
        if not isinstance(data, dict) or "attention" not in data or "ffn" not in data:
            raise BlockConfigError(f"each block_configs entry needs 'attention' and 'ffn', got {data!r}")
        return cls(
            attention=AttentionConfig.from_json(data["attention"], num_attention_heads),
            ffn=FFNConfig.from_json(data["ffn"], hidden_size),
        )


def divisors(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def parse_block_configs(
    raw: list[Any], *, hidden_size: int, num_attention_heads: int, num_hidden_layers: int
) -> list[BlockConfig]:
    """Parse ``config.json``'s ``block_configs`` (dicts or BlockConfig objects), checking length."""
    if not isinstance(raw, (list, tuple)) or len(raw) != num_hidden_layers:
        raise BlockConfigError(
            f"block_configs must be a list with one entry per layer ({num_hidden_layers}), "
            f"got {len(raw) if isinstance(raw, (list, tuple)) else type(raw).__name__}"
        )
    out = []
    for entry in raw:
        if isinstance(entry, BlockConfig):
            entry.attention.validate_for(num_attention_heads)
            out.append(entry)
        else:
            out.append(
                BlockConfig.from_json(entry, hidden_size=hidden_size, num_attention_heads=num_attention_heads)
            )
    return out
