"""MLflow runs of ``kdray train --track``: one run per training, and for born-again generations
(``--generations N``) a parent run with one child run per generation.

A run is created when its training starts and logs each epoch's metrics as they come (step = epoch); at the
end it gets the final metrics (test accuracy, teacher facts, compressed variants), the saved student folder
as artifacts (``student/``) and ends FINISHED, or FAILED (an error) / KILLED (Ctrl-C, SIGTERM) with the
error as tag ``kdray.error``. The born-again parent also gets ``generation_test_acc`` (step = generation)
and a plot of test accuracy by generation. Runs are written with :class:`mlflow.MlflowClient` and explicit
run ids only; the URI is checked before any training (:func:`kdray.tracking.connect`).
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from kdray import __version__
from kdray.config import ExperimentConfig
from kdray.run import RunSummary, born_again, run
from kdray.tracking import (ERROR_TAG, PARENT_TAG, ROLE_TAG, STATUS_TAG, _chunks, _first_line, _metrics, _params,
                            connect, flatten, git_commit, resolve_tracking_uri)

GENERATION_TAG = "kdray.generation"


class TrainTracker:
    """Opens, fills and ends the MLflow runs of ``kdray train`` in experiment ``experiment``."""

    def __init__(self, tracking_uri: Optional[str], experiment: str):
        self.client = connect(tracking_uri)  # a ConfigError naming the URI before any work
        self.uri = resolve_tracking_uri(tracking_uri)[0]
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)

    @contextlib.contextmanager
    def _open(self, name: str, tags: dict[str, str], params: dict[str, Any]) -> Iterator[str]:
        tags = {STATUS_TAG: "running", "kdray.version": __version__, "mlflow.source.name": "kdray train", **tags}
        commit = git_commit(Path.cwd())
        if commit:
            tags["mlflow.source.git.commit"] = commit
        run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        try:
            for chunk in _chunks(_params(params), 100):
                self.client.log_batch(run_id, params=chunk)
            yield run_id
        except BaseException as e:
            status = "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED"
            with contextlib.suppress(Exception):  # never hide the original error
                self.client.set_tag(run_id, STATUS_TAG, status.lower())
                self.client.set_tag(run_id, ERROR_TAG, f"{type(e).__name__}: {_first_line(e, 5000)}")
                self.client.set_terminated(run_id, status)
            raise
        self.client.set_tag(run_id, STATUS_TAG, "finished")
        self.client.set_terminated(run_id, "FINISHED")

    def train(self, cfg: ExperimentConfig, output_dir: str | Path, *, parent_id: Optional[str] = None,
              generation: Optional[int] = None) -> RunSummary:
        """:func:`kdray.run.run` inside a run of its own (a child of ``parent_id`` when given)."""
        tags = {ROLE_TAG: "generation" if generation is not None else "train", "kdray.experiment": cfg.name}
        if parent_id:
            tags[PARENT_TAG] = parent_id
        if generation is not None:
            tags[GENERATION_TAG] = str(generation)
            tags["kdray.taught_by"] = "teacher" if generation == 0 else f"generation {generation - 1}"
        with self._open(cfg.name, tags, flatten(cfg.model_dump(mode="json"))) as run_id:
            def log_epoch(metrics: dict, state_fn) -> None:
                self.client.log_batch(run_id, metrics=_metrics(metrics, int(metrics["epoch"])))

            summary = run(cfg, output_dir=output_dir, callbacks=(log_epoch,))
            final = {"test_acc": summary.test_acc, "best_val_acc": summary.best_val_acc,
                     "student_params": summary.student_params, "seconds": summary.seconds,
                     **{k: v for k, v in summary.teacher.items() if k.startswith(("teacher_", "member"))}}
            if summary.test_teacher_agreement is not None:
                final["test_teacher_agreement"] = summary.test_teacher_agreement
            self.client.log_batch(run_id, metrics=_metrics(final, summary.epochs))
            if summary.output_dir:
                self.client.log_artifacts(run_id, summary.output_dir, "student")
        return summary

    def born_again(self, cfg: ExperimentConfig, generations: int, output_dir: str | Path) -> list[RunSummary]:
        """:func:`kdray.run.born_again` under a parent run, one child run per generation."""
        tags = {ROLE_TAG: "born_again", "kdray.experiment": cfg.name, "kdray.generations": str(generations)}
        params = {"generations": generations, **flatten(cfg.model_dump(mode="json"))}
        with self._open(f"{cfg.name} (born-again x{generations})", tags, params) as parent:
            summaries = born_again(cfg, generations, output_dir,
                                   run_fn=lambda c, out, g: self.train(c, out, parent_id=parent, generation=g))
            accs = [s.test_acc for s in summaries]
            best = max(range(len(accs)), key=accs.__getitem__)
            self.client.log_batch(parent, metrics=[m for g, a in enumerate(accs)
                                                   for m in _metrics({"generation_test_acc": a}, g)]
                                  + _metrics({"best_generation": best, "best_test_acc": accs[best]}, 0))
            with tempfile.TemporaryDirectory() as d:
                from kdray.plots import generations_plot

                self.client.log_artifact(parent, str(generations_plot(accs, Path(d) / "generations.png")), "plots")
        return summaries
