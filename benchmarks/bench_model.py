"""Benchmark the child model itself (issue: core package).

GPU (default when CUDA is present): forward throughput of our DeciLMForCausalLM converted from a
transformers LlamaForCausalLM holding the SAME random weights, for SmolLM2-135M and
Llama-3.1-8B shapes, batch 16 x 1024 tokens, bf16; ours must be >= 0.95x of transformers'.
CPU (--cpu-convert): wall time to convert and export the real SmolLM2-135M parent.

    python benchmarks/bench_model.py                 # GPU forward comparison
    python benchmarks/bench_model.py --cpu-convert   # CPU convert + export timing
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import TRANSFORMERS_RMS_NORM_EPS, llama_config  # noqa: E402

SHAPES = ("smollm2-135m", "llama-3.1-8b")
# As this benchmark has always built them: transformers' default rms_norm_eps, 8192 positions.
AS_BEFORE = dict(rms_norm_eps=TRANSFORMERS_RMS_NORM_EPS, max_position_embeddings=8192)


def gpu_forward(shape: str, batch: int, seq: int, repeats: int) -> dict:
    from transformers import LlamaForCausalLM

    from puzzle.parent import to_decilm

    config = llama_config(shape, **AS_BEFORE)
    torch.manual_seed(0)
    with torch.device("cuda"):
        reference = LlamaForCausalLM._from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa"
        ).eval()
    ours = to_decilm(reference).cuda().eval()  # shares the same weight tensors
    ids = torch.randint(0, config.vocab_size, (batch, seq), device="cuda")
    with torch.no_grad():
        diff = (
            (reference(ids[:2, :128]).logits.float() - ours(ids[:2, :128]).logits.float()).abs().max().item()
        )

    def timed(model) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.no_grad():
            start.record()
            model(ids, use_cache=False)
            end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    for _ in range(3):
        timed(reference), timed(ours)
    ref_ms, our_ms = [], []
    for _ in range(repeats):  # interleaved, so clock drift hits both equally
        ref_ms.append(timed(reference))
        our_ms.append(timed(ours))
    tokens = batch * seq
    ref, our = statistics.median(ref_ms), statistics.median(our_ms)
    result = {
        "shape": shape,
        "batch": batch,
        "seq": seq,
        "dtype": "bfloat16",
        "transformers_ms": round(ref, 3),
        "ours_ms": round(our, 3),
        "transformers_tok_s": round(tokens / ref * 1e3),
        "ours_tok_s": round(tokens / our * 1e3),
        "ratio": round(ref / our, 4),
        "max_abs_logit_diff_bf16": diff,
        "spread_ours_ms": [round(min(our_ms), 3), round(max(our_ms), 3)],
    }
    del reference, ours
    torch.cuda.empty_cache()
    return result


def cpu_convert_export() -> dict:
    from puzzle.child.export import export
    from puzzle.config import ExportConfig
    from puzzle.parent import convert

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        convert("smollm2", str(Path(tmp) / "parent"))
        t1 = time.perf_counter()
        export(str(Path(tmp) / "parent"), str(Path(tmp) / "export"), ExportConfig())
        t2 = time.perf_counter()
    return {"convert_s": round(t1 - t0, 1), "export_s": round(t2 - t1, 1), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu-convert", action="store_true")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None, help="write JSON results here")
    args = parser.parse_args()
    if args.cpu_convert:
        results = [cpu_convert_export()]
    else:
        assert torch.cuda.is_available(), "GPU benchmark needs CUDA (use --cpu-convert on CPU)"
        results = [gpu_forward(s, args.batch, args.seq, args.repeats) for s in SHAPES]
        print(f"device: {torch.cuda.get_device_name()} torch {torch.__version__}")
    for r in results:
        print(json.dumps(r))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
