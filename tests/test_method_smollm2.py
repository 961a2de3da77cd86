"""The method as the paper runs it, on the real SmolLM2-135M parent at tiny budgets: exact pair
scores (hybrid), coupled BLD on the chosen pairs (killed mid-way, resumed), several candidates
realized, evaluated and ranked, and a speed target that holds when the child is measured.

The library offers variants in 8 of the 30 layers (the others keep the parent's block), so that
scoring and training fit the suite's budget on 2 cores; the speed test uses a full library.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from puzzle.config import (
    BLDConfig,
    CostsConfig,
    EvaluateConfig,
    GKDConfig,
    LibraryConfig,
    ScoringConfig,
    SearchConfig,
)
from puzzle.io import artifacts

pytestmark = pytest.mark.integration

LAYERS = [3, 6, 9, 12, 15, 18, 21, 24]
SPACE = LibraryConfig(
    kv_heads=[1], attention_linear=False, attention_noop=True, ffn_fractions=[1.0, 0.5], ffn_noop=True
)
BLD = BLDConfig(token_budget=256, batch_size=4, lr=1e-3, coupled="none")
SCORING = ScoringConfig(mode="hybrid", metrics=["kl_div", "lm_loss"], split="score", batch_size=8)
COSTS = CostsConfig(batch_sizes=[1], prompt_len=16, gen_len=8, repeats=1)
# A parameter budget: deterministic (no timing), and tight enough that whole layers go.
SEARCH = SearchConfig(constraints=["params<=0.87x"], num_solutions=3, alpha=0.9)


@pytest.fixture(scope="module")
def phases(smollm2_parent: Path, smollm2_tokens: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Library (8 layers), BLD, decoupled scores and a cost table of SmolLM2."""
    from puzzle.library.bld import train
    from puzzle.library.scoring import score
    from puzzle.library.variants import build_library
    from puzzle.search.costs import measure

    root = tmp_path_factory.mktemp("method")
    parent, tokens = str(smollm2_parent), str(smollm2_tokens)
    library, trained = str(root / "library"), str(root / "trained")
    build_library(parent, tokens, library, SPACE, layers=LAYERS, device="cpu")
    train(library, parent, tokens, trained, BLD, device="cpu")
    scores = str(root / "scores")
    score(trained, parent, tokens, scores, ScoringConfig(mode="decoupled", **_scoring_fields()), device="cpu")
    costs = str(root / "costs")
    measure(trained, parent, costs, COSTS, device="cpu")
    return {
        "root": root,
        "parent": parent,
        "tokens": tokens,
        "library": trained,
        "scores": scores,
        "costs": costs,
    }


def _scoring_fields() -> dict:
    return {"metrics": SCORING.metrics, "split": SCORING.split, "batch_size": SCORING.batch_size}


@pytest.fixture(scope="module")
def hybrid(phases: dict) -> dict:
    from puzzle.search.refine import search

    out = str(phases["root"] / "solutions")
    manifest = search(
        phases["scores"],
        phases["costs"],
        phases["library"],
        phases["parent"],
        phases["tokens"],
        out,
        SEARCH,
        SCORING,
        BLD,
        device="cpu",
    )
    return {"uri": out, "manifest": manifest, "data": json.loads((Path(out) / "solutions.json").read_text())}


def _pairs(blocks: list[str], parent: list[str]) -> list[tuple[int, str]]:
    """(layer, block) of every layer whose attention and FFN both differ from the parent's."""
    out = []
    for layer, (block, mine) in enumerate(zip(blocks, parent, strict=True)):
        (a, f), (pa, pf) = block.split("+"), mine.split("+")
        if a != pa and f != pf:
            out.append((layer, block))
    return out


def test_hybrid_scores_every_pair_of_every_candidate_exactly_and_equals_full_mode(
    phases: dict, hybrid: dict
) -> None:
    from puzzle.library.scoring import read_scores, score

    data = hybrid["data"]
    parent_blocks = data["parent"]["blocks"]
    with (Path(hybrid["uri"]) / "pairs.csv").open() as fh:
        exact = {(int(r["layer"]), f"{r['attention']}+{r['ffn']}"): r for r in csv.DictReader(fh)}
    assert len(data["solutions"]) == 3
    changed = 0
    for sol in data["solutions"]:
        assert sol["exact_pairs"], sol["blocks"]
        for pair in _pairs(sol["blocks"], parent_blocks):
            assert pair in exact, pair  # scored with the real pair in place, not the additive estimate
            changed += 1
    assert changed > 0, "no candidate changes both halves of a layer: the test would prove nothing"
    # The additive estimate's error on those pairs is recorded next to the exact score.
    errors = [float(r["error_pct"]) for r in exact.values() if r["error_pct"]]
    assert errors and any(abs(e) > 0.1 for e in errors)
    assert hybrid["manifest"].summary["additive_error_median_pct"] is not None

    # Full mode on the same tokens: every block of the best answer scored as it stands.
    best = data["solutions"][0]
    rows = [(layer, b) for layer, b in enumerate(best["blocks"]) if b != parent_blocks[layer]]
    full = str(phases["root"] / "full-scores")
    score(
        phases["library"],
        phases["parent"],
        phases["tokens"],
        full,
        ScoringConfig(mode="full", **_scoring_fields()),
        rows=rows,
        device="cpu",
    )
    kl = sum(float(r["kl_div"]) for r in read_scores(full)["rows"])
    assert kl == pytest.approx(best["objective"], rel=1e-6, abs=1e-9)


