"""Talking to MLflow: the tracking URI (credentials moved to the environment), the connection check before any
work, experiments that must be active, value helpers (params, metrics, tags), and :class:`PausedWrites`, the one
policy for a tracking server that goes away (bounded retries, a pause, and a summary of what was not logged)."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from kdray.errors import ConfigError, first_line
from kdray.redact import credentials_to_env, mask

log = logging.getLogger("kdray")

PARENT_ID_FILE = "mlflow_parent_run_id"


PARENT_TAG = "mlflow.parentRunId"


TRIAL_TAG = "kdray.trial_id"


STATUS_TAG = "kdray.status"


ERROR_TAG = "kdray.error"


ROLE_TAG = "kdray.role"


SEARCH_PATH_TAG = "kdray.search_path"


CHALLENGER = "challenger"  # the alias a search gives its best registered student


RUN_STATUS = {"finished": "FINISHED", "pruned": "FINISHED", "failed": "FAILED", "killed": "KILLED"}


# Tune's own bookkeeping and kdray's report fields that are not metrics of the run
NOT_METRICS = {"training_iteration", "time_total_s", "episodes_total", "timesteps_total", "time_this_iter_s",
               "timestamp", "time_since_restore", "timesteps_since_restore", "iterations_since_restore", "pid",
               "node_ip", "hostname", "date", "done", "trial_id", "experiment_tag", "should_checkpoint",
               "checkpoint_dir_name", "config", "epoch", "max_epochs", "resumed_from"}


_KEY_OK = re.compile(r"[^/\w.\- :]")


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


def error_line(e: BaseException, n: int = 300) -> str:
    """:func:`kdray.errors.first_line` of an error with its credentials masked (masked before it is cut to ``n``
    characters, so that no half of a credential survives the cut)."""
    return mask(first_line(e, 1 << 20))[:n]


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
                                          f"{error_line(e)}") from None
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


def not_found(e: BaseException) -> bool:
    """Whether an MLflow error says that what was asked for does not exist."""
    return getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def quote(s: str) -> str:
    """``s`` as a quoted string value inside an MLflow search filter (``tags.x = '<s>'``)."""
    return str(s).replace("\\", "\\\\").replace("'", "\\'")


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
            log.warning("MLflow logging failed in %s (%s): %s", what, self.goes_on, error_line(e))

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
