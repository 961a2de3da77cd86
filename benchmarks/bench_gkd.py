"""GKD throughput (tokens/s) and model-FLOPs utilisation, on 1 and several GPUs.

Random weights of the real shapes (speed does not depend on weight values): the parent is the
SmolLM2-135M shape (or ``--shape llama-1b``), the child the same with 1 KV head and half-width
FFNs in every other layer. The step is :func:`puzzle.child.gkd.train`'s own (parent forward on the
fly, child forward + backward, cosine + KL loss, AdamW), run through :func:`puzzle.child.gkd.distill`
so the figures include everything the phase does per step.

    python benchmarks/bench_gkd.py prepare --dir /tmp/gkd              # artifacts (one process)
    python benchmarks/bench_gkd.py train --dir /tmp/gkd --steps 30     # 1 GPU
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_gkd.py train --dir /tmp/gkd --steps 30

MFU counts model FLOPs per trained token as PaLM does: child 6 N_c + 12 L_c d T (forward and
backward), parent 2 N_p + 4 L_p d T (forward only), N = matmul parameters (LM head included),
L = attention layers, d = attention width, T = sequence length; divided by the GPUs' dense bf16
peak (989 TFLOP/s per H100/H200 SXM).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import shapes  # noqa: E402

# --shape -> the table's shape.
SHAPES = {"smollm2": "smollm2-135m", "llama-1b": "llama-3.2-1b", "tiny": "tiny"}
# As this benchmark has always built them: transformers' default rms_norm_eps, plain RoPE (no llama3
# scaling for llama-1b) and tied embeddings (tiny's too).
AS_BEFORE = dict(rms_norm_eps=shapes.TRANSFORMERS_RMS_NORM_EPS, tie_word_embeddings=True)


def child_blocks(config):
    from puzzle.modeling import BlockConfig

    narrow = config.blocks[0].ffn.intermediate_size // 2
    return [
        BlockConfig.from_name(f"attn_kv1+ffn_{narrow}") if i % 2 else block
        for i, block in enumerate(config.blocks)
    ]


def prepare(directory: Path, shape: str, seq_len: int, sequences: int) -> None:
    from puzzle.modeling import DeciLMForCausalLM
    from puzzle.modeling.checkpoints import CHILD_KIND, PARENT_KIND, child_config_like

    name = SHAPES[shape]
    parent = shapes.random_parent(
        name, rope_parameters=shapes.plain_rope(name), max_position_embeddings=max(2048, seq_len), **AS_BEFORE
    )
    vocab_size = parent.config.vocab_size

    def save(model, what: str, kind: str) -> None:
        params = {"shape": shape, "name": what}
        shapes.save_random_model(
            directory / what, kind, params, lambda: model, shape=shape, vocab_size=vocab_size
        )

    save(parent, "parent", PARENT_KIND)
    child = DeciLMForCausalLM(child_config_like(parent.config, child_blocks(parent.config)))
    save(child, "child", CHILD_KIND)
    shapes.save_random_tokens(  # from the global generator, after the two models
        directory / "tokens",
        vocab_size=vocab_size,
        seq_len=seq_len,
        splits={"gkd": sequences},
        parameters={"seq_len": seq_len, "n": sequences},
        seed=None,
    )


def matmul_params(model) -> tuple[int, int, int]:
    """(matmul parameters incl. LM head, attention layers, attention width)."""
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attn = [b for b in model.config.blocks if b.attention.is_gqa]
    width = model.config.num_attention_heads * model.config.head_dim
    return n, len(attn), width


def train(directory: Path, steps: int, batch_per_gpu: int, out: Path | None) -> None:
    from puzzle.child.gkd import distill, init_distributed
    from puzzle.config import GKDConfig
    from puzzle.modeling.checkpoints import load_model

    info = init_distributed()
    seq_len = json.loads((directory / "tokens" / "splits.json").read_text())["seq_len"]
    batch = batch_per_gpu * info.world_size
    target = directory / f"distilled-{info.world_size}gpu"
    manifest = distill(
        str(directory / "child"),
        str(directory / "parent"),
        str(directory / "tokens"),
        str(target),
        GKDConfig(
            token_budget=steps * batch * seq_len,
            batch_size=batch,
            lr=1e-4,
            warmup_fraction=0.0,
            checkpoint_every=10**9,
        ),
        device="auto",
    )
    if not info.is_main:
        return
    s = manifest.summary
    child, parent = load_model(str(target)), load_model(str(directory / "parent"))
    nc, lc, dc = matmul_params(child)
    np_, lp, dp = matmul_params(parent)
    flops_per_token = 6 * nc + 12 * lc * dc * seq_len + 2 * np_ + 4 * lp * dp * seq_len
    tps = s["tokens_per_s"]
    device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    result = {
        "device": device_name,
        "gpus": info.world_size,
        "steps": s["steps"],
        "global_batch": batch,
        "seq_len": seq_len,
        "tokens_per_s": tps,
        "tokens_per_s_per_gpu": tps / info.world_size,
        "model_tflops_per_token": flops_per_token / 1e12,
        "mfu": shapes.mfu(flops_per_token, tps, info.world_size) if torch.cuda.is_available() else None,
        "child_matmul_params": nc,
        "parent_matmul_params": np_,
        "final_loss": s["final_loss"],
    }
    shapes.print_json(result, out)


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--sequences", type=int, default=2048)
    t = sub.add_parser("train")
    t.add_argument("--dir", type=Path, required=True)
    t.add_argument("--steps", type=int, default=30)
    t.add_argument("--batch-per-gpu", type=int, default=16)
    t.add_argument("--out", type=Path, default=None, help="also write the figures here (JSON)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    if args.cmd == "prepare":
        prepare(args.dir, args.shape, args.seq_len, args.sequences)
        print(f"prepared {args.shape} artifacts in {args.dir} ({time.perf_counter() - t0:.1f} s)")
    else:
        train(args.dir, args.steps, args.batch_per_gpu, args.out)


if __name__ == "__main__":
    main()
