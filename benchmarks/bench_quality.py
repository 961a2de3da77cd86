"""Issue 13, the headline figure on a GPU: quality kept at a measured speedup, Puzzle against every
baseline, with the real SmolLM2-135M parent and the whole method as ``puzzle run`` runs it.

``run`` carries out a plan of ``puzzle run`` processes (``benchmarks/quality_gpu.yaml``, budgets
issue 13's minimums) over the GPUs of one machine (``--gpus``), each process on GPUs of its own
(``CUDA_VISIBLE_DEVICES``) and each spreading its units over them with ``--jobs``:

    upstream        convert, data, library, BLD and scoring shards, costs (`--until costs`), all GPUs
    upstream-nobld  the initialised library (bld.token_budget 0) scored, all GPUs
    t1.5, t2        side by side, the GPUs shared out: search -> realize -> GKD beside the baselines
                    (uniform_width, noop_only, greedy, layer_dropping, the same GKD), then the
                    evaluation (quality in and out of domain with 95 % intervals, speed at batch 64
                    and 1), export; their phases up to the cost table are hard links to upstream's
    t1.5-nobld      Puzzle on the initialised library at 1.5x (the no-BLD ablation), on a free GPU
    tT-no-gkd       quality of every realized child before its GKD (the no-GKD ablation)

The in-domain text is the Python source of the GPU machine's installed packages (copied once into
``--corpus``; ~306 MB, far more than the 25.7M tokens the splits take); out of domain is English
prose (``data.ood_source: english``). Every task resumes what was finished (``puzzle run`` skips
finished phases, BLD and GKD resume from checkpoints); a task whose evaluation would start with
less than ``--evaluate-s`` seconds left stops instead (an evaluation cannot resume midway).
``summarize`` writes ``quality_gpu.json`` in issue 13's format, copies the reports and plots, and
prints the table; ``merge`` joins the summaries of several machines (a task redone elsewhere with
``run --only TASK``) into one.

Device calls (at most 10 minutes each; the machine is given back ~30 s after a call ends, so make
each call right after the previous one and do nothing to the working tree in between: every call
sends it again, and a phase whose code changed is rebuilt):

    # here, once: bash benchmarks/quality_wheels.sh && ../shared/tools/gpu-weights
    1. carry [".gpu-weights/p1"]   2. carry [".gpu-weights/p2"]   (the parent, in two parts)
    3. carry [".whl/quality"]: install the wheels, then ``start`` (``run`` in its own session, which
       outlives the call while the machine is held) and follow its log for ~9 minutes
    4.., no carry: ``start`` again (follows the running driver, or restarts it, resuming)

The exact command lines: ``python benchmarks/bench_quality.py commands``. A CPU rehearsal with tiny
budgets: ``eval "python benchmarks/bench_quality.py run --work /tmp/bq --limit 3000 --gpus 2
--parent smollm2 --corpus stdlib $(python benchmarks/bench_quality.py rehearse-args)"``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = REPO / "benchmarks" / "quality_gpu.yaml"
PARENT = "/root/w/smollm2.gguf"
TARGETS = [1.5, 2.0]
CORPUS = "/root/w/pycode"
BATCH = 64  # the workload batch size the throughput target is pinned to (issue 13)
PROGRESS = "progress.jsonl"
ABLATION = "no-gkd"  # the ablation's figures: <work>/<root>-no-gkd.json
RESERVE_S = 25.0  # stop after a phase when fewer seconds are left (a new phase loads models first)
EVALUATE_S = 180.0  # the evaluation (~150 s on one H100) cannot resume midway
KILL_GRACE_S = 10.0

# A phase line of `puzzle run` ("[   bld] built   85.2 s  /root/w/q/t1.5/trained"), an artifact
# being built (run_phase's INFO line), and what else is worth echoing from its log.
RECORD = re.compile(
    r"^\[\s*(?P<phase>[\w.-]+)\]\s+(?P<state>built|up to date)\s+(?P<seconds>[\d.]+) s\s+(?P<uri>\S+)"
)
BUILDING = re.compile(r" INFO (\[[^\]]*\] )?[\w.]+: (?P<kind>[\w|-]+): building (?P<uri>\S+)")
ECHO = re.compile(
    r"( (WARNING|ERROR|CRITICAL) |Traceback|Error\b|error:|resuming|search step \d+|candidates: |"
    r"^puzzle run: |^  \S+: accuracy|^(report|export): |knapsack: CBC|^\s+File \")"
)

# Tiny budgets for a CPU rehearsal of the same driver: the SmolLM2 parent, 64-token sequences, a
# 2-variant library, and a parameter bound instead of the speed target (a shared CPU's timings are
# too noisy for the search's measured-speed check):
#   eval "python benchmarks/bench_quality.py run --work /tmp/bq --limit 600 --parent smollm2 \
#         $(python benchmarks/bench_quality.py rehearse-args)"
REHEARSAL = [
    "device=cpu",
    "data.seq_len=64",
    "data.splits={calibration: 4, bld: 8, score: 2, gkd: 8, eval: 4}",
    "data.ood_sequences=4",
    "library.kv_heads=[3]",
    "library.attention_linear=false",
    "library.ffn_linear=false",
    "library.ffn_noop=false",
    "library.ffn_fractions=[1.0, 0.5]",
    "library.batch_size=4",
    "bld.token_budget=512",
    "bld.batch_size=2",
    "bld.val_sequences=1",
    "bld.checkpoint_every=1",
    "scoring.metrics=[kl_div, lm_loss]",
    "scoring.batch_size=2",
    "scoring.shards=2",
    "costs.batch_sizes=[1, 4]",
    "costs.prompt_len=16",
    "costs.gen_len=8",
    "costs.repeats=1",
    "search.speed_margin=0.0",
    "gkd.token_budget=256",
    "gkd.batch_size=2",
    "gkd.checkpoint_every=1",
    "evaluate.seq_len=64",
    "evaluate.batch_size=2",
    "evaluate.repeats=1",
    "evaluate.bootstrap=100",
    "export.dtype=float32",
    "search.constraints=['params<=0.85x']",
    "bld.shards=2",
    "scoring.dtype=float32",
    "gkd.compile='off'",
]


# --------------------------------------------------------------------------- helpers


def now() -> str:
    return datetime.datetime.now().strftime("%H:%M:%S")


def say(message: str) -> None:
    print(f"[bench {now()}] {message}", flush=True)


def target_root(work: Path, target: float) -> Path:
    """The ``puzzle run`` output of one target: ``<work>/t1.5``."""
    return work / f"t{target:g}"


def target_roots(work: Path) -> list[Path]:
    """Every target's output under ``work``, lowest target first."""
    found = [p for p in work.glob("t*") if p.is_dir() and re.fullmatch(r"t\d+(\.\d+)?(-nobld)?", p.name)]
    return sorted(found, key=lambda p: (float(p.name[1:].removesuffix(NO_BLD)), p.name))


