"""The block library: every cheaper variant of every layer's sub-blocks, initialised from the parent.

Per layer, attention variants are grouped-query attention with fewer KV heads (``attn_kv<N>``),
a single linear layer (``attn_linear``) and no-op (``attn_noop``); FFN variants are SwiGLU FFNs
of smaller widths (``ffn_<width>``), a linear layer (``ffn_linear``) and no-op (``ffn_noop``).
The parent's own sub-blocks (e.g. ``attn_kv3`` and ``ffn_1536`` for SmolLM2) are always in the
library; with ``export.serve_with``, the variants a named serving engine cannot load are left out
(:mod:`puzzle.serving`, the export report's rules). Initialisation from the parent:

* narrower FFN: keep the channels with the largest *channel contribution*
  ``C_i = mean_t |X_t,i| * ||W_down[:, i]||_2`` over calibration tokens (``X`` = the FFN's
  intermediate activation ``silu(gate(x)) * up(x)``);
* fewer KV heads: each new KV head is the mean of the parent's K/V heads that its query heads
  used (mean-pooling within merged groups);
* linear attention: ``W_O . W_V`` (each token attends only to itself, so attention is V then O);
* linear FFN: the least-squares map from the FFN's (normalised) input to its output on the
  calibration tokens.

The library artifact (kind ``library``) holds ``library.json`` (parent identity, search space,
the variants of each layer and their statistics) and ``layers/layer_NNN.safetensors`` with the
weights of every variant under ``"<variant>/<layer-relative Llama name>"``, in
``library.save_dtype``. The parent's own sub-blocks are listed but not stored (format 2; their
``"weights"`` is ``"parent"``): they are the parent's weights, which every reader has, and were 63 %
of a SmolLM2 library. :func:`build_library` writes it, :class:`Library` reads it,
:func:`block_state` and :func:`assemble_child` take the parent's own sub-blocks from the parent.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from puzzle import serving
from puzzle.config import ExportConfig, LibraryConfig
from puzzle.errors import PuzzleError
from puzzle.io import artifacts
from puzzle.io.artifacts import Manifest
from puzzle.modeling import AttentionConfig, BlockConfig, DeciLMConfig, DeciLMForCausalLM, FFNConfig
from puzzle.modeling.block_config import divisors
from puzzle.modeling.checkpoints import MODEL_KINDS, model_from_state, storage_tensors
from puzzle.modeling.devices import resolve_device
from puzzle.modeling.layers import LayerRunner, load_verified_model, model_config, sub_blocks

log = logging.getLogger(__name__)

LIBRARY_KIND = "library"
LIBRARY_FILE = "library.json"
LIBRARY_FORMAT = 2
"""2: the parent's own sub-blocks are not stored (``"weights": "parent"``); 1 stored a copy."""
PARENT_WEIGHTS = "parent"
CALIBRATION_SPLIT = "calibration"


class LibraryError(PuzzleError, ValueError):
    """A library that is missing a variant, does not match the parent, or is incomplete."""


def layer_file(layer: int) -> str:
    return f"layers/layer_{layer:03d}.safetensors"


PAPER_LIBRARY = LibraryConfig(
    attention_linear=True, ffn_fractions=[1.0, 0.875, 0.75, 0.5, 0.25, 0.2, 0.1], ffn_linear=True
)
"""The paper's search space: every KV-head divisor, linear and no-op attention; FFN at 100, 87.5,
75, 50, 25, 20 and 10 % of the parent's width, linear and no-op FFN."""


def kv_heads_for(library: LibraryConfig, num_attention_heads: int, parent_kv_heads: int) -> list[int]:
    """The KV-head counts of a parent's attention variants, largest first (the parent's always in)."""
    allowed = [d for d in divisors(num_attention_heads) if d <= parent_kv_heads]
    if library.kv_heads is None:
        return allowed
    for n in library.kv_heads:
        if num_attention_heads % n:
            raise LibraryError(
                f"library.kv_heads: {n} does not divide the parent's {num_attention_heads} attention "
                f"heads; use some of {allowed}"
            )
        if n > parent_kv_heads:
            raise LibraryError(
                f"library.kv_heads: {n} is more than the parent's {parent_kv_heads} KV heads (not a "
                f"cheaper variant); use some of {allowed}"
            )
    return sorted(set(library.kv_heads) | {parent_kv_heads}, reverse=True)


