"""The chart's README is generated from values.yaml and its comments, and says something about every value."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_module():
    spec = importlib.util.spec_from_file_location("chart_readme", ROOT / "charts" / "readme.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_chart_readme_is_generated_from_the_values_file_and_up_to_date() -> None:
    readme = _readme_module()
    committed = (ROOT / "charts" / "puzzle" / "README.md").read_text()
    assert committed == readme.render(), "charts/puzzle/README.md is stale: run `python charts/readme.py`"


def test_every_value_of_the_chart_is_described_in_its_readme() -> None:
    readme = _readme_module()
    rows = [line for line in readme.render().splitlines() if line.startswith("| `")]
    assert len(rows) > 50
    cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows]
    undocumented = [c[0] for c in cells if not c[-1]]
    assert undocumented == [], f"values without a comment in values.yaml: {undocumented}"


def test_a_value_comment_becomes_its_readme_row(tmp_path: Path) -> None:
    readme = _readme_module()
    docs, intros = readme.comments(
        "# Intro of a.\na:\n  # -- What b is,\n  # on two lines.\n  b: 1\n  c: 2\n"
    )
    assert docs == {"a.b": "What b is, on two lines."}
    assert intros == {"a": "Intro of a."}