def load_run_config(config: Path, overrides: list[str]) -> Any:
    from puzzle.config import load_config

    return load_config(str(config), overrides, check_access=False)


def upstream_folders() -> list[str]:
    """Output folders of the phases before the search (the same for every target)."""
    from puzzle.stages import stage

    names = ("convert", "data", "library", "bld", "scoring", "costs")
    folders = [stage(n).folder for n in names]
    return folders + [f"{stage(n).folder}-shards" for n in ("bld", "scoring")]


class Progress:
    """``<work>/progress.jsonl``: every call, phase and stop, for the summary's phase times."""

    def __init__(self, work: Path, root: str) -> None:
        self.path = work / PROGRESS
        self.root = root
        events = self.read(work)
        self.call = 1 + sum(1 for e in events if e.get("event") == "start")

    @staticmethod
    def read(work: Path) -> list[dict[str, Any]]:
        path = work / PROGRESS
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def add(self, event: str, **fields: Any) -> None:
        entry = {"event": event, "call": self.call, "root": self.root, "time": time.time(), **fields}
        with self.path.open("a") as fh:
            fh.write(json.dumps(entry) + "\n")


@dataclasses.dataclass
class Outcome:
    state: str  # "done" | "stopped" | "failed"
    returncode: int | None
    building: str | None
    last_lines: list[str]


def supervise(
    cmd: list[str],
    *,
    deadline: float,
    reserve: float,
    log_path: Path,
    progress: Progress,
    needs: dict[str, float] | None = None,
    root: str | None = None,
    env: dict[str, str] | None = None,
    prefix: str = "",
) -> Outcome:
    """Run ``cmd`` (its output into ``log_path``, the lines that matter echoed), stopping it at
    ``deadline`` (monotonic seconds), or after a phase when less than ``reserve`` seconds are left,
    or when a phase that cannot resume midway is about to be built (its output folder's name in
    ``needs``) with fewer seconds left than it needs."""
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("TQDM_DISABLE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    lines: queue.Queue[str | None] = queue.Queue()
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        process_group=0,  # its own group (same session): stopped with everything it started
    )

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    building: str | None = None
    building_since = time.monotonic()
    tail: list[str] = []
    reason: str | None = None
    last_beat = time.monotonic()
    with log_path.open("a") as log:
        log.write(f"# {now()} {' '.join(cmd)}\n")
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                reason = "the deadline (--limit) was reached"
                break
            try:
                line = lines.get(timeout=min(5.0, left))
            except queue.Empty:
                if time.monotonic() - last_beat >= 60 and building:
                    say(f"{prefix}: ... building {building} for {time.monotonic() - building_since:.0f} s")
                    last_beat = time.monotonic()
                continue
            if line is None:
                break
            log.write(line + "\n")
            log.flush()
            tail = (tail + [line])[-80:]
            if (m := BUILDING.search(line)) is not None:
                building, building_since = m["uri"], time.monotonic()
                left = deadline - time.monotonic()
                need = (needs or {}).get(Path(building).name, 0.0)
                if left < need and proc.poll() is None:
                    reason = f"{left:.0f} s are left, less than the {need:.0f} s {Path(building).name} needs"
                    building = None  # stopped before it did anything
                    break
                say(f"{prefix}: building {building}")
                last_beat = time.monotonic()
                continue
            if (m := RECORD.match(line)) is not None:
                progress.add(
                    "phase",
                    phase=m["phase"],
                    state=m["state"],
                    seconds=float(m["seconds"]),
                    uri=m["uri"],
                    **({"root": root} if root else {}),
                )
                building = None
                print(f"{prefix:>12} {line}", flush=True)
                left = deadline - time.monotonic()
                if left < reserve and proc.poll() is None:
                    reason = f"{left:.0f} s are left, less than --reserve {reserve:.0f} s"
                    break
                continue
            if ECHO.search(line):
                print(f"{prefix:>12} {line}", flush=True)
        if reason is not None:
            _stop(proc)
            seconds = time.monotonic() - building_since if building else 0.0
            progress.add(
                "stopped",
                building=building,
                seconds=seconds,
                reason=reason,
                **({"root": root} if root else {}),
            )
            say(
                f"{prefix}: stopped: {reason}"
                + (f", while building {building} ({seconds:.0f} s in)" if building else "")
            )
            return Outcome("stopped", None, building, tail)
        code = proc.wait()
    return Outcome("done" if code == 0 else "failed", code, building, tail)


def _stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM to the process group, SIGKILL after a grace period (checkpoints are written
    atomically, so either leaves the staging resumable)."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# --------------------------------------------------------------------------- run

NO_BLD = "-nobld"  # the no-BLD ablation's root: <work>/t1.5-nobld
NO_BLD_SETS = ["bld.token_budget=0", "bld.coupled=none", "baselines.methods=[]"]


@dataclasses.dataclass
class Task:
    """One process of the plan: ``puzzle run`` on one root (or the no-GKD ablation of one), on
    ``gpus`` GPUs of its own, once the tasks it comes ``after`` are done."""

    name: str
    root: Path
    gpus: int
    after: tuple[str, ...]
    overrides: list[str]
    run_args: list[str] = dataclasses.field(default_factory=list)
    seed: bool = False  # start from the first target's phases up to the cost table (hard links)
    ablate: bool = False
    needs: dict[str, float] = dataclasses.field(default_factory=dict)


