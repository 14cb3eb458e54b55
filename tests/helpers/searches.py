"""The tiny search space the search, tracking, metrics, reliability and bad-input tests share, and readers of
what a search leaves on disk."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

SPACE = {
    "name": "tiny-search",
    "base": "base.yaml",
    "methods": {
        "hard": [],
        "kd": [{"method": "kd", "temperature": {"float": [1.0, 8.0], "log": True}}],
        "probe_kd": [{"method": "probe_kd", "teacher_layers": {"choice": ["relu2", "relu3"]},
                      "options": {"pooling": {"choice": ["mean", "flatten"]}}}],
        "fitnet": [{"method": "fitnet", "pair": {"choice": [["relu2", "relu2"], ["relu3", "relu3"]]}}],
    },
    "params": {"train.optimizer.lr": {"float": [0.003, 0.03], "log": True}},
    "search": {"num_trials": 6, "concurrency": 2, "max_epochs": 4, "grace_period": 1, "reduction_factor": 2},
}


def write_space(tmp_path: Path, raw_base: dict, **changes) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(raw_base))
    space = json.loads(json.dumps(SPACE))
    space.update(changes)
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(space))
    return p


def finished_epochs(exp: Path) -> dict[str, list[int]]:
    """trial folder -> the epochs it reported, for trials that reported their last epoch."""
    out = {}
    for f in exp.glob("*/result.json"):
        try:
            rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        except ValueError:  # read while Ray writes a line: that trial is not finished, or is read next time
            continue
        if rows and rows[-1].get("epoch") == rows[-1].get("max_epochs"):
            out[f.parent.name] = [r["epoch"] for r in rows]
    return out
