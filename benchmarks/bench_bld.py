"""BLD throughput and model-FLOPs utilisation (GPU), and the CPU wall time of library + BLD + scoring.

GPU: one Llama-3.1-8B-shaped layer (hidden 4096, 32 heads, 8 KV heads, FFN 14336; random
weights: speed does not depend on their values; a small vocabulary since BLD never touches the
LM head) and its full default library (attention kv4/kv2/kv1/linear, FFN 12544 ... 1536/linear),
trained by :func:`puzzle.bld.train` itself (bf16 autocast, fused AdamW, parent activations
shared by all 11 variants)::

    python benchmarks/bench_bld.py gpu --dir /tmp/bld --steps 12 --batch 8 --seq-len 2048

Steady-state tokens/s comes from per-step timestamps (CUDA synchronised) after 2 warm-up steps.
Model FLOPs per token, PaLM convention (attention 4·d·S forward, 12·d·S forward+backward):
parent layer forward 2·N_parent + 4·d·S; each variant 6·N_variant (+ 12·d·S for GQA); with the
default ``block`` objective an attention variant also runs the parent's frozen FFN forward and
backward to its input, 4·N_ffn. MFU divides by 989 TFLOP/s (dense bf16, H100/H200 SXM).

CPU: the real SmolLM2-135M parent with the demo's budget (``puzzle/configs/default.yaml``)::

    python benchmarks/bench_bld.py cpu --dir /tmp/bld-cpu [--threads 2]
"""

from __future__ import annotations

import argparse
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

PEAK_BF16 = 989e12
SHAPES = {
    "llama-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
    ),
    "smollm2": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        rope_theta=100000.0,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=10000.0,
    ),
}


