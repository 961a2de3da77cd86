"""THE headline figure: quality kept at a measured speedup, Puzzle vs simpler ways to shrink.

On the real SmolLM2-135M-Instruct parent: Puzzle children at 1.5x and 2x measured decode
throughput, against uniform width pruning and layer dropping at the same measured speed and the
same BLD/GKD token budgets. Speed is measured on the GPU (random weights of each child's exact
architecture: speed does not depend on weight values) at batch 64, prompt 128, 1024 generated
tokens; quality on CPU with the real weights on held-out text: next-token accuracy kept (child /
parent), KL(parent||child), perplexity.

Stages, because the real weights cannot travel to the GPU machine and the GPU machine has no MIP
solver (``benchmarks/quality-inputs`` holds a few KB of shapes and architectures, not weights):

    # 1. CPU: convert, tokens, library, BLD, replace-1-block scores (long; run in the background)
    python benchmarks/bench_quality.py cpu-prepare --work /tmp/bq
    # 2. GPU: the block cost table at the workload; then (CPU) the MIP search at 1.5x and 2x and the
    #    baselines at the same targets; then (GPU) every architecture's measured throughput
    python benchmarks/bench_quality.py export-inputs --work /tmp/bq --inputs benchmarks/quality-inputs
    python3 benchmarks/bench_quality.py gpu-costs --inputs benchmarks/quality-inputs --out $OUT
    python benchmarks/bench_quality.py plan --work /tmp/bq --costs costs.json
    python benchmarks/bench_quality.py export-inputs --work /tmp/bq --inputs benchmarks/quality-inputs
    python3 benchmarks/bench_quality.py gpu-measure --inputs benchmarks/quality-inputs --out $OUT
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

TARGETS = (1.5, 2.0)

# Budgets (CPU-sized; the paper's are 6 orders of magnitude larger): the same for every child.
BENCH_CONFIG: dict[str, Any] = {
    "parent": "smollm2",
    "data": {
        "source": "stdlib",
        "seq_len": 128,
        "splits": {"calibration": 32, "bld": 128, "score": 8, "gkd": 256, "eval": 64},
        "seed": 0,
    },
    "device": "cpu",
    "library": {
        "kv_heads": None,
        "attention_linear": True,
        "attention_noop": True,
        "ffn_fractions": [1.0, 0.875, 0.75, 0.5, 0.25, 0.2, 0.1],
        "ffn_linear": True,
        "ffn_noop": True,
    },
    "bld": {"token_budget": 16384, "batch_size": 8, "lr": 1e-3},
    "scoring": {"metrics": ["kl_div", "lm_loss", "cosine", "top1_agreement"], "batch_size": 8},
    "gkd": {"token_budget": 16384, "batch_size": 8, "lr": 1e-4, "checkpoint_every": 8},
    "evaluate": {"batch_size": 8},
    "tracking": {"uri": None},
    "baselines": {"methods": ["uniform_width", "layer_dropping"], "gkd": True},
}


def bench_config(work: Path):
    from puzzle.config import parse_config

    return parse_config({**BENCH_CONFIG, "output": str(work)})


def stage_dir(work: Path, name: str) -> Path:
    """Where the run writes stage ``name``'s output under ``work`` (``bld`` -> ``trained/``)."""
    from puzzle.stages import stage

    return work / stage(name).folder


def cpu_prepare(work: Path) -> None:
    """Stage 1: the phases up to the scores, with the project's own runner."""
    from puzzle.run import Runner
    from puzzle.stages import stage

    runner = Runner(
        bench_config(work),
        on_phase=lambda r: print(
            f"[{r.phase:>8}] {'built' if r.rebuilt else 'up to date'} in {r.seconds:.0f} s", flush=True
        ),
    )
    outputs = runner.result.outputs
    for name in ("convert", "data", "library", "bld", "scoring"):
        outputs[name] = runner.execute(stage(name))
    print(
        json.dumps(
            {
                "parent": outputs["convert"],
                "tokens": outputs["data"],
                "bld": outputs["bld"],
                "scores": outputs["scoring"],
            },
            indent=2,
        )
    )


# --------------------------------------------------------------------------- stage 2: GPU speed


def export_inputs(work: Path, inputs: Path) -> None:
    """What the GPU machine needs (a few KB): the parent's config and the library's sub-block names."""
    from puzzle.search import costs

    inputs.mkdir(parents=True, exist_ok=True)
    config = costs._read_parent_config(str(stage_dir(work, "convert")))
    names = costs.library_subblocks(str(stage_dir(work, "bld")), config)
    (inputs / "parent_config.json").write_text(json.dumps(costs.config_to_json(config)))
    (inputs / "subblocks.json").write_text(json.dumps(names))
    plan = work / "plan.json"
    if plan.exists():
        (inputs / "plan.json").write_text(plan.read_text())
    print(f"wrote {inputs}: {len(names)} sub-blocks" + (", plan" if plan.exists() else ""))


