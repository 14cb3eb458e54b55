"""The Probe-KD mechanism in the language-model setting, end to end, from parts this script makes.

The paper's claim (Brown & Russell 2026): (a) a teacher's intermediate representations can hold the answer while
its answer-token output is unreliable, and (b) distilling probe predictions then beats distilling the output, most
of all with few labels. No pretrained weights or benchmark data can be downloaded here, so:

* **Task.** 4-choice questions "Which of these is an animal?" over ``--words`` made-up words (a quarter of them,
  drawn at random, are animals: facts that can only be memorised), one animal among three other words;
  ``--train`` training and ``--test`` test questions written in the ARC layout (``train.jsonl``, ``test.jsonl``)
  and read by kdray's ``multiple_choice`` data set as a user's ARC folder would be.
* **Teacher.** A small ``transformers`` Qwen2 (``--teacher-hidden``, ``--teacher-layers``) with a byte-level BPE
  tokenizer, trained here (plain PyTorch, next-token cross-entropy on the answer token) on *other* generated
  questions rendered exactly as kdray renders them (``kdray.data.multiple_choice.render``, default template) and
  tokenised as kdray tokenises them, but answering with the choice's *number word* `` one``..`` four`` instead of
  its letter (a digit would not do here: after ``Answer:`` Qwen's pre-tokenizer makes `` 1`` two tokens, a space and
  the digit). It is saved with ``save_pretrained`` and loaded by kdray's ``hf_causal_lm`` from that folder, which
  reads the logits of `` A``..`` D`` after ``Answer:``: tokens the teacher was never trained to say. Its test
  accuracy is reported both ways (number words: what it knows; letters: kdray's answer tokens).
* **Students**, trained from their configs (``config_only``): ``bert`` (a word-level tokenizer of its own,
  ``hf_sequence_classifier``, reading its own view of the questions) and ``shared`` (a smaller Qwen2 ``hf_causal_lm``
  sharing the teacher's tokenizer and prompts).
* **Results**, for ``--labels`` labelled questions (default 32, 128, 512; the rest of the training split is the
  unlabelled transfer set; ``--val-fraction`` of the training split is the labelled validation split kdray keeps)
  and ``--seeds`` (each seed draws its own validation/labelled split and trains its own student):

  - per teacher layer, the validation accuracy of a ``last``-pooled probe fitted on the labelled questions (what
    ``kdray layers --probes last`` computes) beside the teacher's answer-token accuracy; the plot
    (``--plot``, default ``benchmarks/results/llm_probe_layers.png``) is that of the middle budget, seed 0;
  - student test accuracy for ``hard`` labels (CE on the labelled questions), ``answer_kd`` (``0.1 CE + 0.9 KD`` on
    the teacher's `` A``..`` D`` logits, T = 2), ``probe_kd`` (``0.1 CE + 0.9 probe KD`` on the layer with the best
    probe validation accuracy, T = 2) and, on the first student, the control ``own_token_kd``: answer-token KD with
    ``teacher.model.kwargs.answer_tokens: [" one", " two", " three", " four"]``, the tokens the teacher was
    trained on;
  - a ``kdray search`` (TPE + ASHA, ``--search-trials``) on the ``bert`` student at ``--search-labels`` labels over
    method (hard / answer-token KD / Probe-KD), probe layer, temperature, KD weight and CE weight, with its best
    trial (chosen on validation accuracy) and kdray's hard-label baseline.

``--workers`` (default 2) trainings run at a time, each a forked process with one thread; the teacher cache is
filled in this process first (one teacher pass per student view, budget and seed, probes on every layer), so the
trainings read it.

Usage: ``python benchmarks/llm_probe_kd.py [--labels 32 128 512] [--seeds 0 1 2] [--epochs 8] [--work DIR]
[--markdown FILE] [--plot PNG]`` (about 22 minutes on a shared 2-core CPU); ``--tiny`` runs a small version
(tiny models, 1 seed, 1 budget, 2 search trials: seconds of training, most of its minute is starting a local Ray
for the search). Progress and markdown tables go to stderr (Ray Tune prints its status to stdout); the last line
of stdout is a JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from jobs import report, run_jobs, summarise  # benchmarks/jobs.py
from probe_setting import fraction_for  # benchmarks/probe_setting.py

HERE = Path(__file__).resolve().parent
LETTERS = "ABCD"
ANSWER_WORDS = [" one", " two", " three", " four"]  # the teacher's answers (" 1": two Qwen tokens)
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"
METHODS = ("hard", "answer_kd", "probe_kd", "own_token_kd")
STUDENTS = ("bert", "shared")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# the task, in the ARC layout


def lexicon(n_words: int, seed: int = 0) -> tuple[list[str], set[str]]:
    """``n_words`` made-up two-syllable words, a quarter of them (drawn at random) the names of animals: facts a
    model can only memorise (the spelling says nothing)."""
    rng = random.Random(seed)
    syllables = [c + v for c in CONSONANTS for v in VOWELS]
    words = sorted({rng.choice(syllables) + rng.choice(syllables) for _ in range(4 * n_words)})
    words = rng.sample(words, n_words)
    return words, set(words[:n_words // 4])


def questions(n: int, seed: int, words: tuple[list[str], set[str]]) -> list[dict]:
    """``n`` questions "Which of these is an animal?": one animal among three other words, in random order:
    {question, choices (4 words), answer (index)}."""
    vocab, animals = words
    others = [w for w in vocab if w not in animals]
    animal_list = sorted(animals)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        wrong = rng.sample(others, 3)
        answer = rng.randrange(4)
        out.append({"question": "Which of these is an animal?", "answer": answer,
                    "choices": wrong[:answer] + [rng.choice(animal_list)] + wrong[answer:]})
    return out


def arc_row(q: dict, i: int) -> dict:
    return {"id": f"q{i}", "question": q["question"], "choices": {"text": q["choices"], "label": list(LETTERS)},
            "answerKey": LETTERS[q["answer"]]}


def write_arc(root: Path, train: list[dict], test: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, qs in (("train", train), ("test", test)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(arc_row(q, i)) + "\n" for i, q in enumerate(qs)))
    return root


def prompt(q: dict) -> str:
    """The teacher's prompt exactly as kdray renders it (default template, ends with ``Answer:``)."""
    from kdray.data.mc_files import Question
    from kdray.data.multiple_choice import DEFAULT_TEMPLATE, render

    return render(Question(q["question"], tuple(q["choices"]), q["answer"]), DEFAULT_TEMPLATE)


