"""The parent MLflow run of a search: where a search's runs live (:class:`SearchStore`) and the parent run's
lifecycle (:class:`ParentRun`: found again on ``--resume`` or created with the search's tags, params and
configs, then ended FINISHED, FAILED or KILLED).

On ``--resume`` the parent run id is read back from ``<storage>/<name>/mlflow_parent_run_id``, else found by
its ``kdray.search_path`` tag. Only :class:`mlflow.MlflowClient` calls with explicit run ids: no fluent state.
"""
from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from kdray import __version__, paths
from kdray.core.cache_probes import probe_l2
from kdray.core.probes import l2_text
from kdray.report.plots import probe_layers_plot
from kdray.redact import mask
from kdray.tracking.client import (_KEY_OK, ERROR_TAG, PARENT_ID_FILE, ROLE_TAG, SEARCH_PATH_TAG, STATUS_TAG, _chunks,
                                   _local_sqlite_dir, _params, active_experiment, flatten, git_commit, quote)

log = logging.getLogger("kdray")

END_STATUS = {"FINISHED": "finished", "FAILED": "failed", "KILLED": "killed"}  # MLflow status -> kdray.status


class SearchStore:
    """Where the runs of one search live and what they describe: the tracking URI and experiment, the parent
    run, the search space and base config, the teacher's label and the number of classes. Its
    :class:`mlflow.MlflowClient` is made on first use and dropped when Tune pickles the search state."""

    def __init__(self, uri: str, experiment: str, space: Any, base_raw: dict, base_dir: str | Path):
        self.uri, self.experiment = uri, experiment
        self.space, self.base_raw, self.base_dir = space, base_raw, str(base_dir)
        self.experiment_id: Optional[str] = None
        self.parent_run_id: Optional[str] = None
        self.num_classes: Optional[int] = None
        self.teacher: str = ""
        self._client = None

    def __getstate__(self) -> dict:  # Tune pickles its callbacks with the experiment state
        return {**self.__dict__, "_client": None, "uri": mask(self.uri)}  # (a database URI keeps its password)

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def teacher_label(self, info: dict) -> str:
        """The teacher's model name and where it came from (``info['source']``), e.g. ``mnist1d_cnn (trained)``."""
        t = self.base_raw.get("teacher") or {}
        name = (t.get("model") or {}).get("name", "") if isinstance(t, dict) else ""
        return f"{name} ({info.get('source')})" if name and info.get("source") else name or "none"


