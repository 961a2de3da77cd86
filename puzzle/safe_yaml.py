"""The one YAML loader for anything a user or a webhook can hand us: run configs, ``--set``
values and the trigger's profiles (which are run configs).

``yaml.safe_load`` constructs no Python objects, but it still accepts a "billion laughs" file: a
few lines of anchors and aliases that expand to billions of nodes as soon as anything walks the
result (a deep copy, a JSON round trip, validation), which then runs for minutes and ends in a
``MemoryError``. This loader composes the document, measures its size *with aliases expanded*
(linear in the document, aliases counted as often as they are used) and refuses it before
anything is built when it is too large, too deep or recursive; the input itself is bounded too.
Errors are :class:`yaml.YAMLError`, so callers report them as invalid YAML.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_BYTES = 1024 * 1024
"""Largest YAML text accepted (a run configuration is a few KiB)."""
MAX_NODES = 100_000
"""Largest document, counted with every alias expanded."""
MAX_DEPTH = 64
"""Deepest nesting of mappings and sequences."""


class UnsafeYAMLError(yaml.YAMLError):
    """The document is larger, deeper or more self-referential than a configuration can be."""


class _Loader(yaml.SafeLoader):
    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise UnsafeYAMLError(f"nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Nodes in ``node`` with aliases expanded; ``sizes`` memoises shared (aliased) nodes."""
    key = id(node)
    if key in sizes:
        if sizes[key] < 0:
            raise UnsafeYAMLError("an alias refers to a node that contains it (recursive alias)")
        return sizes[key]
    sizes[key] = -1
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    if total > MAX_NODES:
        raise UnsafeYAMLError(
            f"expands to more than {MAX_NODES:,} nodes (aliases counted each time they are used): "
            "refused as a YAML alias bomb; write the configuration out without anchors"
        )
    sizes[key] = total
    return total


def load(text: str | bytes) -> Any:
    """Parse one YAML document like ``yaml.safe_load``, refusing alias bombs, deep nesting and
    texts over :data:`MAX_BYTES` (raises :class:`UnsafeYAMLError`, a :class:`yaml.YAMLError`)."""
    if len(text) > MAX_BYTES:
        raise UnsafeYAMLError(f"the text is {len(text):,} bytes; a configuration is at most {MAX_BYTES:,}")
    if isinstance(text, bytes):
        text = text.decode()
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {})
        return loader.construct_document(node)
    except RecursionError as exc:
        raise UnsafeYAMLError("nested too deeply") from exc
    finally:
        loader.dispose()