def corpus(qs: list[dict]) -> list[str]:
    """Prompts answered both ways (letter and number word), so both are tokens of the tokenizers."""
    return [f"{prompt(q)}{a}" for q in qs for a in (" " + LETTERS[q["answer"]], ANSWER_WORDS[q["answer"]])]


# --------------------------------------------------------------------------------------------------
# tokenizers and model folders


def bpe_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (as Qwen's) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def word_tokenizer(texts: list[str]):
    """A word-level tokenizer with [CLS] ... [SEP], as a small BERT student has."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
                                                             show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]")


def teacher_tokenizer(folder: Path, texts: list[str], vocab_size: int):
    """The BPE tokenizer saved in the teacher's folder (with a Qwen2 config) and loaded back as kdray loads it:
    ``transformers`` then builds its Qwen2 tokenizer, whose pre-tokenizer (single digits, a space before a digit a
    token of its own) is Qwen's. The teacher is trained on exactly the tokens kdray will give it; its answer
    words must be one token each after ``Answer:``."""
    import transformers as tf

    from kdray.core.text import ANSWER_CUE, single_token_after

    bpe = bpe_tokenizer(texts, vocab_size)
    qwen2(bpe, 8, 1, 0).save_pretrained(folder)  # the config, so the folder loads as a Qwen2 model's
    bpe.save_pretrained(folder)
    tok = tf.AutoTokenizer.from_pretrained(folder)
    for t in [*ANSWER_WORDS, *(" " + c for c in LETTERS)]:
        if single_token_after(tok, ANSWER_CUE, t) is None:
            raise SystemExit(f"{t!r} is not one token after {ANSWER_CUE!r} for this tokenizer: raise --vocab")
    return tok


def qwen2(tok, hidden: int, layers: int, seed: int):
    """A randomly initialised Qwen2 causal LM over ``tok``'s vocabulary."""
    import torch
    import transformers as tf

    cfg = tf.Qwen2Config(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(cfg)


def save_bert(folder: Path, tok, hidden: int) -> Path:
    """The config of a small BERT classifier (trained from scratch by kdray) with its word-level tokenizer."""
    import transformers as tf

    cfg = tf.BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=128, num_labels=4,
                        pad_token_id=tok.pad_token_id)
    tf.BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------------
# the teacher: knows the answers, says them as number words


def encode(tok, qs: list[dict]):
    """Prompts as (ids padded on the right, last real position)."""
    import torch

    rows = tok([prompt(q) for q in qs])["input_ids"]
    ids = torch.full((len(rows), max(map(len, rows))), tok.pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    return ids, torch.tensor([len(r) - 1 for r in rows])


def answer_logits(model, ids, last, token_ids):
    """The logits of ``token_ids`` at each prompt's last real token (right padding: causal, so exact)."""
    import torch

    mask = (torch.arange(ids.shape[1]) <= last[:, None]).long()
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    return model.lm_head(hidden[torch.arange(len(ids)), last])[:, token_ids]


def train_teacher(model, tok, qs: list[dict], epochs: int, batch: int = 32, lr: float = 3e-3) -> float:
    """Cross-entropy on the answer's *number word* after kdray's prompt, over the whole vocabulary."""
    import torch

    from kdray.core.text import ANSWER_CUE, single_token_after

    words = [single_token_after(tok, ANSWER_CUE, w) for w in ANSWER_WORDS]
    ids, last = encode(tok, qs)
    y = torch.tensor([words[q["answer"]] for q in qs])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * -(-len(qs) // batch)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine to zero
        opt, lambda i: min((i + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))))
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for b in torch.randperm(len(qs), generator=gen).split(batch):
            t = int(last[b].max()) + 1
            logits = answer_logits(model, ids[b, :t], last[b], list(range(len(tok))))
            loss = torch.nn.functional.cross_entropy(logits, y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return loss.item()


def teacher_accuracy(model, tok, qs: list[dict], answers: list[str]) -> float:
    """Accuracy of the argmax over the four ``answers`` tokens (as they follow ``Answer:``)."""
    import torch

    from kdray.core.text import ANSWER_CUE, single_token_after

    token_ids = [single_token_after(tok, ANSWER_CUE, a) for a in answers]
    ids, last = encode(tok, qs)
    with torch.no_grad():
        pred = torch.cat([answer_logits(model, ids[i:i + 256], last[i:i + 256], token_ids).argmax(1)
                          for i in range(0, len(qs), 256)])
    return float((pred == torch.tensor([q["answer"] for q in qs])).float().mean())


def make_world(work: Path, args: argparse.Namespace) -> dict:
    """The data folder, the trained teacher's folder and the students' folders; the teacher's accuracy."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    words = lexicon(args.words)
    train, test = questions(args.train, 1, words), questions(args.test, 2, words)
    data = write_arc(work / "data" / "arc-animals", train, test)
    own = questions(args.teacher_questions, 3, words)  # the teacher's own training questions
    texts = corpus(own[:2000])
    tok = teacher_tokenizer(work / "models" / "teacher", texts, args.vocab)
    teacher = qwen2(tok, args.teacher_hidden, args.teacher_layers, 0)
    t0 = time.perf_counter()
    loss = train_teacher(teacher, tok, own, args.teacher_epochs)
    seconds = time.perf_counter() - t0
    teacher.save_pretrained(work / "models" / "teacher")
    shared = qwen2(tok, args.student_hidden, 2, 1)
    shared.save_pretrained(work / "models" / "shared-student")
    tok.save_pretrained(work / "models" / "shared-student")
    save_bert(work / "models" / "bert-student", word_tokenizer(texts), args.student_hidden)
    info = {"params": sum(p.numel() for p in teacher.parameters()), "hidden": args.teacher_hidden,
            "layers": args.teacher_layers, "vocab": len(tok), "train_questions": len(own), "epochs": args.teacher_epochs,
            "final_loss": round(loss, 4), "train_seconds": round(seconds, 1),
            "test_acc_own_tokens": round(teacher_accuracy(teacher, tok, test, ANSWER_WORDS), 4),
            "test_acc_letters": round(teacher_accuracy(teacher, tok, test, [" " + c for c in LETTERS]), 4)}
    log(f"teacher: {info['params']:,} params, trained {seconds:.0f} s (loss {loss:.3f}); test accuracy answering "
        f"with number words {info['test_acc_own_tokens']:.3f}, with kdray's letters {info['test_acc_letters']:.3f}")
    return {"data": str(data), "teacher": str(work / "models" / "teacher"),
            "bert": str(work / "models" / "bert-student"), "shared": str(work / "models" / "shared-student"),
            "info": info}


# --------------------------------------------------------------------------------------------------
# kdray, as a user drives it: experiment configs, layer probes, trainings, a search


def terms_for(method: str, layer: Optional[str]) -> tuple[list[dict], float]:
    """(distill.terms, ce_weight) of a method; ``own_token_kd`` is answer-token KD (its teacher differs)."""
    if method == "hard":
        return [], 1.0
    if method == "probe_kd":
        return [{"method": "probe_kd", "weight": 0.9, "teacher_layers": [layer], "options": {"pooling": "last"}}], 0.1
    return [{"method": "kd", "weight": 0.9}], 0.1


def experiment_raw(world: dict, student: str, frac: float, seed: int, args: argparse.Namespace,
                   method: str = "hard", layer: Optional[str] = None) -> dict:
    """The experiment config a user would write: the teacher's folder, the ARC folder, a student folder."""
    params: dict[str, Any] = {"format": "arc", "num_choices": 4, "max_length": 64}
    if student == "bert":
        params["student_tokenizer"] = world["bert"]
        spec = {"name": "hf_sequence_classifier", "kwargs": {"path": world["bert"], "config_only": True}}
    else:
        spec = {"name": "hf_causal_lm", "kwargs": {"path": world["shared"], "config_only": True}}
    teacher: dict[str, Any] = {"path": world["teacher"]}
    if method == "own_token_kd":
        teacher["answer_tokens"] = ANSWER_WORDS
    terms, ce = terms_for(method, layer)
    return {"name": f"llm-probe-kd-{student}-{method}-{round(frac * 1e5)}-{seed}", "seed": seed,
            "cache_dir": world["cache"],
            "data": {"name": "multiple_choice", "root": world["data"], "label_fraction": frac, "seed": seed,
                     "val_fraction": args.val_fraction, "batch_size": 64, "eval_batch_size": 256, "params": params},
            "teacher": {"model": {"name": "hf_causal_lm", "kwargs": teacher}},
            "student": spec,
            "distill": {"temperature": 2.0, "ce_weight": ce, "terms": terms},
            "train": {"epochs": args.epochs, "progress": False,
                      "optimizer": {"name": "adamw", "lr": args.lr, "weight_decay": 0.01, "schedule": "cosine"}}}


def layer_probes(raw: dict) -> dict:
    """What ``kdray layers --probes last`` computes: a probe's validation accuracy on every teacher layer (one
    teacher pass, kept in the teacher cache) and the teacher's own answer-token accuracy."""
    from kdray.experiment.configs import parse_config
    from kdray.experiment.run import probe_layer_accuracies

    found = probe_layer_accuracies(parse_config(raw), "last")
    return {"probes": [{k: p[k] for k in ("layer", "pooling", "dim", "train_acc", "val_acc")} for p in found.probes],
            "teacher_val_acc": found.teacher_val_acc, "teacher_test_acc": found.teacher_test_acc,
            "chosen": max(found.probes, key=lambda p: p["val_acc"])["layer"]}


def one_run(raw: dict) -> dict:
    """``kdray train`` of one config (without saving the student): test and validation accuracy."""
    from kdray.experiment.configs import parse_config
    from kdray.experiment.run import run

    t0 = time.perf_counter()
    s = run(parse_config(raw))
    return {"test_acc": s.test_acc, "best_val_acc": s.best_val_acc, "seconds": time.perf_counter() - t0}


def labelled_counts(world: dict, budgets: list[int], args: argparse.Namespace) -> tuple[dict, dict]:
    """Per label budget: the label_fraction that labels that many training questions (stratified) and the count."""
    from kdray.data import make_bundle
    from kdray.experiment.configs import parse_config

    full = make_bundle(parse_config(experiment_raw(world, "shared", 1.0, 0, args)).data)
    counts = [int((full.y_train == c).sum()) for c in range(full.num_classes)]
    fracs = {n: fraction_for(n, counts) for n in budgets}
    return fracs, {n: make_bundle(parse_config(experiment_raw(world, "shared", f, 0, args)).data).n_labelled
                   for n, f in fracs.items()}


SEARCH_SPACE = """# Which teacher layer to probe, and is Probe-KD better than answer-token KD or labels alone?
name: llm-probe-kd-search
base: base.yaml
methods:
  hard: []
  answer_kd:
    - {method: kd, weight: {float: [0.3, 1.0]}, temperature: {float: [1.0, 4.0], log: true}}
  probe_kd:
    - method: probe_kd
      weight: {float: [0.3, 1.0]}
      temperature: {float: [1.0, 4.0], log: true}
      teacher_layers: {choice: LAYERS}
      options: {pooling: last}
params:
  distill.ce_weight: {float: [0.05, 0.5], log: true}
search:
  concurrency: 2
  grace_period: 2
  reduction_factor: 2
"""


def search(world: dict, frac: float, layers: list[str], args: argparse.Namespace) -> dict:
    """``kdray search`` of the space above (written beside its base config in the work folder), without MLflow:
    its best trial by validation accuracy and kdray's hard-label baseline."""
    import yaml

    from kdray.search.driver import SearchOptions, run_search

    folder = Path(world["cache"]).parent / "search"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.yaml").write_text(yaml.safe_dump(experiment_raw(world, "bert", frac, 0, args, "probe_kd",
                                                                    layers[-1]), sort_keys=False))
    (folder / "space.yaml").write_text(SEARCH_SPACE.replace("LAYERS", json.dumps(layers)))
    opts = SearchOptions(storage_path=str(folder / "results"), num_cpus=args.workers, progress=False, tracking=False,
                         overwrite=True, overrides={"num_trials": args.search_trials, "max_epochs": args.epochs,
                                                    "seed": 0})
    out = run_search(str(folder / "space.yaml"), opts)
    import ray

    ray.shutdown()
    t = out.table
    best = t.iloc[0]
    params = {k.removeprefix("param."): best[k] for k in t.columns if k.startswith("param.") and best[k] == best[k]}
    trials = [{"method": r.get("param.method"), "val_acc": r["val_acc"], "test_acc": r["test_acc"],
               "status": r["status"]} for _, r in t.iterrows()]
    return {"trials": len(t), "statuses": t["status"].value_counts().to_dict(), "best": {
        "params": {k: (v if isinstance(v, (str, int)) else round(float(v), 4)) for k, v in params.items()},
        "val_acc": round(float(best["val_acc"]), 4), "test_acc": round(float(best["test_acc"]), 4)},
        "baseline_test_acc": out.baseline["test_acc"] if out.baseline else None, "seconds": round(out.seconds, 1),
        "all": trials, "command": f"kdray search {folder / 'space.yaml'} --num-trials {args.search_trials} --max-epochs "
                                  f"{args.epochs} --seed 0 --num-cpus {args.workers} --no-tracking --overwrite"}