def plan(args: argparse.Namespace) -> list[Task]:
    """The tasks of the whole benchmark, in priority order (see the module docstring)."""
    work = Path(args.work).resolve()
    gpus, targets = args.gpus, sorted(args.targets)
    first = target_root(work, targets[0])
    per_target = max(1, gpus // len(targets))

    def sets(root: Path, target: float, extra: list[str] = []) -> list[str]:  # noqa: B006 - read only
        return [
            f"output={root}",
            f"parent={args.parent}",
            f"data.source={args.corpus}",
            f"search.constraints=['throughput>={target:g}x@bs{args.batch}']",
            *args.set,
            *extra,
        ]

    tasks = [
        Task("upstream", first, gpus, (), sets(first, targets[0]), ["--jobs", str(gpus), "--until", "costs"])
    ]
    ready = "upstream"
    nobld = work / f"{first.name}{NO_BLD}"
    if args.no_bld:
        tasks.append(
            Task(
                "upstream" + NO_BLD,
                nobld,
                gpus,
                ("upstream",),
                sets(nobld, targets[0], NO_BLD_SETS),
                ["--jobs", str(gpus), "--until", "costs"],
                seed=True,
            )
        )
        ready = "upstream" + NO_BLD
    for target in targets:
        root = target_root(work, target)
        jobs = ["--jobs", str(per_target)]
        tasks.append(
            Task(
                root.name,
                root,
                per_target,
                (ready,),
                sets(root, target),
                jobs,
                seed=True,
                needs={"evaluation": args.evaluate_s},
            )
        )
    if args.no_bld:
        tasks.append(
            Task(nobld.name, nobld, 1, (ready,), sets(nobld, targets[0], NO_BLD_SETS), ["--jobs", "1"])
        )
    if args.ablation:
        for target in targets:
            root = target_root(work, target)
            tasks.append(
                Task(f"{root.name}-{ABLATION}", root, 1, (root.name,), sets(root, target), ablate=True)
            )
        if args.no_bld:
            tasks.append(
                Task(
                    f"{nobld.name}-{ABLATION}",
                    nobld,
                    1,
                    (nobld.name,),
                    sets(nobld, targets[0], NO_BLD_SETS),
                    ablate=True,
                )
            )
    if args.only:
        unknown = sorted(set(args.only) - {t.name for t in tasks})
        if unknown:
            names = ", ".join(t.name for t in tasks)
            raise SystemExit(f"--only: no task {', '.join(unknown)} (the plan's tasks: {names})")
        kept = {t.name for t in tasks if t.name in args.only}
        tasks = [
            dataclasses.replace(t, after=tuple(a for a in t.after if a in kept))
            for t in tasks
            if t.name in kept
        ]
    return tasks


def _task_command(args: argparse.Namespace, task: Task) -> list[str]:
    sets = [a for o in task.overrides for a in ("--set", o)]
    if task.ablate:
        return [sys.executable, str(Path(__file__).resolve()), "ablate", "--config", str(args.config), *sets]
    # -v: each phase's INFO log (to the task's log file), whose "building" lines the driver follows
    return [sys.executable, "-m", "puzzle", "-v", "run", "--config", str(args.config), *sets, *task.run_args]


def prepare_corpus(dest: Path) -> dict[str, Any]:
    """The in-domain text on the GPU machine: every Python source file of the installed packages
    (torch, transformers, numpy, ...; tests left out), copied once into ``dest``. Recorded in
    ``dest/CORPUS.json`` (files, bytes, the folders read)."""
    import site

    record = dest / "CORPUS.json"
    if record.is_file():
        return json.loads(record.read_text())
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    roots = sorted({Path(p).resolve() for p in [*site.getsitepackages(), *sys.path] if "-packages" in p})
    roots = [r for r in roots if r.is_dir()]
    files = bytes_ = 0
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            parts = set(path.relative_to(root).parts[:-1])
            if parts & {"tests", "test", "testing", "__pycache__"} or path.name.startswith("test_"):
                continue
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if not 64 <= size <= 512_000:
                continue
            target = tmp / root.name / path.relative_to(root)
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            files += 1
            bytes_ += size
    info = {"roots": [str(r) for r in roots], "files": files, "bytes": bytes_}
    (tmp / "CORPUS.json").write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return info


def _link_upstream(work: Path, task: Task, first: Path) -> None:
    """Hard-link the phases up to the cost table from ``first`` (an ablation root without BLD takes
    only the parent, the tokens and the initialised library)."""
    from puzzle.io import artifacts

    folders = upstream_folders() if not task.root.name.endswith(NO_BLD) else ["parent", "tokens", "library"]
    for folder in folders:
        source, target = first / folder, task.root / folder
        complete = source.is_dir() and (
            artifacts.read_manifest(str(source)) is not None or folder.endswith("-shards")
        )
        if target.exists() or not complete:
            continue
        task.root.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, target, copy_function=os.link)
        say(f"{task.root.name}/{folder}: linked from {first.name}")


