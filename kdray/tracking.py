"""MLflow tracking of a search: one parent run per search, one child run per trial, written by the driver.

* :func:`resolve_tracking_uri` and :func:`connect` pick the tracking URI (``--tracking-uri``, else
  ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory) and check that it
  answers before anything else starts (a short timeout and no retries for HTTP servers). Credentials in an
  HTTP(S) URI move to the environment (:mod:`kdray.redact`); every URI kdray shows is masked.
* :func:`active_experiment` refuses a deleted experiment (exit 2) before any work;
  :func:`search_tracker` runs both checks for a search.
* :class:`PausedWrites` is the one bounded-pause policy for MLflow writes that must never stop the work they
  record (a search's trials here, ``kdray train --track`` in :mod:`kdray.train_tracking`).
* :class:`SearchTracker` owns the runs. It only calls :class:`mlflow.MlflowClient` with explicit run ids
  (no fluent active-run state), so its writes are safe from the Tune driver's callback thread.
* :class:`MlflowSearchCallback` is a driver-side ``ray.tune.Callback``: it opens a trial's child run when
  the trial starts, logs each epoch's metrics as they arrive (step = epoch), and ends the run with a
  status that tells finished, pruned (ASHA), failed (with the error) and killed apart
  (tag ``kdray.status``; MLflow status FINISHED, FINISHED, FAILED, KILLED).
* At the end :meth:`SearchTracker.finish` registers the best students (:mod:`kdray.model_registry`),
  logs the trials table and plots (:mod:`kdray.plots`) on the parent run and ends it.

On ``--resume`` the parent run id is read back from ``<storage>/<name>/mlflow_parent_run_id`` (or found by
tag) and each trial's child run is found by its ``kdray.trial_id`` tag, so every trial keeps one run.
Workers never talk to MLflow. The plain-PyTorch core (run, train) knows nothing of this module.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import pandas as pd
import yaml
from ray.tune import Callback

from kdray import __version__
from kdray.errors import ConfigError, KdrayError
from kdray.redact import credentials_to_env, mask

log = logging.getLogger("kdray")

PARENT_ID_FILE = "mlflow_parent_run_id"
PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "kdray.trial_id"
STATUS_TAG = "kdray.status"
ERROR_TAG = "kdray.error"
ROLE_TAG = "kdray.role"
SEARCH_PATH_TAG = "kdray.search_path"
RUN_STATUS = {"finished": "FINISHED", "pruned": "FINISHED", "failed": "FAILED", "killed": "KILLED"}
# Tune's own bookkeeping and kdray's report fields that are not metrics of the run
NOT_METRICS = {"training_iteration", "time_total_s", "episodes_total", "timesteps_total", "time_this_iter_s",
               "timestamp", "time_since_restore", "timesteps_since_restore", "iterations_since_restore", "pid",
               "node_ip", "hostname", "date", "done", "trial_id", "experiment_tag", "should_checkpoint",
               "checkpoint_dir_name", "config", "epoch", "max_epochs", "resumed_from"}
_KEY_OK = re.compile(r"[^/\w.\- :]")


# --------------------------------------------------------------------------------------------------
# the tracking URI


def resolve_tracking_uri(uri: Optional[str] = None) -> tuple[str, str]:
    """(URI, where it came from): ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite file
    ``mlflow.db`` in the working directory (MLflow 3's own default, made absolute).

    The ``user:password@`` of an HTTP(S) URI moves to ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``
    (:func:`kdray.redact.credentials_to_env`; ``MLFLOW_TRACKING_URI`` is rewritten clean): the URI returned
    holds no password."""
    if uri:
        return credentials_to_env(uri), "--tracking-uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        os.environ["MLFLOW_TRACKING_URI"] = credentials_to_env(os.environ["MLFLOW_TRACKING_URI"])
        return os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI"
    return "sqlite:///" + str(Path("mlflow.db").resolve()), "the default tracking URI"


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _first_line(e: BaseException, n: int = 300) -> str:
    """The first line of an error's message, credentials masked."""
    text = mask(str(e).strip())
    return (text.splitlines()[0] if text else type(e).__name__)[:n]


def connect(uri: Optional[str] = None, timeout_s: float = 5.0):
    """A client for the tracking URI, after checking that it answers (one request, no retries).

    Raises ConfigError naming the URI (and where it came from) when it does not.
    """
    from mlflow import MlflowClient

    uri, source = resolve_tracking_uri(uri)
    with _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(max(1, int(timeout_s)))):
        try:
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
        except Exception as e:  # noqa: BLE001 - connection, auth and URI-scheme errors of many kinds
            field = source if source.startswith(("--", "MLFLOW")) else "tracking URI"
            raise ConfigError(field, mask(uri), f"a reachable MLflow tracking URI (http://host:port of a running "
                                          f"`mlflow server`, sqlite:///path/mlflow.db ...); it failed with: "
                                          f"{_first_line(e)}") from None
    return client


