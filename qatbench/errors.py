"""The one family of user errors.

Everything the user can get wrong (a config file, a name, a plugin that breaks its
contract, a trial that fails) raises a subclass of :class:`QatbenchError`. The CLI catches
the family once and prints ``str(error)`` as a single line; any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations


class QatbenchError(Exception):
    """Base of every error caused by the user's input or plugins, shown as one line."""

    exit_code = 2


class ConfigError(QatbenchError):
    """An experiment file or command-line value is invalid.

    The message names the file, the key path, the bad value and what is allowed.
    """


class UnknownNameError(ConfigError):
    """A method, model, runtime or dataset name is not registered; lists the known ones."""

    def __init__(self, kind: str, name: str, known: list[str], where: str = "") -> None:
        self.kind, self.name, self.known = kind, name, sorted(known)
        prefix = f"{where}: " if where else ""
        super().__init__(
            f"{prefix}unknown {kind} {name!r}; known {kind}s: {', '.join(self.known) or '(none)'}"
        )


class PluginError(QatbenchError):
    """A plugin broke its contract (e.g. a lifecycle step returned None)."""

    exit_code = 1


class TrialError(QatbenchError):
    """A trial failed in a known phase; becomes a failed TrialResult, not a crash."""

    exit_code = 1

    def __init__(self, phase: str, reason: str) -> None:
        self.phase, self.reason = phase, reason
        super().__init__(f"{phase}: {reason}")


class TrackingError(QatbenchError):
    """The tracking store cannot be reached or written."""

    exit_code = 2