def cmd_run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    deadline = started + args.limit
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "driver.pid").write_text(str(os.getpid()))
    if args.corpus != "stdlib":
        corpus = prepare_corpus(Path(args.corpus))
        say(f"in-domain corpus {args.corpus}: {corpus['files']:,} files, {corpus['bytes'] / 1e6:.0f} MB")
    tasks = plan(args)
    for task in tasks:  # every configuration checked before any GPU second is spent
        if not task.ablate:
            config = load_run_config(args.config, task.overrides)
            (work / f"config-{task.root.name}.yaml").write_text(config.to_yaml())
    progress = Progress(work, "driver")
    progress.add("start", limit=args.limit, tasks=[t.name for t in tasks], gpus=args.gpus)
    done = {e["task"] for e in Progress.read(work) if e.get("event") == "task-done"}
    free = list(range(args.gpus))
    first = tasks[0].root
    results: queue.Queue[tuple[Task, list[int], Outcome]] = queue.Queue()
    running: dict[str, list[int]] = {}
    failed: set[str] = set()
    say(
        f"call {progress.call}: {len(tasks)} tasks on {args.gpus} GPUs, {len(done)} done before, "
        f"deadline in {args.limit:.0f} s"
    )

    def launch(task: Task, gpus: list[int]) -> None:
        env_gpus = ",".join(str(g) for g in gpus)
        if task.seed:
            _link_upstream(work, task, first)
        log_path = work / "logs" / f"call{progress.call}-{task.name}.log"
        progress.add("task-start", task=task.name, gpus=env_gpus)
        say(f"{task.name}: starting on GPU {env_gpus}")
        outcome = supervise(
            _task_command(args, task),
            deadline=deadline,
            reserve=args.reserve,
            log_path=log_path,
            progress=progress,
            needs=task.needs,
            root=task.root.name,
            env={"CUDA_VISIBLE_DEVICES": env_gpus},
            prefix=task.name,
        )
        results.put((task, gpus, outcome))

    stopped = False
    while True:
        if not stopped:
            for task in tasks:
                if task.name in done or task.name in running or task.name in failed:
                    continue
                if any(a in failed for a in task.after):
                    failed.add(task.name)
                    say(f"{task.name}: skipped, {', '.join(a for a in task.after if a in failed)} failed")
                    continue
                if not all(a in done for a in task.after) or len(free) < task.gpus:
                    continue
                if task.ablate is False and deadline - time.monotonic() < args.reserve:
                    continue
                gpus, free[:] = free[: task.gpus], free[task.gpus :]
                running[task.name] = gpus
                threading.Thread(target=launch, args=(task, gpus), daemon=True).start()
        if not running:
            break
        task, gpus, outcome = results.get()
        del running[task.name]
        free.extend(gpus)
        free.sort()
        evaluated = (task.root / "evaluation" / "metrics.json").exists()
        full_run = not task.ablate and not task.run_args[-2:-1] == ["--until"]
        if outcome.state == "done" or (outcome.state == "failed" and evaluated and full_run):
            done.add(task.name)
            progress.add("task-done", task=task.name, state=outcome.state)
            say(f"{task.name}: done ({outcome.state}, {time.monotonic() - started:.0f} s into this call)")
            if outcome.state == "failed":
                print("\n".join(outcome.last_lines[-40:]), flush=True)
        elif outcome.state == "stopped":
            stopped = True
            say(f"{task.name}: stopped (resume with the same command)")
        else:
            failed.add(task.name)
            progress.add(
                "task-failed", task=task.name, returncode=outcome.returncode, building=outcome.building
            )
            print("\n".join(outcome.last_lines[-60:]), flush=True)
            say(f"{task.name}: FAILED (exit {outcome.returncode}) while building {outcome.building}")
    left = [t.name for t in tasks if t.name not in done]
    if not left:
        progress.add("complete")
        say(f"complete: every task done ({time.monotonic() - started:.0f} s of this call)")
    else:
        say(f"not done: {', '.join(left)}" + (f" (failed: {', '.join(sorted(failed))})" if failed else ""))
    return 1 if failed else 0


def cmd_ablate(args: argparse.Namespace) -> int:
    """The realized children before GKD (Puzzle's and every baseline's) against the parent: quality in
    and out of domain with the evaluation's settings and intervals, no speed (each has its GKD'd
    child's architecture, measured by the evaluation). Written to ``<work>/<root>-no-gkd.json`` and
    redone only when a child, the parent, the tokens or the settings changed."""
    import torch

    from puzzle.child.evaluate import split_quality
    from puzzle.config import OOD_SPLIT
    from puzzle.data import load_split
    from puzzle.io import artifacts
    from puzzle.modeling.checkpoints import load_model
    from puzzle.modeling.devices import resolve_device
    from puzzle.stages import stage

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    config = load_run_config(args.config, args.set)
    root = Path(config.output)
    parent, tokens = root / stage("convert").folder, root / stage("data").folder
    children = {"puzzle": root / stage("realize").folder}
    for method in config.baselines.methods:
        realized = root / stage("baselines").folder / f"{method}-steps" / "realized"
        if realized.is_dir() and artifacts.read_manifest(str(realized)) is not None:
            children[method] = realized
    seq_len = config.evaluate.context(config.costs)
    splits = [config.evaluate.split] + ([OOD_SPLIT] if config.evaluate.ood else [])
    request = {
        "inputs": {
            n: artifacts.fingerprint(str(u))
            for n, u in {**children, "parent": parent, "tokens": tokens}.items()
        },
        "evaluate": dataclasses.asdict(config.evaluate),
        "seq_len": seq_len,
    }
    out = root.parent / f"{root.name}-{ABLATION}.json"
    result = _read_json(out)
    state = "up to date"
    if result is None or result.get("request") != request:
        state = "built"
        logging.getLogger("bench_quality").info("%s: building %s", ABLATION, out)
        device = str(resolve_device(config.device))
        parent_model = load_model(str(parent), dtype=torch.float32)
        models = {f"{n}_no_gkd": load_model(str(u), dtype=torch.float32) for n, u in children.items()}
        quality = {
            split: split_quality(
                models,
                parent_model,
                load_split(str(tokens), split, seq_len=seq_len),
                batch_size=config.evaluate.batch_size,
                device=device,
                resamples=config.evaluate.bootstrap,
                desc=f"no-GKD ablation {split}",
            )
            for split in splits
        }
        result = {
            "request": request,
            "split": config.evaluate.split,
            "models": {
                name: {
                    "method": name,
                    "of": name.removesuffix("_no_gkd"),
                    "quality": {split: quality[split][name] for split in splits},
                    "blocks": [b.name for b in model.config.blocks],
                }
                for name, model in [("parent", parent_model), *models.items()]
            },
        }
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out)
    print(f"[{'ablation-no-gkd':>24}] {state:<10} {time.perf_counter() - started:7.1f} s  {out}", flush=True)
    for name, row in result["models"].items():
        if name != "parent":
            kept = [row["quality"][split]["accuracy_kept"] for split in splits]
            print(
                f"  {name}: accuracy kept "
                + " / ".join(f"{k:.1%}" for k in kept)
                + f" ({' / '.join(splits)})"
            )
    return 0


# --------------------------------------------------------------------------- summarize


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _manifest_summary(path: Path) -> dict[str, Any]:
    data = _read_json(path / "manifest.json")
    return dict(data.get("summary") or {}) if isinstance(data, dict) else {}


