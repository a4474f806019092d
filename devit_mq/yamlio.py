"""Strict YAML for every file a user writes (topologies, training configs).

Plain YAML keeps the last of two equal keys silently, which turns a copy-paste slip (two ``port:`` or
two ``lr:`` lines) into a node listening somewhere unexpected or a run trained with the wrong
setting. :func:`load_strict` refuses that, and only ever builds plain data (a SafeLoader).
"""

from __future__ import annotations

from typing import Any

import yaml


class DuplicateKeyError(ValueError):
    """A mapping repeats a key; ``line`` is where (1-based), ``first_line`` where it was first set."""

    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(f"duplicate key {key!r} (first on line {first_line})")
        self.key, self.line, self.first_line = key, line, first_line


class _StrictLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if isinstance(key, (str, int, float, bool)):
            if key in seen:
                raise DuplicateKeyError(key, line, seen[key])
            seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_strict(text: str) -> Any:
    """Parse YAML text; raises :class:`DuplicateKeyError` or :class:`yaml.YAMLError`."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 -- a SafeLoader subclass
