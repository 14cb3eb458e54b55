"""The benchmark scripts (issues 7 and 17) run end to end in a tiny mode and end with a JSON summary line.

Each script runs as a real subprocess (as a user runs it) on tiny data, a few epochs, one seed; what is
checked is that it finishes, that its last stdout line is a JSON object with the expected keys, and the
few facts each script exists to show (n/a where a method cannot apply, the probe chosen on validation data).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def run_script(name: str, *args: str, cwd: Path | None = None, timeout: int = 300) -> dict:
    out = subprocess.run([sys.executable, str(BENCH / name), *args], capture_output=True, text=True, timeout=timeout,
                         cwd=cwd, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    return json.loads(last)


def test_methods_table_tiny():
    out = run_script("methods.py", "--fractions", "0.2", "--seeds", "0", "--epochs", "2", "--num-samples", "1000",
                     "--teacher-epochs", "2", "--students", "mnist1d_cnn_small", "mnist1d_mlp",
                     "--methods", "hard", "at", "rkd", "probe_kd", "--workers", "2")
    assert {"fractions", "seeds", "results", "teacher_test_acc", "probe_choice", "labelled", "seconds"} <= set(out)
    cnn, mlp = out["results"]["mnist1d_cnn_small"], out["results"]["mnist1d_mlp"]
    for method in ("hard", "at", "rkd", "probe_kd"):
        assert 0.0 <= cnn[method]["0.2"]["mean"] <= 1.0 and len(cnn[method]["0.2"]["runs"]) == 1
    assert "na" in mlp["at"]["0.2"] and "mean" in mlp["probe_kd"]["0.2"]  # no feature maps in the MLP
    choice = out["probe_choice"]["0.2"]
    assert choice["val_acc"] == max(c["val_acc"] for c in choice["candidates"])
    assert 0.0 < out["teacher_test_acc"] <= 1.0


def test_probe_setting_tiny():
    out = run_script("probe_setting.py", "--labels", "50", "--seeds", "0", "--epochs", "2", "--num-samples", "1000",
                     "--teacher-samples", "1000", "--teacher-epochs", "2", "--methods", "hard", "kd", "fitnet",
                     "probe_kd")
    assert {"labels", "labelled", "results", "teacher", "seconds"} <= set(out)
    assert out["teacher"]["teacher_classes"] == 5
    res = out["results"]["50"]
    assert abs(out["labelled"]["50"] - 50) <= 2
    assert "na" in res["kd"] and "classes" in res["kd"]["na"]  # the teacher's 5 logits cannot teach 10 classes
    assert "mean" in res["hard"] and "mean" in res["fitnet"]
    probe = res["probe_kd"]
    assert set(probe["layers"]) == {"relu1", "relu2", "relu3"}
    assert probe["chosen"] == max(probe["layers"], key=lambda k: probe["layers"][k]["probe_val_acc"])
    assert all("mean" in v["student"] and 0 <= v["probe_test_acc"] <= 1 for v in probe["layers"].values())


def test_search_efficiency_tiny(tmp_path):
    base = yaml.safe_load((BENCH / "search_efficiency_base.yaml").read_text())
    base["data"]["params"] = {"num_samples": 1000}
    base["teacher"]["recipe"]["train"]["epochs"] = 2
    space = yaml.safe_load((BENCH / "search_efficiency_space.yaml").read_text())
    space["base"] = "base.yaml"
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    plot = tmp_path / "curve.png"
    out = run_script("search_efficiency.py", "--space", str(tmp_path / "space.yaml"), "--seeds", "0", "--trials", "2",
                     "--asha-trials", "3", "--max-epochs", "2", "--grace-period", "1", "--plot", str(plot),
                     "--storage", str(tmp_path / "results"), cwd=tmp_path)
    assert {"budget_epochs", "summary", "runs", "curves", "random_final_best_mean", "seconds"} <= set(out)
    assert out["budget_epochs"] == 4 and set(out["summary"]) == {"random", "tpe", "tpe_asha"}
    for name, curves in out["curves"].items():
        c = curves[0]
        assert c == sorted(c) and len(c) == out["runs"][name][0]["epochs_total"]  # best-so-far, one per epoch
    assert out["runs"]["random"][0]["epochs_total"] == 4 and out["runs"]["tpe_asha"][0]["trials"] == 3
    assert out["summary"]["random"]["reached"] == "1/1"  # random reaches its own final best
    assert plot.is_file() and plot.stat().st_size > 1000


def test_cifar100_tiny():
    out = run_script("cifar100.py", "--tiny", "--method", "kd", "probe_kd")
    assert {"teacher", "student", "results", "reference", "teacher_test_acc", "device", "seconds"} <= set(out)
    assert out["tiny"] is True and out["epochs"] == 1
    for method in ("kd", "probe_kd"):
        r = out["results"][method]
        assert {"test_acc", "best_test_acc", "epochs", "reference"} <= set(r) and 0 <= r["test_acc"] <= 100
    assert out["results"]["probe_kd"]["probes"][0]["layer"] == "layer3"
    assert out["reference"]["kd"] == 73.33 and out["reference"]["teacher"] == 79.42


def test_search_throughput_tiny():
    out = run_script("search_throughput.py", "--tiny")
    assert {"tune_wall_s", "train_s", "fixed_cost_per_trial_s", "training_share", "trials", "trial_processes",
            "checkpoints", "status", "seconds"} <= set(out)
    assert out["tiny"] is True and out["trials"] == 4 and sum(out["status"].values()) == 4
    assert 4 <= out["epochs_reported"] <= 8  # each trial runs 1 (pruned at the first rung) or 2 epochs
    assert out["checkpoints"] == out["epochs_reported"]  # grace period 1 of 2 epochs: every epoch is a rung
    assert 1 <= out["trial_processes"] <= 4
    assert 0 < out["training_share"] < 1 and out["train_s"] > 0


def test_llm_probe_kd_tiny(tmp_path):
    """Issue 16: the language-model mechanism end to end on generated questions, tiny: a teacher trained and saved
    by the script, loaded by kdray from its folder, probed per layer, students of both kinds, a search."""
    plot = tmp_path / "layers.png"
    out = run_script("llm_probe_kd.py", "--tiny", "--work", str(tmp_path / "work"), "--plot", str(plot),
                     timeout=900)  # a local Ray for the search: slow to start on a loaded machine
    assert {"labels", "labelled", "teacher", "layers", "results", "search", "seconds"} <= set(out) and out["tiny"]
    assert 0 <= out["teacher"]["test_acc_own_tokens"] <= 1 and 0 <= out["teacher"]["test_acc_letters"] <= 1
    assert abs(out["labelled"]["32"] - 32) <= 2
    found = out["layers"]["32"][0]
    assert [p["layer"] for p in found["probes"]] == ["model.model.layers.0", "model.model.layers.1"]
    assert found["chosen"] == max(found["probes"], key=lambda p: p["val_acc"])["layer"]
    bert, shared = out["results"]["bert"], out["results"]["shared"]
    for method in ("hard", "answer_kd", "probe_kd", "own_token_kd"):
        assert 0 <= bert[method]["32"]["mean"] <= 1 and len(bert[method]["32"]["runs"]) == 1
    assert shared["own_token_kd"] == {} and len(shared["probe_kd"]["32"]["runs"]) == 1  # the control: first student
    s = out["search"]
    assert s["trials"] == 2 and s["best"]["val_acc"] == round(max(t["val_acc"] for t in s["all"]), 4)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    row = json.loads((tmp_path / "work" / "data" / "arc-animals" / "train.jsonl").read_text().splitlines()[0])
    assert set(row) >= {"question", "choices", "answerKey"} and row["choices"]["label"] == ["A", "B", "C", "D"]
    assert (tmp_path / "work" / "models" / "teacher" / "config.json").is_file()


def test_teacher_pass_tiny():
    """Issue 16: kdray's teacher pass over a decoder LM against a plain forward (the same tokens, every decoder
    block's last-token state stored). (The section ``ray_data`` starts Ray and two actor pools, 90 s here: the Ray
    Data pass it times is checked against the in-process pass in tests/test_teacher_pass.py.)"""
    out = run_script("teacher_pass.py", "--tiny", "--reps", "1", "--sections", "lm_pass")
    lm = out["lm_pass"]
    assert lm["layers_stored"] == 4 and lm["tokens"] > lm["examples"] * 20
    assert lm["kdray_tokens_per_s"] > 0 and lm["kdray_over_plain_time"] > 0


def test_teacher_cache_tiny():
    out = run_script("teacher_cache.py", "--tiny", "--precisions", "fp32", "bf16", "fp16")
    assert out["tiny"] is True and out["machine"]["device"] == "cpu" and out["machine"]["date"]
    for case in ("mnist1d", "cifar"):
        r = out[case]
        assert all(r[f"{m}_epoch_s"] > 0 for m in ("hard", "kd_cached", "kd_live"))
        assert abs(r["ratio_kd_cached_over_hard"] / (r["kd_cached_epoch_s"] / r["hard_epoch_s"]) - 1) < 0.01
    cifar = out["cifar"]
    assert cifar["examples_train"] == cifar["batches"] * cifar["batch_size"]
    assert cifar["flops_ratio"] > 5  # resnet32x4 over resnet8x4 on 32x32 inputs (about 6x)
    assert cifar["cache_bytes_per_example"] > 400  # 100 float32 logits per example
    precisions = cifar["precisions"]
    assert precisions["fp32"]["kd_cached_epoch_s"] == cifar["kd_cached_epoch_s"]
    assert precisions["bf16"]["samples_per_s"] > 0 and "CUDA" in precisions["fp16"]["skipped"]
    if cifar["torchdistill"] != "not installed":  # a benchmark-only dependency (see BENCHMARKS.md)
        assert cifar["torchdistill_epoch_s"] > 0
        ratio = cifar["kd_cached_epoch_s"] / cifar["torchdistill_epoch_s"]
        assert abs(cifar["ratio_kd_cached_over_torchdistill"] / ratio - 1) < 0.01


def test_probe_quality_tiny(tmp_path):
    """Issue 22: kdray's probes beside LogisticRegressionCV layer by layer, on generated sentences saved in GLUE
    SST-2's layout (one Dataset, split by test_fraction) with a tiny teacher trained by kdray's recipe, and the
    hard-label and Probe-KD students of one config."""
    plot = tmp_path / "probe_quality.png"
    out = run_script("probe_quality.py", "--tiny", "--work", str(tmp_path / "work"), "--plot", str(plot))
    assert out["tiny"] and {"layers", "best", "students", "chosen", "labelled", "probe_options", "seconds"} <= set(out)
    assert out["probe_options"]["pooling"] in ("auto", "seq_mean")
    (budget,) = out["budgets"]
    rows = out["layers"][str(budget)]
    assert any(r["layer"].endswith("encoder.layer.1") for r in rows)
    for r in rows:
        assert 0 <= r["kdray_test"]["mean"] <= 1 and 0 <= r["lr_test"]["mean"] <= 1 and len(r["lr_C"]) == 1
    best = out["best"][str(budget)]
    assert best["lr_test"] == max(r["lr_test"]["mean"] for r in rows)
    assert abs(best["gap"] - (best["lr_test"] - best["kdray_test"])) < 1e-3
    (chosen,) = out["chosen"][str(budget)]
    assert chosen == max(rows, key=lambda r: r["kdray_val"]["mean"])["layer"]  # one draw: its val acc
    for method in ("hard", "probe_kd"):
        assert len(out["students"][str(budget)][method]["runs"]) == 1
    assert out["n_test"] == 60 and out["labelled"][str(budget)] > 20  # 240 sentences, test_fraction 0.25
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