def save_tokenizer(directory: Path, vocab_size: int) -> None:
    """A byte-level tokenizer; the benchmark's tokens are random ids, so its merges do not matter."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(3)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        if len(vocab) >= min(vocab_size, 259):
            break
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<1>", eos_token="<2>", unk_token="<0>"
    ).save_pretrained(directory)


def make_random_parent(out: Path, shape: str, *, layers: int, vocab_size: int, seq_len: int) -> str:
    """A child artifact holding a random Llama parent of ``shape`` (float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from puzzle.io import artifacts
    from puzzle.modeling.checkpoints import save_child
    from puzzle.parent import parent_to_child

    def body(staging: Path, _local: dict) -> dict:
        torch.manual_seed(0)
        config = LlamaConfig(
            **SHAPES[shape],
            vocab_size=vocab_size,
            num_hidden_layers=layers,
            max_position_embeddings=max(4096, seq_len),
            bos_token_id=1,
            eos_token_id=2,
        )
        model = parent_to_child(LlamaForCausalLM(config))
        save_child(model, None, staging, {"reference": f"random {shape}", "family": "llama"})
        save_tokenizer(staging, vocab_size)
        return {}

    artifacts.run_phase("child", str(out), {}, {"shape": shape, "layers": layers, "vocab": vocab_size}, body)
    return str(out)


def make_random_tokens(out: Path, *, vocab_size: int, seq_len: int, splits: dict[str, int]) -> str:
    """A tokens artifact of random ids (same layout as :func:`puzzle.data.prepare`)."""
    from safetensors.torch import save_file

    from puzzle.io import artifacts

    def body(staging: Path, _local: dict) -> dict:
        gen = torch.Generator().manual_seed(0)
        table = {}
        for name, count in splits.items():
            ids = torch.randint(3, vocab_size, (count, seq_len), dtype=torch.int32, generator=gen)
            save_file({"input_ids": ids}, str(staging / f"{name}.safetensors"))
            table[name] = {"file": f"{name}.safetensors", "sequences": count, "tokens": count * seq_len}
        (staging / "splits.json").write_text(json.dumps({"seq_len": seq_len, "splits": table, "seed": 0}))
        return {}

    artifacts.run_phase("tokens", str(out), {}, {"seq_len": seq_len, "splits": splits}, body)
    return str(out)


def matmul_params(state: dict[str, torch.Tensor]) -> int:
    return int(sum(t.numel() for t in state.values() if t.dim() == 2))


def flops_per_token(lib: Any, layer: int, seq_len: int, objective: str, d_attn: int) -> dict[str, float]:
    """Model FLOPs per training token of one BLD step over every trainable variant of ``layer``."""
    parent = lib.parent_block(layer)
    n_attn = matmul_params(lib.load(layer, parent.attention.name))
    n_ffn = matmul_params(lib.load(layer, parent.ffn.name))
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
    from puzzle.library import bld
    from puzzle.library.variants import Library, SearchSpace, build_library

    root = Path(args.dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    parent = make_random_parent(
        root / "parent", args.shape, layers=1, vocab_size=args.vocab, seq_len=args.seq_len
    )
    tokens = make_random_tokens(
        root / "tokens",
        vocab_size=args.vocab,
        seq_len=args.seq_len,
        splits={"calibration": 4, "bld": args.steps * args.batch, "score": 2},
    )
    started = time.perf_counter()
    build_library(parent, tokens, str(root / "library"), space=SearchSpace(), batch_size=2, device=device)
    library_s = time.perf_counter() - started
    lib = Library.open(str(root / "library"))
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
            token_budget=args.steps * args.batch * args.seq_len,
            batch_size=args.batch,
            lr=1e-4,
            warmup_fraction=0.1,
            objective=objective,
            val_sequences=2,
            checkpoint_every=10**6,
            device=device,
            on_step=on_step,
        )
        phase_s = time.perf_counter() - started
        warm = 2 if len(stamps) > 3 else 0
        per_step = (stamps[-1] - stamps[warm]) / (len(stamps) - 1 - warm)
        tokens_per_s = args.batch * args.seq_len / per_step
        flops = flops_per_token(lib, 0, args.seq_len, objective, d_attn)
        results["objectives"][objective] = {
            "trained_variants": manifest.summary["trained_variants"],
            "seconds_per_step": round(per_step, 4),
            "tokens_per_s": round(tokens_per_s, 1),
            "variant_tokens_per_s": round(tokens_per_s * manifest.summary["trained_variants"], 1),
            "model_tflop_per_token": flops["total"] / 1e12,
            "achieved_tflops": round(flops["total"] * tokens_per_s / 1e12, 1),
            "mfu": round(flops["total"] * tokens_per_s / PEAK_BF16, 4),
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
    from puzzle.library.variants import SearchSpace, build_library
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

    child, tokens = str(root / "child"), str(root / "tokens")
    timed("convert", lambda: convert(config.parent, child))
    d = config.data
    timed(
        "data",
        lambda: prepare(d.source, child, tokens, seq_len=d.seq_len, splits=dict(d.splits), seed=d.seed),
    )
    s = config.search_space
    space = SearchSpace(
        attention_kv_heads=tuple(s.kv_heads) if s.kv_heads else None,
        attention_linear=s.attention_linear,
        attention_noop=s.attention_noop,
        ffn_fractions=tuple(s.ffn_fractions),
        ffn_linear=s.ffn_linear,
        ffn_noop=s.ffn_noop,
    )
    b = config.bld
    timed(
        "library",
        lambda: build_library(
            child, tokens, str(root / "library"), space=space, batch_size=b.batch_size, device="cpu"
        ),
    )
    trained = timed(
        "bld",
        lambda: bld.train(
            str(root / "library"),
            child,
            tokens,
            str(root / "bld"),
            token_budget=b.token_budget,
            batch_size=b.batch_size,
            lr=b.lr,
            warmup_fraction=b.warmup_fraction,
            seed=b.seed,
            device="cpu",
        ),
    )
    sc = config.scoring
    scored = timed(
        "scoring",
        lambda: scoring.score(
            str(root / "bld"),
            child,
            tokens,
            str(root / "scores"),
            metrics=list(sc.metrics),
            split=sc.split,
            batch_size=sc.batch_size,
            device="cpu",
        ),
    )
    return {
        "device": "cpu",
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "budget": {
            "seq_len": d.seq_len,
            "splits": dict(d.splits),
            "space": space.to_json(),
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
    text = json.dumps(
        results, indent=2, default=lambda x: x if not isinstance(x, float) or math.isfinite(x) else None
    )
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
