"""Experiment files: YAML -> validated :class:`ExperimentSpec` -> ``expand()`` -> trials.

Everything is checked when the file is loaded, before any model is built: unknown keys,
types, method options (each method's own ``Config``), names of models, methods, runtimes
and datasets, and whether a method can do a bit-width on a runtime. Errors are
:class:`ConfigError` with one line naming the file, the key path, the bad value and what is
allowed. The schema and the grid are here; the checks against what is registered are
:mod:`qatbench.spec.checks`, and the one-line errors of the schema :mod:`qatbench.spec.errors`.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from qatbench import registry
from qatbench.errors import ConfigError
from qatbench.quant.bitwidth import FP32, BitWidth
from qatbench.spec.checks import check_names_and_capabilities
from qatbench.spec.duplicate_keys import check_unique_keys
from qatbench.spec.errors import describe_validation_error
from qatbench.spec.expectations import Expectation, parse_expectation

SPEC_SCHEMA_VERSION = 1
MAX_FILE_BYTES = 1 << 20  # an experiment file is a page of YAML, not a data set
MAX_VALUES = 100_000  # values in the parsed document, aliases counted each time they appear
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.]*$"  # safe in trial ids, paths and MLflow names


class _Strict(BaseModel):
    # strict: YAML's `true` is no batch size and `1` no boolean (lax pydantic coerces both)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]
Runtime = Name  # a registered runtime (qatbench list runtimes), checked in spec.checks


def _default_runtimes() -> list[Runtime]:
    return ["torch"]


ExpectList = list[str]
# What the pick maximises (speed-up against fp32, per batch size) or minimises (size, memory);
# see qatbench/report/pick.py.
PickBy = Literal["speedup", "size", "peak_memory"]


class ModelEntry(_Strict):
    """A model of the grid: a registered name, or ``factory: package.module:function``;
    ``label`` tells two entries of one registered model apart (two checkpoints, two
    configs) and names the model in trial ids and reports."""

    name: Name
    label: Name | None = None
    factory: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    options: dict[str, Any] = Field(default_factory=dict)
    # which output is compared with fp32 when the model returns several (a name of a dict
    # or ModelOutput, or an index of a tuple; see qatbench/models/adapters.py)
    output: str | int | None = None
    expect: ExpectList = Field(default_factory=list)

    @property
    def key(self) -> str:
        """What the trial id and the report call this model: the label, else the name."""
        return self.label or self.name


class MethodEntry(_Strict):
    """A method of the grid with its options and, optionally, its own bit-widths.

    ``grid`` names options whose values are lists to expand: ``options: {group_size: [32,
    128]}, grid: [group_size]`` is two variants of the method, each a trial of its own,
    labelled ``rtn.group_size_32`` and ``rtn.group_size_128`` (after ``label`` if given).
    """

    name: Name
    label: Name | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    grid: list[str] = Field(default_factory=list)
    bits: list[str] | None = None
    expect: ExpectList = Field(default_factory=list)

    @field_validator("bits")
    @classmethod
    def _bits_parse(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [BitWidth.parse(v).label for v in value]

    @model_validator(mode="after")
    def _grid_keys_are_lists(self) -> MethodEntry:
        for key in self.grid:
            values = self.options.get(key)
            if not isinstance(values, list) or not values:
                raise ValueError(
                    f"grid: {key!r} needs a non-empty list in options (got {values!r})"
                )
        return self

    @property
    def key(self) -> str:
        """What the trial id and the report call this method: the label, else the name."""
        return self.label or self.name

    def implicit_grid(self) -> list[str]:
        """Options given a list where the method takes one value (``group_size: [32, 128]``
        on ``rtn``): expanded like ``grid`` keys. An option that takes a list
        (``keep_fp32: [fc1]``) stays one value; a list whose items the option rejects is
        left to the option check, which names the problem."""
        if self.name not in registry.methods:
            return []  # the name check says so
        fields = registry.methods.get(self.name).Config.model_fields
        keys = []
        for key, values in self.options.items():
            if key in self.grid or key not in fields or not isinstance(values, list) or not values:
                continue
            one = TypeAdapter(fields[key].annotation)
            try:
                one.validate_python(values)
                continue  # the option takes a list
            except ValidationError:
                pass
            try:
                for value in values:
                    one.validate_python(value)
            except ValidationError:
                continue
            keys.append(key)
        return keys

    def variants(self) -> list[MethodEntry]:
        """One entry per combination of the ``grid`` options and of the options given a list
        where the method takes one value (:meth:`implicit_grid`); itself when there is none."""
        grid = [*self.grid, *self.implicit_grid()]
        if not grid:
            return [self]
        combos = itertools.product(*(self.options[k] for k in grid))
        out = []
        for values in combos:
            chosen = dict(zip(grid, values, strict=True))
            suffix = ".".join(f"{k}_{_label_part(v)}" for k, v in chosen.items())
            out.append(
                self.model_copy(
                    update={
                        "options": {**self.options, **chosen},
                        "grid": [],
                        "label": f"{self.key}.{suffix}",
                    }
                )
            )
        return out


def _label_part(value: Any) -> str:
    """A grid value as part of a label (letters, digits, ``_`` and ``.`` only)."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", str(value))


