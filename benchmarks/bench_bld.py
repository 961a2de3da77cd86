"""BLD throughput and model-FLOPs utilisation (GPU), and the CPU wall time of library + BLD + scoring.

GPU: one Llama-3.1-8B-shaped layer (hidden 4096, 32 heads, 8 KV heads, FFN 14336; random
weights: speed does not depend on their values; a small vocabulary since BLD never touches the
LM head) and its full paper library (``PAPER_LIBRARY``: attention kv4/kv2/kv1/linear, FFN 12544 ...
1536/linear), trained by :func:`puzzle.library.bld.train` itself (bf16 autocast, fused AdamW,
parent activations shared by all 11 variants)::

    python benchmarks/bench_bld.py gpu --dir /tmp/bld --steps 12 --batch 8 --seq-len 2048

Steady-state tokens/s comes from per-step timestamps (CUDA synchronised) after 2 warm-up steps.
Model FLOPs per token, PaLM convention (attention 4·d·S forward, 12·d·S forward+backward):
parent layer forward 2·N_parent + 4·d·S; each variant 6·N_variant (+ 12·d·S for GQA); with the
default ``block`` objective an attention variant also runs the parent's frozen FFN forward and
backward to its input, 4·N_ffn. MFU divides by 989 TFLOP/s (dense bf16, H100/H200 SXM).

CPU: the real SmolLM2-135M parent with the demo's budget (the embedded default of
:mod:`puzzle.config`)::

    python benchmarks/bench_bld.py cpu --dir /tmp/bld-cpu [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import shapes  # noqa: E402

# --shape -> the table's shape (its layer widths; the vocabulary and the layer count are the run's).
SHAPES = {"llama-8b": "llama-3.1-8b", "smollm2": "smollm2-135m", "tiny": "tiny"}
# As this benchmark has always built them: transformers' default rms_norm_eps, plain RoPE (no llama3
# scaling for llama-8b) and untied embeddings (smollm2's too).
AS_BEFORE = dict(rms_norm_eps=shapes.TRANSFORMERS_RMS_NORM_EPS, tie_word_embeddings=False)


def make_random_parent(out: Path, shape: str, *, layers: int, vocab_size: int, seq_len: int) -> str:
    """A parent artifact holding a random Llama parent of ``shape`` (float32)."""
    from puzzle.modeling.checkpoints import PARENT_KIND

    name = SHAPES[shape]
    dims = dict(vocab_size=vocab_size, num_hidden_layers=layers, max_position_embeddings=max(4096, seq_len))
    params = {"shape": shape, "layers": layers, "vocab": vocab_size}
    return shapes.save_random_model(
        out,
        PARENT_KIND,
        params,
        lambda: shapes.random_parent(name, rope_parameters=shapes.plain_rope(name), **dims, **AS_BEFORE),
        shape=shape,
        vocab_size=vocab_size,
    )


def matmul_params(state: dict[str, torch.Tensor]) -> int:
    return int(sum(t.numel() for t in state.values() if t.dim() == 2))


def flops_per_token(
    lib: Any, layer: int, seq_len: int, objective: str, d_attn: int, parent_layer: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Model FLOPs per training token of one BLD step over every trainable variant of ``layer``
    (``parent_layer``: the parent's layer, whose own sub-blocks the library does not store)."""
    n_attn = matmul_params({k: v for k, v in parent_layer.items() if k.startswith("self_attn.")})
    n_ffn = matmul_params({k: v for k, v in parent_layer.items() if k.startswith("mlp.")})
    total = 2 * (n_attn + n_ffn) + 4 * d_attn * seq_len  # parent forward of the layer
    frozen_ffn = 0.0
    for name in lib.variants(layer):
        info = lib.info(layer, name)
        if info["parent"] or name.endswith("_noop"):
            continue
        total += 6 * matmul_params(lib.load(layer, name))
        if name.startswith("attn_kv"):
            total += 12 * d_attn * seq_len
        if info["kind"] == "attention" and objective == "block":
            frozen_ffn += 4 * n_ffn
    return {"total": total + frozen_ffn, "frozen_parent_ffn": frozen_ffn}