# --------------------------------------------------------------------------------------------------
# tables


def cell(r: Optional[dict]) -> str:
    return "" if r is None else f"{r['mean']:.3f} ± {r['std']:.3f}"


def markdown(out: dict) -> str:
    cols = [str(n) for n in out["labels"]]
    t = out["teacher"]
    lines = [f"Teacher ({t['params']:,} parameters, {t['layers']} layers, hidden {t['hidden']}), test accuracy: "
             f"answering with the number words it was trained on **{t['test_acc_own_tokens']:.3f}**, with kdray's letter "
             f"answer tokens **{t['test_acc_letters']:.3f}** (chance 0.25).", ""]
    layers = [p["layer"] for p in out["layers"][cols[0]][0]["probes"]]
    lines += ["| probe val acc (`last`), mean over seeds | " + " | ".join(f"{out['labelled'][c]} labels" for c in cols)
              + " |", "|---" * (len(cols) + 1) + "|"]
    for i, layer in enumerate(layers):
        vals = [summarise([s["probes"][i]["val_acc"] for s in out["layers"][c]]) for c in cols]
        lines.append(f"| `{layer}` | " + " | ".join(cell(v) for v in vals) + " |")
    lines.append("| teacher's answer tokens (` A`..` D`), val | " + " | ".join(
        cell(summarise([s["teacher_val_acc"] for s in out["layers"][c]])) for c in cols) + " |")
    lines.append("| layer chosen (per seed) | " + " | ".join(
        ", ".join(s["chosen"].rsplit(".", 1)[-1] for s in out["layers"][c]) for c in cols) + " |")
    lines += ["", "| student | method | " + " | ".join(f"{out['labelled'][c]} labels" for c in cols) + " |",
              "|---|---" + "|---" * len(cols) + "|"]
    for student in out["students"]:
        for m in out["methods"]:
            if not out["results"][student][m]:
                continue  # the control runs on the first student only
            lines.append(f"| {student} | {m} | " + " | ".join(cell(out["results"][student][m].get(c)) for c in cols)
                         + " |")
    if out.get("search"):
        s = out["search"]
        lines += ["", f"Search ({s['trials']} trials, {s['statuses']}, {s['seconds']:.0f} s), best trial by val acc: "
                      f"`{json.dumps(s['best']['params'])}`: val {s['best']['val_acc']:.3f}, test "
                      f"{s['best']['test_acc']:.3f}; hard-label baseline test {s['baseline_test_acc']:.3f}."]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------


