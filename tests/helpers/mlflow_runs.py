"""Reading what a search logged to a real MLflow store."""
from __future__ import annotations

from mlflow import MlflowClient


def all_runs(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return list(client.search_runs([exp.experiment_id], max_results=1000))
