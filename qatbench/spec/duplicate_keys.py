"""YAML mappings with a key twice: an error naming both lines, not "the last one wins".

PyYAML's loaders keep the last of two equal keys silently, so ``methods:`` written twice
would drop the first list. :func:`check_unique_keys` walks the composed node tree (no
Python objects are constructed, aliases are visited once) before the safe loader runs.
"""

from __future__ import annotations

import yaml

from qatbench.errors import ConfigError


def check_unique_keys(text: str, source: str) -> None:
    """Raise ConfigError naming the key path and both lines of the first repeated key."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, str]] = [(root, "")] if root is not None else []
    while stack:
        node, where = stack.pop()
        if id(node) in seen:  # an alias: its anchor's subtree was (or will be) checked
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            lines: dict[object, int] = {}
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else None
                path = f"{where}.{name}" if where else str(name)
                line = key.start_mark.line + 1
                if name is not None and name in lines and name != "<<":
                    raise ConfigError(
                        f"{source}: {path}: duplicate key at lines {lines[name]} and {line}; "
                        "YAML would keep only the last"
                    )
                if name is not None:
                    lines[name] = line
                stack.append((value, path))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(node.value))