class DataSpec(_Strict):
    """Which dataset feeds calibration, training and evaluation, and how much of it."""

    dataset: Literal["digits", "synthetic", "text", "sentences"] = "digits"
    # your own data: "package.module:function" returning a qatbench.data.datasets.TaskData
    # in the model's input structure (then `dataset` is not used); `options` its keywords
    factory: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    options: dict[str, Any] = Field(default_factory=dict)
    calibration_samples: int = Field(256, ge=1, le=100_000)
    eval_samples: int = Field(512, ge=1, le=100_000)
    batch_size: int = Field(64, ge=1, le=65_536)
    pretrain_epochs: int = Field(30, ge=0, le=1000)
    # text only: tokens per sequence (default: the model's context) and the tokenizer,
    # "bytes" (vocabulary 256) or a local Hugging Face tokenizer directory.
    seq_len: int | None = Field(None, ge=2, le=65_536)
    tokenizer: str = "bytes"
    # synthetic only: integer inputs (token ids) are drawn below this (default: the
    # example's largest value + 1)
    vocab_size: int | None = Field(None, ge=2, le=10_000_000)


class TaskEntry(_Strict):
    """The quality task that judges the outputs: a registered name (``classification``,
    ``language_modelling``, ``embedding``, or a plugin's) or ``factory: pkg.mod:name`` of a
    :class:`qatbench.data.tasks.Task` subclass."""

    name: Name | None = None
    factory: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

    @model_validator(mode="after")
    def _one_of(self) -> TaskEntry:
        if (self.name is None) == (self.factory is None):
            raise ValueError("give exactly one of name and factory")
        return self


class GenerationSpec(_Strict):
    """Generation metrics of language models (text data): prefill of ``prompt_tokens``,
    then ``new_tokens`` greedy decode steps at batch 1, with a KV cache where the model has
    one."""

    enabled: bool = True
    prompt_tokens: int = Field(32, ge=1, le=65_536)
    new_tokens: int = Field(32, ge=1, le=65_536)


class MeasureSpec(_Strict):
    """How latency is measured: batch sizes, warm-up, calibrated rounds, a time budget.

    ``max_time_s`` is each timed pair's budget, split into ``repeats`` blocks taken in turn
    across batch sizes (qatbench/measure/timing.py); ``passes`` > 1 times every trial in
    that many worker processes spread over the sweep and pools their rounds
    (qatbench/measure/passes.py).
    """

    batch_sizes: list[Annotated[int, Field(ge=1, le=65_536)]] = Field(
        default_factory=lambda: [1, 64], min_length=1
    )
    warmup_s: float = Field(0.2, ge=0, le=60)
    min_round_s: float = Field(0.002, gt=0, le=10)
    min_rounds: int = Field(15, ge=3, le=100_000)
    max_time_s: float = Field(4.0, gt=0, le=3600)
    repeats: int = Field(8, ge=1, le=1000)
    # stop timing a trial once every speed-up's 95% interval is within +/- this percent of
    # it (checked after each repeat from the third); max_time_s stays the cap. None: off.
    target_ci_pct: float | None = Field(None, gt=0, le=100)
    passes: int = Field(1, ge=1, le=20)
    threads: int = Field(1, ge=1, le=1024)
    per_layer: bool = True
    generation: GenerationSpec = Field(default_factory=GenerationSpec)