def _local_sqlite_dir(uri: str) -> Optional[Path]:
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        return Path(path).resolve().parent if path and path != ":memory:" else None
    return None


@contextlib.contextmanager
def use_tracking_uri(uri: str) -> Iterator[None]:
    """Temporarily point MLflow's global tracking URI at ``uri`` (``mlflow.pytorch.log_model`` and the SQL
    registry store use it); restores both the global and the ``MLFLOW_TRACKING_URI`` variable."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    old_global, old_env = getattr(utils, "_tracking_uri", None), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_global)
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


# --------------------------------------------------------------------------------------------------
# small helpers


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts and lists as ``a.b.0.c`` keys with string values (MLflow params)."""
    out: dict[str, str] = {}
    if isinstance(tree, dict) and tree:
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}.{i}" if prefix else str(i)))
    else:
        out[prefix] = tree if isinstance(tree, str) else json.dumps(tree, default=str)
    return out


def _params(d: dict[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(_KEY_OK.sub("_", k)[:250], (v if isinstance(v, str) else json.dumps(v, default=str))[:6000])
            for k, v in d.items()]


def _metrics(values: dict[str, Any], step: int, skip: Iterable[str] = ()) -> list:
    """MLflow metrics of the finite numbers among ``values`` (not bools, not the keys in ``skip``), at ``step``."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(_KEY_OK.sub("_", k), float(v), now, step) for k, v in values.items()
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def _chunks(xs: list, n: int) -> Iterator[list]:
    for i in range(0, len(xs), n):
        yield xs[i:i + n]


def git_commit(start: Path) -> Optional[str]:
    """The commit checked out in the repository holding ``start`` (read from ``.git``; no git needed)."""
    try:
        for d in [start, *start.parents]:
            g = d / ".git"
            if g.is_file() and g.read_text().startswith("gitdir:"):
                g = (d / g.read_text()[7:].strip()).resolve()
            if not g.is_dir():
                continue
            head = (g / "HEAD").read_text().strip()
            if not head.startswith("ref:"):
                return head
            ref = head[4:].strip()
            common = (g / (g / "commondir").read_text().strip()).resolve() if (g / "commondir").is_file() else g
            for root in (g, common):
                if (root / ref).is_file():
                    return (root / ref).read_text().strip()
                packed = root / "packed-refs"
                if packed.is_file():
                    for line in packed.read_text().splitlines():
                        if line.endswith(" " + ref):
                            return line.split()[0]
            return None
    except OSError:
        return None
    return None


def _write_text(path: str, text: str) -> None:
    if "://" in path:
        import pyarrow.fs as pafs

        fs, p = pafs.FileSystem.from_uri(path)
        fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(p) as f:
            f.write(text.encode())
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)


def _read_text(path: str) -> Optional[str]:
    try:
        if "://" in path:
            import pyarrow.fs as pafs

            fs, p = pafs.FileSystem.from_uri(path)
            with fs.open_input_stream(p) as f:
                return f.read().decode()
        return Path(path).read_text() if Path(path).is_file() else None
    except (OSError, FileNotFoundError):
        return None


def error_text(trial: Any) -> str:
    """The last line of a failed trial's error (the exception's message)."""
    err = None
    # Tune writes the error to the driver's staging folder before calling the callbacks and syncs it
    # to the run storage later: read the staging copy first.
    path = getattr(trial, "error_file", None)
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            err = f.read()
    if not err:
        try:
            err = trial.get_error() or trial.get_pickled_error()
        except Exception:  # noqa: BLE001
            pass
    lines = [ln.strip() for ln in str(err or "").strip().splitlines() if ln.strip() and not ln.startswith("Failure #")]
    return mask(lines[-1] if lines else "unknown error")[:1000]


def active_experiment(client: Any, name: str) -> Any:
    """The MLflow experiment called ``name``, or None when there is none yet; a ConfigError (exit 2) when it
    is deleted: MLflow keeps a deleted experiment's name taken, and runs cannot go into it."""
    exp = client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage != "active":
        raise ConfigError("--experiment", name, f"the name of an active MLflow experiment or a new name; this one is "
                                                f"deleted (id {exp.experiment_id}): restore it with `mlflow "
                                                f"experiments restore --experiment-id {exp.experiment_id}` or "
                                                f"choose another name")
    return exp


