"""Realize: assemble a child from the block library for one search solution.

The child takes every layer's blocks from the library (the BLD-trained variants, or the
parent's own sub-blocks) and the embeddings, final norm and LM head from the parent. It is
written as a ``child`` artifact that GKD, evaluation and export take.
"""

from __future__ import annotations

import dataclasses
import json
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
    PARENT_INFO,
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
    dtype: str | None = None,
) -> artifacts.Manifest:
    """Phase ``realize``: the child of solution ``solution_index`` of ``solutions``, its blocks'
    weights from ``library`` and its embeddings, final norm, LM head and tokenizer from ``parent``
    (the parent artifact the library was built from), written in ``dtype`` (``gkd.save_dtype``;
    None: float32, as assembled)."""
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
        save_model(child, load_tokenizer(local["parent"]), staging, info, dtype=dtype)
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
        {"solution_index": solution_index, **({"dtype": dtype} if dtype else {})},
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
    Children are written in ``gkd.save_dtype``.

    With several candidates, they are the phase's working files: each is an artifact (resumable)
    under the staging directory's ``.work/steps/candidate-<rank>/``, removed once ``out`` is
    published, or under ``<out>-steps/`` with ``gkd.keep_steps``; the chosen one's files become
    ``out``'s (hard links, not a second copy). ``out`` is up to date for the same library,
    solutions, parent, tokens and settings, whether the candidates are still there or not.
    """
    from puzzle.io import storage as store

    data = store.read_json(store.join(solutions, SOLUTIONS_FILE))
    dtype = gkd.save_dtype
    if not data.get("solutions"):
        return realize(library, solutions, parent, out)  # says the search holds no solution
    candidates = [(i, s) for i, s in enumerate(data.get("solutions", [])) if s.get("meets_targets", True)]
    if not candidates:
        raise RealizeError(
            f"no candidate of {solutions} meets its targets when measured: relax search.constraints"
        )
    if len(candidates) == 1:
        return realize(library, solutions, parent, out, solution_index=candidates[0][0], dtype=dtype)
    from puzzle.child.gkd import RUN_ONLY

    short = dataclasses.replace(gkd, token_budget=search.candidate_gkd_tokens)
    inputs = {"library": library, "solutions": solutions, "parent": parent, "tokens": tokens}
    parameters = {
        "candidates": [i for i, _ in candidates],
        "dtype": dtype,
        "split": scoring.split,
        "candidate_gkd": (
            {k: v for k, v in dataclasses.asdict(short).items() if k not in RUN_ONLY}
            if search.candidate_gkd_tokens
            else None
        ),
    }

    def body(staging: Path, _local: dict[str, Path]) -> dict[str, Any]:
        steps = artifacts.steps_dir(out, staging, keep=gkd.keep_steps)
        realized: dict[int, str] = {}
        for index, _ in candidates:
            target = store.join(steps, f"candidate-{index + 1}")
            realize(library, solutions, parent, target, solution_index=index, dtype=dtype)
            if search.candidate_gkd_tokens:
                from puzzle.child.gkd import distill

                tuned = store.join(steps, f"candidate-{index + 1}-gkd")
                distill(target, parent, tokens, tuned, short, device=device)
                target = tuned
            realized[index] = target
        quality = _quality_once(realized, parent, tokens, scoring, device, store.join(steps, QUALITY_FILE))
        ranking = []
        for index, sol in enumerate(data["solutions"]):
            ranking.append(
                {
                    "rank": index + 1,
                    "kl_div": quality.get(index, {}).get("kl_div"),
                    "accuracy": quality.get(index, {}).get("accuracy"),
                    "predicted_speedup": sol["relative_to_parent"]["throughput"],
                    "measured_speedup": _measured_speedup(sol, data.get("parent") or {}),
                    "measured": sol.get("measured"),
                    "meets_targets": sol.get("meets_targets", True),
                    "blocks": sol["blocks"],
                }
            )
        best = min(realized, key=lambda i: quality[i]["kl_div"])
        for entry in ranking:
            entry["chosen"] = entry["rank"] == best + 1
        log.info(
            "candidates: %s; chosen #%d",
            ", ".join(f"#{i + 1} KL {q['kl_div']:.4f}" for i, q in sorted(quality.items())),
            best + 1,
        )
        # The chosen candidate's files are the child's (hard links); its parent.json, extended with
        # the ranking, is written anew (never in place: the candidate's own would change with it).
        chosen = artifacts.adopt(realized[best], staging, skip=(PARENT_INFO,))
        info = read_parent_info(artifacts.materialize(realized[best], CHILD_KIND))
        info["realized_from"] = {**info.get("realized_from", {}), "candidates": ranking, "chosen": best + 1}
        (staging / PARENT_INFO).write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
        return dict(chosen.summary)

    return artifacts.run_phase(
        CHILD_KIND,
        out,
        inputs,
        parameters,
        body,
        input_kinds={
            "library": "library",
            "solutions": "solutions",
            "parent": MODEL_KINDS,
            "tokens": "tokens",
        },
        materialize_inputs=False,  # each candidate's realize reads (and checks) them
    )


QUALITY_FILE = "candidates-quality.json"


def _quality_once(
    realized: dict[int, str], parent: str, tokens: str, scoring: ScoringConfig, device: str, record: str
) -> dict[int, dict[str, float]]:
    """The candidates' quality, kept beside them (``record``) so that a resumed run does not measure
    it again."""
    from puzzle.io import storage as store

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
        return {int(i): q for i, q in cached["quality"].items()}
    quality = _candidate_quality(realized, parent, tokens, scoring, device)
    store.write_json(record, {"key": key, "quality": {str(i): q for i, q in quality.items()}})
    return quality


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
