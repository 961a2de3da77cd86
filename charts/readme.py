"""Render charts/puzzle/README.md from the chart's values.yaml and its comments.

``python charts/readme.py`` rewrites the README; ``tests/test_chart_docs.py`` fails when it is
stale. A value's documentation is the ``# --`` comment right above it (continued by the ``#`` lines
that follow); a plain comment block above a top-level key is that section's introduction. Every
leaf value is listed with its default, so the README always says what the chart does.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parent / "puzzle"
KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_]+):(?P<rest>.*)$")


def comments(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """(value docs by dotted key, section introductions by top-level key) from values.yaml."""
    docs: dict[str, str] = {}
    intros: dict[str, str] = {}
    pending: list[str] = []
    documented = False
    stack: list[tuple[int, str]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            body = stripped.lstrip("#").strip()
            if body.startswith("--"):
                pending, documented = [body[2:].strip()], True
            else:
                pending.append(body)
            continue
        match = KEY.match(line)
        if not stripped or match is None:
            pending, documented = [], False
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        path = ".".join(k for _, k in stack)
        if pending:
            text_block = " ".join(p for p in pending if p)
            if indent == 0 and not documented:
                intros[path] = text_block
            else:
                docs[path] = text_block
        pending, documented = [], False
    return docs, intros


COMPACT = {
    "resources",
    "livenessProbe",
    "readinessProbe",
    "startupProbe",
    "gates",
    "httpGet",
    "seccompProfile",
}
"""Mappings shown as one value (their parts mean nothing alone)."""


def leaves(values: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every (dotted key, value) whose value is not a non-empty mapping (or is a compact one)."""
    if isinstance(values, dict) and values and prefix.rsplit(".", 1)[-1] not in COMPACT:
        out: list[tuple[str, Any]] = []
        for key, value in values.items():
            out += leaves(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    return [(prefix, values)]


def render() -> str:
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    docs, intros = comments(text)
    lines = [
        f"# {chart['name']} chart",
        "",
        "<!-- Generated from values.yaml by `python charts/readme.py`; a test fails when it is stale. -->",
        "",
        chart.get("description", "").strip(),
        "",
        "Install, upgrade and what each object does: docs/deployment.md in the repository. Every value, its",
        "default and what it means (values.schema.json rejects unknown keys and wrong types):",
    ]
    for top, section in values.items():
        lines += ["", f"## `{top}`", ""]
        if top in intros:
            lines += [intros[top], ""]
        lines += ["| key | default | meaning |", "|---|---|---|"]
        for path, value in leaves(section, top):
            doc = docs.get(path) or _inherited({**intros, **docs}, path)
            shown = json.dumps(value)
            lines.append(f"| `{path}` | `{shown}` | {doc} |")
    return "\n".join(lines) + "\n"


def _inherited(docs: dict[str, str], path: str) -> str:
    """A value without its own comment is described by its nearest documented parent."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:cut])
        if parent in docs:
            return f"(`{parent}`) {docs[parent]}"
    return ""


if __name__ == "__main__":
    target = CHART / "README.md"
    target.write_text(render())
    sys.stdout.write(f"{target}\n")