TINY = {"train": 200, "test": 40, "teacher_questions": 200, "teacher_hidden": 32, "teacher_layers": 2,
        "teacher_epochs": 1, "student_hidden": 16, "epochs": 1, "labels": [32], "seeds": [0], "search_trials": 2,
        "vocab": 500, "words": 40}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", type=int, nargs="+", default=[32, 128, 512], help="labelled training questions")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--students", nargs="+", default=list(STUDENTS), choices=STUDENTS)
    ap.add_argument("--train", type=int, default=1600, help="training questions (labelled + transfer + validation)")
    ap.add_argument("--test", type=int, default=400)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--teacher-questions", type=int, default=3000, help="the teacher's own training questions")
    ap.add_argument("--teacher-hidden", type=int, default=64)
    ap.add_argument("--teacher-layers", type=int, default=4)
    ap.add_argument("--teacher-epochs", type=int, default=6)
    ap.add_argument("--student-hidden", type=int, default=32)
    ap.add_argument("--words", type=int, default=240, help="made-up words, a quarter of them animals")
    ap.add_argument("--vocab", type=int, default=1000, help="BPE vocabulary of the teacher's tokenizer")
    ap.add_argument("--epochs", type=int, default=8, help="student epochs (and the search's max epochs)")
    ap.add_argument("--lr", type=float, default=3e-3, help="students' AdamW learning rate (cosine)")
    ap.add_argument("--search-labels", type=int, help="label budget of the search (default: the middle one)")
    ap.add_argument("--search-trials", type=int, default=8, help="0: no search")
    ap.add_argument("--workers", type=int, default=2, help="trainings at a time (forked, 1 thread each)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the teacher's training and passes")
    ap.add_argument("--work", help="folder for the data, models, cache and search (default: a temporary one)")
    ap.add_argument("--plot", default=str(HERE / "results" / "llm_probe_layers.png"))
    ap.add_argument("--markdown", help="also write the tables to this file")
    ap.add_argument("--tiny", action="store_true", help="a few-second check: " + json.dumps(TINY))
    args = ap.parse_args()
    if args.tiny:
        for k, v in TINY.items():
            setattr(args, k, v)
    return args