class TrackingSpec(_Strict):
    """Where results are logged; ``uri: null`` is the embedded store under ``mlruns/``."""

    uri: str | None = None
    experiment: Name | None = None


ONNX_ARTIFACT: Final = "onnx"
TORCH_ARTIFACT: Final = "torch"
ArtifactKind = Literal["onnx", "torch"]


class ExperimentSpec(_Strict):
    """A whole experiment file, validated."""

    schema_version: Literal[1] = 1
    name: Name
    description: str = ""
    seed: int = Field(0, ge=0, le=2**32 - 1)
    models: list[ModelEntry] = Field(min_length=1)
    methods: list[MethodEntry] = Field(min_length=1)
    bits: list[str] = Field(default_factory=lambda: ["w8a8"], min_length=1)
    runtimes: list[Runtime] = Field(default_factory=_default_runtimes, min_length=1)
    exclude: list[dict[Literal["model", "method", "bits", "runtime"], str]] = Field(
        default_factory=list
    )
    data: DataSpec = Field(default_factory=DataSpec)
    measure: MeasureSpec = Field(default_factory=MeasureSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    timeout_s: float = Field(900, gt=0, le=86_400)
    expect: ExpectList = Field(default_factory=list)
    task: TaskEntry | None = None  # default: the dataset's own (accuracy, perplexity)
    # Which artifacts every trial keeps in its folder (and MLflow): "onnx", the exported
    # graph, and "torch", the converted module's state dict as model.pt. Graph runtimes
    # always export the graph they run; by default nothing else is written.
    artifacts: list[ArtifactKind] = Field(default_factory=list)
    # false skips the memory and disk estimate of qatbench validate and run
    # (qatbench/spec/resources.py), as --force does
    check_resources: bool = True

    @field_validator("task", mode="before")
    @classmethod
    def _task_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    # quality metric -> the worst value accepted, read in the metric's own direction
    # (docs/pick.md); the pick (qatbench/report/pick.py) reads it.
    budget: dict[str, float] = Field(default_factory=dict)
    pick_by: PickBy = "speedup"

    @field_validator("models", "methods", mode="before")
    @classmethod
    def _names_to_entries(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("bits")
    @classmethod
    def _bits_parse(cls, value: list[str]) -> list[str]:
        return [BitWidth.parse(v).label for v in value]

    def expand(self) -> list[TrialSpec]:
        """The grid models x methods x bits x runtimes, minus exclusions and combinations
        a method's capabilities rule out. A method that does not quantize runs once per
        model and runtime with bits ``fp32``."""
        trials: list[TrialSpec] = []
        methods = [variant for entry in self.methods for variant in entry.variants()]
        for model in self.models:
            for method in methods:
                caps = registry.methods.get(method.name).capabilities
                runtimes = [
                    r for r in self.runtimes if caps.runs_on(registry.runtimes.get(r).capabilities)
                ]
                labels = method.bits if method.bits is not None else self.bits
                if not caps.quantizes:
                    labels = [FP32.label]
                for bits in labels:
                    if not caps.accepts(BitWidth.parse(bits)):
                        continue
                    for runtime in runtimes:
                        axes = {
                            "model": {model.name, model.key},
                            "method": {method.name, method.key},
                            "bits": {bits},
                            "runtime": {runtime},
                        }
                        if any(all(v in axes[k] for k, v in ex.items()) for ex in self.exclude):
                            continue
                        trials.append(
                            TrialSpec(
                                experiment=self.name,
                                model=model,
                                method=method,
                                bits=bits,
                                runtime=runtime,
                                data=self.data,
                                measure=self.measure,
                                seed=self.seed,
                                timeout_s=self.timeout_s,
                                task=self.task,
                                budget=tuple(self.budget.items()),
                                artifacts=frozenset(self.artifacts),
                                expect=tuple(self.expect)
                                + tuple(model.expect)
                                + tuple(method.expect),
                            )
                        )
        return trials


@dataclass(frozen=True)
class TrialSpec:
    """One cell of the grid: plain picklable data handed to a worker process."""

    experiment: str
    model: ModelEntry
    method: MethodEntry
    bits: str
    runtime: str
    data: DataSpec
    measure: MeasureSpec
    seed: int
    timeout_s: float
    expect: tuple[str, ...] = ()
    task: TaskEntry | None = None
    # the experiment's quality budget as (metric, bound) pairs: keep_fp32: auto searches in it
    budget: tuple[tuple[str, float], ...] = ()
    artifacts: frozenset[str] = frozenset()  # kinds kept besides what the runtime runs

    @property
    def id(self) -> str:
        return f"{self.model.key}-{self.method.key}-{self.bits}-{self.runtime}"

    def expectations(self) -> list[Expectation]:
        return [parse_expectation(e) for e in self.expect]

    def build_key(self) -> str:
        """What the trial's built fp32 model depends on, as text: its model entry and seed.
        Trials of a sweep with equal keys can share one build."""
        key = {"model": self.model.model_dump(exclude={"expect"}), "seed": self.seed}
        return json.dumps(key, sort_keys=True, default=str)

    def conversion_key(self) -> str:
        """What the trial's converted model depends on, as text: its model entry, data,
        seed and threads, and its method, options and bits, not its runtime. Trials of a
        sweep with equal keys can share one conversion (qatbench/trial/shared_fp32.py)."""
        key = {
            "model": self.model.model_dump(exclude={"expect"}),
            "data": self.data.model_dump(),
            "seed": self.seed,
            "threads": self.measure.threads,
            "method": self.method.name,
            "options": self.method.options,
            "bits": self.bits,
        }
        return json.dumps(key, sort_keys=True, default=str)


def load_experiment(path: str | Path) -> ExperimentSpec:
    """Read and validate an experiment file; raises ConfigError naming file, key and value."""
    path = Path(path)
    try:
        with path.open("rb") as handle:  # bounded: /dev/zero or a huge file is refused
            raw = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such experiment file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not an experiment file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_FILE_BYTES} bytes; not an experiment file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8)") from None
    try:
        check_unique_keys(text, str(path))
        data = yaml.safe_load(text)  # the safe loader: plain data, never Python objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    return validate_experiment(data, source=str(path))


