"""Fixtures for the component tests: the project's shared fixtures plus KFP local execution.

The shared fixtures (tiny parents, the SeaweedFS server) live in ``tests/conftest.py``; pytest
only applies a conftest to its own folder, so they are imported here under the same names.
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

puzzle_cache = shared.puzzle_cache
s3_server = shared.s3_server
s3_bucket = shared.s3_bucket
tiny_parent_factory = shared.tiny_parent_factory
tiny_child = shared.tiny_child


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
