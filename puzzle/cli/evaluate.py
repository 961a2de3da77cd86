"""`puzzle evaluate`: children vs the parent on held-out tokens, measured speed, and a report."""

from __future__ import annotations

import argparse

from puzzle.errors import PuzzleError


class _ChildArgError(PuzzleError, ValueError):
    pass


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate children against the parent (KL, perplexity, accuracy, measured speed) with a report",
        description=(
            "Quality on a held-out split: KL(parent||child), LM loss and perplexity, next-token accuracy "
            "(and the share of the parent's kept), top-1/top-5 agreement with the parent. Speed: decode "
            "throughput and memory of the parent and each child measured on this machine at the workload. "
            "Writes metrics.json, report.md, report.html (standalone), pareto.png and architecture.png. "
            "Optional lm-evaluation-harness tasks run when lm_eval and the task data are available."
        ),
    )
    p.add_argument(
        "children",
        nargs="+",
        metavar="NAME=URI",
        help="children to evaluate, e.g. puzzle=runs/x/distilled uniform_width=runs/x/baselines/uniform_width",
    )
    p.add_argument("--parent", required=True, help="the parent as an all-parent child artifact")
    p.add_argument("--tokens", required=True, help="tokens artifact")
    p.add_argument(
        "--out", required=True, help="output evaluation artifact: local directory or s3://bucket/prefix"
    )
    p.add_argument("--split", default="eval", help="held-out split (default eval)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--workload-batch", type=int, default=1, help="speed workload: batch size (default 1)")
    p.add_argument("--prompt-len", type=int, default=64, help="speed workload: prompt tokens (default 64)")
    p.add_argument("--gen-len", type=int, default=64, help="speed workload: generated tokens (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="speed measurements per model (default 3)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="NAME",
        help="mark child NAME as a baseline in the report (repeatable)",
    )
    p.add_argument(
        "--lm-eval-task",
        action="append",
        default=[],
        metavar="TASK",
        help="an lm-evaluation-harness task (repeatable; skipped when unavailable)",
    )
    p.set_defaults(func=run)


def parse_children(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, uri = item.partition("=")
        if not sep or not name or not uri:
            raise _ChildArgError(
                f"child {item!r} must look like NAME=URI, e.g. puzzle=runs/default/distilled"
            )
        out[name] = uri
    return out


def run(args: argparse.Namespace) -> int:
    from puzzle.child.evaluate import Workload, evaluate, read_metrics

    children = parse_children(args.children)
    unknown = [b for b in args.baseline if b not in children]
    if unknown:
        raise _ChildArgError(f"--baseline {unknown[0]} is not one of the children ({', '.join(children)})")
    evaluate(
        children,
        args.parent,
        args.tokens,
        args.out,
        split=args.split,
        batch_size=args.batch_size,
        workload=Workload(batch_size=args.workload_batch, prompt_len=args.prompt_len, gen_len=args.gen_len),
        device=args.device,
        repeats=args.repeats,
        lm_eval_tasks=args.lm_eval_task,
        details={name: {"role": "baseline"} for name in args.baseline},
    )
    metrics = read_metrics(args.out)
    print(f"evaluation written to {args.out} (report.md, report.html)")
    for name, row in metrics["models"].items():
        if name == "parent":
            print(
                f"  parent: accuracy {row['accuracy']:.4f}, perplexity {row['perplexity']:.2f}, "
                f"{row['throughput']:.1f} tokens/s"
            )
            continue
        print(
            f"  {name}: accuracy kept {row['accuracy_kept']:.1%} at {row['speedup']:.2f}x, "
            f"KL {row['kl_div']:.4f}, perplexity {row['perplexity']:.2f}"
        )
    return 0