def _predicted(child_dir: Path, batch: int) -> dict[str, Any]:
    """The search's prediction for a child (from the solution it was realized from): throughput
    over the parent's at ``batch`` (from the cost table), and what the search measured there."""
    info = _read_json(child_dir / "parent.json") or {}
    realized = info.get("realized_from") or {}
    solutions = _read_json(Path(str(realized.get("solutions", ""))) / "solutions.json") or {}
    index = realized.get("solution_index") or 0
    entries = solutions.get("solutions") or []
    if index >= len(entries):
        return {}
    sol, parent = entries[index], solutions.get("parent") or {}
    predicted = None
    for mine, theirs in zip(sol.get("constraints") or [], parent.get("constraints") or []):
        if mine.get("metric") == "throughput" and mine.get("batch_size") == batch and theirs.get("value"):
            predicted = mine["value"] / theirs["value"]
    if predicted is None and sol.get("batch_size") == batch:
        predicted = (sol.get("relative_to_parent") or {}).get("throughput")
    measured = (sol.get("measured") or {}).get(str(batch))
    base = (parent.get("measured") or {}).get(str(batch))
    return {
        "predicted_speedup": predicted,
        "search_measured_speedup": measured["throughput"] / base["throughput"] if measured and base else None,
        "solution_batch_size": sol.get("batch_size"),
        "coupled_blocks": len(sol.get("coupled_blocks") or []),
    }


def _target_of(constraints: list[str]) -> float | None:
    for text in constraints:
        m = re.match(r"^throughput>=([\d.]+)x", text.replace(" ", ""))
        if m:
            return float(m.group(1))
    return None


def _kept(row: dict[str, Any], split: str) -> tuple[float | None, list[float] | None, float | None]:
    q = (row.get("quality") or {}).get(split) or {}
    return q.get("accuracy_kept"), q.get("accuracy_kept_ci"), q.get("kl_div")


def _order(name: str) -> tuple[bool, str]:
    return (not name.startswith("puzzle"), name)


def _children(
    metrics: dict[str, Any],
    root: Path,
    *,
    evaluated: dict[str, Any],
    batch: int,
    target: float | None,
    bld_tokens: int | None,
    ablation: bool,
) -> list[dict[str, Any]]:
    """Issue 13's entries of every child of one evaluation (``evaluated``: the run's evaluation's
    models, whose measured speed an ablation's children share; ``batch``: the target's workload,
    where the predicted speedup is read)."""
    from puzzle.config import OOD_SPLIT

    split = metrics.get("split", "eval")
    parent_speed = evaluated["parent"].get("speed") or {}
    out = []
    for name in sorted(metrics["models"], key=_order):
        row = metrics["models"][name]
        if name == "parent":
            continue
        method = row.get("method") or name
        if ablation:  # quality only: the speed is its GKD'd child's (the same architecture)
            of = row.get("of") or name.removesuffix("_no_gkd")
            child_dir = root / "child" if of == "puzzle" else root / "baselines" / f"{of}-steps" / "realized"
            gkd_tokens: int | None = 0
            speed_row = evaluated.get(of) or {}
        else:
            child_dir = root / "distilled" if name == "puzzle" else root / "baselines" / name
            gkd_tokens = _manifest_summary(child_dir).get("tokens")
            speed_row = row
        kept_in, ci_in, kl_in = _kept(row, split)
        kept_ood, ci_ood, kl_ood = _kept(row, OOD_SPLIT)
        speed1, base1 = (speed_row.get("speed") or {}).get("1"), parent_speed.get("1")
        out.append(
            {
                "name": f"{name}@{target:g}x" if target else name,
                "method": method,
                "target": target,
                "measured_speedup": speed_row.get("speedup"),
                **_predicted(child_dir, batch),
                "bld_tokens_per_variant": bld_tokens,
                "gkd_tokens": gkd_tokens,
                "accuracy_kept": {
                    "in_domain": kept_in,
                    "in_domain_ci95": ci_in,
                    "out_of_domain": kept_ood,
                    "out_of_domain_ci95": ci_ood,
                },
                "kl_in_domain": kl_in,
                "kl_out_of_domain": kl_ood,
                "perplexity_in_domain": row.get("perplexity"),
                "latency_bs1_ms": speed1.get("latency") if speed1 else None,
                "latency_bs1_vs_parent": speed1["latency"] / base1["latency"]
                if speed1 and base1 and speed1.get("latency") and base1.get("latency")
                else None,
                "meets_targets": speed_row.get("meets_targets"),
                "parameters": speed_row.get("parameters"),
                "blocks": row.get("blocks"),
            }
        )
    return out