# --------------------------------------------------------------------------------------------------
# writes that never stop the work they record


class PausedWrites:
    """The bounded pause of MLflow writes that must never stop the work they record (the trials of a search,
    a ``kdray train --track``): one implementation for both.

    Each write gets one retry and a 10 s timeout. A failed write is counted (what, and which ``item``: a trial,
    an epoch), the first failure of each kind is logged at once, and every write of the next ``PAUSE_S`` seconds
    is skipped and counted, so an unreachable server costs one timeout per pause instead of stalling the work.
    :meth:`warn_end` says at the end what was not logged, naming the (masked) URI.
    """

    PAUSE_S = 30.0

    def __init__(self, uri: str, goes_on: str, items: str):
        self.uri, self.goes_on, self.items = mask(uri), goes_on, items
        self.paused_until = 0.0
        self.lost: dict[str, set[str]] = {}  # what -> items
        self._warned: set[str] = set()

    def __getstate__(self) -> dict:  # kept in the search state Tune pickles: a pause does not outlive the run
        return {**self.__dict__, "paused_until": 0.0}

    def __call__(self, what: str, fn, *args, item: Optional[str] = None, **kwargs) -> Any:
        """``fn(*args, **kwargs)``, or None when it failed or was skipped (paused)."""
        if time.monotonic() < self.paused_until:
            self.skipped(what, item)
            return None
        try:
            with _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_TIMEOUT="10"):
                return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - connection errors of many kinds
            self.failed(what, e, item)
            self.paused_until = time.monotonic() + self.PAUSE_S
            return None

    def skipped(self, what: str, item: Optional[str] = None) -> None:
        self.lost.setdefault(what, set()).add(item or "-")

    def failed(self, what: str, e: BaseException, item: Optional[str] = None) -> None:
        """A write failed: counted, and the first failure of each kind logged right away."""
        self.skipped(what, item)
        if what not in self._warned:
            self._warned.add(what)
            log.warning("MLflow logging failed in %s (%s): %s", what, self.goes_on, _first_line(e))

    def summary(self) -> Optional[str]:
        """What was not logged, by kind and item; None when everything was."""
        if not self.lost:
            return None

        def one(what: str, items: set[str]) -> str:
            named = sorted(items - {"-"}, key=lambda i: (len(i), i))
            return f"{what}: {self.items} {', '.join(named)}" if named else what

        return "; ".join(one(what, items) for what, items in sorted(self.lost.items()))

    def warn_end(self, where: str) -> None:
        """At the end: a warning naming the URI and what was not logged (nothing when everything was)."""
        if self.lost:
            log.warning("MLflow (%s): some writes failed while the tracking server was unreachable; not logged: %s. "
                        "%s", self.uri, self.summary(), where)


