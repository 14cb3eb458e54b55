"""Multiple-choice questions from disk, in the layouts of the benchmarks the Probe-KD paper uses.

:func:`read_splits` reads the train and test rows of a ``datasets`` ``save_to_disk`` folder in any layout of
:mod:`kdray.data.saved` (a ``DatasetDict``; one ``Dataset``, e.g. ``ai2_arc/ARC-Easy/validation``, split by
``test_fraction``; one folder per split, e.g. MMLU's ``<subject>/{dev,validation,test}``), or of
``<split>.jsonl`` / ``<split>.json`` / ``<split>.parquet`` files in the data folder; :func:`normalise` turns each row
into a :class:`Question` (text, choice texts, index of the answer) by ``params.format``:

- ``arc`` (``allenai/ai2_arc``): ``question``, ``choices: {text: [...], label: [...]}``, ``answerKey`` (a label:
  ``"A".."D"``, or ``"1".."4"`` in some questions);
- ``mmlu`` (``cais/mmlu``): ``question``, ``choices`` (a list), ``answer`` (the index 0..K-1, or a letter);
- ``aqua`` (AQuA-RAT): ``question``, ``options`` like ``"A)21"``, ``correct`` (``"A".."E"``);
- ``fields``: the fields named by ``question_field``, ``choices_field`` (a list, or ``{text, label}``) and
  ``answer_field`` (an index, a label, or the text of the right choice).

A row of another layout is refused naming the format, the columns the rows have and the format they look like;
an answer that is not one of the row's choices is refused naming the row.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from kdray.core.text import CHOICE_LETTERS
from kdray.data.saved import is_saved_layout, load_saved
from kdray.errors import ConfigError

FORMATS = ("arc", "mmlu", "aqua", "fields")


@dataclass(frozen=True)
class Question:
    text: str
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class Fields:
    """The field names of the ``fields`` format."""
    question: str = "question"
    choices: str = "choices"
    answer: str = "answer"


# --------------------------------------------------------------------------------------------------
# reading files


@dataclass(frozen=True)
class Rows:
    """The rows of the train and test splits, the names they go by, and the folder's layout."""

    train: list[dict]
    test: list[dict]
    train_name: str
    test_name: str
    layout: str  # a layout of kdray.data.saved, or "files"


def read_splits(root: Path, train_split: str, test_split: str, test_fraction: float) -> Rows:
    """The train and test rows of a saved folder (any layout of :mod:`kdray.data.saved`) or of split files."""
    if is_saved_layout(root):
        s = load_saved(root, train_split, test_split, test_fraction)
        return Rows(s.train.to_list(), s.test.to_list(), s.train_name, s.test_name, s.layout)
    return Rows(read_split_file(root, train_split, "train_split"), read_split_file(root, test_split, "test_split"),
                train_split, test_split, "files")


def read_split_file(root: Path, split: str, key: str) -> list[dict]:
    """The rows of ``<split>.jsonl`` / ``.json`` / ``.parquet`` (``key`` names the params field that chose it)."""
    for suffix, reader in ((".jsonl", _read_jsonl), (".json", _read_json), (".parquet", _read_parquet)):
        path = root / f"{split}{suffix}"
        if path.is_file():
            return reader(path)
    have = sorted(p.name for p in root.iterdir() if p.suffix in (".jsonl", ".json", ".parquet"))[:10]
    raise ConfigError(f"data.params.{key}", split, f"a split with a file {split}.jsonl, {split}.json or "
                                                   f"{split}.parquet in {root}, or a datasets save_to_disk folder "
                                                   f"(files there: {', '.join(have) or 'none'})")


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                rows.append(_json_row(line, path, n))
    return rows


def _json_row(text: str, path: Path, line: int) -> dict:
    try:
        row = json.loads(text)
    except ValueError as e:
        raise ConfigError("data.root", f"{path.name} line {line}", f"one JSON object per line ({e})") from None
    if not isinstance(row, dict):
        raise ConfigError("data.root", f"{path.name} line {line}", "a JSON object per line")
    return row


