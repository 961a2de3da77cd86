"""Realize: assemble a child from the block library for one search solution.

The child takes every layer's blocks from the library (the BLD-trained variants, or the
parent's own sub-blocks) and the embeddings, final norm and LM head from the parent. It is
written as a ``child`` artifact that GKD, evaluation and export take.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from puzzle.config import GKDConfig, ScoringConfig, SearchConfig
from puzzle.errors import PuzzleError
from puzzle.io import artifacts, storage
from puzzle.modeling import BlockConfig
from puzzle.modeling.checkpoints import (
    CHILD_KIND,
    MODEL_KINDS,
    count_parameters,
    load_tokenizer,
    read_parent_info,
    save_model,
)

log = logging.getLogger(__name__)

SOLUTIONS_FILE = "solutions.json"


class RealizeError(PuzzleError, ValueError):
    """The solution cannot be realized; the message says which and what to do."""


def read_solutions(uri: str) -> list[dict[str, Any]]:
    """Every solution of a ``solutions`` artifact (search or baseline), best first."""
    artifacts.require_manifest(uri, "solutions")
    data = storage.read_json(storage.join(uri, SOLUTIONS_FILE))
    solutions = data.get("solutions") if isinstance(data, dict) else data
    if not isinstance(solutions, list):
        raise RealizeError(f"{uri}/{SOLUTIONS_FILE} has no 'solutions' list; re-run the search")
    return solutions


SOLUTION_KEYS = ("blocks", "choices", "architecture")


def solution_blocks(solution: dict[str, Any], where: str) -> list[BlockConfig]:
    """The per-layer blocks of one solution: a list of block names (``attn_kv1+ffn_768``), one
    per layer, under ``blocks`` (or ``choices``); an entry may also be ``{"block": name}``."""
    names = next((solution[k] for k in SOLUTION_KEYS if isinstance(solution.get(k), list)), None)
    if not names:
        raise RealizeError(
            f"{where} has no {' / '.join(SOLUTION_KEYS)} list (one block name per layer); re-run the search"
        )
    blocks = []
    for layer, entry in enumerate(names):
        name = entry.get("block") or entry.get("name") if isinstance(entry, dict) else entry
        if not isinstance(name, str):
            raise RealizeError(
                f"{where}: layer {layer}'s choice {entry!r} is not a block name like attn_kv1+ffn_768"
            )
        blocks.append(BlockConfig.from_name(name))
    return blocks


def pick_solution(solutions_uri: str, index: int) -> tuple[dict[str, Any], list[BlockConfig]]:
    solutions = read_solutions(solutions_uri)
    if not solutions:
        raise RealizeError(
            f"{solutions_uri} holds no solution (the constraints were infeasible); relax search.constraints"
        )
    if not 0 <= index < len(solutions):
        raise RealizeError(
            f"solution_index={index} is out of range: {solutions_uri} holds {len(solutions)} solution(s) "
            f"(use 0..{len(solutions) - 1})"
        )
    solution = solutions[index]
    return solution, solution_blocks(solution, f"{solutions_uri} solution {index}")


def coupled_overlay(solutions: str) -> str | None:
    """The coupled blocks a search trained for its solutions (a library overlay inside the solutions
    artifact), or None."""
    data = storage.read_json(storage.join(solutions, SOLUTIONS_FILE))
    name = data.get("coupled") if isinstance(data, dict) else None
    return storage.join(solutions, name) if name else None


def realize(
    library: str,
    solutions: str,
    parent: str,
    out: str,
    *,
    solution_index: int = 0,
) -> artifacts.Manifest:
    """Phase ``realize``: the child of solution ``solution_index`` of ``solutions``, its blocks'
    weights from ``library`` and its embeddings, final norm, LM head and tokenizer from ``parent``
    (the parent artifact the library was built from)."""
    artifacts.require_manifest(library, "library")
    artifacts.require_manifest(parent, MODEL_KINDS)
    solution, blocks = pick_solution(solutions, solution_index)  # fail before loading any weights

    overlay = coupled_overlay(solutions)

    def body(staging: Path, local: dict[str, Path]) -> dict[str, Any]:
        from puzzle.library.variants import Library, assemble_child

        lib = Library.open(str(local["library"]), overlay=overlay)
        child = assemble_child(str(local["parent"]), lib, blocks)
        info = read_parent_info(local["parent"])
        info["realized_from"] = {
            "library": library,
            "solutions": solutions,
            "solution_index": solution_index,
            "method": solution.get("method"),
            "batch_size": solution.get("batch_size"),
            "coupled_blocks": solution.get("coupled_blocks", []),
        }
        save_model(child, load_tokenizer(local["parent"]), staging, info)
        params = count_parameters(child)
        log.info("realized solution %d (%s parameters): %s", solution_index, f"{params:,}", _describe(blocks))
        return {
            "num_parameters": params,
            "blocks": [b.name for b in blocks],
            "solution": {k: v for k, v in solution.items() if k not in SOLUTION_KEYS},
        }

    return artifacts.run_phase(
        CHILD_KIND,
        out,
        {"library": library, "solutions": solutions, "parent": parent},
        {"solution_index": solution_index},
        body,
        input_kinds={"library": "library", "solutions": "solutions", "parent": MODEL_KINDS},
    )


def _describe(blocks: list[BlockConfig]) -> str:
    counts: dict[str, int] = {}
    for b in blocks:
        counts[b.name] = counts.get(b.name, 0) + 1
    return ", ".join(f"{n}x {name}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def realize_candidates(
    library: str,
    solutions: str,
    parent: str,
    tokens: str,
    out: str,
    *,
    scoring: ScoringConfig,
    search: SearchConfig,
    gkd: GKDConfig,
    device: str = "auto",
) -> artifacts.Manifest:
    """Phase ``realize``: every candidate of the search that meets its targets when measured is
    realized (and, with ``search.candidate_gkd_tokens``, given a short GKD); the one with the lowest
    KL to the parent on the held-out ``scoring.split`` becomes the child. Its ``parent.json`` ranks
    every candidate (quality, predicted and measured speed), which the evaluation report shows.

    Candidates are written under ``<out>-steps/candidate-<rank>/`` (each resumable); the chosen one
    is copied to ``out`` when there is more than one.
    """
    from puzzle.io import storage as store

    data = store.read_json(store.join(solutions, SOLUTIONS_FILE))
    if not data.get("solutions"):
        return realize(library, solutions, parent, out)  # says the search holds no solution
    candidates = [(i, s) for i, s in enumerate(data.get("solutions", [])) if s.get("meets_targets", True)]
    if not candidates:
        raise RealizeError(
            f"no candidate of {solutions} meets its targets when measured: relax search.constraints"
        )
    if len(candidates) == 1:
        return realize(library, solutions, parent, out, solution_index=candidates[0][0])
    steps = f"{out.rstrip('/')}-steps"
    realized: dict[int, str] = {}
    for index, _ in candidates:
        target = store.join(steps, f"candidate-{index + 1}")
        realize(library, solutions, parent, target, solution_index=index)
        if search.candidate_gkd_tokens:
            from puzzle.child.gkd import distill

            tuned = store.join(steps, f"candidate-{index + 1}-gkd")
            short = dataclasses.replace(gkd, token_budget=search.candidate_gkd_tokens)
            distill(target, parent, tokens, tuned, short, device=device)
            target = tuned
        realized[index] = target
    # The candidates' quality, kept beside them so that a resumed run does not measure it again.
    record = store.join(steps, "candidates-quality.json")
    key = {
        "candidates": {str(i): artifacts.fingerprint(uri) for i, uri in realized.items()},
        "parent": artifacts.fingerprint(parent),
        "tokens": artifacts.fingerprint(tokens),
        "split": scoring.split,
    }
    try:
        cached = store.read_json(record) if store.exists(record) else None
    except store.StorageError:  # a torn write: measure again
        cached = None
    if isinstance(cached, dict) and cached.get("key") == key:
        quality = {int(i): q for i, q in cached["quality"].items()}
    else:
        quality = _candidate_quality(realized, parent, tokens, scoring, device)
        store.write_json(record, {"key": key, "quality": {str(i): q for i, q in quality.items()}})
    ranking = []
    for index, sol in enumerate(data["solutions"]):
        entry = {
            "rank": index + 1,
            "kl_div": quality.get(index, {}).get("kl_div"),
            "accuracy": quality.get(index, {}).get("accuracy"),
            "predicted_speedup": sol["relative_to_parent"]["throughput"],
            "measured_speedup": _measured_speedup(sol, data.get("parent") or {}),
            "measured": sol.get("measured"),
            "meets_targets": sol.get("meets_targets", True),
            "blocks": sol["blocks"],
        }
        ranking.append(entry)
    best = min(realized, key=lambda i: quality[i]["kl_div"])
    for entry in ranking:
        entry["chosen"] = entry["rank"] == best + 1
    log.info(
        "candidates: %s; chosen #%d",
        ", ".join(f"#{i + 1} KL {q['kl_div']:.4f}" for i, q in sorted(quality.items())),
        best + 1,
    )
    return _copy_child(realized[best], out, {"candidates": ranking, "chosen": best + 1}, inputs=realized)


def _measured_speedup(solution: dict[str, Any], parent: dict[str, Any]) -> float | None:
    """A candidate's whole-model throughput over the parent's, as the search measured them, at the
    batch size it was solved at."""
    batch = str(solution.get("batch_size"))
    child = (solution.get("measured") or {}).get(batch)
    base = (parent.get("measured") or {}).get(batch)
    if not child or not base:
        return None
    return float(child["throughput"]) / float(base["throughput"])


def _candidate_quality(
    realized: dict[int, str], parent: str, tokens: str, scoring: ScoringConfig, device: str
) -> dict[int, dict[str, float]]:
    """KL to the parent and next-token accuracy of each candidate on the held-out scoring split."""
    import torch

    from puzzle.child.evaluate import quality_metrics
    from puzzle.data import load_split
    from puzzle.modeling.checkpoints import load_model
    from puzzle.modeling.devices import resolve_device

    ids = load_split(tokens, scoring.split)
    reference = load_model(parent, dtype=torch.float32)
    models = {str(i): load_model(uri, dtype=torch.float32) for i, uri in realized.items()}
    figures = quality_metrics(
        models, reference, ids, batch_size=scoring.batch_size, device=resolve_device(device)
    )
    return {i: figures[str(i)] for i in realized}


def _copy_child(source: str, out: str, extra: dict[str, Any], inputs: dict[int, str]) -> artifacts.Manifest:
    """The chosen candidate as the stage's output, its ``parent.json`` extended with ``extra``."""
    import json
    import shutil

    def body(staging: Path, local: dict[str, Path]) -> dict[str, Any]:
        src = artifacts.materialize(source, CHILD_KIND)
        for path in src.iterdir():
            if path.name != artifacts.MANIFEST and path.is_file():
                shutil.copyfile(path, staging / path.name)
        info = read_parent_info(src)
        info["realized_from"] = {**info.get("realized_from", {}), **extra}
        (staging / "parent.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
        chosen = artifacts.read_manifest(source)
        return dict(chosen.summary) if chosen is not None else {}

    named = {f"candidate-{i + 1}": uri for i, uri in inputs.items()}
    return artifacts.run_phase(CHILD_KIND, out, named, {"chosen": extra["chosen"]}, body)
