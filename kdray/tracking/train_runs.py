"""MLflow runs of ``kdray train --track``: one run per training, and for born-again generations
(``--generations N``) a parent run with one child run per generation.

A run is created when its training starts and logs each epoch's metrics as they come (step = epoch); at the
end it gets the final metrics (test accuracy, teacher facts, compressed variants), the saved student folder
as artifacts (``student/``) and ends FINISHED, or FAILED (an error) / KILLED (Ctrl-C, SIGTERM) with the
error as tag ``kdray.error``. The born-again parent also gets ``generation_test_acc`` (step = generation)
and a plot of test accuracy by generation. Runs are written with :class:`mlflow.MlflowClient` and explicit
run ids only; the URI and the experiment (not deleted) are checked before any training
(:func:`kdray.tracking.client.connect`, :func:`kdray.tracking.client.active_experiment`).

A tracking server lost during training never stops it: every write goes through the bounded pause a search
has (:class:`kdray.tracking.client.PausedWrites`), and :meth:`TrainTracker.report` says at the end what was not logged.
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from kdray import __version__
from kdray.config import ExperimentConfig
from kdray.experiment.run import RunSummary, born_again, run
from kdray.redact import mask
from kdray.report.plots import generations_plot
from kdray.tracking.client import (ERROR_TAG, PARENT_TAG, ROLE_TAG, STATUS_TAG, PausedWrites, _chunks, error_line,
                                   _metrics, _params, active_experiment, connect, flatten, git_commit,
                                   resolve_tracking_uri)

GENERATION_TAG = "kdray.generation"


class TrainTracker:
    """Opens, fills and ends the MLflow runs of ``kdray train`` in experiment ``experiment``."""
    def __init__(self, tracking_uri: Optional[str], experiment: str):
        self.client = connect(tracking_uri)  # a ConfigError naming the URI before any work
        self.uri = resolve_tracking_uri(tracking_uri)[0]
        self.experiment = experiment
        exp = active_experiment(self.client, experiment)  # a deleted one: a ConfigError before any work
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        self.writes = PausedWrites(self.uri, "the training goes on", "epochs")

    def _write(self, what: str, run_id: Optional[str], fn, *args, item: Optional[str] = None, **kwargs) -> Any:
        """One write to run ``run_id`` through the bounded pause (counted as lost when the run was never created)."""
        if run_id is None:
            return self.writes.skipped(what, item)
        return self.writes(what, fn, run_id, *args, item=item, **kwargs)

    def _end(self, run_id: Optional[str], name: str, status: str, error: Optional[str] = None) -> None:
        self._write(f"ending run {name!r}", run_id, self.client.set_tag, STATUS_TAG, status.lower())
        if error:
            self._write(f"ending run {name!r}", run_id, self.client.set_tag, ERROR_TAG, error)
        self._write(f"ending run {name!r}", run_id, self.client.set_terminated, status)

    @contextlib.contextmanager
    def _open(self, name: str, tags: dict[str, str], params: dict[str, Any]) -> Iterator[Optional[str]]:
        """A run for the work inside (None when the server did not take it: the work goes on unlogged)."""
        tags = {STATUS_TAG: "running", "kdray.version": __version__, "mlflow.source.name": "kdray train", **tags}
        commit = git_commit(Path.cwd())
        if commit:
            tags["mlflow.source.git.commit"] = commit
        run = self.writes(f"creating run {name!r}", self.client.create_run, self.experiment_id, run_name=name,
                          tags=tags)
        run_id = run.info.run_id if run is not None else None
        try:
            for chunk in _chunks(_params(params), 100):
                self._write(f"the params of run {name!r}", run_id, self.client.log_batch, params=chunk)
            yield run_id
        except BaseException as e:  # the run ends FAILED or KILLED, with the error; the error goes on
            status = "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED"
            self._end(run_id, name, status, f"{type(e).__name__}: {error_line(e, 5000)}")
            raise
        self._end(run_id, name, "FINISHED")

    def report(self, saved_to: Any) -> None:
        """The end of a tracked training: where its runs are, and a warning of what was not logged, if anything."""
        print(f"MLflow: experiment {self.experiment!r} at {mask(self.uri)}")
        self.writes.warn_end(f"The student is saved in {saved_to}.")

    def train(self, cfg: ExperimentConfig, output_dir: str | Path, *, parent_id: Optional[str] = None,
              generation: Optional[int] = None) -> RunSummary:
        """:func:`kdray.experiment.run.run` inside a run of its own (a child of ``parent_id`` when given)."""
        tags = {ROLE_TAG: "generation" if generation is not None else "train", "kdray.experiment": cfg.name}
        if parent_id:
            tags[PARENT_TAG] = parent_id
        if generation is not None:
            tags[GENERATION_TAG] = str(generation)
            tags["kdray.taught_by"] = "teacher" if generation == 0 else f"generation {generation - 1}"
        with self._open(cfg.name, tags, flatten(cfg.model_dump(mode="json"))) as run_id:
            def log_epoch(metrics: dict, state_fn) -> None:
                epoch = int(metrics["epoch"])
                self._write(f"the epoch metrics of run {cfg.name!r}", run_id, self.client.log_batch,
                            metrics=_metrics(metrics, epoch), item=str(epoch))

            summary = run(cfg, output_dir=output_dir, callbacks=(log_epoch,))
            final = {"test_acc": summary.test_acc, "best_val_acc": summary.best_val_acc,
                     "student_params": summary.student_params, "seconds": summary.seconds,
                     **{k: v for k, v in summary.teacher.items() if k.startswith(("teacher_", "member"))}}
            if summary.test_teacher_agreement is not None:
                final["test_teacher_agreement"] = summary.test_teacher_agreement
            self._write(f"the final metrics of run {cfg.name!r}", run_id, self.client.log_batch,
                        metrics=_metrics(final, summary.epochs))
            if summary.output_dir:
                self._write(f"the student files of run {cfg.name!r}", run_id, self.client.log_artifacts,
                            str(summary.output_dir), "student")
        return summary

    def born_again(self, cfg: ExperimentConfig, generations: int, output_dir: str | Path) -> list[RunSummary]:
        """:func:`kdray.experiment.run.born_again` under a parent run, one child run per generation."""
        tags = {ROLE_TAG: "born_again", "kdray.experiment": cfg.name, "kdray.generations": str(generations)}
        params = {"generations": generations, **flatten(cfg.model_dump(mode="json"))}
        with self._open(f"{cfg.name} (born-again x{generations})", tags, params) as parent:
            summaries = born_again(cfg, generations, output_dir,
                                   run_fn=lambda c, out, g: self.train(c, out, parent_id=parent, generation=g))
            accs = [s.test_acc for s in summaries]
            best = max(range(len(accs)), key=accs.__getitem__)
            self._write("the generations summary", parent, self.client.log_batch,
                        metrics=[m for g, a in enumerate(accs) for m in _metrics({"generation_test_acc": a}, g)]
                        + _metrics({"best_generation": best, "best_test_acc": accs[best]}, 0))
            with tempfile.TemporaryDirectory() as d:

                self._write("the generations plot", parent, self.client.log_artifact,
                            str(generations_plot(accs, Path(d) / "generations.png")), "plots")
        return summaries
