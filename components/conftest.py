"""Fixtures for the component tests: tiny phase outputs (each phase run once on the tiny parent,
for the unit tests' inputs). The servers, tiny parents, the pipeline's local run and KFP's local
runner are the repository's shared fixtures (the root ``conftest.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_SPLITS = {"calibration": 4, "bld": 8, "score": 4, "gkd": 8, "eval": 4}
TINY_SEQ_LEN = 32


@pytest.fixture(scope="session")
def tiny_tokens(tiny_parent: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokens artifact for the tiny parent, from the embedded corpus (a few short sequences)."""
    from puzzle.config import DataConfig
    from puzzle.data import prepare

    out = tmp_path_factory.mktemp("tiny-tokens") / "tokens"
    prepare(
        str(tiny_parent),
        str(out),
        DataConfig(source="stdlib", seq_len=TINY_SEQ_LEN, splits=TINY_SPLITS, seed=0),
    )
    return out


TINY_LIBRARY = dict(
    kv_heads=[1],
    attention_linear=True,
    attention_noop=True,
    ffn_fractions=[1.0, 0.5],
    ffn_linear=False,
    ffn_noop=True,
)


@pytest.fixture(scope="session")
def tiny_library(tiny_parent: Path, tiny_tokens: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An (untrained) block library of the tiny parent over :data:`TINY_LIBRARY`."""
    from puzzle.config import LibraryConfig
    from puzzle.library.variants import build_library

    out = tmp_path_factory.mktemp("tiny-library") / "library"
    build_library(str(tiny_parent), str(tiny_tokens), str(out), LibraryConfig(**TINY_LIBRARY, batch_size=4))
    return out


TINY_SOLUTION = ["attn_kv1+ffn_256", "attn_noop+ffn_noop", "attn_kv2+ffn_256"]


@pytest.fixture(scope="session")
def tiny_solutions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``solutions`` artifact holding one hand-written solution for the tiny child."""
    import json

    from puzzle.io import artifacts

    out = tmp_path_factory.mktemp("tiny-solutions") / "solutions"

    def body(staging: Path, _inputs: dict[str, Path]) -> dict:
        solutions = {"solutions": [{"blocks": TINY_SOLUTION, "objective": 0.5, "status": "OPTIMAL"}]}
        (staging / "solutions.json").write_text(json.dumps(solutions))
        return {"solutions": 1}

    artifacts.run_phase("solutions", str(out), {}, {"hand_written": True}, body)
    return out


@pytest.fixture(scope="session")
def tiny_realized(tiny_library: Path, tiny_solutions: Path, tiny_parent: Path, tmp_path_factory) -> Path:
    """The tiny child of :data:`TINY_SOLUTION`, assembled from :func:`tiny_library`."""
    from puzzle.child.realize import realize

    out = tmp_path_factory.mktemp("tiny-realized") / "child"
    realize(str(tiny_library), str(tiny_solutions), str(tiny_parent), str(out))
    return out


TINY_BLD = dict(token_budget=64, batch_size=2, lr=1e-3)


@pytest.fixture(scope="session")
def tiny_bld_shards(tiny_library: Path, tiny_parent: Path, tiny_tokens: Path, tmp_path_factory) -> list[Path]:
    """Both shards (of 2) of a short BLD run over :func:`tiny_library`."""
    from puzzle.config import BLDConfig
    from puzzle.library.bld import train

    root = tmp_path_factory.mktemp("tiny-bld")
    outs = []
    for index in range(2):
        out = root / f"shard-{index}"
        train(
            str(tiny_library),
            str(tiny_parent),
            str(tiny_tokens),
            str(out),
            BLDConfig(**TINY_BLD),
            shard=f"{index}/2",
            device="cpu",
        )
        outs.append(out)
    return outs


@pytest.fixture(scope="session")
def tiny_trained_library(tiny_library: Path, tiny_bld_shards: list[Path], tmp_path_factory) -> Path:
    """:func:`tiny_library` with its BLD shards merged in."""
    from puzzle.library.bld import merge

    out = tmp_path_factory.mktemp("tiny-trained") / "library"
    merge([str(p) for p in tiny_bld_shards], str(out), base=str(tiny_library))
    return out


TINY_METRICS = ["kl_div", "lm_loss"]


@pytest.fixture(scope="session")
def tiny_score_shards(
    tiny_trained_library: Path, tiny_parent: Path, tiny_tokens: Path, tmp_path_factory
) -> list[Path]:
    """Both shards (of 2) of the replace-1-block scores of :func:`tiny_trained_library`."""
    from puzzle.config import ScoringConfig
    from puzzle.library.scoring import score

    root = tmp_path_factory.mktemp("tiny-scores")
    outs = []
    for index in range(2):
        out = root / f"shard-{index}"
        score(
            str(tiny_trained_library),
            str(tiny_parent),
            str(tiny_tokens),
            str(out),
            ScoringConfig(metrics=TINY_METRICS, batch_size=4),
            shard=f"{index}/2",
            device="cpu",
        )
        outs.append(out)
    return outs


@pytest.fixture(scope="session")
def tiny_export(tiny_parent: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny parent exported as a Hugging Face checkpoint."""
    from puzzle.child.export import export
    from puzzle.config import ExportConfig

    out = tmp_path_factory.mktemp("tiny-export") / "export"
    export(str(tiny_parent), str(out), ExportConfig())
    return out


def write_evaluation(out: Path, accuracy_kept: float, speedup: float) -> Path:
    """An ``evaluation`` artifact holding just the figures the registry reads."""
    import json

    from puzzle.io import artifacts

    def body(staging: Path, _inputs: dict[str, Path]) -> dict:
        metrics = {"models": {"puzzle": {"accuracy_kept": accuracy_kept, "speedup": speedup}}}
        (staging / "metrics.json").write_text(json.dumps(metrics))
        return {}

    artifacts.run_phase(
        "evaluation", str(out), {}, {"accuracy_kept": accuracy_kept, "speedup": speedup}, body
    )
    return out


@pytest.fixture(scope="session")
def tiny_costs(
    tiny_trained_library: Path, tiny_parent: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The cost table of :func:`tiny_trained_library` on this CPU (a tiny workload)."""
    from puzzle.config import CostsConfig
    from puzzle.search.costs import measure

    out = tmp_path_factory.mktemp("tiny-costs") / "costs"
    measure(
        str(tiny_trained_library),
        str(tiny_parent),
        str(out),
        CostsConfig(batch_sizes=[1], prompt_len=4, gen_len=3, repeats=1),
        device="cpu",
    )
    return out


@pytest.fixture(scope="session")
def tiny_scores(tiny_score_shards: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`tiny_score_shards` merged into one score table."""
    from puzzle.library.scoring import merge

    out = tmp_path_factory.mktemp("tiny-scores-merged") / "scores"
    merge([str(p) for p in tiny_score_shards], str(out))
    return out
