"""Imported at start-up by the Python subprocesses of a test session (this folder is on
their PYTHONPATH): new SQLite MLflow stores start from the session's migrated template.
See mlflow_template.py."""

import mlflow_template

mlflow_template.activate()
