"""What the command line prints to: stdout and stderr consoles; its file arguments expanded."""

from __future__ import annotations

import glob
from pathlib import Path

from rich.console import Console

from qatbench.errors import ConfigError

out = Console(soft_wrap=True)  # paths are never broken across lines
err = Console(stderr=True)


def expand_globs(patterns: list[str]) -> list[Path]:
    """Files named or matched by glob patterns (for shells that leave them unexpanded)."""
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise ConfigError(f"{pattern}: no experiment file matches")
        paths += [Path(m) for m in matches]
    return paths
