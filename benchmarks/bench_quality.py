"""THE headline figure: quality kept at a measured speedup, Puzzle vs simpler ways to shrink.

On the real SmolLM2-135M-Instruct parent: Puzzle children at 1.5x and 2x measured decode
throughput, against uniform width pruning and layer dropping at the same measured speed and the
same BLD/GKD token budgets. Speed is measured on the GPU (random weights of each child's exact
architecture: speed does not depend on weight values) at batch 64, prompt 128, 1024 generated
tokens; quality on CPU with the real weights on held-out text: next-token accuracy kept (child /
parent), KL(parent||child), perplexity.

Three stages, because the real weights cannot travel to the GPU machine and the GPU machine has
no MIP solver:

    # 1. CPU: convert, tokens, library, BLD, replace-1-block scores (long; run in the background)
    python benchmarks/bench_quality.py cpu-prepare --work /tmp/bq
    # 2. GPU: block cost table at the workload, search at 1.5x and 2x, baselines calibrated to the
    #    same measured speed, every architecture's measured throughput  (--inputs travel with the tree)
    python benchmarks/bench_quality.py export-inputs --work /tmp/bq --inputs benchmarks/.quality-inputs
    python3 benchmarks/bench_quality.py gpu-speed --inputs benchmarks/.quality-inputs --out $OUT
    # 3. CPU: realize every architecture from the BLD library, the same GKD budget for each,
    #    evaluate all of them against the parent; prints the table for RESULTS.md
    python benchmarks/bench_quality.py cpu-quality --work /tmp/bq --speed $OUT/speed.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORKLOAD = {"batch_size": 64, "prompt_len": 128, "gen_len": 1024}
TARGETS = (1.5, 2.0)

# Budgets (CPU-sized; the paper's are 6 orders of magnitude larger): the same for every child.
BENCH_CONFIG: dict[str, Any] = {
    "parent": "smollm2",
    "data": {"source": "stdlib", "seq_len": 128,
             "splits": {"calibration": 32, "bld": 128, "score": 8, "gkd": 256, "eval": 64}, "seed": 0},
    "search_space": {"kv_heads": None, "attention_linear": True, "attention_noop": True,
                     "ffn_fractions": [1.0, 0.875, 0.75, 0.5, 0.25, 0.2, 0.1], "ffn_linear": True, "ffn_noop": True},
    "bld": {"token_budget": 16384, "batch_size": 8, "lr": 1e-3, "device": "cpu"},
    "scoring": {"metrics": ["kl_div", "lm_loss", "cosine", "top1_agreement"], "batch_size": 8, "device": "cpu"},
    "gkd": {"token_budget": 16384, "batch_size": 8, "lr": 1e-4, "checkpoint_every": 8, "device": "cpu"},
    "evaluate": {"batch_size": 8, "device": "cpu"},
    "tracking": {"uri": None},
    "baselines": {"methods": ["uniform_width", "layer_dropping"], "gkd": True},
}


def bench_config(work: Path):
    from puzzle.config import parse_config

    return parse_config({**BENCH_CONFIG, "output": str(work)})


def cpu_prepare(work: Path) -> None:
    """Stage 1: the phases up to the scores, with the project's own runner."""
    from puzzle.run import Runner

    runner = Runner(bench_config(work), on_phase=lambda r: print(
        f"[{r.phase:>8}] {'built' if r.rebuilt else 'up to date'} in {r.seconds:.0f} s", flush=True))
    child = runner.convert()
    tokens = runner.data(child)
    library = runner.library(child, tokens)
    trained = runner.bld(library, child, tokens)
    runner.scores(trained, child, tokens)
    print(json.dumps({"child": child, "tokens": tokens, "bld": trained, "scores": runner.uri("scores")}, indent=2))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("cpu-prepare")
    p.add_argument("--work", type=Path, required=True)
    args = parser.parse_args()
    t0 = time.perf_counter()
    if args.cmd == "cpu-prepare":
        cpu_prepare(args.work)
    print(f"{args.cmd}: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
