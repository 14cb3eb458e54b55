"""Multiple-choice reasoning (``multiple_choice``): ARC, MMLU, AQuA-RAT or any named fields, rendered as prompts
and tokenised, with a teacher view and a student view of every example.

The teacher reads a prompt built from ``params.template`` (the question, the choices lettered ``A.`` ``B.`` ...,
``Answer:``), optionally after ``few_shot`` solved examples from the labelled training split and inside the
instruct tokenizer's chat template, tokenised by ``teacher_tokenizer``. The student reads its own rendering
(``student_template``, ``student_tokenizer``; default: the teacher's). When both renderings are the same token
ids the bundle has one view; otherwise ``DataBundle.teacher_view`` holds the teacher's. Inputs are (N, T) long
tensors padded on the right with kdray's -1 (:mod:`kdray.core.text`). A prompt longer than ``max_length``
(``student_max_length``) tokens is cut on the left of its text, inside the chat template when there is one
(:class:`View`): few-shot examples and the question's start go first, the end of the question, the choices, the
cue and the template's own tokens are kept; cut prompts are counted per view and split in the log and in the
data's metadata (``truncated``). With a chat template the prompt ends with the answer cue once
(:func:`chat_prompt`: the template's own cue when its assistant turn ends with one). Labels are the index of the
right choice, so the number of classes is ``num_choices``; examples with another number of choices are dropped
and counted in the log and in the data's metadata (``dropped``).
"""
from __future__ import annotations

import logging
import random
import string
from collections import Counter
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import torch
from pydantic import Field, field_validator

from kdray.config import DataConfig
from kdray.core.text import ANSWER_CUE, CHOICE_LETTERS, load_tokenizer, pad_rows
from kdray.data.mc_files import FORMATS, Fields, Question, normalise, read_splits
from kdray.data.registry import Params, RawData, register_dataset
from kdray.errors import ConfigError

log = logging.getLogger("kdray")

DEFAULT_TEMPLATE = "Question: {question}\n{choices}\n" + ANSWER_CUE
PLACEHOLDERS = {"question", "choices"}


