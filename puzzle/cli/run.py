"""`puzzle run`: the whole method, end to end, from one configuration file."""

from __future__ import annotations

import argparse
import textwrap

DESCRIPTION = """\
Run every Puzzle phase in order and export the child:

  convert   the parent -> an all-parent child artifact              child/
  data      text -> token splits (calibration/bld/score/gkd/eval)   tokens/
  library   every block variant of every layer, from the parent     library/
  bld       blockwise local distillation of the variants            bld/
  scores    replace-1-block scores (KL to the parent, ...)          scores/
  costs     measured per-block latency and memory on this machine   costs/
  search    the MIP: best child under the constraints               solutions/
  baselines uniform width, layer dropping, ... (same constraints)   baselines/<method>/
  realize   the chosen child assembled from the library             realized/
  gkd       global distillation of the child against the parent    distilled/
  evaluate  quality (KL, perplexity, accuracy kept) and measured
            speedup of the child and the baselines; report          evaluation/report.{md,html}
  export    Hugging Face checkpoint (Nemotron-NAS layout)           export/
  register  MLflow Model Registry + gate (when registry.model_name is set)

Everything goes under the config's `output` (a local directory or s3://bucket/prefix).

Resume: a phase whose output already exists for the same inputs and parameters is skipped, so
running the same command again finishes at once, and a run that was stopped (Ctrl-C, a crash,
a killed pod) continues where it stopped: GKD and BLD resume from their last checkpoint. To redo
one phase, delete its directory: that phase and the phases after it that depend on it re-run.

Without --config, the embedded default runs: the real SmolLM2-135M-Instruct parent, the Python
standard library as text, local storage under ./puzzle-runs/default, a local MLflow store, and
the constraint "throughput>=1.5x" (1.5 times the parent's decode throughput measured on this
machine); budgets are sized to finish in about 15 minutes on 2 CPU cores.

The configuration is validated before any model is loaded (unknown fields, types, ranges,
constraint syntax, impossible constraints, reachability of the output and inputs); every field
is documented in docs/config.md, with a commented example in configs/example.yaml.
"""

EPILOG = """\
examples:
  puzzle run                                       # the embedded default
  puzzle run --print-config > my.yaml              # start your own config from the default
  puzzle run --config my.yaml --check              # validate only
  puzzle run --config my.yaml --set output=s3://bucket/runs/a --set "search.constraints=['throughput>=2x']"
  MLFLOW_TRACKING_URI=http://mlflow:5000 puzzle run --config my.yaml --set registry.model_name=smollm2-fast
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="run every phase end to end (resumable) from one config; no config: the embedded default",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config", metavar="FILE", help="run configuration (YAML, local or s3://); default: embedded"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set gkd.lr=2e-4 (value parsed as YAML; repeatable)",
    )
    p.add_argument("--check", action="store_true", help="validate the configuration and storage, then stop")
    p.add_argument(
        "--print-config", action="store_true", help="print the full resolved configuration as YAML and stop"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from puzzle.config import load_config

    config = load_config(args.config, args.overrides, check_access=not args.print_config)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    if args.check:
        print(f"configuration OK (digest {config.digest}); output: {config.output}")
        return 0

    from puzzle.child.evaluate import read_metrics
    from puzzle.run import PhaseRecord
    from puzzle.run import run as run_all

    def show(record: PhaseRecord) -> None:
        state = "built" if record.rebuilt else "up to date"
        print(f"[{record.phase:>24}] {state:<10} {record.seconds:7.1f} s  {record.uri}", flush=True)

    print(
        f"puzzle run: parent {config.parent}, output {config.output}, constraints {config.search.constraints}"
    )
    result = run_all(config, on_phase=show, check_access=False)
    metrics = read_metrics(result.evaluation_uri)
    print()
    primary = metrics.get("primary")
    for name in sorted((n for n in metrics["models"] if n != "parent"), key=lambda n: (n != primary, n)):
        row = metrics["models"][name]
        kept = row.get("accuracy_kept")
        kept_text = "undefined (parent accuracy 0)" if kept is None else f"{kept:.1%}"
        print(
            f"{name:>16}: accuracy kept {kept_text} at {row['speedup']:.2f}x measured throughput, "
            f"KL {row['kl_div']:.4f}, perplexity {row['perplexity']:.2f}"
        )
    print(f"\nreport: {result.evaluation_uri}/report.md (and report.html)")
    print(f"export: {result.export_uri}")
    print(
        textwrap.indent(
            "load it: AutoModelForCausalLM.from_pretrained(<export>, trust_remote_code=True)", "  "
        )
    )
    if result.registration is not None:
        gate = "passed: alias champion" if result.gate.passed else "failed: " + "; ".join(result.gate.reasons)
        print(f"registered: {result.registration.uri} (alias candidate); gate {gate}")
    return 0
