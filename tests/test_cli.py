"""The kdray command line as a user runs it: real processes, exit codes and messages."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdray.cli import main

ROOT = Path(__file__).resolve().parents[1]


def kdray(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdray.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def write(tmp_path: Path, raw: dict) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_layers_lists_teacher_and_student_with_shapes():
    out = kdray("layers", str(ROOT / "configs" / "mnist1d_probe_kd.yaml"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.split()[:3] == ["teacher", "conv1", "Conv1d"] for line in lines)
    assert any(line.split()[:3] == ["student", "fc", "Linear"] and "100x10" in line for line in lines)


def test_train_prints_a_summary_and_saves_the_student(tmp_path, tiny_raw):
    cfg = write(tmp_path, tiny_raw)
    out = kdray("train", str(cfg), "--output-dir", str(tmp_path / "run"), "--set", "train.epochs=1", "--json")
    assert out.returncode == 0, out.stderr
    assert "student test acc" in out.stdout and "teacher test acc" in out.stdout
    assert (tmp_path / "run" / "student.pt").is_file()
    import json

    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["epochs"] == 1 and 0 <= summary["test_acc"] <= 1


@pytest.mark.parametrize("edit,expected", [
    (lambda r: r["distill"]["terms"].append({"method": "fitnet", "teacher_layers": "relu22",
                                             "student_layers": "relu2"}), ["teacher_layers", "relu22", "relu2"]),
    (lambda r: r["distill"].update(temperature=-1), ["distill.temperature", "-1", "> 0"]),
    (lambda r: r["train"].update(epoch=3), ["train.epoch", "known keys", "epochs"]),
])
def test_bad_configs_exit_2_naming_the_problem(tmp_path, tiny_raw, edit, expected):
    edit(tiny_raw)
    out = kdray("train", str(write(tmp_path, tiny_raw)), "--output-dir", str(tmp_path / "run"))
    assert out.returncode == 2, out.stderr
    for text in expected:
        assert text in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_report_writes_one_self_contained_html(tmp_path, capsys):
    import pandas as pd

    exp = tmp_path / "results" / "demo"
    exp.mkdir(parents=True)
    pd.DataFrame({
        "trial_id": ["a", "b", "c", "d"], "status": ["finished", "pruned", "failed", "finished"],
        "param.method": ["kd", "kd", "fitnet", "probe_kd"], "param.kd.0.temperature": [2.0, 6.0, None, None],
        "epochs": [4, 2, 1, 4], "val_acc": [0.81, 0.52, None, 0.86], "test_acc": [0.8, None, None, 0.85],
        "error": [None, None, "diverged at epoch 1", None], "path": ["/x/a", "/x/b", "/x/c", "/x/d"],
    }).to_parquet(exp / "results.parquet")
    assert main(["report", "demo", "--storage-path", str(tmp_path / "results")]) == 0
    out = exp / "report.html"
    assert f"wrote {out}" in capsys.readouterr().out
    text = out.read_text()
    assert text.count("<img alt=") == 3  # best over trials, by parameter, parallel coordinates (PNG, base64)
    assert "iframe sandbox" in text  # the interactive view, inlined
    assert "Best trial" in text and ">d<" in text and "0.86" in text and "diverged at epoch 1" in text
    assert "<script src=" not in text  # nothing to fetch when opened
    assert main(["report", "demo", "--storage-path", str(tmp_path / "results"), "--metric", "nope"]) == 2
    assert main(["report", "missing", "--storage-path", str(tmp_path / "results")]) == 2
