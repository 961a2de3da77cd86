"""The layout keeps one source of truth: settings declared once, arrows pointing one way."""

from __future__ import annotations

import ast
import dataclasses
import io
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml

import pipelines.puzzle_pipeline  # noqa: F401 - built before a test patches the config, as in production
import puzzle.config
from puzzle.config import GKDConfig

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("puzzle", "components", "pipelines")
ALLOWED = {"puzzle": set(), "components": {"puzzle"}, "pipelines": {"puzzle", "components"}}


@dataclasses.dataclass(frozen=True, kw_only=True)
class GKDWithNewOption(GKDConfig):
    new_option: int = 7
    """A GKD option added by declaring it here, and nowhere else."""


def test_a_new_gkd_option_reaches_the_pipeline_the_cli_and_the_components_without_further_edits(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(puzzle.config, "GKDConfig", GKDWithNewOption)
    from components import _runtime
    from pipelines.puzzle_pipeline import build_pipeline, compile_pipeline
    from puzzle.cli import main

    compiled = next(yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml", build_pipeline()).read_text()))
    gkd_default = compiled["root"]["inputDefinitions"]["parameters"]["gkd"]["defaultValue"]
    assert gkd_default["new_option"] == 7

    help_text = io.StringIO()
    with redirect_stdout(help_text), pytest.raises(SystemExit):
        main(["gkd", "--help"])
    assert "gkd.new_option = 7" in help_text.getvalue()
    assert "A GKD option added by declaring it here" in help_text.getvalue()

    config = puzzle.config.load_config(None, ["gkd.new_option=3"], check_access=False)
    assert config.gkd.new_option == 3
    assert _runtime.sections("gkd", {"gkd": {"new_option": 5}})["gkd"].new_option == 5
    with pytest.raises(puzzle.config.ConfigError, match="gkd.new_option must be an integer"):
        _runtime.sections("gkd", {"gkd": {"new_option": "many"}})


def test_the_embedded_default_is_the_dataclass_defaults() -> None:
    assert puzzle.config.RunConfig() == puzzle.config.load_config(None, check_access=False)


def _imports(path: Path) -> set[str]:
    """Top-level packages imported anywhere in a file (module level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_dependency_arrows_point_one_way(package: str) -> None:
    """puzzle <- components <- pipelines: nothing imports a package to its right, not even in a function."""
    wrong = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        if path.name.startswith("test_") or path.name == "conftest.py":
            continue
        bad = (_imports(path) & set(PACKAGES)) - ALLOWED[package] - {package}
        if bad:
            wrong[str(path.relative_to(ROOT))] = sorted(bad)
    assert wrong == {}


def test_no_old_name_for_the_converted_parent_is_left() -> None:
    offenders = []
    for pattern in ("*.py", "*.md", "*.yaml"):
        for path in ROOT.rglob(pattern):
            if any(part.startswith(".") for part in path.relative_to(ROOT).parts) or path == Path(__file__):
                continue
            text = path.read_text(errors="ignore")
            if "all-parent child" in text or re.search(r"\bparent_child\b", text):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_every_stage_has_a_component_of_its_name_and_its_sections_exist() -> None:
    from puzzle.config import section_names
    from puzzle.stages import STAGES

    for stage in STAGES:
        assert (ROOT / "components" / stage.name / "component.py").is_file(), stage.name
        assert set(stage.sections) <= set(section_names()), stage.name
        if stage.shards:
            assert (ROOT / "components" / f"{stage.name}_merge" / "component.py").is_file()


def test_readme_is_short_and_points_at_the_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 15 * 1024
    for doc in (
        "docs/method.md",
        "docs/pipeline.md",
        "docs/mlflow.md",
        "docs/deployment.md",
        "docs/config.md",
    ):
        assert doc in readme and (ROOT / doc).is_file(), doc


def test_config_reference_is_generated_from_the_dataclasses() -> None:
    assert (ROOT / "docs" / "config.md").read_text() == puzzle.config.reference_markdown(), (
        "docs/config.md is stale: run `python -m puzzle.config > docs/config.md`"
    )


def test_python_dash_m_puzzle_is_the_puzzle_command() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "puzzle", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("puzzle ")
