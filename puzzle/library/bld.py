"""Blockwise local distillation (BLD): train each library variant alone to imitate the parent.

Every variant sees the parent's hidden state entering its layer and learns to reproduce what the
parent's block adds to the residual stream there. Decoupled BLD trains attention variants inside
a block with the parent's (frozen) FFN and FFN variants inside a block with the parent's
attention, so ``(m + n) * L`` blocks are trained instead of ``m * n * L``; coupled BLD trains
given ``attention+ffn`` pairs together. The loss is the normalised MSE

    MSE(o_parent, o_child) / MSE(o_parent, 0)

where ``o`` is the block's contribution to the residual stream (output minus input), so a no-op
block scores 1 and a perfect one 0 (``objective="subblock"`` uses the sub-block's own output
instead). AdamW with linear warm-up and cosine decay; bf16 autocast on CUDA.

All variants of the run train in lock-step on the same batches: the parent's activations are
computed once per batch and reused for every variant of every layer. A variant's result does
not depend on which other variants share its run, so work splits into shards (``shard="i/n"``
and/or explicit ``layers``/``variants`` lists) that run in separate processes or pods and
:func:`merge` into the library an unsharded run gives. A finished run is skipped on re-run
(:func:`puzzle.io.artifacts.run_phase`); a killed one resumes from its last checkpoint, kept in the
phase's staging ``.work/`` directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from puzzle.config import BLDConfig
from puzzle.errors import PuzzleError
from puzzle.io import artifacts
from puzzle.io.artifacts import Manifest
from puzzle.library.variants import LIBRARY_FILE, LIBRARY_KIND, Library, LibraryError, block_state, layer_file
from puzzle.modeling import AttentionConfig, BlockConfig, DeciLMConfig, FFNConfig
from puzzle.modeling.checkpoints import MODEL_KINDS, load_training_state
from puzzle.modeling.devices import resolve_device
from puzzle.modeling.layers import (
    LayerContext,
    LayerRunner,
    SubBlockOutputs,
    build_layer,
    load_verified_model,
    model_config,
    sub_blocks,
)
from puzzle.modeling.modeling_decilm import DeciLMDecoderLayer

log = logging.getLogger(__name__)

CHECKPOINT = "bld_checkpoint.pt"
OBJECTIVES = ("block", "subblock")
ATTN_PREFIXES = ("input_layernorm.", "self_attn.")
FFN_PREFIXES = ("post_attention_layernorm.", "mlp.")


class BLDError(PuzzleError, ValueError):
    """Bad BLD settings (budget, shard, selection) or too little data for the token budget."""


# --------------------------------------------------------------------------- work units


@dataclass
class Unit:
    """One variant trained by BLD: an attention or FFN variant, or a coupled block."""

    layer: int
    name: str
    kind: str  # "attention" | "ffn" | "block"

    @property
    def key(self) -> str:
        return f"{self.layer}:{self.name}"


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """``"i/n"`` (0 <= i < n) -> ``(i, n)``."""
    if shard is None:
        return None
    index, sep, count = str(shard).partition("/")
    if not sep or not index.isdigit() or not count.isdigit() or not 0 <= int(index) < int(count):
        raise BLDError(f"shard must look like i/n with 0 <= i < n (e.g. 0/4), got {shard!r}")
    return int(index), int(count)


def _pair_unit(lib: Library, layer: int, name: str) -> Unit:
    """One coupled (attention, FFN) block of one layer, checked against the library."""
    if layer not in lib.layers:
        raise BLDError(f"layer {layer} is not in library {lib.uri} (it has layers {lib.layers})")
    block, parent = BlockConfig.from_name(name), lib.parent_block(layer)
    for sub in (block.attention.name, block.ffn.name):
        if sub not in lib.variants(layer) and sub not in (parent.attention.name, parent.ffn.name):
            raise BLDError(f"coupled block {name}: layer {layer} has no variant {sub} in the library")
    return Unit(layer, name, "block")


def plan_units(
    lib: Library,
    *,
    layers: list[int] | None = None,
    variants: list[str] | None = None,
    coupled: list[str] | None = None,
    pairs: list[tuple[int, str]] | None = None,
    shard: str | None = None,
) -> list[Unit]:
    """The variants a run trains: trainable variants of the selected layers, then this shard's part.

    Trainable: every attention/FFN variant that is neither the parent's own nor a no-op, plus the
    ``coupled`` blocks (``attn+ffn`` names) in every selected layer. Shards are contiguous,
    balanced slices of that list in (layer, variant) order. ``pairs`` instead: exactly these
    (layer, block) coupled blocks (the search's chosen pairs), nothing else.
    """
    if pairs is not None:
        return [_pair_unit(lib, layer, name) for layer, name in sorted(set(pairs))]
    chosen = lib.layers if layers is None else list(layers)
    missing = sorted(set(chosen) - set(lib.layers))
    if missing:
        raise BLDError(f"layers {missing} are not in library {lib.uri} (it has layers {lib.layers})")
    blocks = [BlockConfig.from_name(name) for name in coupled or []]
    units: list[Unit] = []
    for layer in sorted(set(chosen)):
        parent = lib.parent_block(layer)
        for name in lib.variants(layer):
            info = lib.info(layer, name)
            if info["parent"] or name.endswith("_noop"):
                continue
            units.append(Unit(layer, name, info["kind"]))
        for block in blocks:
            for sub in (block.attention.name, block.ffn.name):
                if sub not in lib.variants(layer) and sub not in (parent.attention.name, parent.ffn.name):
                    raise BLDError(
                        f"coupled block {block.name}: layer {layer} has no variant {sub} in the library"
                    )
            units.append(Unit(layer, block.name, "block"))
    if variants is not None:
        known = {u.name for u in units}
        unknown = sorted(set(variants) - known)
        if unknown:
            raise BLDError(
                f"variants {unknown} are not trainable variants of the selected layers (trainable: "
                f"{sorted(known)})"
            )
        units = [u for u in units if u.name in set(variants)]
    parsed = parse_shard(shard)
    if parsed is not None:
        index, count = parsed
        units = units[index * len(units) // count : (index + 1) * len(units) // count]
    return units


# --------------------------------------------------------------------------- training


def lr_at(step: int, total: int, *, lr: float, warmup_steps: int) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to 0 at ``total``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def normalized_mse(child: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """``MSE(parent, child) / MSE(parent, 0)`` computed in float32."""
    parent = parent.float()
    return (child.float() - parent).pow(2).sum() / parent.pow(2).sum().clamp_min(1e-20)


@dataclass
class _Trainer:
    unit: Unit
    layer: DeciLMDecoderLayer
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    losses: list[float] = field(default_factory=list)


def _unit_layer(
    lib: Library, unit: Unit, parent_layer: DeciLMDecoderLayer, config: DeciLMConfig, device: torch.device
) -> tuple[DeciLMDecoderLayer, list[torch.nn.Parameter]]:
    """The block a unit trains: its own (trainable, fp32) weights plus the parent's frozen ones."""
    parent_block = lib.parent_block(unit.layer)
    parent_state = parent_layer.state_dict()
    if unit.kind == "attention":
        block = BlockConfig(attention=AttentionConfig.from_name(unit.name), ffn=parent_block.ffn)
        own = lib.load(unit.layer, unit.name)
        frozen = {k: v for k, v in parent_state.items() if k.startswith(FFN_PREFIXES)}
    elif unit.kind == "ffn":
        block = BlockConfig(attention=parent_block.attention, ffn=FFNConfig.from_name(unit.name))
        own = lib.load(unit.layer, unit.name)
        frozen = {k: v for k, v in parent_state.items() if k.startswith(ATTN_PREFIXES)}
    else:
        block = BlockConfig.from_name(unit.name)
        own = block_state(lib, unit.layer, block, parent_state)
        frozen = {}
    state = {k: v.float().to(device) for k, v in own.items()}
    state.update(frozen)
    layer = build_layer(config, block, state)
    trainable = set(own)
    params = []
    for name, param in layer.named_parameters():
        param.requires_grad_(name in trainable)
        if name in trainable:
            params.append(param)
    return layer, params


def _unit_delta(
    trainer: _Trainer, hidden: torch.Tensor, ctx: LayerContext, parent: SubBlockOutputs, objective: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(child output, parent target) of a unit on one batch."""
    layer, kind = trainer.layer, trainer.unit.kind
    if kind == "ffn":
        # The attention is the parent's: reuse its output instead of recomputing it.
        mid = hidden + parent.attn_delta
        ffn = (
            layer.mlp(layer.post_attention_layernorm(mid))
            if layer.mlp is not None
            else torch.zeros_like(hidden)
        )
        if objective == "subblock":
            return ffn, parent.ffn_delta
        return parent.attn_delta + ffn, parent.block_delta
    if kind == "attention" and objective == "subblock":
        attn = sub_blocks_attention(layer, hidden, ctx)
        return attn, parent.attn_delta
    out = sub_blocks(layer, hidden, ctx)
    return out.block_delta, parent.block_delta


def sub_blocks_attention(layer: DeciLMDecoderLayer, hidden: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
    if layer.self_attn is None:
        return torch.zeros_like(hidden)
    return layer.self_attn(
        layer.input_layernorm(hidden),
        position_embeddings=ctx.position_embeddings,
        attention_mask=ctx.attention_mask,
    )


def _autocast(device: torch.device, enabled: bool) -> Any:
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def _evaluate(
    runner: LayerRunner,
    trainers: list[_Trainer],
    ids: torch.Tensor,
    batch_size: int,
    objective: str,
    device: torch.device,
    autocast: bool,
) -> dict[str, float]:
    """Normalised MSE of every unit on held-out sequences (sums over batches, then the ratio)."""
    num = {t.unit.key: 0.0 for t in trainers}
    den = {t.unit.key: 0.0 for t in trainers}
    by_layer: dict[int, list[_Trainer]] = {}
    for t in trainers:
        by_layer.setdefault(t.unit.layer, []).append(t)
    last = max(by_layer)
    for start in range(0, ids.shape[0], batch_size):
        with _autocast(device, autocast):
            hidden, ctx = runner.embed(ids[start : start + batch_size].to(device))
            for index in range(last + 1):
                layer = runner.layers[index]
                if index in by_layer:
                    parts = sub_blocks(layer, hidden, ctx)
                    for t in by_layer[index]:
                        child, target = _unit_delta(t, hidden, ctx, parts, objective)
                        num[t.unit.key] += float((child.float() - target.float()).pow(2).sum())
                        den[t.unit.key] += float(target.float().pow(2).sum())
                    hidden = parts.hidden_out
                else:
                    hidden = runner.layer(index, hidden, ctx)
    return {k: num[k] / max(den[k], 1e-20) for k in num}


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def train(
    library: str,
    parent: str,
    tokens: str,
    out: str,
    bld: BLDConfig,
    *,
    shard: str | None = None,
    layers: list[int] | None = None,
    variants: list[str] | None = None,
    coupled: list[str] | None = None,
    pairs: list[tuple[int, str]] | None = None,
    split: str = "bld",
    val_split: str | None = "score",
    device: str = "auto",
    on_step: Callable[[int], None] | None = None,
) -> Manifest:
    """Phase ``bld``: train library variants by blockwise local distillation; writes a ``library``.

    Args:
        library: the library to train (the ``library`` phase's output, or a trained one).
        parent: the parent artifact it was built from.
        tokens: tokens artifact with the ``split`` split. Every variant's normalised MSE is
            measured before and after training on the first ``bld.val_sequences`` sequences of
            ``val_split`` (held-out text); when the artifact has no such split, the last
            ``bld.val_sequences`` sequences of ``split`` are held out instead.
        out: output library. Without ``shard`` a complete library (untrained variants copied);
            with ``shard`` only this shard's trained variants (merge shards with :func:`merge`).
        bld: budget, batch, learning rate, objective, seed, checkpointing.
        shard: ``"i/n"``: train the i-th of n contiguous slices of the selected variants
            (``"0/1"`` with explicit ``layers``/``variants`` makes an explicit-list shard).
        layers, variants: train only these layers / variant names (default: all trainable).
        coupled: block names (``"attn_kv1+ffn_768"``) to train as coupled pairs in every
            selected layer, initialised from their sub-block variants.
        pairs: instead, exactly these (layer, block) coupled blocks; the output is then a partial
            library of those blocks only (an overlay: ``Library.open(library, overlay=out)``).
        device: where to train.
        on_step: called with the step index after each step (progress hooks, tests).

    Every variant's ``initial_nmse`` and ``final_nmse`` (held-out) are recorded in
    ``library.json`` under the variant's ``bld`` entry.
    """
    from puzzle.data import read_splits

    token_budget, batch_size, lr, warmup_fraction = (
        bld.token_budget,
        bld.batch_size,
        bld.lr,
        bld.warmup_fraction,
    )
    seed, objective, weight_decay, val_sequences = (
        bld.seed,
        bld.objective,
        bld.weight_decay,
        bld.val_sequences,
    )
    if token_budget < 0 or (token_budget == 0 and (pairs is not None or coupled)):
        raise BLDError(f"bld.token_budget must be > 0 to train coupled pairs (>= 0 else), got {token_budget}")
    lib = Library.open(library)
    lib.check_parent(model_config(parent), artifacts.fingerprint(parent))
    units = plan_units(lib, layers=layers, variants=variants, coupled=coupled, pairs=pairs, shard=shard)
    info = read_splits(tokens)
    if split not in info["splits"]:
        raise BLDError(f"tokens {tokens} have no {split!r} split (they have {sorted(info['splits'])})")
    seq_len = info["seq_len"]
    if val_split is not None and val_split not in info["splits"]:
        log.info(
            "bld: tokens have no %r split; holding out %d %r sequences for validation",
            val_split,
            val_sequences,
            split,
        )
        val_split = None
    if val_split == split:
        raise BLDError(f"the validation split must differ from the training split {split!r} (or be None)")
    if val_split is not None and info["splits"][val_split]["sequences"] < val_sequences:
        raise BLDError(f"split {val_split!r} has fewer than val_sequences={val_sequences} sequences")
    available = info["splits"][split]["sequences"] - (val_sequences if val_split is None else 0)
    steps = math.ceil(token_budget / (batch_size * seq_len))
    if steps == 0:
        units = []  # bld.token_budget 0: no BLD, the library as initialised
    if steps * batch_size > available * bld.max_epochs:
        raise BLDError(
            f"too little data: bld.token_budget={token_budget} at bld.batch_size={batch_size} x seq_len="
            f"{seq_len} needs {steps * batch_size} training sequences, more than bld.max_epochs="
            f"{bld.max_epochs} passes over the {available} of split {split!r}"
            f"{f' (after {val_sequences} held out)' if val_split is None else ''}: lower the budget, raise "
            f"bld.max_epochs or prepare more {split!r} sequences"
        )
    parameters = {
        "token_budget": token_budget,
        "batch_size": batch_size,
        "lr": lr,
        "warmup_fraction": warmup_fraction,
        "seed": seed,
        "shard": shard,
        "layers": layers,
        "variants": variants,
        "coupled": coupled,
        "pairs": [list(p) for p in sorted(set(pairs))] if pairs is not None else None,
        "split": split,
        "objective": objective,
        "weight_decay": weight_decay,
        "val_sequences": val_sequences,
        "val_split": val_split,
    }

    def body(staging: Path, local: dict[str, Path]) -> dict[str, Any]:
        result = _train_units(
            lib,
            str(local["parent"]),
            str(local["tokens"]),
            units,
            split=split,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            warmup_fraction=warmup_fraction,
            seed=seed,
            objective=objective,
            weight_decay=weight_decay,
            val_sequences=val_sequences,
            val_split=val_split,
            checkpoint=staging / ".work" / CHECKPOINT,
            checkpoint_every=bld.checkpoint_every,
            device=resolve_device(device),
            autocast=bld.autocast,
            on_step=on_step,
        )
        bld_meta = {
            **parameters,
            "seq_len": seq_len,
            "steps": steps,
            "tokens_per_variant": steps * batch_size * seq_len,
        }
        if pairs is not None:
            _write_shard(staging, lib, result.trained, bld_meta, "pairs")
        elif shard is None:
            _write_full_library(staging, lib, result.trained, bld_meta)
        else:
            _write_shard(staging, lib, result.trained, bld_meta, shard)
        return {
            "trained_variants": len(units),
            "steps": steps,
            "tokens_per_variant": steps * batch_size * seq_len,
            "tokens_per_second": result.tokens_per_second,
            "resumed_from_step": result.resumed_from,
            "mean_initial_nmse": _mean([v["bld"]["initial_nmse"] for v in result.trained.values()]),
            "mean_final_nmse": _mean([v["bld"]["final_nmse"] for v in result.trained.values()]),
            "shard": shard,
            "partial": shard is not None or pairs is not None,
        }

    return artifacts.run_phase(
        LIBRARY_KIND,
        out,
        {"library": library, "parent": parent, "tokens": tokens},
        parameters,
        body,
        input_kinds={"library": LIBRARY_KIND, "parent": MODEL_KINDS, "tokens": "tokens"},
    )


def _mean(values: list[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


@dataclass
class _Result:
    trained: dict[tuple[int, str], dict[str, Any]]  # (layer, name) -> {"tensors", "info", "bld"}
    tokens_per_second: float
    resumed_from: int


def _train_units(
    lib: Library,
    child: str,
    tokens: str,
    units: list[Unit],
    *,
    split: str,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_fraction: float,
    seed: int,
    objective: str,
    weight_decay: float,
    val_sequences: int,
    val_split: str | None,
    checkpoint: Path,
    checkpoint_every: int,
    device: torch.device,
    autocast: bool,
    on_step: Callable[[int], None] | None,
) -> _Result:
    from puzzle.data import load_split

    if not units:
        return _Result({}, 0.0, 0)
    parent_dtype = "bfloat16" if device.type == "cuda" and autocast else "float32"
    model = load_verified_model(Path(child), dtype=parent_dtype, device=device)
    model.requires_grad_(False)
    runner = LayerRunner(model)
    ids = load_split(tokens, split)
    if val_split is None:
        train_ids, val_ids = ids[: ids.shape[0] - val_sequences], ids[ids.shape[0] - val_sequences :]
    else:
        train_ids, val_ids = ids, load_split(tokens, val_split)[:val_sequences]
    # One seeded shuffle per pass over the split (the budget may take up to bld.max_epochs passes).
    passes = max(1, math.ceil(steps * batch_size / max(1, train_ids.shape[0])))
    order = torch.cat(
        [
            torch.randperm(train_ids.shape[0], generator=torch.Generator().manual_seed(seed + epoch))
            for epoch in range(passes)
        ]
    )
    trainers = []
    for unit in units:
        layer, params = _unit_layer(lib, unit, runner.layers[unit.layer], model.config, device)
        optimizer = torch.optim.AdamW(
            params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay, fused=device.type == "cuda"
        )
        trainers.append(_Trainer(unit, layer, params, optimizer))
    warmup = int(round(warmup_fraction * steps))
    start_step, initial = 0, None
    if checkpoint.exists():
        saved = load_training_state(checkpoint, map_location=device)
        start_step, initial = saved["step"], saved["initial"]
        for t in trainers:
            t.layer.load_state_dict(saved["units"][t.unit.key]["weights"], strict=False)
            t.optimizer.load_state_dict(saved["units"][t.unit.key]["optimizer"])
            t.losses = saved["units"][t.unit.key]["losses"]
        log.info("bld: resuming from the checkpoint at step %d of %d", start_step, steps)
    if initial is None:
        initial = _evaluate(runner, trainers, val_ids, batch_size, objective, device, autocast)
    by_layer: dict[int, list[_Trainer]] = {}
    for t in trainers:
        by_layer.setdefault(t.unit.layer, []).append(t)
    last = max(by_layer)
    seq_tokens = batch_size * train_ids.shape[1]
    bar = tqdm(
        total=steps * seq_tokens,
        initial=start_step * seq_tokens,
        desc=f"bld ({len(units)} variants)",
        unit="tok",
        unit_scale=True,
        leave=False,
    )
    started = time.perf_counter()
    for step in range(start_step, steps):
        rate = lr_at(step, steps, lr=lr, warmup_steps=warmup)
        batch = train_ids[order[step * batch_size : (step + 1) * batch_size]].to(device)
        step_losses: list[torch.Tensor] = []  # read back once per step: no GPU sync per variant
        with _autocast(device, autocast):
            with torch.no_grad():
                hidden, ctx = runner.embed(batch)
            for index in range(last + 1):
                with torch.no_grad():
                    parts = sub_blocks(runner.layers[index], hidden, ctx) if index in by_layer else None
                for t in by_layer.get(index, []):
                    if parts is None:  # unreachable: layers with trainers always get the parent's outputs
                        raise BLDError(f"layer {index}: the parent's sub-block outputs were not computed")
                    for group in t.optimizer.param_groups:
                        group["lr"] = rate
                    child_out, target = _unit_delta(t, hidden, ctx, parts, objective)
                    loss = normalized_mse(child_out, target)
                    loss.backward()
                    t.optimizer.step()
                    t.optimizer.zero_grad(set_to_none=True)
                    step_losses.append(loss.detach())
                with torch.no_grad():
                    hidden = parts.hidden_out if parts is not None else runner.layer(index, hidden, ctx)
        for t, value in zip(
            [t for index in sorted(by_layer) for t in by_layer[index]], torch.stack(step_losses).tolist()
        ):
            t.losses.append(value)
        bar.update(seq_tokens)
        bar.set_postfix(nmse=f"{_mean([t.losses[-1] for t in trainers]):.4f}")
        done = step + 1
        if done % checkpoint_every == 0 and done < steps:
            _save_checkpoint(
                checkpoint,
                {
                    "step": done,
                    "initial": initial,
                    "units": {
                        t.unit.key: {
                            "weights": {
                                n: p.detach() for n, p in t.layer.named_parameters() if p.requires_grad
                            },
                            "optimizer": t.optimizer.state_dict(),
                            "losses": t.losses,
                        }
                        for t in trainers
                    },
                },
            )
        if on_step is not None:
            on_step(step)
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    final = _evaluate(runner, trainers, val_ids, batch_size, objective, device, autocast)
    trained = {}
    for t in trainers:
        tensors = {
            n: p.detach().float().cpu().contiguous() for n, p in t.layer.named_parameters() if p.requires_grad
        }
        curve = t.losses[:: max(1, len(t.losses) // 50)]
        trained[(t.unit.layer, t.unit.name)] = {
            "kind": t.unit.kind,
            "tensors": tensors,
            "bld": {
                "initial_nmse": initial[t.unit.key],
                "final_nmse": final[t.unit.key],
                "steps": steps,
                "train_nmse_curve": curve,
            },
        }
        log.info(
            "bld: layer %d %s: held-out nmse %.4f -> %.4f",
            t.unit.layer,
            t.unit.name,
            initial[t.unit.key],
            final[t.unit.key],
        )
    tokens_done = (steps - start_step) * seq_tokens
    return _Result(trained, tokens_done / elapsed if elapsed > 0 else 0.0, start_step)


# --------------------------------------------------------------------------- writing libraries


def _variant_info(
    lib: Library, layer: int, name: str, kind: str, tensors: dict[str, torch.Tensor]
) -> dict[str, Any]:
    if kind == "block":
        block = BlockConfig.from_name(name)
        return {
            "kind": "block",
            "parent": False,
            "init": "coupled_from_variants",
            "attention": block.attention.name,
            "ffn": block.ffn.name,
            "params": int(sum(t.numel() for t in tensors.values())),
        }
    return dict(lib.info(layer, name))


def _stored(base: Library, tensors: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """``tensors`` in the dtype the library stores its variants in (``library.save_dtype``, recorded in
    its ``space``; older libraries: as trained, float32). BLD trains in float32; what it writes
    takes no more room than the initial variants."""
    from puzzle.modeling.checkpoints import storage_tensors

    stored, _ = storage_tensors(tensors, (base.meta.get("space") or {}).get("save_dtype"), what=what)
    return stored


def _write_full_library(
    staging: Path, base: Library, trained: dict[tuple[int, str], dict[str, Any]], bld_meta: dict[str, Any]
) -> None:
    """The base library with every trained variant's weights and BLD statistics replaced."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    meta = json.loads(json.dumps(base.meta))
    (staging / "layers").mkdir(parents=True, exist_ok=True)
    for layer in base.layers:
        mine = {name: entry for (lay, name), entry in trained.items() if lay == layer}
        source = base.local / layer_file(layer)
        target = staging / layer_file(layer)
        if not mine:
            if source.exists():
                shutil.copyfile(source, target)
            continue
        tensors: dict[str, torch.Tensor] = {}
        if source.exists():
            with safe_open(str(source), framework="pt") as fh:
                for key in fh.keys():
                    if key.split("/", 1)[0] not in mine:
                        tensors[key] = fh.get_tensor(key)
        variants = meta["layers"][str(layer)]["variants"]
        for name, entry in mine.items():
            tensors.update({f"{name}/{k}": v for k, v in entry["tensors"].items()})
            info = variants.get(name) or _variant_info(base, layer, name, entry["kind"], entry["tensors"])
            variants[name] = {**info, "trained": True, "bld": entry["bld"]}
        save_file(_stored(base, tensors, target.name), str(target))
    meta["partial"] = False
    meta["bld"] = bld_meta
    meta.pop("base", None)
    meta.pop("shard", None)
    (staging / LIBRARY_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _write_shard(
    staging: Path,
    base: Library,
    trained: dict[tuple[int, str], dict[str, Any]],
    bld_meta: dict[str, Any],
    shard: str,
) -> None:
    """Only this shard's trained variants, with a reference to the base library for :func:`merge`."""
    from safetensors.torch import save_file

    (staging / "layers").mkdir(parents=True, exist_ok=True)
    layers: dict[str, Any] = {}
    for layer in sorted({lay for lay, _ in trained}):
        tensors: dict[str, torch.Tensor] = {}
        variants = {}
        for (lay, name), entry in trained.items():
            if lay != layer:
                continue
            tensors.update({f"{name}/{k}": v for k, v in entry["tensors"].items()})
            info = _variant_info(base, layer, name, entry["kind"], entry["tensors"])
            variants[name] = {**info, "trained": True, "bld": entry["bld"]}
        save_file(_stored(base, tensors, layer_file(layer)), str(staging / layer_file(layer)))
        layers[str(layer)] = {"variants": variants}
    meta = {
        "format_version": base.meta["format_version"],
        "partial": True,
        "shard": shard,
        "base": {"uri": base.uri, "hash": artifacts.fingerprint(base.uri)},
        "parent": base.meta["parent"],
        "space": base.meta["space"],
        "layers": layers,
        "bld": bld_meta,
    }
    (staging / LIBRARY_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def merge(shard_uris: list[str], out: str, *, base: str | None = None) -> Manifest:
    """Phase: merge BLD shard outputs (same base library and settings) into one complete library.

    ``base`` overrides the base library URI recorded in the shards (e.g. when it moved). With
    ``i/n`` shards every index must be present exactly once; a variant trained by two shards is
    an error.
    """
    if not shard_uris:
        raise BLDError("merge needs at least one shard")
    shards = [Library.open(uri) for uri in shard_uris]
    for shard in shards:
        if not shard.partial:
            raise BLDError(f"{shard.uri} is a complete library, not a BLD shard output")
    hashes = {s.meta["base"]["hash"] for s in shards}
    if len(hashes) != 1:
        raise BLDError(
            "the shards were trained from different base libraries; re-run them from the same library"
        )
    settings = [{k: v for k, v in s.meta["bld"].items() if k != "shard"} for s in shards]
    if any(s != settings[0] for s in settings):
        raise BLDError(
            "the shards were trained with different BLD settings; re-run them with the same settings"
        )
    parsed = [p for s in shards if (p := parse_shard(s.meta["shard"])) is not None]
    if len(parsed) != len(shards):
        raise BLDError("a BLD shard output records no shard (i/n); re-run that shard")
    counts = {p[1] for p in parsed}
    if len(counts) == 1 and next(iter(counts)) > 1:
        total = next(iter(counts))
        indices = sorted(p[0] for p in parsed)
        if indices != list(range(total)):
            raise BLDError(
                f"shards {indices} of {total} given: merge needs every shard 0..{total - 1} exactly once"
            )
    base_uri = base or shards[0].meta["base"]["uri"]

    def body(staging: Path, local: dict[str, Path]) -> dict[str, Any]:
        base_lib = Library.open(str(local["base"]))
        if artifacts.fingerprint(str(local["base"])) not in hashes:
            raise LibraryError(f"base library {base_uri} is not the one the shards were trained from")
        trained: dict[tuple[int, str], dict[str, Any]] = {}
        for shard in shards:
            for layer in shard.layers:
                for name in shard.variants(layer) + shard.coupled_blocks(layer):
                    if (layer, name) in trained:
                        raise BLDError(f"layer {layer} variant {name} was trained by more than one shard")
                    info = shard.info(layer, name)
                    trained[(layer, name)] = {
                        "kind": info["kind"],
                        "tensors": shard.load(layer, name),
                        "bld": info["bld"],
                    }
        bld_meta = {**settings[0], "shard": None, "merged_from": len(shards)}
        _write_full_library(staging, base_lib, trained, bld_meta)
        stats = [t["bld"] or {} for t in trained.values()]

        def mean_of(key: str) -> float | None:
            return _mean([s[key] for s in stats if s.get(key) is not None])

        return {
            "trained_variants": len(trained),
            "merged_shards": len(shards),
            "steps": settings[0].get("steps"),
            "tokens_per_variant": settings[0].get("tokens_per_variant"),
            "mean_initial_nmse": mean_of("initial_nmse"),
            "mean_final_nmse": mean_of("final_nmse"),
            "partial": False,
        }

    inputs = {"base": base_uri, **{f"shard_{i}": uri for i, uri in enumerate(shard_uris)}}
    return artifacts.run_phase(
        LIBRARY_KIND,
        out,
        inputs,
        {"shards": len(shard_uris)},
        body,
        input_kinds={k: LIBRARY_KIND for k in inputs},
    )