def summarize_root(work: Path, root: Path) -> dict[str, Any]:
    """One target's figures (``status`` partial while its evaluation is missing)."""
    from puzzle.config import OOD_SPLIT

    config_path = work / f"config-{root.name}.yaml"
    config = load_run_config(config_path, []) if config_path.exists() else None
    constraints = list(config.search.constraints) if config else []
    target = _target_of(constraints)
    trained = _manifest_summary(root / "trained")
    bld_tokens = trained.get("tokens_per_variant")
    if bld_tokens is None and config is not None:  # a library merged from shards before it said
        bld_tokens = config.bld.token_budget
    done = sorted(p.name for p in root.iterdir() if (p / "manifest.json").is_file()) if root.is_dir() else []
    entry: dict[str, Any] = {
        "root": str(root),
        "constraints": constraints,
        "target": target,
        "phases_done": done,
    }
    if config is not None:
        entry["budgets"] = {
            "bld_tokens_per_variant": config.bld.token_budget,
            "scoring_tokens": config.data.splits[config.scoring.split] * config.data.seq_len,
            "gkd_tokens_per_child": config.gkd.token_budget,
            "seq_len": config.data.seq_len,
            "eval_sequences": config.data.splits[config.evaluate.split],
            "ood_sequences": config.data.ood_sequences,
            "library": dataclasses.asdict(config.library),
        }
    if trained:
        entry["bld"] = {
            k: trained.get(k)
            for k in (
                "trained_variants",
                "steps",
                "tokens_per_variant",
                "tokens_per_second",
                "mean_initial_nmse",
                "mean_final_nmse",
            )
        }
    search = _manifest_summary(root / "solutions")
    if search:
        entry["search"] = search
    metrics = _read_json(root / "evaluation" / "metrics.json")
    if metrics is None:
        entry["status"] = "partial"
        return entry
    parent = metrics["models"]["parent"]
    speed = parent.get("speed") or {}
    entry.update(
        {
            "status": "complete",
            "card": metrics.get("device_name"),
            "workload": metrics.get("workload"),
            "splits": metrics.get("splits"),
            "parent": {
                "name": metrics.get("parent"),
                "accuracy_in_domain": (parent.get("quality") or {})
                .get(metrics.get("split", "eval"), {})
                .get("accuracy"),
                "accuracy_out_of_domain": (parent.get("quality") or {}).get(OOD_SPLIT, {}).get("accuracy"),
                "perplexity_in_domain": parent.get("perplexity"),
                "throughput": parent.get("throughput"),
                "throughput_by_batch": {b: s.get("throughput") for b, s in speed.items()},
                "latency_bs1_ms": (speed.get("1") or {}).get("latency"),
                "parameters": parent.get("parameters"),
            },
            "unreachable": metrics.get("unreachable") or {},
            "candidates": metrics.get("candidates"),
        }
    )
    batch = int((metrics.get("workload") or {}).get("batch_size") or BATCH)
    common = {"evaluated": metrics["models"], "batch": batch, "target": target, "bld_tokens": bld_tokens}
    entry["children"] = _children(metrics, root, **common, ablation=False)
    ablation = _read_json(root.parent / f"{root.name}-{ABLATION}.json")
    if ablation is not None:
        entry["children"] += _children(ablation, root, **common, ablation=True)
    if root.name.endswith(NO_BLD):  # Puzzle on the initialised library: the no-BLD ablation
        for child in entry["children"]:
            child["name"] = child["name"].replace("puzzle", "puzzle_no_bld", 1)
            child["method"] = child["method"].replace("puzzle", "no_bld", 1)
    return entry