def gpu_costs(inputs: Path, out: Path, device: str, workload: dict[str, int]) -> None:
    """Call 1 on the GPU: the per-sub-block cost table at the benchmark workload."""
    from puzzle.config import CostsConfig
    from puzzle.search import costs

    config = costs.config_from_json(json.loads((inputs / "parent_config.json").read_text()))
    names = json.loads((inputs / "subblocks.json").read_text())
    shape = CostsConfig(
        batch_sizes=[workload["batch_size"]], prompt_len=workload["prompt_len"], gen_len=workload["gen_len"]
    )
    table = costs.build_table(config, names, shape, costs.TorchBackend(device=device, repeats=3))
    (out / "costs.json").write_text(json.dumps(table, indent=2) + "\n")
    print(
        f"cost table of {len(names)} sub-blocks in {table['measurement']['build_seconds']:.0f} s "
        f"on {table['hardware']['device_name']}"
    )


def gpu_measure(inputs: Path, out: Path, repeats: int, device: str, workload: dict[str, int]) -> None:
    """Call 2 on the GPU: measured throughput of the parent and every planned architecture
    (random weights of the exact shapes), at the benchmark workload."""
    import torch

    from puzzle.modeling import BlockConfig, DeciLMForCausalLM, engine
    from puzzle.modeling.checkpoints import child_config_like
    from puzzle.search import costs

    config = costs.config_from_json(json.loads((inputs / "parent_config.json").read_text()))
    plan = json.loads((inputs / "plan.json").read_text())
    archs = {"parent": [b.name for b in config.blocks], **{k: v["blocks"] for k, v in plan.items()}}
    results = {}
    for name, blocks in archs.items():
        torch.manual_seed(0)
        model = DeciLMForCausalLM(child_config_like(config, [BlockConfig.from_name(b) for b in blocks]))
        if device.startswith("cuda"):
            model = model.to(torch.bfloat16)
        r = engine.measure_throughput(model, **workload, device=device, repeats=repeats)
        results[name] = {
            "throughput": r["throughput"],
            "total_s": r["total_s"],
            "decode_s": r["decode_s"],
            "prefill_s": r["prefill_s"],
            "device_name": r["device_name"],
            "blocks": blocks,
        }
        print(f"{name:>24}: {r['throughput']:10.0f} tokens/s", flush=True)
        del model
    base = results["parent"]["throughput"]
    for r in results.values():
        r["speedup"] = r["throughput"] / base
    (out / "speed.json").write_text(json.dumps({"workload": workload, "models": results}, indent=2) + "\n")


# ------------------------------------------------------------------- the plan (CPU, between the calls)