class ParentRun:
    """The parent run of a search: started (found again or created), then ended once."""

    def __init__(self, store: SearchStore):
        self.store = store
        self.ended = False

    def attach(self, run_id: str) -> None:
        """Use the existing run ``run_id`` (of an earlier search) as the parent."""
        s = self.store
        run = s.client.get_run(run_id)
        s.experiment_id, s.parent_run_id = run.info.experiment_id, run_id
        s.teacher = s.teacher or run.data.tags.get("kdray.teacher", "")
        self.ended = run.info.status != "RUNNING"

    def start(self, exp_path: str, *, resume: bool, settings: dict, space_path: str | Path,
              ray_address: Optional[str], probes: list[dict] = (), teacher_val_acc: Optional[float] = None
              ) -> tuple[str, bool]:
        """(the parent run id, whether it is an earlier one reopened): the experiment found or created, the
        parent reopened on ``resume`` (when found) or created, its id written beside the search's results."""
        s = self.store
        s.experiment_id = self._experiment_id()
        id_file = exp_path.rstrip("/") + "/" + PARENT_ID_FILE
        parent = self._find(id_file, exp_path) if resume else None
        if parent is not None:
            self._reopen(parent)
            log.info("MLflow: resuming parent run %s in experiment %r (%s)", parent, s.experiment, mask(s.uri))
        else:
            if resume:
                log.warning("MLflow: no parent run of %s found in %s; starting a new one", mask(exp_path),
                            mask(s.uri))
            s.parent_run_id = self._create(exp_path, settings, space_path, ray_address)
            log.info("MLflow: parent run %s in experiment %r (%s)", s.parent_run_id, s.experiment, mask(s.uri))
        paths.write_text(id_file, s.parent_run_id + "\n")
        self._log_probes(probes, teacher_val_acc)
        return s.parent_run_id, parent is not None

    def _experiment_id(self) -> str:
        s, c = self.store, self.store.client
        exp = active_experiment(c, s.experiment)
        if exp is not None:
            return exp.experiment_id
        local = _local_sqlite_dir(s.uri)
        try:
            return c.create_experiment(s.experiment, artifact_location=(local / "mlruns").as_uri() if local else None)
        except Exception:  # noqa: BLE001 - created meanwhile by another search
            exp = c.get_experiment_by_name(s.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def _find(self, id_file: str, exp_path: str) -> Optional[str]:
        """The parent run of an earlier search at ``exp_path``: by the id file, else by its path tag."""
        c, exp_id = self.store.client, self.store.experiment_id
        text = paths.read_text(id_file)
        if text and text.strip():
            try:
                run = c.get_run(text.strip())
                if run.info.experiment_id == exp_id and run.info.lifecycle_stage == "active":
                    return run.info.run_id
            except Exception:  # noqa: BLE001 - not in this tracking store
                pass
        runs = c.search_runs([exp_id], f"tags.{ROLE_TAG} = 'search' and "
                                       f"tags.`{SEARCH_PATH_TAG}` = '{quote(mask(exp_path))}'",
                             max_results=1, order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None

    def _reopen(self, run_id: str) -> None:
        c = self.store.client
        self.store.parent_run_id = run_id
        c.update_run(run_id, status="RUNNING")
        resumes = int(c.get_run(run_id).data.tags.get("kdray.resumes", "0")) + 1
        c.set_tag(run_id, "kdray.resumes", str(resumes))
        c.set_tag(run_id, STATUS_TAG, "running")

    def _create(self, exp_path: str, settings: dict, space_path: str | Path, ray_address: Optional[str]) -> str:
        s, c = self.store, self.store.client
        tags = {ROLE_TAG: "search", SEARCH_PATH_TAG: mask(exp_path), STATUS_TAG: "running",
                "kdray.version": __version__, "kdray.ray_address": mask(ray_address) or "local",
                "kdray.teacher": s.teacher,
                "kdray.space_file": str(Path(space_path).resolve()), "kdray.metric": s.space.metric,
                "kdray.mode": s.space.mode, "mlflow.source.name": "kdray search"}
        commit = git_commit(Path(space_path).resolve().parent) or git_commit(Path.cwd())
        if commit:
            tags["kdray.git_commit"] = tags["mlflow.source.git.commit"] = commit
        rid = c.create_run(s.experiment_id, run_name=s.space.name, tags=tags).info.run_id
        space_raw = s.space.model_dump(mode="json", by_alias=True, exclude={"search"})
        params = {**{f"space.{k}": v for k, v in flatten(space_raw).items()},
                  **{f"search.{k}": v for k, v in flatten(settings).items()},
                  **{f"base.{k}": v for k, v in flatten(s.base_raw).items()}}
        for chunk in _chunks(_params(params), 100):
            c.log_batch(rid, params=chunk)
        self._log_configs(rid, settings, space_path)
        return rid

    def _log_configs(self, run_id: str, settings: dict, space_path: str | Path) -> None:
        """The space file as written (or as parsed, when it cannot be read), the base config and the settings."""
        s, c = self.store, self.store.client
        try:
            space_text = Path(space_path).read_text()
        except OSError:
            space_text = yaml.safe_dump(s.space.model_dump(mode="json", by_alias=True), sort_keys=False)
        c.log_text(run_id, space_text, "config/space.yaml")
        c.log_text(run_id, yaml.safe_dump(s.base_raw, sort_keys=False), "config/base.yaml")
        c.log_text(run_id, yaml.safe_dump(settings, sort_keys=False), "config/search_settings.yaml")

    def _log_probes(self, probes: list[dict], teacher_val_acc: Optional[float] = None) -> None:
        """The probes fitted up-front on the candidate layers, as metrics ``probe_val_acc.<layer>.<pooling>`` and
        ``probe_l2.<layer>.<pooling>`` (the strength fitted: cross-validated for ``l2: auto``), with ``.l2_<l2>``
        after them when the search fits several strengths per layer; ``teacher_val_acc``, the teacher's own; and
        the plot of both by layer (``probes/<pooling>.png``, ``probes/<pooling>-l2_<l2>.png``)."""
        if not probes:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        several = len({l2_text(p["l2"]) for p in probes}) > 1
        metrics = []
        for p in probes:
            key = f"{p['layer']}.{p['pooling']}" + (f".l2_{l2_text(p['l2'])}" if several else "")
            if math.isfinite(p["val_acc"]):
                metrics.append(Metric(_KEY_OK.sub("_", f"probe_val_acc.{key}"), float(p["val_acc"]), now, 0))
            if (l2 := probe_l2(p)) is not None:
                metrics.append(Metric(_KEY_OK.sub("_", f"probe_l2.{key}"), float(l2), now, 0))
        if teacher_val_acc is not None:
            metrics.append(Metric("teacher_val_acc", float(teacher_val_acc), now, 0))
        self.store.client.log_batch(self.store.parent_run_id, metrics=metrics)
        with tempfile.TemporaryDirectory() as d:
            for pooling, l2 in sorted({(p["pooling"], l2_text(p["l2"])) for p in probes}):
                same = [p for p in probes if p["pooling"] == pooling and l2_text(p["l2"]) == l2]
                if len(same) > 1:
                    name = _KEY_OK.sub("_", f"{pooling}-l2_{l2}" if several else pooling)
                    png = probe_layers_plot(same, teacher_val_acc, Path(d) / f"{name}.png")
                    self.store.client.log_artifact(self.store.parent_run_id, str(png), "probes")

    def end(self, status: str, error: Optional[str] = None) -> None:
        """End the parent run FINISHED, FAILED or KILLED (with ``error`` as tag ``kdray.error``), once."""
        run_id = self.store.parent_run_id
        if run_id is None or self.ended:
            return
        c = self.store.client
        c.set_tag(run_id, STATUS_TAG, END_STATUS[status])
        if error:
            c.set_tag(run_id, ERROR_TAG, error[:5000])
        c.set_terminated(run_id, status)
        self.ended = True
