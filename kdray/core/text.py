"""Token-id inputs and multiple-choice prompts, shared by the data sets that make them and the models that read them.

* Padding: kdray pads token-id tensors with :data:`PAD` (-1), a value no tokenizer uses, so a model wrapper knows
  every real token whatever the tokenizer's own pad token is (:func:`token_mask`). kdray's data sets pad rows on
  the right; a decoder-only wrapper re-lays any layout out on the left (:func:`left_align`), so position -1 is the
  last real token, and an encoder wrapper on the right (:func:`right_align`): input padded on either side (or
  both) reads the same.
* Multiple choice: choices are lettered ``A, B, C ...`` (:data:`CHOICE_LETTERS`) and a prompt ends with
  :data:`ANSWER_CUE`; the answer token of letter ``L`` is the one token that follows the cue when ``" L"`` (or
  ``"L"``) is appended (:func:`answer_token_ids`).
* :func:`length_batches` groups rows of similar length so a batch wastes little on padding.
* :func:`load_tokenizer` is the one way data sets and models load a Hugging Face tokenizer (an empty one is
  refused); :func:`tokenizer_difference` compares two by what they do, not by where they came from.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import torch

from kdray.core.hf_package import import_transformers
from kdray.errors import ConfigError

PAD = -1
CHOICE_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
ANSWER_CUE = "Answer:"


def is_token_ids(x: torch.Tensor) -> bool:
    """A (N, T) integer tensor: token ids (padded with :data:`PAD` by kdray's text data sets)."""
    return x.dim() == 2 and not torch.is_floating_point(x) and x.dtype != torch.bool


def pad_rows(rows: Sequence[Sequence[int]], length: Optional[int] = None) -> torch.Tensor:
    """Token-id rows as one (N, T) long tensor padded on the right with :data:`PAD`; T is the longest row."""
    t = max((len(r) for r in rows), default=1) if length is None else length
    out = torch.full((len(rows), max(t, 1)), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(list(r)[:t], dtype=torch.long)
    return out


def token_mask(ids: torch.Tensor, pad_token_id: Optional[int] = None) -> torch.Tensor:
    """True at real tokens: not :data:`PAD` (and not ``pad_token_id`` when given, for data padded with it)."""
    mask = ids >= 0
    if pad_token_id is not None:
        mask &= ids != pad_token_id
    return mask


def left_align(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's padding to the left, wherever it was (order of the real tokens kept): ``(ids, mask)`` laid
    out so the last position of every row is its last real token."""
    return _align(ids, mask, pads_first=True)


def right_align(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's padding to the right, wherever it was (order of the real tokens kept): the layout encoders
    with absolute positions expect, so a left-padded row is computed as the same tokens alone."""
    return _align(ids, mask, pads_first=False)


def _align(ids: torch.Tensor, mask: torch.Tensor, pads_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    key = mask.to(torch.int8) if pads_first else (~mask).to(torch.int8)
    src = torch.sort(key, dim=1, stable=True).indices
    return ids.gather(1, src), mask.gather(1, src)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted over the real tokens only (as ``generate`` does for left-padded batches), so a padded
    row is computed exactly as the same prompt alone."""
    return (mask.long().cumsum(1) - 1).clamp_min(0)


def length_batches(x: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(row indices, rows)`` batches over ``x``. Token ids are sorted by length (longest first, so memory peaks
    at once) and each batch is cut to its longest row; other inputs come in order."""
    if not is_token_ids(x) or len(x) == 0:
        for i in range(0, len(x), batch_size):
            yield torch.arange(i, min(i + batch_size, len(x))), x[i:i + batch_size]
        return
    lengths = (x >= 0).sum(1)
    order = torch.sort(lengths, descending=True, stable=True).indices
    for i in range(0, len(x), batch_size):
        idx = order[i:i + batch_size]
        yield idx, x[idx, :max(int(lengths[idx].max()), 1)]


PROBE_TEXT = "Question: What is 1 plus 1?\nA. 2\nB. 3\nAnswer: A"  # any tokenizer of a text model reads this
GIVE_TOKENIZER = ("give the tokenizer's folder or hub name (a model's kwargs.tokenizer, or data.params.tokenizer / "
                  "teacher_tokenizer / student_tokenizer)")


def load_tokenizer(path: str, field: str) -> Any:
    """``AutoTokenizer.from_pretrained(path)``; a missing or too old ``transformers``, a folder or hub name it cannot
    load, or an empty tokenizer (:func:`check_usable`: a model folder without tokenizer files loads as one in
    ``transformers`` 5) is a ConfigError on ``field``."""
    transformers = import_transformers(field, path)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(field, path, f"a folder or hub name with usable tokenizer files: transformers cannot load a "
                                       f"tokenizer from {path} ({e}); {GIVE_TOKENIZER}") from None
    check_usable(tokenizer, path, field)
    return tokenizer


def check_usable(tokenizer: Any, path: str, field: str) -> None:
    """``tokenizer`` is not empty: it reads :data:`PROBE_TEXT` as some tokens, and unless one of them is known, its
    vocabulary holds more than its special tokens (a small domain vocabulary may know none of the probe's words)."""
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    unknown = getattr(tokenizer, "unk_token_id", None)
    if any(t != unknown for t in ids):
        return
    special = set(getattr(tokenizer, "all_special_tokens", ()))
    if ids and any(t not in special for t in tokenizer.get_vocab()):
        return
    reads = "no tokens" if not ids else f"unknown tokens only, its vocabulary being its {len(special)} special tokens"
    raise ConfigError(field, path, f"a folder or hub name with usable tokenizer files: {path} has none (its "
                                   f"tokenizer reads {PROBE_TEXT!r} as {reads}); {GIVE_TOKENIZER}")


def tokenizer_difference(a: Any, b: Any) -> Optional[str]:
    """How two tokenizers differ in what a model reads (their vocabularies, or the ids they give
    :data:`PROBE_TEXT` with special tokens), or None when they read text alike, whatever folders they came from."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        return f"their vocabularies differ ({len(va)} and {len(vb)} tokens, {len(va.items() ^ vb.items())} entries " \
               "not in both)"
    ia, ib = a(PROBE_TEXT)["input_ids"], b(PROBE_TEXT)["input_ids"]
    if ia != ib:
        return f"they read {PROBE_TEXT!r} as different ids ({ia[:8]}... and {ib[:8]}...)"
    return None


# --------------------------------------------------------------------------------------------------
# answer tokens


def single_token_after(tokenizer: Any, prefix: str, piece: str) -> Optional[int]:
    """The id of ``piece`` when it is exactly one token following ``prefix`` (tokenised together), else None."""
    base = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    full = tokenizer(prefix + piece, add_special_tokens=False)["input_ids"]
    unknown = getattr(tokenizer, "unk_token_id", None)
    if len(full) == len(base) + 1 and full[:len(base)] == base and full[-1] != unknown:
        return int(full[-1])
    return None


def answer_token_ids(tokenizer: Any, num_choices: int, cue: str = ANSWER_CUE) -> list[int]:
    """The token id of each choice letter as it follows ``cue``: ``" A"`` where that is one token (byte-level BPE
    tokenizers), else ``"A"``. Raises ValueError naming a letter that is neither."""
    ids = []
    for letter in CHOICE_LETTERS[:num_choices]:
        tid = single_token_after(tokenizer, cue, " " + letter)
        if tid is None:
            tid = single_token_after(tokenizer, cue, letter)
        if tid is None:
            ids_read = tokenizer(cue + " " + letter, add_special_tokens=False)["input_ids"]
            pieces = tokenizer.convert_ids_to_tokens(ids_read)
            raise ValueError(f"choice label {letter!r} is not one token after {cue!r} for this tokenizer (it reads "
                             f"{pieces}): give answer_tokens, {num_choices} strings that are each one token, or ids")
        ids.append(tid)
    if len(set(ids)) != len(ids):
        raise ValueError(f"the choice letters map to repeated token ids {ids}: give answer_tokens")
    return ids