def _read_json(path: Path) -> list[dict]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConfigError("data.root", path.name, f"a JSON list of objects ({e})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ConfigError("data.root", path.name, "a JSON list of objects")
    return rows


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise ConfigError("data.root", path.name, f"a Parquet file pyarrow can read ({e})") from None


# --------------------------------------------------------------------------------------------------
# the formats


def _arc(row: dict, f: Fields) -> Question:
    choices = row["choices"]
    labels, texts = [str(x) for x in choices["label"]], [str(x) for x in choices["text"]]
    return Question(str(row["question"]), tuple(texts), _index_of(str(row["answerKey"]), labels, "answerKey"))


def _mmlu(row: dict, f: Fields) -> Question:
    texts = tuple(str(x) for x in row["choices"])
    return Question(str(row["question"]), texts, _answer_index(row["answer"], texts, "answer"))


def _aqua(row: dict, f: Fields) -> Question:
    labels, texts = [], []
    for opt in row["options"]:
        label, sep, text = str(opt).partition(")")
        if not sep:
            raise _BadRow("options", opt, "options like 'A)21'")
        labels.append(label.strip())
        texts.append(text.strip())
    return Question(str(row["question"]), tuple(texts), _index_of(str(row["correct"]).strip(), labels, "correct"))


def _fields(row: dict, f: Fields) -> Question:
    choices = row[f.choices]
    if isinstance(choices, dict):
        labels, texts = [str(x) for x in choices["label"]], tuple(str(x) for x in choices["text"])
        answer = row[f.answer]
        if isinstance(answer, str) and answer in labels:
            return Question(str(row[f.question]), texts, labels.index(answer))
    else:
        texts = tuple(str(x) for x in choices)
    return Question(str(row[f.question]), texts, _answer_index(row[f.answer], texts, f.answer))


READERS: dict[str, Callable[[dict, Fields], Question]] = {"arc": _arc, "mmlu": _mmlu, "aqua": _aqua, "fields": _fields}
COLUMNS = {"arc": ("question", "choices", "answerKey"), "mmlu": ("question", "choices", "answer"),
           "aqua": ("question", "options", "correct")}


class _BadRow(Exception):
    def __init__(self, field: str, value: Any, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed


def _index_of(label: str, labels: list[str], field: str) -> int:
    if label not in labels:
        raise _BadRow(field, label, f"one of the row's choice labels {labels}")
    return labels.index(label)


def _answer_index(answer: Any, texts: tuple[str, ...], field: str) -> int:
    """An index (an int), or a string: a letter ``A..``, the text of one of the choices, or an index in digits."""
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        raise _BadRow(field, answer, "an index, a letter or a choice's text")
    if isinstance(answer, str):
        a = answer.strip()
        if a and a in CHOICE_LETTERS[:len(texts)]:
            return CHOICE_LETTERS.index(a)
        if answer in texts:
            return texts.index(answer)
        if not a.isdigit():
            raise _BadRow(field, answer, f"an index 0..{len(texts) - 1}, a letter or the text of one of the row's "
                                         "choices")
    i = int(answer)
    if not 0 <= i < len(texts):
        raise _BadRow(field, answer, f"an index 0..{len(texts) - 1} of the row's {len(texts)} choices")
    return i


def guess_format(row: dict) -> Optional[str]:
    return next((f for f, cols in COLUMNS.items() if all(c in row for c in cols)), None)


def normalise(rows: list[dict], fmt: str, fields: Fields, split: str) -> list[Question]:
    """Every row as a :class:`Question`; a row that does not fit ``fmt`` is a ConfigError saying why."""
    read = READERS[fmt]
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(read(row, fields))
        except (KeyError, TypeError, AttributeError) as e:
            raise _format_error(row, fmt, fields, split, i, e) from None
        except _BadRow as e:
            raise ConfigError("data", f"{e.field}={e.value!r} in row {i} of split {split!r}", e.allowed) from None
    return out


def _format_error(row: dict, fmt: str, fields: Fields, split: str, i: int, e: Exception) -> ConfigError:
    cols = ", ".join(sorted(row)[:12])
    guess = guess_format(row)
    hint = f" (they look like format {guess!r})" if guess and guess != fmt else ""
    need = COLUMNS.get(fmt) or (fields.question, fields.choices, fields.answer)
    return ConfigError("data.params.format", fmt, f"the layout of the files: format {fmt!r} reads {', '.join(need)}, "
                                                  f"but row {i} of split {split!r} has {cols}{hint} ({type(e).__name__}:"
                                                  f" {e})")