class MultipleChoiceParams(Params):
    format: Literal[FORMATS] = "arc"  # type: ignore[valid-type]
    question_field: str = "question"  # format: fields
    choices_field: str = "choices"
    answer_field: str = "answer"
    num_choices: int = Field(4, ge=2, le=len(CHOICE_LETTERS))
    teacher_tokenizer: Optional[str] = None  # default: the teacher's model folder (teacher.model.kwargs.path)
    student_tokenizer: Optional[str] = None  # default: the teacher's tokenizer
    template: str = DEFAULT_TEMPLATE
    student_template: Optional[str] = None  # default: template
    few_shot: int = Field(0, ge=0)  # solved examples from the labelled training split before each teacher prompt
    chat_template: bool = False  # wrap the teacher prompt in the teacher tokenizer's chat template (see chat_prompt)
    max_length: int = Field(1024, ge=8)  # teacher prompt tokens (the text cut on the left, counted in meta.truncated)
    student_max_length: Optional[int] = Field(None, ge=8)  # default: max_length
    train_split: str = "train"
    test_split: str = "test"
    test_fraction: float = Field(0.2, gt=0, lt=1)  # only for a saved single Dataset (no splits): seed 0, not stratified

    @field_validator("template", "student_template")
    @classmethod
    def _template(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        names = {name for _, name, _, _ in string.Formatter().parse(v) if name is not None}
        if names - PLACEHOLDERS or not PLACEHOLDERS <= names:
            raise ValueError(f"a template with the placeholders {{question}} and {{choices}} and no others "
                             f"(it has {sorted(names)})")
        return v


def _load_tokenizer(path: str, key: str) -> Any:
    tok = load_tokenizer(path, f"data.params.{key}")
    tok.truncation_side = "left"  # keep the choices and the answer cue
    return tok


# --------------------------------------------------------------------------------------------------
# prompts


def render(q: Question, template: str) -> str:
    choices = "\n".join(f"{CHOICE_LETTERS[i]}. {c}" for i, c in enumerate(q.choices))
    return template.format(question=q.text, choices=choices)


def solved(q: Question, template: str) -> str:
    return f"{render(q, template)} {CHOICE_LETTERS[q.answer]}"


def chat_prompt(tokenizer: Any, text: str) -> str:
    """The prompt as the user's turn of the tokenizer's chat template, then the assistant's turn the template opens
    (``add_generation_prompt``), ending with the answer cue exactly once. The user's turn is ``text`` without its
    trailing :data:`ANSWER_CUE`. When the opened turn already ends with a cue of the template's own (its last
    non-blank character is ``:``, e.g. ``Answer:`` or ``### Response:``), the prompt ends there, trailing blanks
    dropped so the answer letter follows a ``:`` as it follows ``Answer:``; otherwise ``Answer:`` is appended."""
    user = text.removesuffix(ANSWER_CUE).rstrip()
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    return rendered.rstrip() if has_own_cue(rendered) else rendered + ANSWER_CUE


def has_own_cue(rendered: str) -> bool:
    """A chat prompt whose opened assistant turn ends with a cue of its own: its last non-blank character is ``:``."""
    return rendered.rstrip().endswith(":")


class View:
    """One rendering of the questions: template, shots, chat template, tokenizer and length. A prompt longer than
    ``max_length`` tokens is cut on the left of its text (the few-shot examples, then the question's start), so the
    end of the question, the choices and the cue are kept, and a chat template's own tokens (system prompt, turn
    markers) too: the text is cut inside the template, not the rendered tokens. :attr:`truncated` counts them."""

    def __init__(self, tokenizer: Any, template: str, max_length: int, shots: Sequence[Question] = (),
                 chat: bool = False):
        self.tokenizer, self.template, self.max_length, self.chat = tokenizer, template, max_length, chat
        self.prefix = "".join(solved(s, template) + "\n\n" for s in shots)
        self.truncated: dict[str, int] = {}

    def text(self, q: Question) -> str:
        return self.prefix + render(q, self.template)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """The tokens of each prompt text, inside the chat template when the view has one, uncut."""
        if self.chat:
            prompts = [chat_prompt(self.tokenizer, t) for t in texts]
            return self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        return self.tokenizer(texts)["input_ids"]

    def ids(self, questions: Sequence[Question], split: str) -> torch.Tensor:
        rows = self.encode([self.text(q) for q in questions])
        long = [i for i, r in enumerate(rows) if len(r) > self.max_length]
        for i in long:
            rows[i] = self.cut(self.text(questions[i]))
        self.truncated[split] = len(long)
        return pad_rows(rows)

    def cut(self, text: str) -> list[int]:
        """The tokens of ``text`` cut on its left to fit ``max_length``: by the tokenizer (which keeps its special
        tokens) without a chat template; inside the template with one (a few re-renderings at most)."""
        if not self.chat:
            return self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"]
        ids = self.encode([text])[0]
        for _ in range(8):
            if len(ids) <= self.max_length or not text:
                break
            text = drop_tokens(self.tokenizer, text, len(ids) - self.max_length)
            ids = self.encode([text])[0]
        return ids[-self.max_length:]  # the template and the cue alone are longer than max_length: cut them too


def drop_tokens(tokenizer: Any, text: str, n: int) -> str:
    """``text`` without its first ``n`` tokens (at least one character less)."""
    try:
        spans = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError):  # a slow tokenizer has no offsets: decode the rest
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return tokenizer.decode(ids[n:]) if n < len(ids) else ""
    if n >= len(spans):
        return ""
    return text[max(spans[n][0], 1):]


# --------------------------------------------------------------------------------------------------
# the loader


def _questions(root: Path, p: MultipleChoiceParams) -> tuple[list[Question], list[Question], dict, str]:
    """Train and test questions with ``num_choices`` choices (the others dropped and counted), and the layout."""
    fields = Fields(p.question_field, p.choices_field, p.answer_field)
    rows = read_splits(root, p.train_split, p.test_split, p.test_fraction)
    kept, dropped = {}, {}
    for split, name in (("train", rows.train_name), ("test", rows.test_name)):
        qs = normalise(getattr(rows, split), p.format, fields, name)
        kept[split] = [q for q in qs if len(q.choices) == p.num_choices]
        dropped[split] = len(qs) - len(kept[split])
        if not kept[split]:
            counts = dict(Counter(len(q.choices) for q in qs))
            raise ConfigError("data.params.num_choices", p.num_choices,
                              f"the number of choices of the questions in split {name!r} (choices per question: "
                              f"{counts or 'no questions'})")
        if dropped[split]:
            log.warning("multiple_choice: dropped %d of %d %s questions whose number of choices is not %d",
                        dropped[split], len(qs), name, p.num_choices)
    return kept["train"], kept["test"], dropped, rows.layout


