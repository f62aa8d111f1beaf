"""MLflow tracking: one run per trial, its metrics in one batch, the ONNX file and trial.json.

This is the only package of qatbench that imports mlflow, and only the parent process
imports it: workers return plain :class:`~qatbench.results.TrialResult` data and the parent
logs it here. The embedded default store keeps everything under ``mlruns/``: an SQLite
database (``mlruns/mlflow.db``) next to an artifact folder (``mlruns/artifacts``). Any other
MLflow tracking URI (e.g. a shared ``mlflow server``) works the same way.

- :mod:`~qatbench.tracking.store`: where the store is, creating it, reaching it;
- :mod:`~qatbench.tracking.tracker`: :class:`Tracker`, one experiment's runs, logged and
  found again for a resumed sweep;
- :mod:`~qatbench.tracking.run_data`: a trial result as MLflow metrics, params and tags;
- :mod:`~qatbench.tracking.onnx_model`: a trial's graph logged as an ONNX-flavour model;
- :mod:`~qatbench.tracking.queries`: logged trials read back (compare, history, report).

Every failure to reach or write the store is raised as a one-line
:class:`~qatbench.errors.TrackingError`.
"""

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before a submodule imports mlflow
