"""Tiny language-model stand-ins made offline: generated multiple-choice questions in the ARC, MMLU and AQuA-RAT
layouts, a byte-level BPE tokenizer and tiny random decoder-only models (Llama, Qwen2) for the teacher, and a
word-level tokenizer with a tiny BERT for a student that reads its own tokens."""
from __future__ import annotations

import json
import random
from pathlib import Path

LETTERS = "ABCDE"


def questions(n: int, seed: int = 0, k: int = 4) -> list[dict]:
    """Arithmetic questions with ``k`` numeric choices: {question, choices, answer} (answer: an index)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        right = a + b
        wrong = rng.sample([v for v in range(2, 41) if v != right], k - 1)
        answer = rng.randrange(k)
        choices = wrong[:answer] + [right] + wrong[answer:]
        out.append({"question": f"What is {a} plus {b}?", "choices": [str(c) for c in choices], "answer": answer})
    return out


def arc_row(q: dict, numeric_labels: bool = False) -> dict:
    labels = [str(i + 1) for i in range(len(q["choices"]))] if numeric_labels else list(LETTERS[:len(q["choices"])])
    return {"id": "q", "question": q["question"], "choices": {"text": q["choices"], "label": labels},
            "answerKey": labels[q["answer"]]}


def mmlu_row(q: dict) -> dict:
    return {"question": q["question"], "subject": "arithmetic", "choices": q["choices"], "answer": q["answer"]}


def aqua_row(q: dict) -> dict:
    return {"question": q["question"], "options": [f"{LETTERS[i]}){c}" for i, c in enumerate(q["choices"])],
            "rationale": "add", "correct": LETTERS[q["answer"]]}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_mc(root: Path, fmt: str, n_train: int = 160, n_test: int = 40, suffix: str = ".jsonl") -> Path:
    """A multiple-choice folder in ``fmt`` (arc, mmlu, aqua): train and test files."""
    row = {"arc": arc_row, "mmlu": mmlu_row, "aqua": aqua_row}[fmt]
    write = write_parquet if suffix == ".parquet" else write_jsonl
    write(root / f"train{suffix}", [row(q) for q in questions(n_train, 0)])
    write(root / f"test{suffix}", [row(q) for q in questions(n_test, 1)])
    return root


def corpus() -> list[str]:
    texts = []
    for q in questions(300, 7):
        lines = [f"Question: {q['question']}"] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(q["choices"])]
        texts.append("\n".join(lines) + "\nAnswer: " + LETTERS[q["answer"]])
    return texts


def bpe_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer (as GPT-2, Llama 3 and Qwen use) trained on the question texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def word_tokenizer():
    """A word-level tokenizer with [CLS] ... [SEP], as a small BERT student would have."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus(), trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]")


def save_causal_lm(folder: Path, arch: str = "qwen2", layers: int = 3, hidden: int = 32, seed: int = 0) -> Path:
    """A tiny random decoder-only model with the BPE tokenizer, saved as a user's Qwen or Llama folder would be."""
    import torch
    import transformers as tf

    tok = bpe_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=512,
                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    cfg = tf.Qwen2Config(**common) if arch == "qwen2" else tf.LlamaConfig(**common)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_bert(folder: Path, num_labels: int = 4, hidden: int = 32) -> Path:
    """A tiny random BERT sequence classifier with the word-level tokenizer."""
    import torch
    import transformers as tf

    tok = word_tokenizer()
    cfg = tf.BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=512, num_labels=num_labels,
                        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    tf.BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


SYSTEM = "You are a careful assistant who answers multiple-choice questions."
CHAT_TEMPLATES = {  # the opened assistant turn: plain (kdray appends "Answer:"), with a cue of its own, Alpaca-style
    "plain": "<|im_start|>system\n" + SYSTEM + "<|im_end|>\n{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
             "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "own_cue": "{% for m in messages %}<|user|>\n{{ m['content'] }}\n{% endfor %}"
               "{% if add_generation_prompt %}<|assistant|>\nAnswer:{% endif %}",
    "response": "### Instruction:\n{% for m in messages %}{{ m['content'] }}\n\n{% endfor %}"
                "{% if add_generation_prompt %}### Response:\n{% endif %}",
}


def save_chat_tokenizer(folder: Path, kind: str) -> Path:
    """The BPE tokenizer with one of :data:`CHAT_TEMPLATES` (an instruct model's tokenizer folder)."""
    tok = bpe_tokenizer()
    tok.chat_template = CHAT_TEMPLATES[kind]
    tok.save_pretrained(folder)
    return folder