def ffn_widths_for(library: LibraryConfig, parent_width: int) -> list[int]:
    """FFN widths for a parent width, largest first (the parent's own width always included)."""
    widths = {parent_width}
    multiple = library.ffn_multiple if parent_width % library.ffn_multiple == 0 else 1
    for f in library.ffn_fractions:
        width = max(multiple, int(math.floor(f * parent_width / multiple + 0.5)) * multiple)
        widths.add(min(width, parent_width))
    return sorted(widths, reverse=True)


def attention_variants(
    library: LibraryConfig, num_attention_heads: int, parent_kv_heads: int
) -> list[AttentionConfig]:
    out = [
        AttentionConfig(num_kv_heads=n) for n in kv_heads_for(library, num_attention_heads, parent_kv_heads)
    ]
    if library.attention_linear:
        out.append(AttentionConfig(linear=True))
    if library.attention_noop:
        out.append(AttentionConfig(no_op=True))
    return out


def ffn_variants(library: LibraryConfig, parent_width: int) -> list[FFNConfig]:
    out = [FFNConfig(intermediate_size=w) for w in ffn_widths_for(library, parent_width)]
    if library.ffn_linear:
        out.append(FFNConfig(linear=True))
    if library.ffn_noop:
        out.append(FFNConfig(no_op=True))
    return out