def main() -> None:
    args = parse_args()
    t_start = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="kdray-llm-probe-kd-")).resolve()
    os.environ["KDRAY_CACHE_DIR"] = str(work / "cache")  # nothing of this run lands in the user's cache
    world = {**make_world(work, args), "cache": str(work / "cache")}
    mid = str(args.labels[len(args.labels) // 2])
    n_search = args.search_labels or int(mid)
    fracs, labelled = labelled_counts(world, sorted({*args.labels, n_search}), args)
    log(f"label budgets: {labelled} (label_fraction {fracs})")
    layers: dict[str, list] = {}
    jobs = []
    for n in args.labels:
        for seed in args.seeds:
            for student in args.students:  # one teacher pass per data view and split, all layers probed
                found = layer_probes(experiment_raw(world, student, fracs[n], seed, args))
                if student == args.students[0]:
                    layers.setdefault(str(n), []).append(found)
                for m in args.methods:
                    if m == "own_token_kd" and student != args.students[0]:
                        continue  # the control: on the first student only
                    jobs.append((student, n, seed, m, experiment_raw(world, student, fracs[n], seed, args, m,
                                                                     found["chosen"])))
            f = layers[str(n)][-1]
            log(f"{n} labels, seed {seed}: probe val acc " + " ".join(f"{p['val_acc']:.3f}" for p in f["probes"])
                + f"; teacher's answer tokens {f['teacher_val_acc']:.3f}; chosen {f['chosen']}")
    plot = layers[mid][0]
    from kdray.report.plots import probe_layers_plot

    probe_layers_plot(plot["probes"], plot["teacher_val_acc"], args.plot,
                      f"Made-up animals, {labelled[int(mid)]} labels: probes vs answer tokens")
    by: dict[tuple, list] = {}
    for (student, n, seed, m, _), r in zip(jobs, run_jobs(one_run, jobs, args.workers)):
        by.setdefault((student, m, str(n)), []).append(r["test_acc"])
        log(f"  {student} {m} {n} labels seed {seed}: test {r['test_acc']:.4f} (val {r['best_val_acc']:.4f}, "
            f"{r['seconds']:.0f} s)")
    results = {s: {m: {c: summarise(v) for (s2, m2, c), v in by.items() if (s2, m2) == (s, m)} for m in args.methods}
               for s in args.students}
    found = search(world, fracs[n_search], [p["layer"] for p in plot["probes"]], args) if args.search_trials else None
    out = {"labels": args.labels, "labelled": {str(n): labelled[n] for n in args.labels},
           "label_fractions": {str(n): fracs[n] for n in args.labels}, "seeds": args.seeds, "epochs": args.epochs,
           "methods": args.methods, "students": args.students, "teacher": world["info"],
           "layers": layers, "results": results, "search": found, "search_labels": n_search, "plot": args.plot,
           "work": str(work), "tiny": args.tiny, "seconds": round(time.perf_counter() - t_start, 1)}
    report(out, markdown(out), args.markdown, log)


if __name__ == "__main__":
    main()
