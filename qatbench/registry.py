"""Name -> plugin lookup, filled from entry points.

Built-in methods, models and runtimes register through the same entry-point groups a third
party uses (``qatbench.methods``, ``qatbench.models``, ``qatbench.runtimes``), so there is
one way in. A plugin whose
import raises is skipped with a warning naming it; it never takes the CLI down. An unknown
name raises :class:`UnknownNameError` listing the known ones.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from qatbench.errors import ConfigError, UnknownNameError

T = TypeVar("T")

METHODS_GROUP = "qatbench.methods"
MODELS_GROUP = "qatbench.models"
RUNTIMES_GROUP = "qatbench.runtimes"
TASKS_GROUP = "qatbench.tasks"


class PluginImportWarning(UserWarning):
    """A registered plugin could not be imported and was skipped."""


class Registry(Generic[T]):
    """Plugins of one kind, loaded lazily from one entry-point group.

    ``register`` adds an object directly (tests, notebooks); entry points are read on the
    first lookup. Entry points never override a directly registered name.
    """

    def __init__(self, kind: str, group: str, validate: Callable[[str, Any], T]) -> None:
        self.kind, self.group = kind, group
        self._validate = validate
        self._items: dict[str, T] = {}
        self._failed: dict[str, str] = {}
        self._direct: dict[str, str] = {}
        self._loaded = False

    def register(self, name: str, obj: Any) -> None:
        self._items[name] = self._validate(name, obj)
        module, qualname = getattr(obj, "__module__", ""), getattr(obj, "__qualname__", "")
        if module and module != "__main__" and "<locals>" not in qualname:
            self._direct[name] = f"{module}:{qualname}"

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)
        self._direct.pop(name, None)

    def direct_registrations(self) -> dict[str, str]:
        """Directly registered plugins as ``module:qualname``, for worker processes to
        register again (a worker sees entry points, not the parent's registrations)."""
        return dict(self._direct)

    def register_from(self, refs: dict[str, str]) -> None:
        """Register ``name -> module:qualname`` references (see direct_registrations)."""
        for name, ref in refs.items():
            module_name, _, qualname = ref.partition(":")
            obj: Any = importlib.import_module(module_name)
            for part in qualname.split("."):
                obj = getattr(obj, part)
            self.register(name, obj)

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for ep in entry_points(group=self.group):
            if ep.name in self._items:
                continue
            try:
                self._items[ep.name] = self._validate(ep.name, ep.load())
            except Exception as exc:  # a broken plugin is a warning, never a crash
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
                self._failed[ep.name] = reason
                warnings.warn(
                    f"{self.kind} plugin {ep.name!r} ({ep.value}) failed to load and is "
                    f"skipped: {reason}",
                    PluginImportWarning,
                    stacklevel=2,
                )

    def reload(self) -> None:
        """Forget entry-point plugins and read the groups again (after an install)."""
        self._loaded = False
        self._failed.clear()

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def failed(self) -> dict[str, str]:
        """Plugins that were registered but failed to load: name -> reason."""
        self._load()
        return dict(self._failed)

    def get(self, name: str, where: str = "") -> T:
        self._load()
        try:
            return self._items[name]
        except KeyError:
            if name in self._failed:
                prefix = f"{where}: " if where else ""
                raise ConfigError(
                    f"{prefix}{self.kind} {name!r} is installed but failed to load: "
                    f"{self._failed[name]}"
                ) from None
            raise UnknownNameError(self.kind, name, self.names(), where=where) from None

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items


def _validate_method(name: str, obj: Any) -> Any:
    from qatbench.methods.base import QuantMethod

    if not (isinstance(obj, type) and issubclass(obj, QuantMethod)):
        raise TypeError(f"{obj!r} is not a QuantMethod subclass")
    if obj.name != name:
        raise TypeError(f"class {obj.__name__} has name {obj.name!r}, registered as {name!r}")
    return obj


def _validate_runtime(name: str, obj: Any) -> Any:
    from qatbench.runtimes.base import Runtime, RuntimeCapabilities

    if not (isinstance(obj, type) and issubclass(obj, Runtime)):
        raise TypeError(f"{obj!r} is not a Runtime subclass")
    if getattr(obj, "name", None) != name:
        raise TypeError(f"class {obj.__name__} has name {obj.name!r}, registered as {name!r}")
    if not isinstance(getattr(obj, "capabilities", None), RuntimeCapabilities):
        raise TypeError(f"class {obj.__name__} has no RuntimeCapabilities")
    return obj


def _validate_task(name: str, obj: Any) -> Any:
    from qatbench.data.tasks import Task

    task = obj() if isinstance(obj, type) and issubclass(obj, Task) else obj
    if not isinstance(task, Task):
        raise TypeError(f"{obj!r} is not a Task subclass or instance")
    if task.name != name:
        raise TypeError(f"task {task.name!r} registered as {name!r}")
    return task


def _validate_model(name: str, obj: Any) -> Any:
    if not callable(obj):
        raise TypeError(f"{obj!r} is not callable")
    return obj


methods: Registry[Any] = Registry("method", METHODS_GROUP, _validate_method)
models: Registry[Callable[..., Any]] = Registry("model", MODELS_GROUP, _validate_model)
runtimes: Registry[Any] = Registry("runtime", RUNTIMES_GROUP, _validate_runtime)
tasks: Registry[Any] = Registry("task", TASKS_GROUP, _validate_task)
