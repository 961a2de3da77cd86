"""Fixtures for the component tests: the project's shared fixtures, tiny phase outputs, KFP local.

The shared fixtures (tiny parents, the SeaweedFS and MLflow servers) live in ``tests/conftest.py``;
pytest only applies a conftest to its own folder, so every fixture defined there is re-exported
here. The expensive ones (the whole pipeline's local run and the MLflow server) are taken from
``tests/`` when it already made them in this session (see :func:`local_pipeline_run`). The
``tiny_*`` fixtures run each phase once on the tiny parent, for the unit tests' inputs.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parents[1] / "tests"
_spec = importlib.util.spec_from_file_location("puzzle_shared_fixtures", _TESTS / "conftest.py")
assert _spec is not None and _spec.loader is not None
shared = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = shared
_spec.loader.exec_module(shared)

from _pytest.fixtures import FixtureFunctionDefinition  # noqa: E402 - pytest's own fixture type

globals().update(
    {
        name: obj
        for name, obj in vars(shared).items()
        if isinstance(obj, FixtureFunctionDefinition) and name not in ("local_pipeline_run",)
    }
)


@pytest.fixture(scope="session")
def local_pipeline_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The whole pipeline's local run (tests/pipeline_local.py), shared with tests/ when it ran there.

    Re-exported session fixtures get a second instance here; asking for the servers only when no
    run exists yet keeps the session at one S3 server, one MLflow server and one pipeline run.
    """
    import pipeline_local

    if pipeline_local.SHARED_RUN is not None:
        return pipeline_local.SHARED_RUN
    return pipeline_local.session_run(
        tmp_path_factory,
        request.getfixturevalue("s3_server"),
        request.getfixturevalue("mlflow_server"),
        request.getfixturevalue("tiny_parent_factory"),
    )


@pytest.fixture(scope="session")
def tracking_server(request: pytest.FixtureRequest) -> str:
    """URL of an MLflow server: the pipeline run's when the session has one, else a new one."""
    import pipeline_local

    if pipeline_local.SHARED_RUN is not None:
        return pipeline_local.SHARED_RUN.tracking_uri
    return request.getfixturevalue("mlflow_server").url


@pytest.fixture
def kfp_local(tmp_path: Path) -> Iterator[Path]:
    """KFP's local runner in this environment (``puzzle`` installed, no per-task venv)."""
    from kfp import local

    root = tmp_path / "pipeline-root"
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        workspace_root=str(tmp_path / "workspace"),
        raise_on_error=True,
    )
    with warnings.catch_warnings():
        # Our images are not named "python...": the runner warns about it, and here it is fine.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
        yield root


TINY_SPLITS = {"calibration": 4, "bld": 8, "score": 4, "gkd": 8, "eval": 4}
TINY_SEQ_LEN = 32


@pytest.fixture(scope="session")
def tiny_tokens(tiny_child: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokens artifact for the tiny child, from the embedded corpus (a few short sequences)."""
    from puzzle.data import prepare

    out = tmp_path_factory.mktemp("tiny-tokens") / "tokens"
    prepare("stdlib", str(tiny_child), str(out), seq_len=TINY_SEQ_LEN, splits=TINY_SPLITS, seed=0)
    return out


TINY_SPACE = dict(
    kv_heads=[1],
    attention_linear=True,
    attention_noop=True,
    ffn_fractions=[1.0, 0.5],
    ffn_linear=False,
    ffn_noop=True,
)


@pytest.fixture(scope="session")
def tiny_library(tiny_child: Path, tiny_tokens: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An (untrained) block library of the tiny child over :data:`TINY_SPACE`."""
    from puzzle.library.variants import SearchSpace, build_library

    space = SearchSpace(
        attention_kv_heads=tuple(TINY_SPACE["kv_heads"]),
        attention_linear=TINY_SPACE["attention_linear"],
        attention_noop=TINY_SPACE["attention_noop"],
        ffn_fractions=tuple(TINY_SPACE["ffn_fractions"]),
        ffn_linear=TINY_SPACE["ffn_linear"],
        ffn_noop=TINY_SPACE["ffn_noop"],
    )
    out = tmp_path_factory.mktemp("tiny-library") / "library"
    build_library(str(tiny_child), str(tiny_tokens), str(out), space=space, batch_size=4)
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
def tiny_realized(tiny_library: Path, tiny_solutions: Path, tiny_child: Path, tmp_path_factory) -> Path:
    """The tiny child of :data:`TINY_SOLUTION`, assembled from :func:`tiny_library`."""
    from puzzle.child.realize import realize

    out = tmp_path_factory.mktemp("tiny-realized") / "child"
    realize(str(tiny_library), str(tiny_solutions), str(out), parent_child=str(tiny_child))
    return out


TINY_BLD = dict(token_budget=64, batch_size=2, lr=1e-3)


@pytest.fixture(scope="session")
def tiny_bld_shards(tiny_library: Path, tiny_child: Path, tiny_tokens: Path, tmp_path_factory) -> list[Path]:
    """Both shards (of 2) of a short BLD run over :func:`tiny_library`."""
    from puzzle.library.bld import train

    root = tmp_path_factory.mktemp("tiny-bld")
    outs = []
    for index in range(2):
        out = root / f"shard-{index}"
        train(
            str(tiny_library),
            str(tiny_child),
            str(tiny_tokens),
            str(out),
            shard=f"{index}/2",
            device="cpu",
            **TINY_BLD,
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
    tiny_trained_library: Path, tiny_child: Path, tiny_tokens: Path, tmp_path_factory
) -> list[Path]:
    """Both shards (of 2) of the replace-1-block scores of :func:`tiny_trained_library`."""
    from puzzle.library.scoring import score

    root = tmp_path_factory.mktemp("tiny-scores")
    outs = []
    for index in range(2):
        out = root / f"shard-{index}"
        score(
            str(tiny_trained_library),
            str(tiny_child),
            str(tiny_tokens),
            str(out),
            metrics=TINY_METRICS,
            shard=f"{index}/2",
            batch_size=4,
            device="cpu",
        )
        outs.append(out)
    return outs


@pytest.fixture(scope="session")
def tiny_export(tiny_child: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny child exported as a Hugging Face checkpoint."""
    from puzzle.child.export import export

    out = tmp_path_factory.mktemp("tiny-export") / "export"
    export(str(tiny_child), str(out))
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
    tiny_trained_library: Path, tiny_child: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The cost table of :func:`tiny_trained_library` on this CPU (a tiny workload)."""
    from puzzle.search.costs import measure

    out = tmp_path_factory.mktemp("tiny-costs") / "costs"
    measure(
        str(tiny_trained_library),
        str(tiny_child),
        str(out),
        batch_sizes=[1],
        prompt_len=4,
        gen_len=3,
        repeats=1,
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
