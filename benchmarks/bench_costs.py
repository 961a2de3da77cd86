"""Cost tables on the GPU: build time, predicted vs measured child throughput, decode bandwidth.

For SmolLM2-135M and Llama-3.1-8B shapes (random weights of the real shapes; speed does not
depend on the values) and the default search space, at batch 1, 16, 64, 256, prompt 128, 1024
generated tokens:

1. the cost table (:func:`puzzle.search.costs.build_table`, what ``puzzle costs`` writes) and the time
   to build it;
2. calibration: 5 random children per shape (each layer's attention and FFN drawn from the
   table) realized with random weights and run whole in the engine; predicted (sum of the
   table) vs measured throughput (goal: within 5 %);
3. the decode bandwidth check: the Llama-3.1-8B-shaped parent at batch 64, bytes a decode step
   must read (weights + filled KV cache at the mean context) over the card's measured
   device-to-device copy bandwidth (read + write), against the measured step time (goal: 60 %).

Work is done in that order of priority; with ``--budget-s`` the calibrations that would not fit
are skipped and said so. Every result is written to ``OUT/bench_costs.json`` as it comes::

    python3 benchmarks/bench_costs.py --out /tmp/bc                 # GPU, the figures of RESULTS.md
    python benchmarks/bench_costs.py --out /tmp/bc --tiny           # CPU smoke test, tiny shapes
    python benchmarks/bench_costs.py --out /tmp/bc --demo           # CPU, the demo's table (see below)

``--demo``: what ``make demo`` measures on CPU: SmolLM2-135M shapes, the embedded default library's
sub-blocks, batch 1, prompt 64, 32 generated tokens, float32, 6 random children plus the parent.
Wall and CPU seconds and the load average before and after are recorded with every table and
calibration (on a shared machine other work's contention shows in both).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import llama_config  # noqa: E402

from puzzle.config import CostsConfig, LibraryConfig  # noqa: E402
from puzzle.library.variants import PAPER_LIBRARY, plan_layers  # noqa: E402
from puzzle.modeling import BlockConfig, DeciLMConfig, engine  # noqa: E402
from puzzle.modeling.checkpoints import child_config_like  # noqa: E402
from puzzle.modeling.devices import resolve_device  # noqa: E402
from puzzle.search import costs  # noqa: E402

# --shapes -> the table's shape (the real models' configurations, as this benchmark has always used).
SHAPES = {"smollm2": "smollm2-135m", "llama-3.1-8b": "llama-3.1-8b", "tiny": "tiny"}

log = logging.getLogger("bench_costs")


def shape_config(name: str) -> DeciLMConfig:
    from puzzle.parent import decilm_config

    return decilm_config(llama_config(SHAPES[name]))


def cpu_seconds() -> float:
    """CPU seconds this process has used (user + system, every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class Results:
    """The results document, rewritten after every step (a timeout still leaves what was done)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"shapes": {}, "skipped": []}

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")


def iqr(entry: dict[str, Any]) -> str:
    """The quartiles of an entry's runtime over its repeats ('' for an entry not timed)."""
    q = entry.get("spread", {}).get("runtime_ms")
    return f"{q['q1']:.1f} .. {q['q3']:.1f}" if q else ""


def print_table(table: costs.CostTable) -> None:
    sizes = table.batch_sizes
    print(
        f"  {'sub-block':<20}{'params':>13}"
        + "".join(f"{'bs ' + str(b) + ' dec ms':>16}" for b in sizes)
        + "".join(f"{'bs ' + str(b) + ' run ms':>16}" for b in sizes)
        + "".join(f"{'bs ' + str(b) + ' run IQR':>22}" for b in sizes)
    )
    for name in [costs.FIXED, *table.names]:
        e = {b: table.subblock(name, b) for b in sizes}
        print(
            f"  {name:<20}{e[sizes[0]]['params']:>13,}"
            + "".join(f"{e[b]['decode_ms']:>16.4f}" for b in sizes)
            + "".join(f"{e[b]['runtime_ms']:>16.1f}" for b in sizes)
            + "".join(f"{iqr(e[b]):>22}" for b in sizes)
        )
    for b in sizes:
        print(f"  parent predicted at bs {b}: {table.throughput(table.parent_blocks, b):,.0f} tokens/s")


def bandwidth_check(
    backend: costs.TorchBackend, table: costs.CostTable, batch: int, copy_bw: float
) -> dict[str, Any]:
    """The parent at ``batch``: measured decode step vs bytes read over the copy bandwidth."""
    config = table.config()
    workload = CostsConfig(batch_sizes=[batch], prompt_len=table.prompt_len, gen_len=table.gen_len)
    got = backend.measure_model(config, workload)[batch]
    bound_s = got["decode_bytes_per_step"] / copy_bw
    predicted = table.totals(table.parent_blocks, batch)
    return {
        "batch_size": batch,
        "decode_step_ms": got["decode_step_s"] * 1e3,
        "bytes_per_step": got["decode_bytes_per_step"],
        "bound_ms": bound_s * 1e3,
        "fraction_of_bound": bound_s / got["decode_step_s"],
        "achieved_bandwidth_tb_s": got["decode_bytes_per_step"] / got["decode_step_s"] / 1e12,
        "measured_throughput": got["throughput"],
        "predicted_throughput": predicted["throughput"],
        "error_pct": 100.0 * (predicted["throughput"] - got["throughput"]) / got["throughput"],
        "peak_memory_gib": (got["peak_memory_bytes"] or 0) / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for bench_costs.json and the cost tables")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny shapes and workload")
    parser.add_argument("--demo", action="store_true", help="CPU: the demo's shapes, library and workload")
    parser.add_argument("--shapes", default=None, help="comma-separated (default: smollm2,llama-3.1-8b)")
    parser.add_argument("--batch-sizes", default="1,16,64,256")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=1024)
    parser.add_argument("--children", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="table timing repeats (calibration runs once)")
    parser.add_argument("--bandwidth-batch", type=int, default=64)
    parser.add_argument(
        "--budget-s", type=float, default=None, help="skip calibrations that would end after this"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        shapes, sizes, prompt_len, gen_len, device = ["tiny"], [1, 2], 8, 6, "cpu"
        args.children, args.repeats, args.bandwidth_batch = 2, 1, 2
    elif args.demo:
        shapes, sizes, prompt_len, gen_len, device = ["smollm2"], [1], 64, 32, "cpu"
        args.children, args.bandwidth_batch = 6, 1
    else:
        shapes = (args.shapes or "smollm2,llama-3.1-8b").split(",")
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        prompt_len, gen_len, device = args.prompt_len, args.gen_len, "auto"
    dev = resolve_device(device)
    results = Results(out / "bench_costs.json")
    copy_bw = engine.copy_bandwidth(dev, megabytes=1024 if dev.type == "cuda" else 64)
    results.data.update(
        device=engine.device_name(dev),
        torch=torch.__version__,
        copy_bandwidth_tb_s=copy_bw / 1e12,
        workload={"batch_sizes": sizes, "prompt_len": prompt_len, "gen_len": gen_len},
        command=" ".join(sys.argv),
    )
    print(
        f"device {results.data['device']}, torch {torch.__version__}, "
        f"copy bandwidth {copy_bw / 1e12:.2f} TB/s"
    )
    results.save()

    def left() -> float:
        return float("inf") if args.budget_s is None else args.budget_s - (time.perf_counter() - started)

    tables: dict[str, costs.CostTable] = {}
    backends: dict[str, costs.TorchBackend] = {}
    # 1. Tables (and the bandwidth check right after the 8B table, while its backend is warm).
    for shape in shapes:
        config = shape_config(shape)
        space = LibraryConfig() if args.demo else PAPER_LIBRARY
        names = list(dict.fromkeys(n for layer in plan_layers(config, space, None).values() for n in layer))
        backend = costs.TorchBackend(device=device, repeats=args.repeats)
        workload = CostsConfig(batch_sizes=list(sizes), prompt_len=prompt_len, gen_len=gen_len)
        t0, cpu0, load0 = time.perf_counter(), cpu_seconds(), load_average()
        try:
            data = costs.build_table(config, names, workload, backend)
        except Exception as exc:  # noqa: BLE001 - record it and go on with the other shape
            log.exception("table of %s failed", shape)
            results.data["shapes"][shape] = {"error": repr(exc)}
            results.save()
            continue
        build_s = time.perf_counter() - t0
        (out / f"costs_{shape}.json").write_text(json.dumps(data, indent=2) + "\n")
        table = costs.CostTable(data, f"costs_{shape}.json")
        tables[shape], backends[shape] = table, backend
        entry = results.data["shapes"].setdefault(shape, {})
        entry.update(
            build_seconds=build_s,
            build_cpu_seconds=cpu_seconds() - cpu0,
            load_average={"before": load0, "after": load_average()},
            subblocks=names,
            hardware=data["hardware"],
            stack_layers={n: data["subblocks"][n].get("stack_layers") for n in names},
            parent_predicted_throughput={b: table.throughput(table.parent_blocks, b) for b in sizes},
        )
        print(
            f"\n{shape}: table of {len(names)} sub-blocks + fixed built in {build_s:.1f} s "
            f"({entry['build_cpu_seconds']:.1f} CPU s, load average {load0} -> "
            f"{entry['load_average']['after']})"
        )
        print_table(table)
        results.save()
        if shape != "smollm2" or len(shapes) == 1:
            try:
                bw = bandwidth_check(backend, table, args.bandwidth_batch, copy_bw)
            except Exception as exc:  # noqa: BLE001
                log.exception("bandwidth check failed")
                entry["bandwidth"] = {"error": repr(exc)}
                results.save()
                continue
            entry["bandwidth"] = bw
            print(
                f"  {shape} parent at bs {bw['batch_size']}: decode step {bw['decode_step_ms']:.2f} ms, "
                f"{bw['bytes_per_step'] / 1e9:.2f} GB/step -> bound {bw['bound_ms']:.2f} ms: "
                f"{100 * bw['fraction_of_bound']:.1f} % of the copy-bandwidth bound "
                f"({bw['achieved_bandwidth_tb_s']:.2f} TB/s); "
                f"parent predicted {bw['predicted_throughput']:,.0f} vs "
                f"measured {bw['measured_throughput']:,.0f} tokens/s ({bw['error_pct']:+.1f} %)"
            )
            results.save()

    # 2. Calibration, in order of priority: the bandwidth batch first, then the others.
    order = [args.bandwidth_batch] + [b for b in sizes if b != args.bandwidth_batch]
    plan = [(shape, b) for b in order for shape in shapes if b in sizes]
    plan.sort(key=lambda sb: (sb[1] != args.bandwidth_batch, sb[0] != "smollm2"))
    for shape, batch in plan:
        if shape not in tables:
            continue
        table, backend = tables[shape], backends[shape]
        children = costs.random_children(table, args.children, seed=1)
        entry = results.data["shapes"][shape].setdefault("calibration", {})
        rows = []
        for index, arch in enumerate(children):
            estimate = 1.3 * table.runtime_ms(arch, batch) / 1e3 + 3.0
            if estimate > left():
                results.data["skipped"].append(
                    f"{shape} child {index} at batch {batch} (~{estimate:.0f} s left out)"
                )
                print(
                    f"  skipped {shape} child {index} at bs {batch}: ~{estimate:.0f} s, {left():.0f} s left"
                )
                continue
            config = child_config_like(table.config(), [BlockConfig.from_name(b) for b in arch])
            workload = CostsConfig(batch_sizes=[batch], prompt_len=table.prompt_len, gen_len=table.gen_len)
            t0, cpu0 = time.perf_counter(), cpu_seconds()
            try:
                got = backend.measure_model(config, workload, seed=index + 1)[batch]
            except Exception as exc:  # noqa: BLE001
                log.exception("calibration of %s child %d at batch %d failed", shape, index, batch)
                results.data["skipped"].append(f"{shape} child {index} at batch {batch}: {exc!r}")
                results.save()
                continue
            predicted = table.totals(arch, batch)
            row = {
                "child": index,
                "blocks": arch,
                "predicted_throughput": predicted["throughput"],
                "measured_throughput": got["throughput"],
                "error_pct": 100.0 * (predicted["throughput"] - got["throughput"]) / got["throughput"],
                "predicted_prefill_ms": predicted["prefill_ms"],
                "measured_prefill_ms": got["prefill_s"] * 1e3,
                "predicted_decode_ms": predicted["decode_ms"],
                "measured_decode_ms": got["decode_step_s"] * 1e3,
                "seconds": time.perf_counter() - t0,
                "cpu_seconds": cpu_seconds() - cpu0,
                "load_average": load_average(),
            }
            rows.append(row)
            entry[str(batch)] = rows
            results.save()
            print(
                f"  {shape} child {index} bs {batch}: predicted {row['predicted_throughput']:,.0f}, measured "
                f"{row['measured_throughput']:,.0f} tokens/s ({row['error_pct']:+.1f} %); decode step "
                f"{row['predicted_decode_ms']:.3f} vs {row['measured_decode_ms']:.3f} ms, prefill "
                f"{row['predicted_prefill_ms']:.1f} vs {row['measured_prefill_ms']:.1f} ms "
                f"({row['seconds']:.1f} s)"
            )
    for shape in shapes:
        calib = results.data["shapes"][shape].get("calibration", {})
        errors = [abs(r["error_pct"]) for rows in calib.values() for r in rows]
        if errors:
            results.data["shapes"][shape]["calibration_summary"] = {
                "runs": len(errors),
                "mean_abs_error_pct": sum(errors) / len(errors),
                "max_abs_error_pct": max(errors),
                "within_5pct": sum(e <= 5 for e in errors) / len(errors),
            }
            s = results.data["shapes"][shape]["calibration_summary"]
            print(
                f"{shape}: {s['runs']} runs, mean |error| {s['mean_abs_error_pct']:.2f} %, max "
                f"{s['max_abs_error_pct']:.2f} %, {100 * s['within_5pct']:.0f} % within 5 %"
            )
    results.data["total_seconds"] = time.perf_counter() - started
    results.data["total_cpu_seconds"] = cpu_seconds()
    results.save()
    print(f"total {results.data['total_seconds']:.0f} s; results in {results.path}")


if __name__ == "__main__":
    main()