def phase_seconds(work: Path) -> dict[str, dict[str, float]]:
    """Seconds each phase took, per target: its final build plus any stopped attempts."""
    out: dict[str, dict[str, float]] = {}
    roots = {p.name for p in target_roots(work)}
    for e in Progress.read(work):
        if e.get("root") not in roots:
            continue
        per = out.setdefault(e["root"], {})
        if e.get("event") == "phase" and e.get("state") == "built":
            per[e["phase"]] = round(per.get(e["phase"], 0.0) + float(e["seconds"]), 1)
        elif e.get("event") == "stopped" and e.get("building"):
            key = f"stopped: {Path(e['building']).name}"
            per[key] = round(per.get(key, 0.0) + float(e.get("seconds") or 0.0), 1)
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table(result: dict[str, Any]) -> str:
    lines = [
        "| child | method | measured speedup | predicted | in-domain kept | out-of-domain kept [95 % CI] "
        "| KL out-of-domain | bs-1 latency vs parent | GKD tokens |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for child in result["children"]:
        kept = child["accuracy_kept"]
        ci = kept.get("out_of_domain_ci95")
        ci_text = f" [{ci[0]:.1%}, {ci[1]:.1%}]" if ci else ""
        lines.append(
            f"| {child['name']} | {child['method']} | {_fmt(child['measured_speedup'], '.3f')}x | "
            f"{_fmt(child.get('predicted_speedup'), '.3f')}x | {_fmt(kept['in_domain'], '.1%')} | "
            f"{_fmt(kept['out_of_domain'], '.1%')}{ci_text} | {_fmt(child['kl_out_of_domain'], '.3f')} | "
            f"{_fmt(child.get('latency_bs1_vs_parent'), '.3f')}x | {_fmt(child['gkd_tokens'], ',')} |"
        )
    return "\n".join(lines)


def cmd_summarize(args: argparse.Namespace) -> int:
    import platform

    work = Path(args.work).resolve()
    roots = target_roots(work)
    if not roots:
        say(f"nothing under {work} yet: run `run` first")
        return 1
    targets = [summarize_root(work, root) for root in roots]
    complete = [t for t in targets if t["status"] == "complete"]
    result: dict[str, Any] = {
        "issue": 13,
        "status": "complete" if len(complete) == len(targets) else "partial",
        "card": complete[0]["card"] if complete else None,
        "parent": complete[0]["parent"] if complete else None,
        "children": [c for t in complete for c in t["children"]],
        "targets": {
            t["root"].rsplit("/", 1)[-1]: {k: v for k, v in t.items() if k not in ("children", "parent")}
            for t in targets
        },
        "phase_seconds": phase_seconds(work),
        "not_run": {}
        if any(r.name.endswith(NO_BLD) for r in roots)
        else {"ablation_no_bld": "Puzzle on the initialised library (no BLD): run without --no-bld-ablation"},
        "software": _software(),
        "host": platform.node(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    copy_dir = Path(args.copy_dir) if args.copy_dir else out.parent
    copied = []
    for root in roots:
        for name in ("report.md", "metrics.json", "pareto.png"):
            source = root / "evaluation" / name
            if source.is_file():
                stem, suffix = name.rsplit(".", 1)
                target = copy_dir / f"{stem}-{root.name}.{suffix}"
                shutil.copyfile(source, target)
                copied.append(target.name)
    say(
        f"wrote {out} ({result['status']})"
        + (f"; copied {', '.join(copied)} to {copy_dir}" if copied else "")
    )
    for t in targets:
        name = t["root"].rsplit("/", 1)[-1]
        if t["status"] != "complete":
            say(f"{name}: partial, phases done: {', '.join(t['phases_done']) or 'none'}")
    if complete:
        p = result["parent"]
        print(
            f"\nparent {p['name']} on {result['card']}: accuracy {p['accuracy_in_domain']:.4f} in domain, "
            f"{p['accuracy_out_of_domain']:.4f} out of domain; {p['throughput']:,.0f} tokens/s at batch "
            f"{complete[0]['workload']['batch_size']}\n"
        )
        print(table(result))
    for name, seconds in result["phase_seconds"].items():
        print(f"\nphase seconds ({name}): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """One ``quality_gpu.json`` from the ``summarize`` outputs of several machines (e.g. the 4-GPU
    run and the no-BLD ablation redone on one GPU): children, targets and phase times side by side,
    each part's card, parent speed and description under ``parts``. Children that name no BLD
    budget get their target's."""
    parts, merged_children, targets, seconds = [], {}, {}, {}
    first: dict[str, Any] = {}
    for spec in args.parts:
        path, _, description = spec.partition("=")
        part = _read_json(Path(path))
        if part is None or part.get("issue") != 13:
            raise SystemExit(f"{path}: not a quality_gpu.json written by `summarize`")
        first = first or part
        parts.append(
            {
                "file": Path(path).name,
                "description": description or None,
                "card": part.get("card"),
                "status": part.get("status"),
                "parent_throughput": (part.get("parent") or {}).get("throughput"),
                "targets": sorted(part.get("targets") or {}),
                "software": part.get("software"),
            }
        )
        for name, target in (part.get("targets") or {}).items():
            if target.get("status") == "complete" or name not in targets:
                targets[name] = target
        for name, per in (part.get("phase_seconds") or {}).items():
            seconds.setdefault(name, {}).update(per)
        for child in part.get("children") or []:
            if child.get("bld_tokens_per_variant") is None:
                nobld = str(child.get("method")).startswith("no_bld")
                root = f"t{child['target']:g}" + (NO_BLD if nobld else "")
                budgets = (targets.get(root) or {}).get("budgets") or {}
                child["bld_tokens_per_variant"] = budgets.get("bld_tokens_per_variant")
            merged_children[child["name"]] = child
    cards = {p["card"] for p in parts}
    result = {
        "issue": 13,
        "status": "complete" if all(t.get("status") == "complete" for t in targets.values()) else "partial",
        "card": next(iter(cards)) if len(cards) == 1 else sorted(cards),
        "parent": first.get("parent"),
        "children": list(merged_children.values()),
        "targets": targets,
        "phase_seconds": seconds,
        "parts": parts,
        "not_run": {} if any(n.endswith(NO_BLD) for n in targets) else first.get("not_run", {}),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    say(f"wrote {out} ({result['status']}, {len(result['children'])} children from {len(parts)} parts)")
    print(table(result))
    return 0


MARKERS = {"puzzle": "o", "no_bld": "P", "greedy": "s", "noop_only": "^", "layer_dropping": "v"}


def cmd_plot(args: argparse.Namespace) -> int:
    """Accuracy kept (in domain, out of domain with its 95 % interval) against the measured speedup,
    one panel per domain, every GKD'd child near the targets (a child beyond ``--max-speedup``, e.g.
    a uniform architecture that overshoots, is named in the caption instead)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = _read_json(Path(args.json))
    if result is None:
        raise SystemExit(f"{args.json}: no quality_gpu.json there")
    children = [c for c in result["children"] if c.get("gkd_tokens") and c.get("measured_speedup")]
    shown = [c for c in children if c["measured_speedup"] <= args.max_speedup]
    left_out = sorted({c["name"] for c in children} - {c["name"] for c in shown})
    if not shown:
        raise SystemExit(
            f"{args.json}: no GKD'd child with a measured speedup <= {args.max_speedup:g}x to plot"
        )
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, (key, title) in zip(
        axes, [("in_domain", "in domain (Python code)"), ("out_of_domain", "out of domain (English prose)")]
    ):
        for child in shown:
            kept = child["accuracy_kept"]
            ci = kept.get(f"{key}_ci95")
            err = [[100 * (kept[key] - ci[0])], [100 * (ci[1] - kept[key])]] if ci else None
            method = child["method"]
            ax.errorbar(
                child["measured_speedup"],
                100 * kept[key],
                yerr=err,
                fmt=MARKERS.get(method, "x"),
                color="C0" if method == "puzzle" else ("C2" if method == "no_bld" else "0.45"),
                capsize=3,
                markersize=8,
            )
            ax.annotate(
                child["name"],
                (child["measured_speedup"], 100 * kept[key]),
                fontsize=7,
                xytext=(4, 3),
                textcoords="offset points",
            )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("measured decode speedup (batch 64, prompt 128, 1,024 generated)")
        ax.set_ylabel("next-token accuracy kept (%)")
        ax.grid(alpha=0.3)
    card = result.get("card")
    fig.suptitle(
        f"SmolLM2-135M children after {shown[0]['gkd_tokens']:,} GKD tokens each, {card}"
        + (f" (not shown: {', '.join(left_out)})" if left_out else ""),
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    say(f"wrote {args.out}")
    return 0


def _software() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "mip"):
        try:
            module = __import__(name)
            versions[name] = str(getattr(module, "__version__", "?"))
        except ImportError:
            versions[name] = "absent"
    try:
        from puzzle.search.knapsack import mip_solver

        versions["mip_solver"] = mip_solver()
    except Exception as exc:  # noqa: BLE001 - reported, not needed
        versions["mip_solver"] = f"none ({exc})"
    return versions


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def cmd_start(args: argparse.Namespace) -> int:
    """``run`` in the background (its own session: it outlives this call while the machine stays
    warm), unless one is running already; then follow its log like ``follow``."""
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    pid_file = work / "driver.pid"
    pid = int(pid_file.read_text()) if pid_file.is_file() else 0
    if pid and _alive(pid):
        say(f"the driver (pid {pid}) is running: following it")
    else:
        log = (work / "driver.log").open("a")
        extra = [a for a in args.run_args if a != "--"]
        cmd = [sys.executable, str(Path(__file__).resolve()), "run", "--work", str(work)]
        cmd += ["--limit", str(args.run_limit), *extra]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
        pid_file.write_text(str(proc.pid))
        say(f"started the driver (pid {proc.pid}): {' '.join(cmd)}")
    return cmd_follow(args)


def cmd_follow(args: argparse.Namespace) -> int:
    """Print the driver's log as it grows until it exits or ``--limit`` seconds pass."""
    work = Path(args.work).resolve()
    pid = int((work / "driver.pid").read_text())
    log, offset_file = work / "driver.log", work / "driver.log.shown"
    offset = int(offset_file.read_text()) if offset_file.is_file() else 0
    end = time.monotonic() + args.limit
    while True:
        if log.is_file():
            with log.open() as fh:
                fh.seek(offset)
                chunk = fh.read()
                offset = fh.tell()
            if chunk:
                print(chunk, end="", flush=True)
                offset_file.write_text(str(offset))
        if not _alive(pid):
            say(f"the driver (pid {pid}) has exited")
            return 0
        if time.monotonic() >= end:
            say(f"the driver (pid {pid}) is still running: follow it again (next call)")
            return 0
        time.sleep(5)


# --------------------------------------------------------------------------- device commands


def device_commands(work: str, gpus: int, limit: int) -> list[tuple[str, list[str], str]]:
    """(what, carry, command) of each device call."""
    env = (
        "export PYTHONPATH=/root/w/site PUZZLE_CORPUS_DIR=/root/w/corpora PYTHONUNBUFFERED=1; "
        "test -f /root/w/smollm2.gguf || { echo 'no /root/w/smollm2.gguf: the machine was given back, "
        "start again at call 1'; exit 3; }; "
    )
    install = (
        "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "
        "/root/w/site .whl/quality/*.whl && rm -rf /root/w/corpora && cp -r .whl/quality/corpora /root/w/ "
        "|| exit 4; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; "
    )
    start = f"python3 benchmarks/bench_quality.py start --work {work} --limit {limit} -- --gpus {gpus}; "
    summarize = f"python3 benchmarks/bench_quality.py summarize --work {work} --out $OUT/quality_gpu.json"
    return [
        (
            "1: parent, part 1",
            [".gpu-weights/p1"],
            "mkdir -p /root/w && cp .gpu-weights/p1/part1 /root/w/ && nvidia-smi -L",
        ),
        (
            "2: parent, part 2",
            [".gpu-weights/p2"],
            "cat /root/w/part1 .gpu-weights/p2/part2 > /root/w/smollm2.gguf && rm /root/w/part1 && "
            "sha256sum -c .gpu-weights/p2/SHA256SUMS",
        ),
        (
            "3: wheels, then the driver in the background, followed",
            [".whl/quality"],
            env + install + start + summarize,
        ),
        (
            "4, 5, ...: follow it (restarted, resuming, if it was stopped) until it exits",
            [],
            env + start + summarize,
        ),
    ]


def cmd_commands(args: argparse.Namespace) -> int:
    for what, carry, command in device_commands(args.work, args.gpus, args.limit):
        print(
            f"call {what}\n  carry: {json.dumps(carry)}\n  timeout_s: 600\n  command ({len(command)} chars):"
        )
        print(f"    {command}\n")
    return 0


def cmd_rehearse_args(args: argparse.Namespace) -> int:
    print(" ".join(f"--set {json.dumps(s)}" for s in REHEARSAL))
    return 0


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)

    def run_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, default=CONFIG)
        p.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="extra puzzle run override"
        )

    p = sub.add_parser("run", help="the whole plan (resumed) under a deadline, GPUs shared out")
    p.add_argument("--work", required=True, help="work folder; target T runs into <work>/tT")
    p.add_argument("--limit", type=float, required=True, help="seconds this call may take (stops cleanly)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs of this machine the plan shares out (1)")
    p.add_argument(
        "--targets", type=float, nargs="+", default=TARGETS, help="throughput targets, x the parent (1.5 2)"
    )
    p.add_argument("--batch", type=int, default=BATCH, help="batch size the targets are pinned to (64)")
    p.add_argument("--parent", default=PARENT, help=f"the parent model ({PARENT})")
    p.add_argument(
        "--corpus", default=CORPUS, help=f"in-domain text, made from site-packages if absent ({CORPUS})"
    )
    p.add_argument(
        "--reserve", type=float, default=RESERVE_S, help="stop after a phase when fewer seconds are left"
    )
    p.add_argument("--no-ablation", dest="ablation", action="store_false", help="skip the no-GKD ablation")
    p.add_argument("--no-bld-ablation", dest="no_bld", action="store_false", help="skip the no-BLD ablation")
    p.add_argument(
        "--only",
        nargs="+",
        metavar="TASK",
        default=[],
        help="run only these tasks of the plan (e.g. upstream-nobld t1.5-nobld), each free of the others",
    )
    p.add_argument(
        "--evaluate-s", type=float, default=EVALUATE_S, help="start the evaluation only with this many s left"
    )
    run_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("ablate", help="(run calls it) evaluate the realized children before GKD")
    run_args(p)
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("summarize", help="quality_gpu.json, the report files and the table")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True, help="the JSON to write (e.g. $OUT/quality_gpu.json)")
    p.add_argument(
        "--copy-dir", help="where report.md, metrics.json and pareto.png go (default: beside --out)"
    )
    p.set_defaults(func=cmd_summarize)

    p = sub.add_parser("plot", help="accuracy kept vs measured speedup of quality_gpu.json's children")
    p.add_argument("--json", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-speedup", type=float, default=2.5, help="children beyond are named, not drawn")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("merge", help="one quality_gpu.json from the summaries of several machines")
    p.add_argument("parts", nargs="+", metavar="JSON[=DESCRIPTION]", help="summarize outputs, first = main")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("start", help="`run` in the background unless running, then follow its log")
    p.add_argument("--work", required=True)
    p.add_argument("--limit", type=float, required=True, help="seconds to follow the log in this call")
    p.add_argument("--run-limit", type=float, default=3000, help="the background run's own deadline")
    p.add_argument("run_args", nargs=argparse.REMAINDER, help="after --: more `run` arguments (--gpus 4)")
    p.set_defaults(func=cmd_start)

    p = sub.add_parser("follow", help="print the background run's log until it exits or --limit passes")
    p.add_argument("--work", required=True)
    p.add_argument("--limit", type=float, required=True)
    p.set_defaults(func=cmd_follow)

    p = sub.add_parser("commands", help="print the device calls")
    p.add_argument("--work", default="/root/w/q")
    p.add_argument("--gpus", type=int, default=4)
    p.add_argument("--limit", type=int, default=540)
    p.set_defaults(func=cmd_commands)

    p = sub.add_parser("rehearse-args", help="print the --set overrides of a tiny CPU rehearsal")
    p.set_defaults(func=cmd_rehearse_args)

    args = parser.parse_args()
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
