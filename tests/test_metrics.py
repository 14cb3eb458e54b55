"""kdray's Prometheus metrics: a real search on a local Ray exports them through Ray's metrics endpoint."""
from __future__ import annotations

import re
import socket
import time
import urllib.request
from typing import Callable, Union

import pytest
from helpers.searches import SPACE, write_space

from kdray.search.driver import SearchOptions, run_search

Check = Union[str, Callable[[str], bool]]  # a regular expression that must match, or a test of the text


def scrape(port: int, checks: dict[str, Check], timeout: float = 60) -> str:
    """The scraped text once EVERY check passes on one scrape (series are exported on separate timers,
    so one being there says nothing of the others); AssertionError naming those that failed after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
        except OSError:
            text = ""
        failed = [name for name, c in checks.items() if not (re.search(c, text) if isinstance(c, str) else c(text))]
        if not failed:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"not exported after {timeout:.0f} s: {failed}; kdray lines:\n"
                                 + "\n".join(line for line in text.splitlines() if "kdray" in line))
        time.sleep(0.5)


def test_a_search_exports_trial_counts_epoch_times_best_value_and_cache_lookups(tmp_path, tiny_raw):
    pytest.importorskip("aiohttp", reason="Ray's metrics agent needs ray[default] (the dev extra installs it)")
    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", _metrics_export_port=port,
             _system_config={"metrics_report_interval_ms": 500})
    try:
        space = write_space(tmp_path, tiny_raw, name="metrics-demo", methods={"kd": SPACE["methods"]["kd"]},
                            search={"num_trials": 2, "concurrency": 2, "max_epochs": 2, "scheduler": "none"})
        out = run_search(str(space), SearchOptions(storage_path=str(tmp_path / "r"), progress=False, baseline=False,
                                                   tracking=False))
        assert (out.table.status == "finished").sum() == 2
        tags = r'\{[^}]*search="metrics-demo"[^}]*'
        best = out.table.best_val_acc.max()

        def best_is_exported(text: str) -> bool:
            m = re.search(r'ray_kdray_best_val_acc' + tags + r'\} ([0-9.e+-]+)', text)
            return bool(m) and float(m.group(1)) == pytest.approx(best)

        scrape(port, {"finished": r'ray_kdray_trials' + tags + r'state="finished"[^}]*\} 2\.0',
                      "running": r'ray_kdray_trials' + tags + r'state="running"[^}]*\} 0\.0',
                      "epoch times": r'ray_kdray_epoch_seconds_count' + tags + r'\} 4\.0',  # 2 trials x 2 epochs
                      "best value": best_is_exported,
                      "cache lookups": r'ray_kdray_cache_(hits|misses)_total' + tags + r'\} 1\.0',
                      "samples per second": r'ray_kdray_samples_per_second' + tags + r'trial="'})
    finally:
        ray.shutdown()
