"""Reading what a search logged to a real MLflow store, and loading a registered model in a fresh process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from mlflow import MlflowClient

PREDICT = ("import sys, numpy as np, mlflow; m = mlflow.pyfunc.load_model(sys.argv[1]); "
           "np.save(sys.argv[3], np.asarray(m.predict(np.load(sys.argv[2]))))")


def predict_in_fresh_process(model_uri: str, x: np.ndarray, tracking_uri: str, tmp: Path) -> np.ndarray:
    """``mlflow.pyfunc.load_model(model_uri).predict(x)`` in a new Python process (nothing of this one's imports)."""
    np.save(tmp / "x.npy", x)
    done = subprocess.run([sys.executable, "-c", PREDICT, model_uri, str(tmp / "x.npy"), str(tmp / "y.npy")],
                          env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}, capture_output=True, text=True,
                          timeout=300, cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    return np.load(tmp / "y.npy")


def all_runs(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return list(client.search_runs([exp.experiment_id], max_results=1000))
