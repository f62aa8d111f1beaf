"""MLflow tags naming the machine a sweep's trials ran on (``env.*``, the git commit)."""

from __future__ import annotations

from qatbench.results import TrialResult


def env_tags(env: dict[str, object]) -> dict[str, str]:
    tags = {f"env.{k}": str(v) for k, v in env.items() if not isinstance(v, dict | list)}
    if env.get("git_commit"):
        tags["mlflow.source.git.commit"] = str(env["git_commit"])
    return tags


def trial_env_tags(tags: dict[str, str], result: TrialResult) -> dict[str, str]:
    """The sweep's env tags, overridden by the machine that ran the trial where it says
    (on a cluster, the node; see :func:`qatbench.sweep.executor.with_node_env`)."""
    node = result.details.get("env")
    return {**tags, **env_tags(node)} if isinstance(node, dict) else tags
