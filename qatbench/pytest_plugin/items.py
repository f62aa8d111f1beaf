"""pytest items of a YAML experiment: the file a collector, each trial an item run in an
isolated worker process; a failure shown as one line."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from qatbench.errors import QatbenchError
from qatbench.pytest_plugin.session import session_state
from qatbench.pytest_plugin.trial_results import TrialFailed, fail_on, result_properties

if TYPE_CHECKING:
    from qatbench.spec.schema import ExperimentSpec, TrialSpec

MARKER = "qatbench"


class OneLine:
    """A failure shown as one line: in the terminal, the summary and JUnit XML alike."""

    def __init__(self, message: str, path: Path) -> None:
        self.message = message
        # What pytest's short summary and junitxml read for the one-line message.
        self.reprcrash = _Crash(str(path), 0, message)

    def toterminal(self, tw: Any) -> None:
        tw.line(self.message, red=True, bold=True)

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class _Crash:
    path: str
    lineno: int
    message: str


class ExperimentFile(pytest.File):
    """A YAML experiment file; its trials are the items. An invalid file is one error."""

    def collect(self) -> Iterator[pytest.Item]:
        from qatbench.spec.schema import load_experiment

        # Messages name the file as the user did: relative to where pytest started.
        here = Path.cwd()
        spec = load_experiment(
            self.path.relative_to(here) if self.path.is_relative_to(here) else self.path
        )
        for trial in spec.expand():
            yield TrialItem.from_parent(self, name=trial.id, spec=spec, trial=trial)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException]) -> Any:  # type: ignore[override]  # pytest's own return type is wider than its stubs
        if isinstance(excinfo.value, QatbenchError):
            return OneLine(str(excinfo.value), self.path)
        return super().repr_failure(excinfo)


class TrialItem(pytest.Item):
    """One trial of an experiment file, run in an isolated worker process."""

    def __init__(self, *, spec: ExperimentSpec, trial: TrialSpec, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.trial = trial
        self.add_marker(MARKER)
        # -k matches any of these words, e.g. -k "ptq and onnxruntime".
        self.extra_keyword_matches.update(
            {trial.model.key, trial.method.name, trial.method.key, trial.bits, trial.runtime}
        )

    def runtest(self) -> None:
        session = session_state(self.config)
        experiment = session.experiment(
            self.spec.tracking.experiment or self.spec.name,
            yaml_uri=self.spec.tracking.uri,
            source=str(self.path),
            spec=self.spec.model_dump(mode="json"),
            threads=self.spec.measure.threads,
        )
        trial_dir = experiment.trial_dir(self.trial.id)
        result = session.executor.run(self.trial, trial_dir, self.trial.timeout_s)
        result = experiment.add(result, tags={"qatbench.pytest.nodeid": self.nodeid})
        self.user_properties.extend(result_properties(result))
        fail_on(self.spec, result)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException]) -> Any:  # type: ignore[override]  # see ExperimentFile.repr_failure
        if isinstance(excinfo.value, TrialFailed | QatbenchError):
            return OneLine(str(excinfo.value), self.path)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"trial {self.trial.id}"