def _check_size(data: Any, source: str) -> None:
    """Refuse documents that expand to more than MAX_VALUES values: YAML aliases can make
    a small file stand for billions of values (the "billion laughs")."""
    count, stack = 0, [data]
    while stack:
        item = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise ConfigError(
                f"{source}: the document expands to more than {MAX_VALUES} values "
                "(nested YAML aliases?); not an experiment file"
            )
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)


def validate_experiment(data: Any, source: str = "<experiment>") -> ExperimentSpec:
    """Validate a parsed YAML document (see :func:`load_experiment`)."""
    _check_size(data, source)
    if data is None:
        raise ConfigError(f"{source}: the file is empty; an experiment needs name, models, methods")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping of keys, got {type(data).__name__}"
        )
    version = data.get("schema_version", SPEC_SCHEMA_VERSION)
    if version != SPEC_SCHEMA_VERSION:
        raise ConfigError(
            f"{source}: schema_version: {version!r} is not supported; "
            f"allowed: {SPEC_SCHEMA_VERSION}"
        )
    try:
        spec = ExperimentSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_validation_error(exc, ExperimentSpec)}") from None
    check_names_and_capabilities(spec, source)
    trials = spec.expand()
    if not trials:
        raise ConfigError(f"{source}: the grid is empty after exclusions and capabilities")
    repeated = [tid for tid, n in Counter(t.id for t in trials).items() if n > 1]
    if repeated:
        raise ConfigError(
            f"{source}: duplicate trial id {repeated[0]!r}: a model, method, bit-width or "
            "runtime is listed twice (give one of two entries of a model or method a label)"
        )
    return spec
