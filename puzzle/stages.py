"""The stage graph: every phase of the method, what it reads, writes and needs, declared once
(``stages.yaml`` beside this module; :class:`Stage` documents its keys).

``puzzle run`` executes it in order on one machine (:mod:`puzzle.run`); the Kubeflow pipeline
builder turns each stage into a task of the component of the same name
(``pipelines/puzzle_pipeline.py``); the CLI has one command per stage (:mod:`puzzle.cli.phases`).
A stage's name is its phase everywhere: CLI command, config section (where it has settings),
component (folder and function), MLflow phase run; its ``output`` names what it writes (the
folder under the run's ``output``, the component's output artifact). A stage calls one function::

    function(*[item], *config_fields, *inputs, out, **sections, [shard=...], [device=...])

``inputs`` are the outputs of earlier stages (artifact URIs), in the function's parameter order;
``sections`` the config sections the phase takes, passed by keyword under their own name.

Fan-out is declared, not written: a stage with ``shards`` (the config field holding the count)
runs as ``n`` independent shards (``shard="i/n"``) joined by its ``merge`` function; a stage with
``items`` (a config field holding a list) runs once per item, and later stages receive the
outputs as a mapping item -> URI.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from puzzle.config import RunConfig

STAGES_FILE = Path(__file__).with_name("stages.yaml")


@dataclass(frozen=True)
class Stage:
    """One phase of the method."""

    name: str
    """The phase: CLI command, output folder, component, MLflow phase run."""
    function: str
    """``module:function`` that runs the phase."""
    output: str
    """Name of the artifact it writes: its folder under ``output``, the component's output
    parameter ("" for a stage that writes none)."""
    kind: str
    """Kind recorded in the output's manifest; ``a|b`` where the output may be either (a baseline
    that cannot reach the target writes the ``solutions`` saying so instead of a ``child``)."""
    inputs: dict[str, str] = field(default_factory=dict)
    """Parameter name -> the stage whose output it reads, in the function's parameter order."""
    config_fields: tuple[str, ...] = ()
    """Top-level config fields passed first, as values (``convert`` takes ``parent``)."""
    sections: tuple[str, ...] = ()
    """Config sections passed by keyword under their own name."""
    gpu: bool = False
    """Runs on a GPU in the cluster; the function takes ``device`` (the run's ``device`` setting)."""
    target_gpu: bool = False
    """Its figures are valid only on the target GPU (the cluster pins it to that GPU model)."""
    shards: str | None = None
    """Config field holding a shard count: the stage fans out over shards, then the ``merge``
    function of the phase function's module joins them (``merge(shard_uris, out)``)."""
    items: str | None = None
    """Config field holding a list: the stage runs once per item (the item is the first argument)."""
    when: str | None = None
    """Config field that must be set (not null or empty) for the stage to run."""
    summary: str = ""
    """One line: what the phase does."""

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds its output may hold."""
        return tuple(self.kind.split("|")) if self.kind else ()

    @property
    def folder(self) -> str:
        """Where the stage writes under the run's ``output``: its output's name, or for a stage run per
        item its own name (``baselines/<method>``)."""
        return self.name if self.items else self.output

    def resolve(self, name: str | None = None) -> Callable[..., Any]:
        """The phase function (or the merge function with ``name="merge"``)."""
        module, _, attr = self.function.partition(":")
        if name == "merge" and self.shards is None:
            raise ValueError(f"stage {self.name} has no shards to merge")
        return getattr(importlib.import_module(module), "merge" if name == "merge" else attr)

    def arguments(self, config: RunConfig, inputs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        """Positional and keyword arguments of the phase function for ``config`` (``out`` excluded)."""
        args = [getattr(config, f) for f in self.config_fields] + [inputs[name] for name in self.inputs]
        kwargs: dict[str, Any] = {s: getattr(config, s) for s in self.sections}
        if self.gpu:
            kwargs["device"] = config.device
        return args, kwargs

    def fan_out(self, config: RunConfig) -> list[Any] | None:
        """The shard indices or items this stage runs over (None when it runs once)."""
        if self.shards is not None:
            count = config_value(config, self.shards)
            return list(range(count)) if count > 1 else None
        if self.items is not None:
            return list(config_value(config, self.items))
        return None

    def enabled(self, config: RunConfig) -> bool:
        return self.when is None or bool(config_value(config, self.when))


def config_value(config: RunConfig, path: str) -> Any:
    """The value of a dotted config field (``bld.shards``)."""
    value: Any = config
    for part in path.split("."):
        value = getattr(value, part)
    return value


def load_stages(path: Path = STAGES_FILE) -> tuple[Stage, ...]:
    """The stage graph declared in ``stages.yaml`` (keys: the fields of :class:`Stage`)."""
    rows = yaml.safe_load(path.read_text())
    known = {f.name for f in dataclasses.fields(Stage)}
    stages = []
    for row in rows:
        unknown = set(row) - known
        if unknown:
            raise ValueError(f"{path}: stage {row.get('name')!r} has unknown keys {sorted(unknown)}")
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in row.items()}
        stages.append(Stage(**values))
    names = [s.name for s in stages]
    for s in stages:
        missing = set(s.inputs.values()) - set(names[: names.index(s.name)])
        if missing:
            raise ValueError(f"{path}: stage {s.name} reads {sorted(missing)}, which no earlier stage writes")
    return tuple(stages)


STAGES = load_stages()
STAGE_NAMES = tuple(stage.name for stage in STAGES)


def stage(name: str) -> Stage:
    """The stage called ``name``."""
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"no stage {name!r}; stages: {', '.join(STAGE_NAMES)}")


def dependants(name: str) -> list[str]:
    """Every stage that reads ``name``'s output, directly or through others."""
    found: list[str] = []
    frontier = [name]
    while frontier:
        current = frontier.pop()
        for s in STAGES:
            if current in s.inputs.values() and s.name not in found:
                found.append(s.name)
                frontier.append(s.name)
    return found