@dataclass(frozen=True)
class ParentShape:
    """What a library must agree on with its parent."""

    hidden_size: int
    num_attention_heads: int
    head_dim: int
    num_hidden_layers: int
    vocab_size: int
    blocks: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def of(cls, config: DeciLMConfig) -> ParentShape:
        return cls(
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            head_dim=config.head_dim,
            num_hidden_layers=config.num_hidden_layers,
            vocab_size=config.vocab_size,
            blocks=tuple(b.name for b in config.blocks),
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["blocks"] = list(self.blocks)
        return data


def parent_blocks(config: DeciLMConfig) -> list[BlockConfig]:
    """The parent's blocks; every layer must be a full GQA + SwiGLU layer."""
    blocks = config.blocks
    for index, block in enumerate(blocks):
        if not (block.attention.is_gqa and block.ffn.is_mlp):
            raise LibraryError(
                f"layer {index} of the parent is {block.name}: a library is built from a parent whose layers "
                "are all "
                "full attention + FFN blocks (convert the original parent with `puzzle convert`)"
            )
    return blocks


def _parent_sizes(block: BlockConfig, index: int) -> tuple[int, int]:
    """A parent layer's KV heads and FFN width (both set: :func:`parent_blocks` checked the layer)."""
    kv_heads, width = block.attention.num_kv_heads, block.ffn.intermediate_size
    if kv_heads is None or width is None:
        raise LibraryError(f"layer {index} of the parent is {block.name}, not a full attention + FFN block")
    return kv_heads, width


# --------------------------------------------------------------------------- initialisation


def pool_kv_heads(
    weight: torch.Tensor, *, num_heads: int, parent_kv: int, new_kv: int, head_dim: int
) -> torch.Tensor:
    """K or V projection (weight [kv*hd, H] or bias [kv*hd]) with ``new_kv`` heads by mean-pooling.

    New KV head ``j`` serves query heads ``j*g' .. (j+1)*g' - 1``; it becomes the mean of the
    parent KV heads those query heads used (so merging groups of a GQA parent averages them).
    """
    per_head = weight.reshape(parent_kv, head_dim, *weight.shape[1:])
    parent_group, new_group = num_heads // parent_kv, num_heads // new_kv
    source = torch.arange(num_heads) // parent_group  # parent KV head of every query head
    pooled = torch.stack(
        [per_head[source[j * new_group : (j + 1) * new_group]].mean(0) for j in range(new_kv)]
    )
    return pooled.reshape(new_kv * head_dim, *weight.shape[1:]).contiguous()


def linear_attention_weight(
    state: dict[str, torch.Tensor], *, num_heads: int, kv_heads: int, head_dim: int
) -> torch.Tensor:
    """``W_O . W_V`` with V repeated per query head: attention where each token sees only itself."""
    v = state["self_attn.v_proj.weight"]
    hidden = v.shape[1]
    v_per_query = v.reshape(kv_heads, head_dim, hidden).repeat_interleave(num_heads // kv_heads, dim=0)
    return (state["self_attn.o_proj.weight"] @ v_per_query.reshape(num_heads * head_dim, hidden)).contiguous()


def narrow_ffn(state: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """The parent FFN restricted to the intermediate channels ``keep`` (sorted indices)."""
    out = {"post_attention_layernorm.weight": state["post_attention_layernorm.weight"].clone()}
    for name in ("gate_proj", "up_proj"):
        out[f"mlp.{name}.weight"] = state[f"mlp.{name}.weight"][keep].contiguous()
        if f"mlp.{name}.bias" in state:
            out[f"mlp.{name}.bias"] = state[f"mlp.{name}.bias"][keep].contiguous()
    out["mlp.down_proj.weight"] = state["mlp.down_proj.weight"][:, keep].contiguous()
    if "mlp.down_proj.bias" in state:
        out["mlp.down_proj.bias"] = state["mlp.down_proj.bias"].clone()
    return out


def channel_contribution(mean_abs_activation: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
    """``C_i = mean_t |X_t,i| * ||W_down[:, i]||_2`` for every intermediate channel ``i``."""
    return mean_abs_activation * down_weight.float().norm(dim=0)


def least_squares_map(xtx: torch.Tensor, xty: torch.Tensor) -> torch.Tensor:
    """``W`` minimising ``||X W^T - Y||^2`` from the sufficient statistics, lightly ridge-regularised."""
    ridge = 1e-6 * xtx.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(xtx.shape[0], dtype=xtx.dtype)
    return torch.linalg.solve(xtx + ridge * eye, xty).T.contiguous()


@dataclass
class _Calibration:
    tokens: int = 0
    abs_activation: dict[int, torch.Tensor] = field(default_factory=dict)
    xtx: dict[int, torch.Tensor] = field(default_factory=dict)
    xty: dict[int, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
def calibrate(
    model: DeciLMForCausalLM,
    input_ids: torch.Tensor,
    layers: list[int],
    *,
    batch_size: int = 8,
    need_abs: bool = True,
    need_lstsq: bool = True,
) -> _Calibration:
    """Statistics of the parent's FFNs on calibration tokens (one pass through the parent)."""
    runner = LayerRunner(model)
    device = next(model.parameters()).device
    stats = _Calibration()
    wanted = set(layers)
    last = max(layers)
    bar = tqdm(total=input_ids.numel(), desc="calibration", unit="tok", unit_scale=True, leave=False)
    for start in range(0, input_ids.shape[0], batch_size):
        batch = input_ids[start : start + batch_size].to(device)
        hidden, ctx = runner.embed(batch)
        stats.tokens += batch.numel()
        for index in range(last + 1):
            layer = runner.layers[index]
            if index in wanted:
                mid = hidden + sub_blocks(layer, hidden, ctx).attn_delta
                x = layer.post_attention_layernorm(mid)
                mlp = layer.mlp
                inter = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
                # Sums in float64 on the model's device; moved to the CPU once at the end.
                if need_abs:
                    acc = inter.abs().double().sum(dim=(0, 1))
                    stats.abs_activation[index] = stats.abs_activation.get(index, 0) + acc
                if need_lstsq:
                    flat_x = x.reshape(-1, x.shape[-1]).double()
                    flat_y = mlp.down_proj(inter).reshape(-1, x.shape[-1]).double()
                    stats.xtx[index] = stats.xtx.get(index, 0) + flat_x.T @ flat_x
                    stats.xty[index] = stats.xty.get(index, 0) + flat_x.T @ flat_y
            hidden = runner.layer(index, hidden, ctx)
        bar.update(batch.numel())
    bar.close()
    for table in (stats.abs_activation, stats.xtx, stats.xty):
        for index in table:
            table[index] = table[index].cpu()
    return stats


def _layer_state(model: DeciLMForCausalLM, index: int) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.model.layers[index].state_dict().items()}


def attention_weights(
    state: dict[str, torch.Tensor], variant: AttentionConfig, config: DeciLMConfig, parent_kv: int
) -> dict[str, torch.Tensor]:
    """Initial weights of an attention variant from the parent layer's ``state``."""
    if variant.no_op:
        return {}
    norm = {"input_layernorm.weight": state["input_layernorm.weight"].clone()}
    heads, head_dim = config.num_attention_heads, config.head_dim
    if variant.linear:
        return {
            **norm,
            "self_attn.linear_attn.weight": linear_attention_weight(
                state, num_heads=heads, kv_heads=parent_kv, head_dim=head_dim
            ),
        }
    if variant.num_kv_heads is None:
        raise LibraryError(f"attention variant {variant.name} is neither no-op, linear nor GQA")
    out = {**norm}
    for name, tensor in state.items():
        if not name.startswith("self_attn."):
            continue
        if name.startswith(("self_attn.k_proj.", "self_attn.v_proj.")) and variant.num_kv_heads != parent_kv:
            tensor = pool_kv_heads(
                tensor, num_heads=heads, parent_kv=parent_kv, new_kv=variant.num_kv_heads, head_dim=head_dim
            )
        out[name] = tensor.clone()
    return out


def ffn_weights(
    state: dict[str, torch.Tensor],
    variant: FFNConfig,
    parent_width: int,
    *,
    ranking: torch.Tensor | None,
    linear: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """Initial weights of an FFN variant: ``ranking`` orders channels best first; ``linear`` is the LS map."""
    if variant.no_op:
        return {}
    if variant.linear:
        assert linear is not None
        return {
            "post_attention_layernorm.weight": state["post_attention_layernorm.weight"].clone(),
            "mlp.linear_mlp.weight": linear.float(),
        }
    width = variant.intermediate_size
    if width == parent_width:
        return {k: v.clone() for k, v in state.items() if k.startswith(("mlp.", "post_attention_layernorm."))}
    assert ranking is not None
    keep = ranking[:width].sort().values
    return narrow_ffn(state, keep)


# --------------------------------------------------------------------------- the artifact


class Library:
    """A block library artifact (local directory or ``s3://``, downloaded once and verified)."""

    def __init__(self, uri: str, local: Path, meta: dict[str, Any]) -> None:
        self.uri = uri
        self.local = local
        self.meta = meta
        self.overlay: Library | None = None

    @classmethod
    def open(cls, uri: str | Path, *, overlay: str | None = None) -> Library:
        """The library at ``uri``; with ``overlay`` (a partial library trained from it, e.g. the
        coupled blocks of the search), the two seen as one: the overlay's blocks added to the base's."""
        local = artifacts.materialize(str(uri), LIBRARY_KIND)
        meta = json.loads((local / LIBRARY_FILE).read_text())
        if meta.get("format_version", 0) > LIBRARY_FORMAT:
            raise LibraryError(
                f"library {uri} has format {meta['format_version']}, newer than this package's"
            )
        library = cls(str(uri), local, meta)
        return library.with_overlay(cls.open(overlay)) if overlay else library

    def with_overlay(self, overlay: Library) -> Library:
        """This library plus the blocks of ``overlay`` (which must have been trained from it)."""
        base_hash = (overlay.meta.get("base") or {}).get("hash")
        if not overlay.partial or base_hash != artifacts.fingerprint(self.uri):
            raise LibraryError(
                f"{overlay.uri} is not a partial library trained from {self.uri} (its base is "
                f"{(overlay.meta.get('base') or {}).get('uri')}); train the overlay from this library"
            )
        meta = json.loads(json.dumps(self.meta))
        for layer, entry in overlay.meta["layers"].items():
            meta["layers"][layer]["variants"].update(entry["variants"])
        combined = Library(self.uri, self.local, meta)
        combined.overlay = overlay
        return combined

    @property
    def partial(self) -> bool:
        """True for one BLD shard's output: only that shard's variants; merge the shards first."""
        return bool(self.meta.get("partial"))

    @property
    def layers(self) -> list[int]:
        return sorted(int(k) for k in self.meta["layers"])

    @property
    def parent_shape(self) -> ParentShape:
        data = dict(self.meta["parent"]["shape"])
        data["blocks"] = tuple(data.get("blocks", ()))
        return ParentShape(**data)

    def parent_block(self, layer: int) -> BlockConfig:
        return BlockConfig.from_name(self.parent_shape.blocks[layer])

    def _layer(self, layer: int) -> dict[str, Any]:
        try:
            return self.meta["layers"][str(layer)]
        except KeyError:
            raise LibraryError(
                f"library {self.uri} has no layer {layer} (it has layers {self.layers})"
            ) from None

    def variants(self, layer: int) -> list[str]:
        """Sub-block variant names of a layer: attention variants first, then FFN variants."""
        return [
            name
            for name, info in self._layer(layer)["variants"].items()
            if info["kind"] in ("attention", "ffn")
        ]

    def attention_variants(self, layer: int) -> list[str]:
        return [n for n, i in self._layer(layer)["variants"].items() if i["kind"] == "attention"]

    def ffn_variants(self, layer: int) -> list[str]:
        return [n for n, i in self._layer(layer)["variants"].items() if i["kind"] == "ffn"]

    def coupled_blocks(self, layer: int) -> list[str]:
        """Block names (``attn+ffn``) trained together by coupled BLD in this layer."""
        return [n for n, i in self._layer(layer)["variants"].items() if i["kind"] == "block"]

    def info(self, layer: int, variant: str) -> dict[str, Any]:
        """Statistics of one variant (init method, parameter count, BLD losses when trained)."""
        variants = self._layer(layer)["variants"]
        if variant not in variants:
            raise LibraryError(
                f"library {self.uri} has no variant {variant!r} in layer {layer}; it has {list(variants)}"
            )
        return variants[variant]

    def parent_weights(self, layer: int, variant: str) -> bool:
        """True when the variant is the parent's own sub-block and its weights are the parent's (not
        stored in the library: take them from the parent's layer, as :func:`block_state` does)."""
        return self.info(layer, variant).get("weights") == PARENT_WEIGHTS

    def load(self, layer: int, variant: str) -> dict[str, torch.Tensor]:
        """A variant's weights with layer-relative Llama names (empty for no-op variants), in
        float32 whatever dtype they are stored in. The parent's own sub-blocks are the parent's
        weights, not the library's (:meth:`parent_weights`): asking for them is an error."""
        from safetensors import safe_open

        if self.parent_weights(layer, variant):
            raise LibraryError(
                f"layer {layer}'s {variant} is the parent's own sub-block: its weights are the parent's "
                f"layer {layer}, not stored in library {self.uri} (block_state takes them from the parent)"
            )
        if self.overlay is not None and variant in self.overlay.meta["layers"].get(str(layer), {}).get(
            "variants", {}
        ):
            return self.overlay.load(layer, variant)
        path = self.local / layer_file(layer)
        prefix = f"{variant}/"
        out: dict[str, torch.Tensor] = {}
        if not path.exists():
            return out
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                if key.startswith(prefix):
                    tensor = fh.get_tensor(key)
                    out[key[len(prefix) :]] = tensor.float() if tensor.is_floating_point() else tensor
        return out

    def check_parent(
        self, config: DeciLMConfig, parent_hash: str | None = None, *, where: str = "parent"
    ) -> None:
        """Raise :class:`LibraryError` when the library was not built for this parent."""
        if self.partial:
            raise LibraryError(
                f"library {self.uri} is one BLD shard's output; merge the shards first (`puzzle bld merge`)"
            )
        mine, theirs = self.parent_shape, ParentShape.of(config)
        for name in (
            "hidden_size",
            "num_attention_heads",
            "head_dim",
            "num_hidden_layers",
            "vocab_size",
            "blocks",
        ):
            a, b = getattr(mine, name), getattr(theirs, name)
            if a != b:
                shown = (a, b) if name != "blocks" else (sorted(set(a)), sorted(set(b)))
                raise LibraryError(
                    f"library {self.uri} does not match the {where}: {name} is {shown[0]} in the library but "
                    f"{shown[1]} in the {where}; use the parent the library was built from "
                    f"({self.meta['parent'].get('uri')})"
                )
        recorded = self.meta["parent"].get("hash")
        if parent_hash is not None and recorded is not None and parent_hash != recorded:
            raise LibraryError(
                f"library {self.uri} was built from other weights than the {where} (content hash "
                f"{recorded[:12]} vs {parent_hash[:12]}); use the parent it was built from "
                f"({self.meta['parent'].get('uri')}) or rebuild the library"
            )


def plan_layers(
    config: DeciLMConfig, library: LibraryConfig, layers: list[int] | None
) -> dict[int, list[str]]:
    """Variant names per layer for a parent; every error is raised here, before any weights load."""
    blocks = parent_blocks(config)
    chosen = list(range(config.num_hidden_layers)) if layers is None else list(layers)
    if not chosen:
        raise LibraryError("layers is empty: pass None for every layer or a list of layer indices")
    for index in chosen:
        if not isinstance(index, int) or not 0 <= index < config.num_hidden_layers:
            raise LibraryError(
                f"layers: {index!r} is not a layer of the parent (0..{config.num_hidden_layers - 1})"
            )
    if len(set(chosen)) != len(chosen):
        raise LibraryError(f"layers lists a layer twice: {chosen}")
    plan = {}
    for index in sorted(chosen):
        kv_heads, width = _parent_sizes(blocks[index], index)
        attn = attention_variants(library, config.num_attention_heads, kv_heads)
        ffn = ffn_variants(library, width)
        plan[index] = [v.name for v in attn] + [v.name for v in ffn]
    return plan


def restrict_to_engines(
    config: DeciLMConfig, plan: dict[int, list[str]], serve_with: list[str]
) -> tuple[dict[int, list[str]], dict[str, list[str]]]:
    """``plan`` without the variants some engine of ``serve_with`` (``export.serve_with``) cannot load,
    and why each left-out variant is left out (:mod:`puzzle.serving`'s rules, the export report's).

    Raises :class:`LibraryError` when an engine cannot serve the parent itself (a model-level feature
    or the parent's own blocks): every child would inherit it.
    """
    for key in serve_with:
        why = serving.reasons(key, config)
        if why:
            raise LibraryError(
                f"export.serve_with names {key!r}, but {serving.engine(key).name} cannot load the parent: "
                f"{'; '.join(why)}. Every child keeps this, so none could be served with {key}: remove "
                f"{key!r} from export.serve_with (empty: any engine) or compress a parent {key} can load"
            )
    kept: dict[int, list[str]] = {}
    left_out: dict[str, list[str]] = {}
    for index, names in plan.items():
        kept[index] = []
        for name in names:
            sub = AttentionConfig.from_name(name) if name.startswith("attn_") else FFNConfig.from_name(name)
            why = [
                f"{serving.engine(key).name} cannot load {reason}"
                for key in serve_with
                for reason in serving.sub_block_reasons(key, sub)
            ]
            if why:
                left_out.setdefault(name, why)
            else:
                kept[index].append(name)
    for name, why in left_out.items():
        where = [i for i, names in plan.items() if name in names]
        log.info(
            "library: export.serve_with %s leaves out %s (%s): %s",
            serve_with,
            name,
            serving.fmt_layers(where),
            "; ".join(why),
        )
    return kept, left_out


def _param_count(state: dict[str, torch.Tensor]) -> int:
    return int(sum(t.numel() for t in state.values()))


def build_library(
    parent: str,
    tokens: str,
    out: str,
    library: LibraryConfig,
    *,
    export: ExportConfig | None = None,
    layers: list[int] | None = None,
    calibration_sequences: int | None = None,
    device: str = "auto",
) -> Manifest:
    """Phase ``library``: initialise every variant of every layer from the parent and write it.

    Args:
        parent: the parent artifact (``puzzle convert``).
        tokens: a tokens artifact with a ``calibration`` split (channel contribution and the linear
            FFN's least squares use it).
        out: where to write the ``library`` artifact.
        library: which variants to build and how (validated against the parent before any work).
        export: its ``serve_with`` leaves out the variants a named engine cannot load (and refuses a
            parent one of them cannot serve, before any work); None or empty: every variant.
        layers: only these layers (default: all).
        calibration_sequences: use only the split's first N sequences (default: all).
        device: where the parent runs.
    """
    from puzzle.data import read_splits

    config = model_config(parent)
    plan = plan_layers(config, library, layers)
    serve_with = sorted(export.serve_with) if export is not None else []
    plan, left_out = restrict_to_engines(config, plan, serve_with)
    splits = read_splits(tokens)["splits"]
    if CALIBRATION_SPLIT not in splits:
        raise LibraryError(
            f"tokens {tokens} have no {CALIBRATION_SPLIT!r} split (they have {sorted(splits)}): prepare them "
            f"with a data.splits.{CALIBRATION_SPLIT} entry"
        )
    ffn_init, batch_size, seed = library.ffn_init, library.batch_size, library.seed
    parameters: dict[str, Any] = {
        "library": asdict(library),
        "layers": sorted(plan),
        "calibration_sequences": calibration_sequences,
    }
    serving_meta: dict[str, Any] = {}
    if serve_with:  # only then: an unrestricted library keeps its parameters (and is not rebuilt)
        parameters["serve_with"] = serve_with
        serving_meta = {"serving": {"serve_with": serve_with, "left_out": left_out}}

    def body(staging: Path, local: dict[str, Path]) -> dict[str, Any]:
        from safetensors.torch import save_file

        from puzzle.data import load_split

        dev = resolve_device(device)
        model = load_verified_model(local["parent"], dtype="float32", device=dev)
        blocks = config.blocks
        need_linear = any("ffn_linear" in names for names in plan.values())
        need_rank = ffn_init == "channel_contribution" and any(
            n.startswith("ffn_") and n[4:].isdigit() and int(n[4:]) < _parent_sizes(blocks[i], i)[1]
            for i, names in plan.items()
            for n in names
        )
        ids = load_split(str(local["tokens"]), CALIBRATION_SPLIT)[:calibration_sequences]
        stats = _Calibration(tokens=0)
        if need_rank or need_linear:
            stats = calibrate(
                model, ids, sorted(plan), batch_size=batch_size, need_abs=need_rank, need_lstsq=need_linear
            )
        generator = torch.Generator().manual_seed(seed)
        (staging / "layers").mkdir(exist_ok=True)
        layers_meta: dict[str, Any] = {}
        total = 0
        for index in tqdm(sorted(plan), desc="library", unit="layer", leave=False):
            state = _layer_state(model, index)
            parent_block = blocks[index]
            width = parent_block.ffn.intermediate_size
            ranking = None
            if need_rank:
                mean_abs = (stats.abs_activation[index] / stats.tokens).float()
                ranking = channel_contribution(mean_abs, state["mlp.down_proj.weight"]).argsort(
                    descending=True
                )
            elif ffn_init == "random":
                ranking = torch.randperm(width, generator=generator)
            linear = least_squares_map(stats.xtx[index], stats.xty[index]) if need_linear else None
            tensors: dict[str, torch.Tensor] = {}
            variants: dict[str, Any] = {}
            for name in plan[index]:
                variant: AttentionConfig | FFNConfig
                if name.startswith("attn_"):
                    variant = AttentionConfig.from_name(name)
                    weights = attention_weights(state, variant, config, parent_block.attention.num_kv_heads)
                    is_parent = variant == parent_block.attention
                    init = (
                        "parent"
                        if is_parent
                        else "none"
                        if variant.no_op
                        else ("linear_wo_wv" if variant.linear else "mean_pooled_kv")
                    )
                    kind = "attention"
                else:
                    variant = FFNConfig.from_name(name)
                    weights = ffn_weights(state, variant, width, ranking=ranking, linear=linear)
                    is_parent = variant == parent_block.ffn
                    init = (
                        "parent"
                        if is_parent
                        else "none"
                        if variant.no_op
                        else ("least_squares" if variant.linear else ffn_init)
                    )
                    kind = "ffn"
                if not is_parent:  # the parent's own: the parent's weights, not stored twice
                    tensors.update({f"{name}/{k}": v.float().contiguous() for k, v in weights.items()})
                variants[name] = {
                    "kind": kind,
                    "parent": is_parent,
                    "init": init,
                    "params": _param_count(weights),
                    "trained": False,
                    **({"weights": PARENT_WEIGHTS} if is_parent else {}),
                }
            if tensors:
                stored, _ = storage_tensors(tensors, library.save_dtype, what=layer_file(index))
                save_file(stored, str(staging / layer_file(index)))
            total += len(variants)
            layers_meta[str(index)] = {"variants": variants}
        meta = {
            "format_version": LIBRARY_FORMAT,
            "partial": False,
            "parent": {
                "uri": parent,
                "hash": artifacts.fingerprint(parent),
                "shape": ParentShape.of(config).to_json(),
            },
            "space": asdict(library),
            "ffn_init": ffn_init,
            "calibration": {"split": CALIBRATION_SPLIT, "tokens": stats.tokens},
            "layers": layers_meta,
            "bld": None,
            **serving_meta,
        }
        (staging / LIBRARY_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        log.info(
            "library: %d variants over %d layers, calibrated on %d tokens", total, len(plan), stats.tokens
        )
        names = sorted({n for variants in plan.values() for n in variants})
        return {
            "layers": len(plan),
            "variants": total,
            "variant_names": names,
            "calibration_tokens": stats.tokens,
            "trained": False,
            **({"serve_with": serve_with, "left_out": sorted(left_out)} if serve_with else {}),
        }

    return artifacts.run_phase(
        LIBRARY_KIND,
        out,
        {"parent": parent, "tokens": tokens},
        parameters,
        body,
        input_kinds={"parent": MODEL_KINDS, "tokens": "tokens"},
    )


# --------------------------------------------------------------------------- assembling children


def _non_layer_state(model: DeciLMForCausalLM) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("model.layers.")}


def block_state(
    library: Library, layer: int, block: BlockConfig, parent_layer: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Layer-relative weights for ``block`` in ``layer``: a coupled entry when the library has one,
    else the attention and FFN variants; the parent's own sub-blocks come from ``parent_layer`` (the
    parent's layer ``layer``; a library stores them only in format 1)."""
    in_library = layer in library.layers
    if in_library and block.name in library.coupled_blocks(layer):
        return library.load(layer, block.name)
    parent = library.parent_block(layer)
    state: dict[str, torch.Tensor] = {}
    for sub, own, prefixes in (
        (block.attention, parent.attention, ("input_layernorm.", "self_attn.")),
        (block.ffn, parent.ffn, ("post_attention_layernorm.", "mlp.")),
    ):
        listed = in_library and sub.name in library.variants(layer)
        if listed and not library.parent_weights(layer, sub.name):
            state.update(library.load(layer, sub.name))
        elif sub == own and parent_layer is not None:
            state.update({k: v for k, v in parent_layer.items() if k.startswith(prefixes)})
        elif sub.no_op:
            continue
        elif listed:
            raise LibraryError(
                f"layer {layer}: {sub.name} is the parent's own sub-block, whose weights are the parent's: "
                "pass the parent's layer (parent_layer)"
            )
        else:
            have = library.variants(layer) if in_library else []
            raise LibraryError(
                f"layer {layer}: variant {sub.name} is not in library {library.uri} (layer {layer} has "
                f"{have or 'no variants'})"
            )
    return state


def assemble_child(
    parent: str | DeciLMForCausalLM,
    library: str | Library,
    blocks: list[BlockConfig],
    *,
    check_hash: bool = True,
) -> DeciLMForCausalLM:
    """A child with the given per-layer ``blocks``, its weights taken from the library.

    Embeddings, final norm and LM head come from the parent (the parent artifact URI or
    the loaded model); layers outside the library must use the parent's own block. The child has
    the parent's dtype and device.
    """
    from puzzle.modeling.checkpoints import child_config_like, load_model

    lib = library if isinstance(library, Library) else Library.open(library)
    if isinstance(parent, DeciLMForCausalLM):
        model = parent
        lib.check_parent(model.config)
    else:
        model = load_model(parent, dtype="float32")
        lib.check_parent(model.config, artifacts.fingerprint(parent) if check_hash else None)
    if len(blocks) != model.config.num_hidden_layers:
        raise LibraryError(
            f"blocks has {len(blocks)} entries; the parent has {model.config.num_hidden_layers} layers"
        )
    config = child_config_like(model.config, list(blocks))
    config._attn_implementation = model.config._attn_implementation
    param = next(model.parameters())
    state = _non_layer_state(model)
    for index, block in enumerate(blocks):
        parent_layer = model.model.layers[index].state_dict()
        for key, value in block_state(lib, index, block, parent_layer).items():
            state[f"model.layers.{index}.{key}"] = value.to(device=param.device, dtype=param.dtype)
    try:
        child = model_from_state(config, state, device=param.device, what="assembled weights")
    except ValueError as exc:
        raise LibraryError(str(exc)) from None
    child.generation_config = model.generation_config
    return child.eval()
