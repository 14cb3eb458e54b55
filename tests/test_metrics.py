"""kdray's Prometheus metrics: a real search on a local Ray exports them through Ray's metrics endpoint."""
from __future__ import annotations

import re
import socket
import time
import urllib.request

import pytest

from kdray.search import SearchOptions, run_search
from test_search import SPACE, write_space


def scrape(port: int, want: str, timeout: float = 60) -> str:
    deadline = time.time() + timeout
    text = ""
    while time.time() < deadline:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
        except OSError:
            text = ""
        if re.search(want, text):
            return text
        time.sleep(1)
    raise AssertionError(f"{want!r} not exported; kdray lines: "
                         + "\n".join(line for line in text.splitlines() if "kdray" in line))


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
        text = scrape(port, r'ray_kdray_trials' + tags + r'state="finished"[^}]*\} 2\.0')
        assert re.search(r'ray_kdray_trials' + tags + r'state="running"[^}]*\} 0\.0', text)
        assert re.search(r'ray_kdray_epoch_seconds_count' + tags + r'\} 4\.0', text)  # 2 trials x 2 epochs
        best = float(re.search(r'ray_kdray_best_val_acc' + tags + r'\} ([0-9.]+)', text).group(1))
        assert best == pytest.approx(out.table.best_val_acc.max())
        assert re.search(r'ray_kdray_cache_(hits|misses)_total' + tags + r'\} 1\.0', text)
        assert re.search(r'ray_kdray_samples_per_second' + tags + r'trial="', text)
    finally:
        ray.shutdown()
