"""GKD throughput (tokens/s) and model-FLOPs utilisation, on 1 and several GPUs.

Random weights of the real shapes (speed does not depend on weight values): the parent is the
SmolLM2-135M shape (or ``--shape llama-1b``), the child the same with 1 KV head and half-width
FFNs in every other layer. The step is :func:`puzzle.distill.train`'s own (parent forward on the
fly, child forward + backward, cosine + KL loss, AdamW), run through :func:`puzzle.distill.distill`
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

SHAPES = {
    "smollm2": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
    "llama-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
    "tiny": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    ),
}
PEAK_BF16 = 989e12


def child_blocks(config):
    from puzzle.modeling import BlockConfig

    narrow = config.blocks[0].ffn.intermediate_size // 2
    return [
        BlockConfig.from_name(f"attn_kv1+ffn_{narrow}") if i % 2 else block
        for i, block in enumerate(config.blocks)
    ]


def prepare(directory: Path, shape: str, seq_len: int, sequences: int) -> None:
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from puzzle.io import artifacts
    from puzzle.modeling import DeciLMForCausalLM
    from puzzle.modeling.checkpoints import child_config_like, save_child
    from puzzle.parent import parent_to_child

    torch.manual_seed(0)
    dims = SHAPES[shape]
    llama = LlamaForCausalLM(
        LlamaConfig(**dims, max_position_embeddings=max(2048, seq_len), bos_token_id=1, eos_token_id=2)
    )
    parent = parent_to_child(llama)

    def save(model, name):
        def body(staging: Path, _local) -> dict:
            save_child(model, None, staging, {"reference": f"random {shape}", "family": "llama"})
            save_tiny_tokenizer(staging, dims["vocab_size"])
            return {}

        artifacts.run_phase("child", str(directory / name), {}, {"shape": shape, "name": name}, body)

    save(parent, "parent")
    child = DeciLMForCausalLM(child_config_like(parent.config, child_blocks(parent.config)))
    save(child, "child")

    def tokens_body(staging: Path, _local) -> dict:
        ids = torch.randint(3, dims["vocab_size"], (sequences, seq_len), dtype=torch.int32)
        save_file({"input_ids": ids}, str(staging / "gkd.safetensors"))
        info = {
            "seq_len": seq_len,
            "splits": {
                "gkd": {"file": "gkd.safetensors", "sequences": sequences, "tokens": sequences * seq_len}
            },
        }
        (staging / "splits.json").write_text(json.dumps(info))
        return {}

    artifacts.run_phase(
        "tokens", str(directory / "tokens"), {}, {"seq_len": seq_len, "n": sequences}, tokens_body
    )


def save_tiny_tokenizer(directory: Path, vocab_size: int) -> None:
    """A byte-level tokenizer (token ids do not matter here: the tokens are random ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(3)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        if len(vocab) >= vocab_size:
            break
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<1>", eos_token="<2>", unk_token="<0>")
    fast.save_pretrained(directory)


def matmul_params(model) -> tuple[int, int, int]:
    """(matmul parameters incl. LM head, attention layers, attention width)."""
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attn = [b for b in model.config.blocks if b.attention.is_gqa]
    width = model.config.num_attention_heads * model.config.head_dim
    return n, len(attn), width


def train(directory: Path, steps: int, batch_per_gpu: int, out: Path | None) -> None:
    from puzzle.child.gkd import distill, init_distributed
    from puzzle.modeling.checkpoints import load_child

    info = init_distributed()
    seq_len = json.loads((directory / "tokens" / "splits.json").read_text())["seq_len"]
    batch = batch_per_gpu * info.world_size
    target = directory / f"distilled-{info.world_size}gpu"
    manifest = distill(
        str(directory / "child"),
        str(directory / "parent"),
        str(directory / "tokens"),
        str(target),
        token_budget=steps * batch * seq_len,
        batch_size=batch,
        lr=1e-4,
        warmup_fraction=0.0,
        checkpoint_every=10**9,
        device="auto",
    )
    if not info.is_main:
        return
    s = manifest.summary
    child, parent = load_child(str(target)), load_child(str(directory / "parent"))
    nc, lc, dc = matmul_params(child)
    np_, lp, dp = matmul_params(parent)
    flops_per_token = 6 * nc + 12 * lc * dc * seq_len + 2 * np_ + 4 * lp * dp * seq_len
    tps = s["tokens_per_s"]
    device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    peak = PEAK_BF16 * info.world_size
    result = {
        "device": device_name,
        "gpus": info.world_size,
        "steps": s["steps"],
        "global_batch": batch,
        "seq_len": seq_len,
        "tokens_per_s": tps,
        "tokens_per_s_per_gpu": tps / info.world_size,
        "model_tflops_per_token": flops_per_token / 1e12,
        "mfu": flops_per_token * tps / peak if torch.cuda.is_available() else None,
        "child_matmul_params": nc,
        "parent_matmul_params": np_,
        "final_loss": s["final_loss"],
    }
    print(json.dumps(result, indent=2), flush=True)
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n")


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