def run_gpu(args: argparse.Namespace) -> dict[str, Any]:
    from puzzle.config import BLDConfig
    from puzzle.library import bld
    from puzzle.library.variants import PAPER_LIBRARY, Library, build_library
    from puzzle.modeling.checkpoints import load_model

    root = Path(args.dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    parent = make_random_parent(
        root / "parent", args.shape, layers=1, vocab_size=args.vocab, seq_len=args.seq_len
    )
    tokens = shapes.save_random_tokens(
        root / "tokens",
        vocab_size=args.vocab,
        seq_len=args.seq_len,
        splits={"calibration": 4, "bld": args.steps * args.batch, "score": 2},
    )
    started = time.perf_counter()
    library = dataclasses.replace(PAPER_LIBRARY, batch_size=2)
    build_library(parent, tokens, str(root / "library"), library, device=device)
    library_s = time.perf_counter() - started
    lib = Library.open(str(root / "library"))
    parent_layer = load_model(parent).model.layers[0].state_dict()
    config = json.loads((Path(parent) / "config.json").read_text())
    d_attn = config["num_attention_heads"] * config["head_dim"]
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": args.shape,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "library_build_s": round(library_s, 1),
        "variants": lib.variants(0),
        "objectives": {},
    }
    for objective in args.objectives.split(","):
        stamps: list[float] = []

        def on_step(step: int, stamps: list[float] = stamps) -> None:
            if device == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        manifest = bld.train(
            str(root / "library"),
            parent,
            tokens,
            str(root / f"bld-{objective}"),
            BLDConfig(
                token_budget=args.steps * args.batch * args.seq_len,
                batch_size=args.batch,
                lr=1e-4,
                warmup_fraction=0.1,
                objective=objective,
                val_sequences=2,
                checkpoint_every=10**6,
            ),
            device=device,
            on_step=on_step,
        )
        phase_s = time.perf_counter() - started
        warm = 2 if len(stamps) > 3 else 0
        per_step = (stamps[-1] - stamps[warm]) / (len(stamps) - 1 - warm)
        tokens_per_s = args.batch * args.seq_len / per_step
        flops = flops_per_token(lib, 0, args.seq_len, objective, d_attn, parent_layer)
        results["objectives"][objective] = {
            "trained_variants": manifest.summary["trained_variants"],
            "seconds_per_step": round(per_step, 4),
            "tokens_per_s": round(tokens_per_s, 1),
            "variant_tokens_per_s": round(tokens_per_s * manifest.summary["trained_variants"], 1),
            "model_tflop_per_token": flops["total"] / 1e12,
            "achieved_tflops": round(flops["total"] * tokens_per_s / 1e12, 1),
            "mfu": round(shapes.mfu(flops["total"], tokens_per_s), 4),
            "share_of_flops_in_frozen_parent_ffn": round(flops["frozen_parent_ffn"] / flops["total"], 3),
            "phase_wall_s": round(phase_s, 1),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)
            if device == "cuda"
            else None,
            "mean_nmse": [manifest.summary["mean_initial_nmse"], manifest.summary["mean_final_nmse"]],
        }
        print(json.dumps({objective: results["objectives"][objective]}), flush=True)
    return results


def run_cpu(args: argparse.Namespace) -> dict[str, Any]:
    """Library + BLD + scoring of the real SmolLM2 with the demo configuration's budget."""
    from puzzle.config import parse_config
    from puzzle.data import prepare
    from puzzle.library import bld, scoring
    from puzzle.library.variants import build_library
    from puzzle.parent import convert

    torch.set_num_threads(args.threads)
    config = parse_config(None)
    root = Path(args.dir)
    times: dict[str, float] = {}
    cpu_times: dict[str, float] = {}

    def cpu_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def timed(name: str, fn) -> Any:
        started, cpu_started = time.perf_counter(), cpu_seconds()
        out = fn()
        times[name] = round(time.perf_counter() - started, 1)
        cpu_times[name] = round(cpu_seconds() - cpu_started, 1)
        print(
            f"{name}: {times[name]} s wall, {cpu_times[name]} s CPU, load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        return out

    parent, tokens = str(root / "parent"), str(root / "tokens")
    timed("convert", lambda: convert(config.parent, parent))
    d = config.data
    timed("data", lambda: prepare(parent, tokens, d))
    lib, b = config.library, config.bld
    timed("library", lambda: build_library(parent, tokens, str(root / "library"), lib, device="cpu"))
    trained = timed(
        "bld",
        lambda: bld.train(str(root / "library"), parent, tokens, str(root / "bld"), b, device="cpu"),
    )
    sc = config.scoring
    scored = timed(
        "scoring",
        lambda: scoring.score(str(root / "bld"), parent, tokens, str(root / "scores"), sc, device="cpu"),
    )
    return {
        "device": "cpu",
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "budget": {
            "seq_len": d.seq_len,
            "splits": dict(d.splits),
            "space": dataclasses.asdict(lib),
            "bld_token_budget": b.token_budget,
            "bld_batch": b.batch_size,
            "score_batch": sc.batch_size,
        },
        "seconds": times,
        "cpu_seconds": cpu_times,
        "load_average_at_end": os.getloadavg(),
        "library_bld_scoring_s": round(times["library"] + times["bld"] + times["scoring"], 1),
        "bld": trained.summary,
        "scoring": scored.summary,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    gpu = sub.add_parser("gpu", help="BLD tokens/s and MFU of one layer's variants (random weights)")
    gpu.add_argument("--dir", required=True)
    gpu.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    gpu.add_argument("--steps", type=int, default=12)
    gpu.add_argument("--batch", type=int, default=8)
    gpu.add_argument("--seq-len", type=int, default=2048)
    gpu.add_argument("--vocab", type=int, default=8192)
    gpu.add_argument("--objectives", default="block,subblock")
    cpu = sub.add_parser("cpu", help="library + BLD + scoring wall time, real SmolLM2, demo budget")
    cpu.add_argument("--dir", required=True)
    cpu.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    results = run_gpu(args) if args.mode == "gpu" else run_cpu(args)
    shapes.print_json(
        results, args.json, default=lambda x: x if not isinstance(x, float) or math.isfinite(x) else None
    )


if __name__ == "__main__":
    main()