def test_three_candidates_are_realized_evaluated_and_ranked(phases: dict, hybrid: dict) -> None:
    from puzzle.child.evaluate import compare, read_metrics
    from puzzle.child.realize import realize_candidates
    from puzzle.modeling.checkpoints import read_parent_info

    root = phases["root"]
    child = str(root / "child")
    realize_candidates(
        phases["library"],
        hybrid["uri"],
        phases["parent"],
        phases["tokens"],
        child,
        scoring=SCORING,
        search=SEARCH,
        gkd=GKDConfig(keep_steps=True),  # the candidates kept beside the child (else working files)
        device="cpu",
    )
    for i in (1, 2, 3):
        assert artifacts.read_manifest(str(root / "child-steps" / f"candidate-{i}")) is not None
    ranking = read_parent_info(Path(child))["realized_from"]["candidates"]
    assert [c["rank"] for c in ranking] == [1, 2, 3]
    chosen = [c for c in ranking if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["kl_div"] == min(c["kl_div"] for c in ranking)

    evaluation = str(root / "evaluation")
    compare(
        child,
        {},
        phases["parent"],
        phases["tokens"],
        evaluation,
        EvaluateConfig(batch_size=8, repeats=1, bootstrap=200),
        COSTS,
        SEARCH,
        device="cpu",
    )
    metrics = read_metrics(evaluation)
    assert len(metrics["candidates"]) == 3 and metrics["meets_targets"]
    report = (Path(evaluation) / "report.md").read_text()
    table = report.split("## Candidates of the search")[1]
    for i in (1, 2, 3):
        assert f"| #{i} |" in table
    assert table.count("**yes**") == 1


def test_coupled_bld_trains_the_chosen_pairs_rescores_and_resumes_after_a_kill(
    phases: dict, hybrid: dict
) -> None:
    """`puzzle search` with bld.coupled: chosen, killed once the exact pair scores are on disk, then
    run again: the finished steps are not redone and the answer uses the coupled pairs."""
    from puzzle.search.refine import search

    out = phases["root"] / "coupled-solutions"
    work = Path(f"{out}.partial") / ".work"
    settings = [
        "--set", "search.constraints=['params<=0.87x']", "--set", "search.num_solutions=1",
        "--set", "scoring.metrics=[kl_div, lm_loss]", "--set", "scoring.batch_size=8",
        "--set", "bld.token_budget=256", "--set", "bld.batch_size=4", "--set", "bld.coupled=chosen",
        "--set", "bld.checkpoint_every=1", "--set", "device=cpu",
        "--set", "data.seq_len=64",  # the tokens' (budgets are checked against it)
    ]  # fmt: skip
    command = [
        str(Path(sys.executable).parent / "puzzle"),
        "search",
        *(phases[k] for k in ("scores", "costs", "library", "parent", "tokens")),
        "--out",
        str(out),
        *settings,
    ]
    proc = subprocess.Popen(
        command,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    scored = work / "pairs-0" / artifacts.MANIFEST
    deadline = time.time() + 600
    while not scored.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the search ended before it could be killed:\n" + proc.stdout.read()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert artifacts.read_manifest(str(out)) is None
    before = artifacts.read_manifest(str(work / "pairs-0"))
    assert before is not None

    manifest = search(
        *(phases[k] for k in ("scores", "costs", "library", "parent", "tokens")),
        str(out),
        SearchConfig(constraints=["params<=0.87x"], num_solutions=1),
        ScoringConfig(mode="hybrid", **_scoring_fields()),
        BLDConfig(token_budget=256, batch_size=4, coupled="chosen", checkpoint_every=1),
        device="cpu",
    )
    rounds = json.loads((out / "rounds.json").read_text())
    assert rounds[0]["scored_pairs"] > 0  # the step done before the kill, taken as it was
    assert any(r.get("coupled_pairs") for r in rounds)  # trained jointly, scored again, searched again
    best = json.loads((out / "solutions.json").read_text())["solutions"][0]
    assert best["coupled_blocks"] and manifest.summary["coupled_pairs"] > 0
    # The coupled pairs are a library overlay published with the solutions.
    from puzzle.library.variants import Library

    overlay = Library.open(str(out / "coupled"))
    for layer, block in best["coupled_blocks"]:
        assert block in overlay.coupled_blocks(layer)


@pytest.fixture(scope="module")
def steady_clock() -> Iterator[str]:
    """The clock the speed test's measurements (cost table, the search's whole-child check, the three
    evaluations) run on: wall time, as the product measures, where the suite has the cores to itself;
    this process's CPU time where other work holds them (the suite then runs one torch thread, see
    tests/threads.py). Under load, wall time mostly measures the other work: with two busy loops
    beside the suite, three evaluations of one child measured 1.44x, 1.66x and 1.50x. One thread's CPU
    time is the work the model does, which is what the target is about."""
    import torch

    from puzzle.modeling import engine

    if torch.get_num_threads() > 1:
        yield "wall"
        return
    wall_mark = engine.Timer.mark

    def mark(timer: engine.Timer) -> object:
        return wall_mark(timer) if timer.cuda else time.process_time()

    patch = pytest.MonkeyPatch()
    patch.setattr(engine.Timer, "mark", mark)
    try:
        yield "cpu"
    finally:
        patch.undo()


@pytest.fixture(scope="module")
def full_library(
    steady_clock: str, smollm2_parent: Path, smollm2_tokens: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    """The demo's library (every layer, untrained: speed does not depend on the weights) and a cost
    table at the demo's workload (batch 1, prompt 64, 32 generated tokens) on this CPU."""
    from puzzle.library.variants import build_library
    from puzzle.search.costs import measure

    root = tmp_path_factory.mktemp("speed")
    library, costs = str(root / "library"), str(root / "costs")
    build_library(str(smollm2_parent), str(smollm2_tokens), library, LibraryConfig(), device="cpu")
    measure(library, str(smollm2_parent), costs, CostsConfig(), device="cpu")
    return {"root": root, "library": library, "costs": costs}


def _synthetic_scores(library: str, path: Path) -> str:
    """Decoupled scores for every variant of ``library`` (replace-1-block KL as SmolLM2 shows it:
    attention cheap to drop in the upper layers, the FFN dear everywhere)."""
    from puzzle.library.variants import Library

    lib = Library.open(library)
    rows = []
    for layer in lib.layers:
        depth = layer / max(lib.layers)
        pa, pf = lib.parent_block(layer).name.split("+")
        blocks = {(pa, pf)} | {(a, pf) for a in lib.attention_variants(layer)}
        blocks |= {(pa, f) for f in lib.ffn_variants(layer)}
        for a, f in sorted(blocks):
            kl = 0.0 if a == pa else (0.02 + 0.2 * (1 - depth)) * (2.0 if "noop" in a else 1.0)
            kl += 0.0 if f == pf else (0.3 if "noop" in f else 0.1) * (1.5 - depth)
            rows.append({"layer": layer, "block": f"{a}+{f}", "attention": a, "ffn": f, "kl_div": kl})
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["layer", "block", "attention", "ffn", "kl_div"])
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def test_the_demo_target_holds_when_the_child_is_measured_three_times(
    steady_clock: str, full_library: dict, smollm2_parent: Path, smollm2_tokens: Path
) -> None:
    """throughput>=1.5x at the demo's workload: the search measures its answer whole (and corrects
    a miss); the realized child, measured three more times as the evaluation measures it, keeps it."""
    import torch

    from puzzle.child.evaluate import measure_speeds
    from puzzle.child.realize import realize
    from puzzle.modeling.checkpoints import load_model
    from puzzle.search.refine import search

    root = full_library["root"]
    scores = _synthetic_scores(full_library["library"], root / "scores.csv")
    solutions = str(root / "solutions")
    search(
        scores,
        full_library["costs"],
        full_library["library"],
        str(smollm2_parent),
        str(smollm2_tokens),
        solutions,
        SearchConfig(constraints=["throughput>=1.5x"], num_solutions=1),
        ScoringConfig(mode="decoupled"),
        BLDConfig(coupled="none"),
        device="cpu",
    )
    best = json.loads((Path(solutions) / "solutions.json").read_text())["solutions"][0]
    assert best["meets_targets"]
    child = str(root / "child")
    realize(full_library["library"], solutions, str(smollm2_parent), child)
    models = {
        "parent": load_model(str(smollm2_parent), dtype=torch.float32),
        "child": load_model(child, dtype=torch.float32),
    }
    workload = CostsConfig()
    speedups = []
    for _ in range(3):  # three evaluations, each as `puzzle evaluate` measures (interleaved rounds)
        figures = measure_speeds(
            models,
            workload.batch_sizes,
            prompt_len=workload.prompt_len,
            gen_len=workload.gen_len,
            device="cpu",
            repeats=EvaluateConfig().repeats,
        )
        b = workload.batch_sizes[0]
        speedups.append(figures["child"][b]["throughput"] / figures["parent"][b]["throughput"])
    assert min(speedups) >= 1.5, (
        f"measured speedups {speedups} on the {steady_clock} clock (search predicted and measured "
        f"{best['measured']})"
    )