def plan(work: Path, costs_json: Path) -> None:
    """Search (MIP) for 1.5x and 2x with the GPU cost table; the baselines at the same targets."""
    from puzzle.config import SearchConfig
    from puzzle.io import artifacts
    from puzzle.search import baselines
    from puzzle.search import mip as search

    def costs_body(staging: Path, _local: dict) -> dict:
        (staging / "costs.json").write_text(costs_json.read_text())
        return {}

    costs_uri = str(work / "costs-gpu")
    artifacts.run_phase("costs", costs_uri, {"table": str(costs_json)}, {}, costs_body)
    scores = str(stage_dir(work, "scoring"))
    result: dict[str, Any] = {}
    for target in TARGETS:
        constraint = f"throughput>={target}x"
        settings = SearchConfig(objective="kl_div", constraints=[constraint])
        out = work / f"solutions-{target}x"
        search.search(scores, costs_uri, str(out), settings)
        best = search.load_solutions(str(out))["solutions"][0]
        result[f"puzzle@{target}x"] = {
            "blocks": best["blocks"],
            "predicted_speedup": best["relative_to_parent"]["throughput"],
            "solutions": str(out),
        }
        for method in BENCH_CONFIG["baselines"]["methods"]:
            out = work / f"baseline-{method}-{target}x"
            baselines.baseline(
                method,
                scores,
                costs_uri,
                str(out),
                settings,
                library=str(stage_dir(work, "bld")),
                device="cpu",
            )
            best = search.load_solutions(str(out))["solutions"][0]
            result[f"{method}@{target}x"] = {
                "blocks": best["blocks"],
                "predicted_speedup": best["relative_to_parent"]["throughput"],
                "solutions": str(out),
            }
    (work / "plan.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, r in result.items():
        print(f"{name:>24}: predicted {r['predicted_speedup']:.2f}x")


# --------------------------------------------------------------------------- stage 3: CPU quality


def cpu_quality(work: Path, speed_json: Path) -> None:
    """Realize every planned child from the BLD library, GKD each with the same budget, and
    measure quality against the parent on the held-out split; print the table."""
    from puzzle.child.evaluate import quality_metrics
    from puzzle.child.gkd import distill
    from puzzle.child.realize import realize
    from puzzle.data import load_split
    from puzzle.modeling.checkpoints import load_model

    cfg = bench_config(work)
    g = cfg.gkd
    speed = json.loads(speed_json.read_text())["models"]
    plan_data = json.loads((work / "plan.json").read_text())
    parent_uri, tokens = str(stage_dir(work, "convert")), str(stage_dir(work, "data"))
    trained = str(stage_dir(work, "bld"))
    distilled: dict[str, str] = {}
    realized: dict[str, str] = {}
    for name, entry in plan_data.items():
        slug = name.replace("@", "-")
        realized[name] = str(work / "realized" / slug)
        realize(trained, entry["solutions"], parent_uri, realized[name])
        distilled[name] = str(work / "distilled" / slug)
        t0 = time.perf_counter()
        distill(realized[name], parent_uri, tokens, distilled[name], g, device="cpu")
        print(f"GKD {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    held_out = load_split(tokens, "eval")
    parent = load_model(parent_uri)
    models = {f"{n} (before GKD)": load_model(u) for n, u in realized.items()}
    models.update({n: load_model(u) for n, u in distilled.items()})
    quality = quality_metrics(models, parent, held_out, batch_size=8)
    rows = []
    for name in plan_data:
        q, q0 = quality[name], quality[f"{name} (before GKD)"]
        rows.append(
            {
                "child": name,
                "predicted_speedup": plan_data[name]["predicted_speedup"],
                "measured_speedup": speed[name]["speedup"],
                "throughput": speed[name]["throughput"],
                "accuracy_kept": q["accuracy"] / quality["parent"]["accuracy"],
                "kl_div": q["kl_div"],
                "perplexity": q["perplexity"],
                "kl_before_gkd": q0["kl_div"],
                "accuracy_kept_before_gkd": q0["accuracy"] / quality["parent"]["accuracy"],
            }
        )
    result = {
        "parent": {**quality["parent"], **speed["parent"]},
        "children": rows,
        "tokens": int(held_out.numel() - held_out.shape[0]),
        "budgets": {"bld": cfg.bld.token_budget, "gkd": g.token_budget},
    }
    (work / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    p = quality["parent"]
    print(
        f"parent: accuracy {p['accuracy']:.4f}, perplexity {p['perplexity']:.2f}, "
        f"{speed['parent']['throughput']:.0f} tokens/s on {speed['parent']['device_name']}"
    )
    print(
        "| child | measured speedup (GPU) | predicted | accuracy kept | KL(parent‖child) | perplexity | "
        "accuracy kept before GKD | KL before GKD |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['child']} | {r['measured_speedup']:.2f}x | {r['predicted_speedup']:.2f}x | "
            f"{r['accuracy_kept']:.1%} | {r['kl_div']:.3f} | {r['perplexity']:.2f} | "
            f"{r['accuracy_kept_before_gkd']:.1%} | {r['kl_before_gkd']:.3f} |"
        )


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda", help="cuda (the benchmark); cpu only for a smoke test")
    p.add_argument("--workload", default="64,128,1024", help="batch,prompt,generated (default 64,128,1024)")


def parse_workload(text: str) -> dict[str, int]:
    batch, prompt, gen = (int(x) for x in text.split(","))
    return {"batch_size": batch, "prompt_len": prompt, "gen_len": gen}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("cpu-prepare")
    p.add_argument("--work", type=Path, required=True)
    p = sub.add_parser("export-inputs")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--inputs", type=Path, required=True)
    p = sub.add_parser("gpu-costs")
    p.add_argument("--inputs", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    add_device_args(p)
    p = sub.add_parser("plan")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--costs", type=Path, required=True, help="costs.json from gpu-costs")
    p = sub.add_parser("gpu-measure")
    p.add_argument("--inputs", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=2)
    add_device_args(p)
    p = sub.add_parser("cpu-quality")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--speed", type=Path, required=True, help="speed.json from gpu-measure")
    args = parser.parse_args()
    t0 = time.perf_counter()
    if args.cmd == "cpu-prepare":
        cpu_prepare(args.work)
    elif args.cmd == "export-inputs":
        export_inputs(args.work, args.inputs)
    elif args.cmd == "gpu-costs":
        gpu_costs(args.inputs, args.out, args.device, parse_workload(args.workload))
    elif args.cmd == "plan":
        plan(args.work, args.costs)
    elif args.cmd == "gpu-measure":
        gpu_measure(args.inputs, args.out, args.repeats, args.device, parse_workload(args.workload))
    else:
        cpu_quality(args.work, args.speed)
    print(f"{args.cmd}: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
