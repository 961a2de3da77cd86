"""Replace-1-block scoring: seconds per scored variant, SmolLM2 shapes (random weights).

A random SmolLM2-135M-shaped parent (30 layers, hidden 576, vocabulary 49,152), its library with
the paper's search space (:data:`puzzle.library.variants.PAPER_LIBRARY`), and the scoring loop of
:func:`puzzle.library.scoring.score` (:func:`puzzle.library.scoring.score_rows`: parent pass, then
every row) on random token ids (speed does not depend on the values); all five metrics::

    python benchmarks/bench_scoring.py --dir /tmp/score --sequences 16 --seq-len 128      # GPU
    python benchmarks/bench_scoring.py --dir /tmp/score --device cpu --threads 2 --layers 0,15,29

``seconds_per_variant`` = the scoring loop's wall time (parent pass included, after a warm-up) / rows.
A row at layer l runs layers l..29 and the LM head, so on a subset of layers the figure depends on which.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_bld import make_random_parent  # noqa: E402
from shapes import print_json, save_random_tokens  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", default=None, help="comma-separated layers to score (default: all 30)")
    parser.add_argument("--dtypes", default="float32", help="comma-separated: float32,bfloat16")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from puzzle.data import load_split
    from puzzle.library import scoring
    from puzzle.library.variants import PAPER_LIBRARY, Library, build_library
    from puzzle.modeling.checkpoints import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    root = Path(args.dir)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    parent = make_random_parent(root / "parent", "smollm2", layers=30, vocab_size=49152, seq_len=args.seq_len)
    tokens = save_random_tokens(
        root / "tokens",
        vocab_size=49152,
        seq_len=args.seq_len,
        splits={"calibration": 4, "score": args.sequences},
    )
    build_library(parent, tokens, str(root / "library"), PAPER_LIBRARY, layers=layers, device=device)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0)
        if device.startswith("cuda")
        else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "sequences": args.sequences,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "layers": layers or "all",
        "runs": {},
    }
    lib = Library.open(str(root / "library"))
    rows = scoring.plan_rows(lib, layers=layers)
    ids = load_split(tokens, "score")
    for dtype in args.dtypes.split(","):
        model = load_model(parent, dtype=dtype, device=device)
        scoring.score_rows(model, lib, rows[:2], ids[: args.batch], metrics=list(scoring.METRICS))  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        scoring.score_rows(model, lib, rows, ids, metrics=list(scoring.METRICS), batch_size=args.batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        loop = time.perf_counter() - started
        results["runs"][dtype] = {
            "rows": len(rows),
            "scoring_s": round(loop, 2),
            "seconds_per_variant": round(loop / len(rows), 4),
            "scored_tokens_per_s": round(len(rows) * ids.shape[0] * (args.seq_len - 1) / loop, 1),
        }
        print(json.dumps({dtype: results["runs"][dtype]}), flush=True)
        del model
    print_json(results, args.json)


if __name__ == "__main__":
    main()