def _views(p: MultipleChoiceParams, train: list[Question], shot_ids: Sequence[int]) -> tuple[View, View]:
    if p.teacher_tokenizer is None:
        raise ConfigError("data.params.teacher_tokenizer", None, "a tokenizer folder or hub name (default: the "
                                                                 "teacher's teacher.model.kwargs.path)")
    t_tok = _load_tokenizer(p.teacher_tokenizer, "teacher_tokenizer")
    if p.chat_template and not getattr(t_tok, "chat_template", None):
        raise ConfigError("data.params.chat_template", True, f"false: tokenizer {p.teacher_tokenizer} has no chat "
                                                             "template")
    s_tok = t_tok if p.student_tokenizer in (None, p.teacher_tokenizer) else \
        _load_tokenizer(p.student_tokenizer, "student_tokenizer")
    shots = [train[i] for i in shot_ids]
    teacher = View(t_tok, p.template, p.max_length, shots, p.chat_template)
    student = View(s_tok, p.student_template or p.template, p.student_max_length or p.max_length)
    return teacher, student


def log_truncated(truncated: dict, fields: dict, limits: dict, sizes: dict) -> None:
    """One warning per view and split whose prompts were cut to their length limit."""
    for view, counts in truncated.items():
        for split, n in counts.items():
            if n:
                log.warning("multiple_choice: %d of %d %s prompts of the %s view are longer than %s=%d tokens: cut on "
                            "the left (few-shot examples and the question's start go first; the choices and the "
                            "answer cue are kept)", n, sizes[split], split, view, fields[view], limits[view])


def choose_shots(labelled: Sequence[int], k: int, seed: int) -> list[int]:
    """``k`` of the labelled training examples (raw indices), drawn with ``seed``."""
    return sorted(random.Random(seed).sample(list(labelled), min(k, len(labelled))))


def build_raw(root: Path, p: MultipleChoiceParams, train: list[Question], test: list[Question], dropped: dict,
              shot_ids: Sequence[int], layout: str = "files") -> RawData:
    teacher, student = _views(p, train, shot_ids)
    x_tr, x_te = student.ids(train, "train"), student.ids(test, "test")
    t_tr, t_te = teacher.ids(train, "train"), teacher.ids(test, "test")
    truncated = {"teacher": teacher.truncated, "student": student.truncated}
    log_truncated(truncated, {"teacher": "max_length", "student": "student_max_length" if p.student_max_length
                              else "max_length"}, {"teacher": teacher.max_length, "student": student.max_length},
                  {"train": len(train), "test": len(test)})
    same = t_tr.shape == x_tr.shape and t_te.shape == x_te.shape and torch.equal(t_tr, x_tr) and torch.equal(t_te, x_te)
    y_tr = torch.tensor([q.answer for q in train], dtype=torch.long)
    y_te = torch.tensor([q.answer for q in test], dtype=torch.long)
    meta = {"format": p.format, "layout": layout, "num_choices": p.num_choices, "dropped": dropped,
            "n_train": len(train), "n_test": len(test), "teacher_tokenizer": p.teacher_tokenizer,
            "student_tokenizer": p.student_tokenizer or p.teacher_tokenizer, "two_views": not same,
            "few_shot": list(shot_ids), "teacher_tokens": int(t_tr.shape[1]), "student_tokens": int(x_tr.shape[1]),
            "vocab_size": len(student.tokenizer), "classes": list(CHOICE_LETTERS[:p.num_choices]),
            "truncated": truncated}
    return RawData(x_tr, y_tr, x_te, y_te, p.num_choices, None, meta,
                   teacher_x_train=None if same else t_tr, teacher_x_test=None if same else t_te)


@register_dataset("multiple_choice", MultipleChoiceParams, needs_root=True,
                  root_hint="a datasets save_to_disk folder, or a folder with <split>.jsonl / .json / .parquet files")
def multiple_choice(cfg: DataConfig, cache_dir: str | None = None) -> RawData:
    p = MultipleChoiceParams.model_validate(cfg.params)
    root = Path(cfg.root or ".").expanduser()
    train, test, dropped, layout = _questions(root, p)
    y_tr = torch.tensor([q.answer for q in train], dtype=torch.long)
    if p.few_shot == 0:
        return build_raw(root, p, train, test, dropped, (), layout)
    # few-shot prompts need the labelled training examples, known only after the split: render them then
    empty = torch.empty(0)
    return RawData(empty, y_tr, empty, torch.tensor([q.answer for q in test]), p.num_choices, None, {},
                   with_labelled=lambda labelled: build_raw(root, p, train, test, dropped,
                                                            choose_shots(labelled, p.few_shot, cfg.seed), layout))
