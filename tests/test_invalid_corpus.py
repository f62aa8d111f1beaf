"""Bad input through ``qatbench run``, end to end: each case is exit 2 with one ``error:``
line and no traceback, and writes nothing (no reports/, no mlruns/, no cache); or, where the
input is valid but the user's code fails, a failed trial naming its phase and exit 1.

``tests/test_spec.py`` checks the same files' messages in-process and ``tests/test_cli.py``
through ``qatbench validate``; here ``run`` must refuse them before creating anything.
"""

from __future__ import annotations

import ast
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from data.sweep_support import TESTS, qatbench, report_trials, sqlite_uri, write_experiment

INVALID = TESTS / "data" / "invalid"
PYTHONPATH = {"PYTHONPATH": str(TESTS)}  # data.raising_module, data.bad_plugins

# case -> the fragments of its one error line (besides the file's own path)
CASES: dict[str, list[str]] = {
    "missing.yaml": ["no such experiment file"],
    "binary.yaml": ["not a text file (not UTF-8)"],
    "huge_eval_samples.yaml": [
        "data.eval_samples: Input should be less than or equal to 100000 (got 1000000000000)"
    ],
    "nan_timing.yaml": ["measure.max_time_s", "(got nan)"],
    "escape_model_name.yaml": ["models[0].name: String should match pattern", "'../../etc'"],
    "path_name.yaml": ["name: String should match pattern", "'../escape'"],
    "alias_bomb.yaml": ["the document expands to more than 100000 values"],
    "deep_nesting.yaml": ["invalid YAML: nested too deeply"],
    "python_tag.yaml": ["invalid YAML at line 2", "python/object/apply:os.system"],
    "factory_import_raises.yaml": [
        "models[0].factory: cannot import 'data.raising_module': "
        "raising_module refuses to be imported"
    ],
    "empty.yaml": ["the file is empty"],
    "yaml_syntax.yaml": ["invalid YAML at line 4"],
    # the six that once slipped through validation
    "dup_key.yaml": ["methods: duplicate key at lines 3 and 5"],
    "typo_hides_required.yaml": ["metods: unknown key (did you mean 'methods'?)"],
    "unsatisfiable_bits.yaml": ["bits[1]: no method of the grid can do 'w9a8'"],
    "bool_batch.yaml": ["measure.batch_sizes[0]: Input should be a valid integer (got True)"],
    "input_mismatch.yaml": [
        "models[0] (linear): data.dataset 'digits' gives 28x28 float images",
        "float32 [1, 4096]",
    ],
    "file_store_uri.yaml": ["tracking.uri: 'file:///tmp/qatbench-file-store'", "file store"],
}


def assert_refused(proc: subprocess.CompletedProcess[str], cwd: Path, *fragments: str) -> str:
    """Exit 2, one ``error:`` line naming the fragments, no traceback, nothing written."""
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    assert proc.stdout == ""
    left = sorted(p.name for p in cwd.iterdir() if p.name != "input")
    assert left == [], f"half-written: {left}"
    return errors[0]


def _run_case(name: str, root: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    cwd = root / name.removesuffix(".yaml")
    cwd.mkdir()
    return qatbench("run", INVALID / name, cwd=cwd, env=PYTHONPATH, timeout=120), cwd


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    """``qatbench run`` on every case, each in an empty folder of its own, two at a time."""
    root = tmp_path_factory.mktemp("corpus")
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = list(pool.map(lambda n: _run_case(n, root), CASES))
    return dict(zip(CASES, done, strict=True))


@pytest.mark.parametrize("name", list(CASES))
def test_run_refuses_an_invalid_file_with_one_line_and_writes_nothing(
    name: str, runs: dict[str, tuple[subprocess.CompletedProcess[str], Path]]
) -> None:
    proc, cwd = runs[name]
    line = assert_refused(proc, cwd, *CASES[name])
    assert line.startswith(f"error: {INVALID / name}: ")


def test_the_unsafe_yaml_tag_ran_nothing(
    runs: dict[str, tuple[subprocess.CompletedProcess[str], Path]],
) -> None:
    _, cwd = runs["python_tag.yaml"]
    assert not (cwd / "qatbench-pwned").exists()


def test_a_file_over_the_size_limit_is_refused_unread(tmp_path: Path) -> None:
    big = tmp_path / "input" / "big.yaml"
    big.parent.mkdir()
    big.write_text("name: big\nmodels: [mlp]\nmethods: [fp32]\n" + "# padding\n" * 120_000)
    proc = qatbench("run", big, "/dev/zero", cwd=tmp_path)
    assert_refused(proc, tmp_path, f"{big}: larger than 1048576 bytes")


def test_a_directory_or_a_report_is_not_an_experiment_file(tmp_path: Path) -> None:
    folder = tmp_path / "input"
    folder.mkdir()
    proc = qatbench("run", folder, cwd=tmp_path)
    assert_refused(proc, tmp_path, f"{folder}: is a directory, not an experiment file")
    (folder / "report.json").write_text("{}")
    proc = qatbench("run", folder, cwd=tmp_path)
    assert_refused(
        proc, tmp_path, f"{folder}: a report, not an experiment file; continue it with --resume"
    )


def install_entry_point(site: Path, name: str, target: str) -> None:
    """A distribution (just its metadata) declaring the method entry point ``name``."""
    info = site / f"qatbench_{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: qatbench-{name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[qatbench.methods]\n{name} = {target}\n")


