"""``qatbench run --shard I/N`` and ``qatbench merge``: a grid split for CI matrix jobs and
put back together. The runner's bookkeeping runs with the FakeExecutor (no measuring)
against a real SQLite MLflow store; the commands run as the installed console script.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest
from data.sweep_support import FakeExecutor, qatbench, sqlite_uri, write_experiment

from qatbench.errors import ConfigError
from qatbench.report import load_schema
from qatbench.report.merge import load_and_merge, merge_records
from qatbench.results import RunRecord
from qatbench.spec.schema import load_experiment
from qatbench.sweep.folders import Shard
from qatbench.sweep.runner import resume_experiment, run_experiment

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
MODELS = "[{name: mlp, options: {hidden: [32]}}, tiny_transformer]"
RUNTIMES = "[torch, onnxruntime]"
BROKEN = "tiny_transformer-ptq-w4a8-onnxruntime"  # comes back failed from the FakeExecutor


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    from qatbench.tracking.store import init_store

    return init_store(sqlite_uri(tmp_path_factory.mktemp("store")))


def _one_line(proc: object, *fragments: str) -> None:
    stderr = getattr(proc, "stderr", "")
    assert getattr(proc, "returncode", None) == 2, stderr
    assert "Traceback" not in stderr
    line = stderr.rstrip("\n")
    assert "\n" not in line and line.startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in line, line


@pytest.mark.parametrize("text", ["0/2", "3/2", "1/0", "a/b", "1-2", "", "2"])
def test_a_bad_shard_is_a_one_line_error_naming_it(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        Shard.parse(text)
    message = str(info.value)
    assert "\n" not in message and f"--shard {text!r}" in message and "I/N" in message


def test_shards_partition_the_grid_round_robin_the_same_way_every_time() -> None:
    trials = load_experiment(QUICKSTART).expand()
    ids = [t.id for t in trials]
    for count in range(1, len(ids) + 2):
        parts = [[t.id for t in Shard(i, count).take(trials)] for i in range(1, count + 1)]
        assert sorted(i for part in parts for i in part) == sorted(
            ids
        )  # every trial in exactly one shard
        assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced
    assert [t.id for t in Shard(2, 3).take(trials)] == ids[1::3]
    assert Shard.parse(" 2 / 3 ") == Shard(2, 3) and str(Shard(2, 3)) == "2/3"


def test_two_shards_merged_equal_the_unsharded_sweep(store: str, tmp_path: Path) -> None:
    exp = write_experiment(
        tmp_path / "exp.yaml", "sharded", store, models=MODELS, runtimes=RUNTIMES
    )
    reports = tmp_path / "reports"
    broken = frozenset({BROKEN})
    whole = run_experiment(exp, output_root=reports, executor=FakeExecutor(fail=broken))
    shards = [
        run_experiment(exp, output_root=reports, executor=FakeExecutor(fail=broken), shard=s)
        for s in (Shard(1, 2), Shard(2, 2))
    ]
    assert [s.record.experiment["shard"] for s in shards] == ["1/2", "2/2"]
    assert not {t.id for t in shards[0].record.trials} & {t.id for t in shards[1].record.trials}
    assert all(not s.missing for s in shards)  # a shard's grid is its part

    out = tmp_path / "merged"
    proc = qatbench("merge", *(s.report_json for s in shards), "--output", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "sharded: 12 trials merged from 2 reports (1 failed)" in proc.stdout
    assert proc.stderr == ""  # no trial of the grid missing
    data = json.loads((out / "report.json").read_text())
    jsonschema.Draft202012Validator(load_schema()).validate(data)
    assert (out / "report.html").is_file()

    merged = RunRecord.load(out / "report.json")
    expected = {(t.id, t.status) for t in whole.record.trials}
    assert {(t.id, t.status) for t in merged.trials} == expected
    assert len(merged.trials) == len(expected) == 12
    assert merged.experiment["shards"] == ["1/2", "2/2"]
    assert merged.experiment["spec"] == whole.record.experiment["spec"]
    # one store, two sweeps: the common tracking fields kept, each shard's in full
    assert merged.tracking["uri"] == store and merged.tracking["experiment"] == "sharded"
    assert [s["sweep"] for s in merged.tracking["shards"]] == [
        s.record.tracking["sweep"] for s in shards
    ]
    assert merged.created == min(s.record.created for s in shards)


def test_a_shard_sweep_resumes_its_own_shard_only(store: str, tmp_path: Path) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", "shard_resume", store, models=MODELS)
    reports = tmp_path / "reports"
    first = next(iter(Shard(2, 2).ids(load_experiment(exp))))
    cut = run_experiment(
        exp,
        output_root=reports,
        executor=FakeExecutor(),
        shard=Shard(2, 2),
        select=lambda t: t.id == first,
    )
    executor = FakeExecutor()
    resumed = resume_experiment(cut.report_json, executor=executor)
    assert sorted([first, *executor.ran]) == sorted(Shard(2, 2).ids(load_experiment(exp)))
    assert not resumed.missing

    # by experiment file: the newest unfinished sweep of that shard, not of another
    run_experiment(
        exp, output_root=reports, executor=FakeExecutor(), shard=Shard(1, 2), select=lambda t: False
    )
    done = qatbench("run", "--resume", "--shard", "2/2", exp, "--output-dir", reports, cwd=tmp_path)
    _one_line(done, "no unfinished sweep of 'shard_resume' shard 2/2")
    wrong = qatbench("run", "--resume", "--shard", "1/2", cut.report_json, cwd=tmp_path)
    _one_line(wrong, "--shard 1/2", "is a sweep of shard 2/2")


def test_merge_refuses_other_experiments_and_conflicting_duplicates(
    store: str, tmp_path: Path
) -> None:
    exp = write_experiment(tmp_path / "a.yaml", "merge_a", store)
    a = run_experiment(exp, output_root=tmp_path / "r", executor=FakeExecutor()).record
    other = write_experiment(tmp_path / "b.yaml", "merge_b", store)
    b = run_experiment(other, output_root=tmp_path / "r", executor=FakeExecutor()).record
    pa, pb = Path("a/report.json"), Path("b/report.json")

    with pytest.raises(ConfigError, match="experiment 'merge_b' is not 'merge_a'"):
        merge_records([(pa, a), (pb, b)])
    changed = replace(a, experiment={**a.experiment, "spec": {**a.experiment["spec"], "seed": 7}})
    with pytest.raises(ConfigError, match=re.escape("experiment.spec differs")):
        merge_records([(pa, a), (pb, changed)])

    # the same trial twice: fine when identical, an error when the results differ
    assert merge_records([(pa, a), (pb, a)]).trials == a.trials
    trial = replace(a.trials[0], metrics={"size_bytes": 1.0})
    conflicting = replace(a, trials=(trial,))
    with pytest.raises(ConfigError, match=re.escape(f"trial {trial.id} is also in {pa}")):
        merge_records([(pa, a), (pb, conflicting)])

    a.save(tmp_path / "a.json")
    with pytest.raises(ConfigError, match="given twice"):
        load_and_merge([tmp_path / "a.json", tmp_path / "a.json"])
    b.save(tmp_path / "b.json")
    proc = qatbench("merge", "a.json", "b.json", "-o", "out", cwd=tmp_path)
    _one_line(proc, "b.json: experiment 'merge_b' is not 'merge_a'")
    assert not (tmp_path / "out").exists()


def test_merge_warns_about_trials_of_the_grid_in_no_report(store: str, tmp_path: Path) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", "merge_gap", store)
    part = run_experiment(
        exp, output_root=tmp_path / "r", executor=FakeExecutor(), shard=Shard(1, 2)
    )
    proc = qatbench("merge", part.report_json.parent, "-o", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    missing = sorted(Shard(2, 2).ids(load_experiment(exp)))
    assert proc.stderr.strip() == (
        f"warning: {len(missing)} trial(s) of the grid are in no report: "
        + ", ".join(t.id for t in load_experiment(exp).expand() if t.id in missing)
    )


def test_shards_of_one_run_key_are_one_sweep_for_history_and_merge(
    store: str, tmp_path: Path
) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", "nightly_shards", store, models=MODELS)
    reports = tmp_path / "reports"
    first_night = [
        run_experiment(exp, output_root=reports, executor=FakeExecutor(), shard=s, run_key="n1")
        for s in (Shard(1, 2), Shard(2, 2))
    ]
    second_night = run_experiment(
        exp, output_root=reports, executor=FakeExecutor(), shard=Shard(1, 2), run_key="n2"
    )
    sweeps = {s.record.tracking["sweep"] for s in first_night}
    assert sweeps == {"nightly_shards-n1"}
    assert second_night.record.tracking["sweep"] == "nightly_shards-n2"

    proc = qatbench(
        "history", "nightly_shards", "--metric", "size_bytes", "--tracking-uri", store,
        "-o", tmp_path / "history.html", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    grid = len(load_experiment(exp).expand())
    assert f"2 sweeps, {grid} trials" in proc.stdout  # the first night whole, then shard 1

    out = tmp_path / "merged"
    merged = qatbench("merge", *(s.report_json for s in first_night), "-o", out, cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr
    record = RunRecord.load(out / "report.json")
    assert record.tracking["sweep"] == "nightly_shards-n1" and "shards" not in record.tracking
    assert len(record.trials) == grid


def test_sweep_id_options_are_checked_before_anything_runs(store: str, tmp_path: Path) -> None:
    exp = write_experiment(tmp_path / "exp.yaml", "sweep_ids", store)
    bad = qatbench("run", exp, "--sweep-id", "no spaces", cwd=tmp_path)
    _one_line(bad, "--sweep-id 'no spaces'", "malformed")
    both = qatbench("run", exp, "--sweep-id", "a", "--run-key", "b", cwd=tmp_path)
    _one_line(both, "--sweep-id", "not both")
    resumed = qatbench("run", exp, "--resume", "--run-key", "n1", cwd=tmp_path)
    _one_line(resumed, "--run-key", "keeps its own sweep id")
    assert not (tmp_path / "reports").exists()