# --------------------------------------------------------------------------------------------------
# the runs of one search


class SearchTracker:
    """The MLflow runs of one search: the parent, and a child per trial (keyed by Tune trial id)."""

    def __init__(self, uri: str, experiment: str, space: Any, base_raw: dict, base_dir: str | Path):
        self.uri, self.experiment = uri, experiment
        self.space, self.base_raw, self.base_dir = space, base_raw, str(base_dir)
        self.experiment_id: Optional[str] = None
        self.parent_run_id: Optional[str] = None
        self.children: dict[str, str] = {}  # trial id -> child run id
        self.open: set[str] = set()  # trial ids whose child run is RUNNING
        self.logged_epoch: dict[str, int] = {}
        self.statuses: dict[str, str] = {}  # trial id -> kdray status
        self.unfinished: list[str] = []  # trials Tune left neither TERMINATED nor ERROR (interrupted)
        self.num_classes: Optional[int] = None
        self.teacher: str = ""
        self.ended = False
        self._client = None
        self._student_cache: dict[str, tuple[int, int]] = {}
        self.writes = PausedWrites(uri, "the search goes on; trials keep training", "trials")

    @classmethod
    def attach(cls, uri: str, experiment: str, space: Any, base_raw: dict, base_dir: str | Path, parent_run_id: str,
               num_classes: int, teacher: str = "") -> "SearchTracker":
        """A tracker for the runs of an earlier search (e.g. to register more of its students)."""
        t = cls(uri, experiment, space, base_raw, base_dir)
        run = t.client.get_run(parent_run_id)
        t.experiment_id, t.parent_run_id, t.num_classes = run.info.experiment_id, parent_run_id, num_classes
        t.teacher = teacher or run.data.tags.get("kdray.teacher", "")
        t.ended = run.info.status != "RUNNING"
        t._load_children()
        return t

    def __getstate__(self) -> dict:  # Tune pickles its callbacks with the experiment state
        return {**self.__dict__, "_client": None, "uri": mask(self.uri)}  # (a database URI keeps its password)

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    # ---- the parent run

    def start(self, exp_path: str, *, resume: bool, settings: dict, space_path: str | Path,
              ray_address: Optional[str], teacher_info: dict, num_classes: int, probes: list[dict] = ()) -> str:
        """Find or create the experiment and the parent run (reused on resume); returns its id.

        ``probes`` (the probes fitted up-front on the candidate layers) go on the parent run as metrics
        ``probe_val_acc.<layer>.<pooling>``."""
        c = self.client
        self.num_classes = num_classes
        self.teacher = self._teacher_label(teacher_info)
        exp = active_experiment(c, self.experiment)
        if exp is None:
            local = _local_sqlite_dir(self.uri)
            try:
                self.experiment_id = c.create_experiment(
                    self.experiment, artifact_location=(local / "mlruns").as_uri() if local else None)
            except Exception:  # noqa: BLE001 - created meanwhile by another search
                exp = c.get_experiment_by_name(self.experiment)
                if exp is None:
                    raise
                self.experiment_id = exp.experiment_id
        else:
            self.experiment_id = exp.experiment_id
        id_file = exp_path.rstrip("/") + "/" + PARENT_ID_FILE
        parent = self._find_parent(id_file, exp_path) if resume else None
        if parent is not None:
            self.parent_run_id = parent
            c.update_run(parent, status="RUNNING")
            resumes = int(c.get_run(parent).data.tags.get("kdray.resumes", "0")) + 1
            c.set_tag(parent, "kdray.resumes", str(resumes))
            c.set_tag(parent, STATUS_TAG, "running")
            self._load_children()
            log.info("MLflow: resuming parent run %s in experiment %r (%s)", parent, self.experiment, mask(self.uri))
        else:
            if resume:
                log.warning("MLflow: no parent run of %s found in %s; starting a new one", mask(exp_path),
                            mask(self.uri))
            self.parent_run_id = self._create_parent(exp_path, settings, space_path, ray_address)
            log.info("MLflow: parent run %s in experiment %r (%s)", self.parent_run_id, self.experiment,
                     mask(self.uri))
        _write_text(id_file, self.parent_run_id + "\n")
        if probes:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            c.log_batch(self.parent_run_id, metrics=[
                Metric(_KEY_OK.sub("_", f"probe_val_acc.{p['layer']}.{p['pooling']}"), float(p["val_acc"]), now, 0)
                for p in probes if math.isfinite(p["val_acc"])])
        return self.parent_run_id

    def _teacher_label(self, info: dict) -> str:
        t = self.base_raw.get("teacher") or {}
        name = (t.get("model") or {}).get("name", "") if isinstance(t, dict) else ""
        return f"{name} ({info.get('source')})" if name and info.get("source") else name or "none"

    def _find_parent(self, id_file: str, exp_path: str) -> Optional[str]:
        text = _read_text(id_file)
        if text and text.strip():
            try:
                run = self.client.get_run(text.strip())
                if run.info.experiment_id == self.experiment_id and run.info.lifecycle_stage == "active":
                    return run.info.run_id
            except Exception:  # noqa: BLE001 - not in this tracking store
                pass
        runs = self.client.search_runs([self.experiment_id], f"tags.{ROLE_TAG} = 'search' and "
                                                             f"tags.`{SEARCH_PATH_TAG}` = '{_quote(mask(exp_path))}'",
                                       max_results=1, order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None

    def _create_parent(self, exp_path: str, settings: dict, space_path: str | Path, ray_address: Optional[str]) -> str:
        c = self.client
        tags = {ROLE_TAG: "search", SEARCH_PATH_TAG: mask(exp_path), STATUS_TAG: "running",
                "kdray.version": __version__, "kdray.ray_address": mask(ray_address) or "local",
                "kdray.teacher": self.teacher,
                "kdray.space_file": str(Path(space_path).resolve()), "kdray.metric": self.space.metric,
                "kdray.mode": self.space.mode, "mlflow.source.name": "kdray search"}
        commit = git_commit(Path(space_path).resolve().parent) or git_commit(Path.cwd())
        if commit:
            tags["kdray.git_commit"] = tags["mlflow.source.git.commit"] = commit
        run = c.create_run(self.experiment_id, run_name=self.space.name, tags=tags)
        rid = run.info.run_id
        space_raw = self.space.model_dump(mode="json", by_alias=True, exclude={"search"})
        params = {**{f"space.{k}": v for k, v in flatten(space_raw).items()},
                  **{f"search.{k}": v for k, v in flatten(settings).items()},
                  **{f"base.{k}": v for k, v in flatten(self.base_raw).items()}}
        for chunk in _chunks(_params(params), 100):
            c.log_batch(rid, params=chunk)
        try:
            space_text = Path(space_path).read_text()
        except OSError:
            space_text = yaml.safe_dump(self.space.model_dump(mode="json", by_alias=True), sort_keys=False)
        c.log_text(rid, space_text, "config/space.yaml")
        c.log_text(rid, yaml.safe_dump(self.base_raw, sort_keys=False), "config/base.yaml")
        c.log_text(rid, yaml.safe_dump(settings, sort_keys=False), "config/search_settings.yaml")
        return rid

    def _load_children(self) -> None:
        token = None
        while True:
            page = self.client.search_runs([self.experiment_id], f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'",
                                           max_results=1000, page_token=token)
            for r in page:
                tid = r.data.tags.get(TRIAL_TAG)
                if tid:
                    self.children.setdefault(tid, r.info.run_id)
            token = page.token
            if not token:
                break

    def end(self, status: str, error: Optional[str] = None) -> None:
        """End the parent run (and any child still open) — FINISHED, FAILED or KILLED."""
        kdray_status = {"FINISHED": "finished", "FAILED": "failed", "KILLED": "killed"}[status]
        for tid in list(self.open):
            self._end_child(tid, kdray_status, f"the search ended before this trial did: {error}" if error else None)
        if self.parent_run_id is None or self.ended:
            return
        c = self.client
        c.set_tag(self.parent_run_id, STATUS_TAG, kdray_status)
        if error:
            c.set_tag(self.parent_run_id, ERROR_TAG, error[:5000])
        c.set_terminated(self.parent_run_id, status)
        self.ended = True

    def close_after_error(self, e: BaseException) -> None:
        """The search raised or was interrupted: end every open run (KILLED for an interruption, else FAILED)."""
        status = "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED"
        try:
            self.end(status, f"{type(e).__name__}: {_first_line(e)}")
        except Exception as e2:  # noqa: BLE001 - never hide the original error
            log.warning("could not end the MLflow runs of the search: %s", _first_line(e2))

    # ---- child runs (called from the Tune callback, on the driver)

    def _child_for(self, trial_id: str) -> Optional[str]:
        if trial_id not in self.children:
            runs = self.client.search_runs([self.experiment_id], f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and "
                                                                 f"tags.`{TRIAL_TAG}` = '{_quote(trial_id)}'",
                                           max_results=1)
            if runs:
                self.children[trial_id] = runs[0].info.run_id
        return self.children.get(trial_id)

    def trial_started(self, trial_id: str, config: dict) -> str:
        c = self.client
        run_id = self._child_for(trial_id)
        if run_id is not None:  # a retried or resumed trial keeps its run
            c.update_run(run_id, status="RUNNING")
            c.set_tag(run_id, STATUS_TAG, "running")
            with contextlib.suppress(Exception):
                c.delete_tag(run_id, ERROR_TAG)
            if trial_id not in self.logged_epoch:
                hist = c.get_metric_history(run_id, self.space.metric)
                self.logged_epoch[trial_id] = max((m.step for m in hist), default=0)
        else:
            from kdray.search import _scalar

            values = {k: _scalar(v) for k, v in (config or {}).items()}
            tags = {PARENT_TAG: self.parent_run_id, TRIAL_TAG: trial_id, STATUS_TAG: "running",
                    ROLE_TAG: "trial", "kdray.search": self.space.name, "kdray.teacher": self.teacher}
            if "method" in values:
                tags["kdray.method"] = str(values["method"])
            run_id = c.create_run(self.experiment_id, run_name=trial_id, tags=tags).info.run_id
            self.children[trial_id] = run_id
            self.logged_epoch[trial_id] = 0
            params = _params(values)
            for chunk in _chunks(params, 100):
                c.log_batch(run_id, params=chunk)
            size = self.student_size(config or {})
            if size is not None:
                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                c.log_batch(run_id, metrics=[Metric("student_params", size[0], now, 0),
                                             Metric("student_size_bytes", size[1], now, 0)])
        self.open.add(trial_id)
        return run_id

    def student_size(self, values: dict) -> Optional[tuple[int, int]]:
        """(parameter count, bytes of its kdray model file) of the student of a trial's (Tune) config."""
        if self.num_classes is None:
            return None
        try:
            import torch

            from kdray.config import parse_config
            from kdray.models import build_model, count_parameters
            from kdray.space import trial_raw
            from kdray.teacher import model_checkpoint

            cfg = parse_config(trial_raw(self.space, self.base_raw, values), self.base_dir)
            key = json.dumps(cfg.student.model_dump(mode="json"), sort_keys=True)
            if key not in self._student_cache:
                model = build_model(cfg.student, self.num_classes)
                buf = io.BytesIO()
                torch.save(model_checkpoint(model, cfg.student, self.num_classes), buf)
                self._student_cache[key] = (count_parameters(model), len(buf.getvalue()))
            return self._student_cache[key]
        except Exception as e:  # noqa: BLE001 - informative only
            log.debug("student size of %s: %s", values, e)
            return None

    def trial_result(self, trial_id: str, result: dict) -> None:
        run_id = self.children.get(trial_id) or self.trial_started(trial_id, result.get("config") or {})
        epoch = int(result.get("epoch", result.get("training_iteration", 0)) or 0)
        if epoch and epoch <= self.logged_epoch.get(trial_id, 0):
            return  # already logged (a trial restored from an earlier checkpoint)
        for chunk in _chunks(_metrics(result, epoch, skip=NOT_METRICS), 1000):
            self.client.log_batch(run_id, metrics=chunk)
        self.logged_epoch[trial_id] = epoch

    def trial_completed(self, trial_id: str, last: Optional[dict]) -> None:
        last = last or {}
        epoch, max_epochs = int(last.get("epoch", 0) or 0), int(last.get("max_epochs", 0) or 0)
        status = "killed" if not epoch else "pruned" if epoch < max_epochs else "finished"
        self._end_child(trial_id, status)

    def trial_errored(self, trial_id: str, error: str) -> None:
        self._end_child(trial_id, "failed", error)

    def experiment_ended(self, unfinished: list[str]) -> None:
        """Tune's loop is over; trials it did not finish (interrupted) are killed."""
        self.unfinished = list(unfinished)
        for tid in list(self.open):
            self._end_child(tid, "killed")

    def _end_child(self, trial_id: str, status: str, error: Optional[str] = None) -> None:
        run_id = self.children.get(trial_id) or self._child_for(trial_id)
        if run_id is None:
            return
        c = self.client
        c.set_tag(run_id, STATUS_TAG, status)
        if error:
            c.set_tag(run_id, ERROR_TAG, error[:5000])
        c.set_terminated(run_id, RUN_STATUS[status])
        self.statuses[trial_id] = status
        self.open.discard(trial_id)

    def trial_recovered(self, trial_id: str, error: str) -> None:
        """Tune restarts a failed trial from its last checkpoint: same child run, the retry on record."""
        run_id = self.children.get(trial_id) or self._child_for(trial_id)
        if run_id is None:
            return
        c = self.client
        n = int(c.get_run(run_id).data.tags.get("kdray.retries", "0")) + 1
        c.set_tag(run_id, "kdray.retries", str(n))
        c.set_tag(run_id, f"kdray.retry_{n}_error", error[:5000])
        c.set_tag(run_id, STATUS_TAG, "retrying")

    # ---- the end of the search

    def finish(self, grid: Any, table: pd.DataFrame, *, register_top: int, registered_model: Optional[str],
               input_example: Any, baseline: Optional[dict] = None, expected_trials: int = 0,
               register_pareto: bool = False) -> tuple[pd.DataFrame, list[dict]]:
        """Register the top students (of a multi-objective search: the top of its Pareto front, or with
        ``register_pareto`` every Pareto-optimal one), log the summary on the parent run and end it.

        Returns the table with a ``model_version`` column and the registrations. An interrupted search
        (trials left unfinished) only ends the parent as KILLED: ``--resume`` continues it.
        """
        from kdray.model_registry import register_trials

        if self.unfinished or len(table) < expected_trials:
            self.end("KILLED", f"interrupted with {max(len(self.unfinished), expected_trials - len(table))} trial(s) "
                               f"unfinished; continue it with --resume")
            return table, []
        registrations: list[dict] = []
        error: Optional[BaseException] = None
        # a multi-objective search registers from its Pareto front: the K best of it by the first objective
        # (--register-top K), or all of it (--register-pareto)
        candidates = table[table["pareto"]] if "pareto" in table else table
        top = len(candidates) if register_pareto and "pareto" in table else register_top
        if top > 0:
            try:
                registrations = register_trials(self, grid, candidates, top,
                                                registered_model or f"{self.experiment}-student", input_example)
            except Exception as e:  # noqa: BLE001 - reported below, after the summary is logged
                error = e
        if registrations:
            versions = {r["trial_id"]: str(r["version"]) for r in registrations}
            table = table.copy()
            table["model_version"] = [versions.get(t) for t in table["trial_id"]]
        self.log_summary(table, baseline, registrations)
        if error is not None:
            self.end("FAILED", f"registering the best students failed: {_first_line(error)}")
            raise KdrayError(f"the search finished, but registering its best students in {mask(self.uri)} failed "
                             f"(no model version was left behind): {_first_line(error)}") from error
        self.end("FINISHED")
        return table, registrations

    def log_summary(self, table: pd.DataFrame, baseline: Optional[dict], registrations: list[dict]) -> None:
        from mlflow.entities import Metric

        from kdray.plots import search_plots

        c, rid, metric = self.client, self.parent_run_id, self.space.metric
        with tempfile.TemporaryDirectory() as d:
            res = Path(d, "results")
            res.mkdir()
            table.to_parquet(res / "trials.parquet")
            table.to_csv(res / "trials.csv", index=False)
            try:
                search_plots(table, metric, self.space.mode, Path(d, "plots"),
                             [(o.metric, o.mode) for o in self.space.objectives])
            except Exception as e:  # noqa: BLE001 - plots are a nicety; never lose the table for them
                log.warning("search plots failed: %s", _first_line(e))
            c.log_artifacts(rid, d)
        now = int(time.time() * 1000)
        metrics = [Metric(f"trials_{s}", float((table["status"] == s).sum()) if not table.empty else 0.0, now, 0)
                   for s in ("finished", "pruned", "failed", "killed")]
        fin = table[table["status"] == "finished"] if not table.empty else table
        if not fin.empty and fin[metric].notna().any():
            best = fin.loc[fin[metric].idxmax() if self.space.mode == "max" else fin[metric].idxmin()]
            metrics.append(Metric(f"best_{metric}", float(best[metric]), now, 0))
            if pd.notna(best.get("test_acc")):
                metrics.append(Metric("best_test_acc", float(best["test_acc"]), now, 0))
            c.set_tag(rid, "kdray.best_trial_id", str(best["trial_id"]))
            if best["trial_id"] in self.children:
                c.set_tag(rid, "kdray.best_run_id", self.children[best["trial_id"]])
        for k, v in (baseline or {}).items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                metrics.append(Metric(f"baseline_{k}", float(v), now, 0))
        c.log_batch(rid, metrics=metrics)
        if registrations:
            best = registrations[0]
            c.set_tag(rid, "kdray.registered_model", f"{best['name']}/{best['version']}")


def search_tracker(uri: Optional[str], experiment: str, space: Any, base_raw: dict,
                   base_dir: str | Path) -> SearchTracker:
    """The tracker of a search, after the checks that come before any work: the tracking URI answers
    (:func:`connect`) and the experiment is not deleted (:func:`active_experiment`)."""
    active_experiment(connect(uri), experiment)
    return SearchTracker(resolve_tracking_uri(uri)[0], experiment, space, base_raw, base_dir)


def _quote(s: str) -> str:
    return str(s).replace("\\", "\\\\").replace("'", "\\'")


class MlflowSearchCallback(Callback):
    """Driver-side Tune callback: every MLflow write of a search's trials goes through here.

    MLflow errors never stop the search: they go through the tracker's :class:`PausedWrites`.
    """

    def __init__(self, tracker: SearchTracker):
        self.tracker = tracker

    def _safe(self, what: str, fn, *args) -> None:
        trial_id = args[0] if args and isinstance(args[0], str) else None
        self.tracker.writes(what, fn, *args, item=trial_id)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._safe("on_trial_start", self.tracker.trial_started, trial.trial_id, trial.config)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._safe("on_trial_result", self.tracker.trial_result, trial.trial_id, result)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._safe("on_trial_complete", self.tracker.trial_completed, trial.trial_id, trial.last_result)

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self._safe("on_trial_recover", self.tracker.trial_recovered, trial.trial_id, error_text(trial))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._safe("on_trial_error", self.tracker.trial_errored, trial.trial_id, error_text(trial))

    def on_experiment_end(self, trials, **info) -> None:
        unfinished = [t.trial_id for t in trials if t.status not in ("TERMINATED", "ERROR")]
        self._safe("on_experiment_end", self.tracker.experiment_ended, unfinished)
