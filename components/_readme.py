"""Each component folder's README.md, rendered from the component itself.

``python -m components._readme`` rewrites them; a test fails when one is stale, so the READMEs
always say what the code does: the docstring, the image, the ``puzzle`` functions called, and
every input and output with its type, default and description.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
_PUZZLE_IMPORT = re.compile(r"^\s+from (puzzle(?:\.\w+)*) import (.+)$", re.MULTILINE)
_RUN_STAGE = re.compile(r"_runtime\.run_stage\(\s*\"(\w+)\"")
_ARG = re.compile(r"^\s{4}(\w+): (.*)$")


def component_folders() -> list[Path]:
    return sorted(p.parent for p in ROOT.glob("*/component.py"))


def load_component(folder: Path) -> Any:
    """The component defined in ``folder/component.py`` (the one object with a component_spec)."""
    module = importlib.import_module(f"components.{folder.name}.component")
    found = [
        v
        for v in vars(module).values()
        if hasattr(v, "component_spec") and getattr(v, "__module__", "") == module.__name__
    ]
    if len(found) != 1:
        found = [
            v
            for v in vars(module).values()
            if hasattr(v, "python_func") and v.python_func.__module__ == module.__name__
        ]
    (component,) = found
    return component


def _sections(doc: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """(description, {arg: text}, {returned name: text}) from a Google-style docstring."""
    lines = inspect.cleandoc(doc or "").splitlines()
    description: list[str] = []
    args: dict[str, str] = {}
    returns: dict[str, str] = {}
    target: dict[str, str] | None = None
    current = None
    for line in lines:
        if line.strip() in ("Args:", "Returns:"):
            target = args if line.strip() == "Args:" else returns
            current = None
            continue
        if target is None:
            description.append(line)
            continue
        match = _ARG.match(line)
        if match:
            current = match[1]
            target[current] = match[2].strip()
        elif line.strip() and current is not None:
            target[current] += " " + line.strip()
        elif line.strip() and target is returns:
            returns["Output"] = (returns.get("Output", "") + " " + line.strip()).strip()
    return "\n".join(description).strip(), args, returns


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _type(spec_type: str) -> str:
    return spec_type.split("@")[0].removeprefix("system.")


def _stage_function(stage_name: str) -> str:
    """``module.function`` of the phase a component runs through ``_runtime.run_stage``."""
    from puzzle.stages import stage

    return stage(stage_name).function.replace(":", ".")


def render(component: Any) -> str:
    spec = component.component_spec
    func = component.python_func
    description, args, returns = _sections(func.__doc__ or "")
    image = spec.implementation.container.image
    source = inspect.getsource(func)
    calls = sorted(
        {
            f"`{m}.{name.strip()}`" if not name.strip().startswith("(") else f"`{m}`"
            for m, names in _PUZZLE_IMPORT.findall(source)
            for name in names.split(",")
        }
        | {f"`{_stage_function(name)}`" for name in _RUN_STAGE.findall(source)}
    )
    calls = [c.replace(" as ", "` as `") for c in calls]
    lines = [
        f"# `{spec.name}`",
        "",
        description,
        "",
        f"- image: `{image}` (from `components/images.yaml`), `install_kfp_package=False`",
        f"- calls: {', '.join(calls) if calls else 'no puzzle function (plain Python)'}",
        "- code: [`component.py`](component.py); tests: `test_component_unit.py` (`python_func`), "
        "`test_component_local.py` (KFP local runner)",
        "",
        "## Inputs",
        "",
        "| name | type | default | description |",
        "|---|---|---|---|",
    ]
    for name, value in spec.inputs.items():
        default = "" if value.default is None and not value.optional else f"`{value.default!r}`"
        kind = _type(value.type) + (" (list)" if getattr(value, "is_artifact_list", False) else "")
        lines.append(f"| `{name}` | {kind} | {default} | {_cell(args.get(name, ''))} |")
    lines += ["", "## Outputs", "", "| name | type | description |", "|---|---|---|"]
    for name, value in (spec.outputs or {}).items():
        lines.append(f"| `{name}` | {_type(value.type)} | {_cell(args.get(name) or returns.get(name, ''))} |")
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    for folder in component_folders():
        (folder / "README.md").write_text(render(load_component(folder)))
        print(folder / "README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