def test_a_plugin_whose_import_raises_is_a_warning_and_using_it_one_error(
    tmp_path: Path,
) -> None:
    site = tmp_path / "input" / "site"
    install_entry_point(site, "raising", "data.raising_module:Thing")
    exp = tmp_path / "input" / "exp.yaml"
    exp.write_text("name: uses_raising\nmodels: [mlp]\nmethods: [fp32, raising]\n")
    env = {"PYTHONPATH": os.pathsep.join([str(site), str(TESTS)])}
    proc = qatbench("run", exp, cwd=tmp_path, env=env)
    assert_refused(
        proc,
        tmp_path,
        "methods[1].name: method 'raising' is installed but failed to load: "
        "RuntimeError: raising_module refuses to be imported",
    )
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and "'raising' (data.raising_module:Thing)" in warning[0]


# --- valid input, failing user code: a failed trial, exit 1 -------------------------------


Sweep = tuple[subprocess.CompletedProcess[str], dict[str, dict[str, Any]]]


@pytest.fixture(scope="module")
def failing_sweep(tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    """One sweep with a method whose convert returns None (an installed entry point) and
    a model factory that raises: 4 trials, 1 finished."""
    tmp = tmp_path_factory.mktemp("failing")
    site = tmp / "site"
    install_entry_point(site, "none_convert", "data.bad_plugins:NoneConvert")
    exp = write_experiment(
        tmp / "exp.yaml",
        "user_code_fails",
        sqlite_uri(tmp / "mlruns"),
        models="[{name: mlp, options: {hidden: [32]}}, "
        "{name: boom, factory: 'data.bad_plugins:raising_factory', options: {width: 3}}]",
        methods="[fp32, none_convert]",
        bits="[w8a8]",
    )
    env = {"PYTHONPATH": os.pathsep.join([str(site), str(TESTS)])}
    proc = qatbench("run", exp, cwd=tmp, env=env, timeout=240)
    (report,) = (tmp / "reports" / "user_code_fails").glob("*/report.json")
    assert report.with_name("report.html").is_file()
    return proc, {t["id"]: t for t in report_trials(report)}


@pytest.mark.slow
def test_a_convert_that_returns_none_is_a_failed_trial(failing_sweep: Sweep) -> None:
    proc, trials = failing_sweep
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "user_code_fails: 1 finished, 3 failed" in proc.stdout
    trial = trials["mlp-none_convert-w8a8-torch"]
    assert trial["status"] == "failed"
    assert trial["error"] == {
        "phase": "convert",
        "reason": "method 'none_convert': convert() returned NoneType, not the model",
    }
    assert trials["mlp-fp32-fp32-torch"]["status"] == "finished"


@pytest.mark.slow
def test_a_model_factory_that_raises_is_a_failed_trial_in_build(failing_sweep: Sweep) -> None:
    proc, trials = failing_sweep
    assert proc.returncode == 1
    for trial_id in ("boom-fp32-fp32-torch", "boom-none_convert-w8a8-torch"):
        assert trials[trial_id]["error"] == {
            "phase": "build",
            "reason": "RuntimeError: factory exploded with options {'width': 3}",
        }
        assert f"failed {trial_id}: build: RuntimeError: factory exploded" in proc.stderr


# --- what the package itself loads --------------------------------------------------------

PACKAGE = TESTS.parent / "qatbench"


def _calls(attribute: str, module: str) -> list[tuple[str, ast.Call]]:
    """Every call ``module.attribute(...)`` in the package's source, with its place."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == attribute
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == module
            ):
                found.append((f"{path.relative_to(PACKAGE)}:{node.lineno}", node))
    return found


def test_every_checkpoint_is_loaded_with_weights_only() -> None:
    """Except the one load of a sweep's own signed pickles (trial/shared_fp32.py's
    ``_load_model``, which checks the signature first: the test below)."""
    loads = _calls("load", "torch")
    assert loads, "no torch.load found: the check would pass vacuously"
    unsafe = [
        where
        for where, call in loads
        if not any(
            k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
            for k in call.keywords
        )
    ]
    assert len(unsafe) == 1 and unsafe[0].startswith("trial/shared_fp32.py:"), unsafe
    source = (PACKAGE / "trial" / "shared_fp32.py").read_text()
    line = int(unsafe[0].split(":")[1])
    loader = next(
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef) and node.lineno <= line <= (node.end_lineno or 0)
    )
    assert loader.name == "_load_model"


class _Planted:
    """A pickle that, when loaded whole, touches a file: what a planted model could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.marker,))


def test_a_shared_model_not_signed_by_the_sweep_is_never_unpickled(tmp_path: Path) -> None:
    """A file put in a sweep's shared folder by anyone but its workers (no signature, or
    one made without the sweep's key, or a signed file changed after) is not loaded."""
    import torch

    from qatbench.trial import shared_fp32 as shared

    marker = tmp_path / "unpickled"
    with shared.shared_folder(tmp_path / "shared"):
        target = tmp_path / "shared" / "converted-x.pt"
        signature = target.with_name(target.name + shared.SIGNATURE_SUFFIX)
        torch.save({"model": _Planted(marker)}, target)
        assert shared._load_model(target) is None
        signature.write_text("0" * 64)  # a signature made without the key
        assert shared._load_model(target) is None
        # signed by the sweep, then changed: the bytes no longer match
        shared._save_model(target, {"model": torch.nn.Linear(2, 2)})
        assert shared._load_model(target) is not None
        torch.save({"model": _Planted(marker)}, target)
        assert shared._load_model(target) is None
    assert not marker.exists()


def test_yaml_is_only_read_with_the_safe_loader() -> None:
    assert _calls("safe_load", "yaml")
    unsafe = [
        where
        for name in (
            "load",
            "load_all",
            "full_load",
            "full_load_all",
            "unsafe_load",
            "unsafe_load_all",
        )
        for where, _ in _calls(name, "yaml")
    ]
    assert unsafe == []
