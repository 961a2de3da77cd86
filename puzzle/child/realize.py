"""Realize: assemble a child from the block library for one search solution.

The child takes every layer's blocks from the library (the BLD-trained variants, or the
parent's own sub-blocks) and the embeddings, final norm and LM head from the parent. It is
written as a ``child`` artifact that GKD, evaluation and export take.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

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

    def body(staging: Path, local: dict[str, Path]) -> dict[str, Any]:
        from puzzle.library.variants import assemble_child

        child = assemble_child(str(local["parent"]), str(local["library"]), blocks)
        info = read_parent_info(local["parent"])
        info["realized_from"] = {
            "library": library,
            "solutions": solutions,
            "solution_index": solution_index,
            "method": solution.get("method"),
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
