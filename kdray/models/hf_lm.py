"""``hf_causal_lm``: a decoder-only language model (``AutoModelForCausalLM``) as a multiple-choice classifier.

Its output for a batch of prompts is the logits of the answer tokens (one per choice: the tokens of `` A``,
`` B`` ... as they follow ``Answer:``, see :func:`kdray.core.text.answer_token_ids`) at the last real position of
each prompt, so logit KD on them is the Probe-KD paper's "answer-token KD" baseline and probes read the same
model's hidden states. Prompts come padded with kdray's -1 (on either side); the wrapper lays each batch out on
the left with position ids counted over the real tokens, so a padded prompt is computed as it would be alone and
the hidden state at position -1 is the last real token's (what the ``last`` pooling takes). The inner model's
module paths are under ``model.``: decoder blocks are ``model.model.layers.N`` (what
:func:`kdray.core.blocks.block_paths` finds).
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from kdray.core.text import answer_token_ids, left_align, load_tokenizer, positions, token_mask
from kdray.errors import ConfigError
from kdray.models.hf import FolderWeights, TokenLayout, import_transformers, load_pretrained, loads_own_weights
from kdray.models.registry import MODELS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFCausalLM(TokenLayout, FolderWeights):
    """``forward(input_ids)`` -> (B, K) logits of the K answer tokens after each prompt. Its hidden states are laid
    out padded on the left (``layout_mask``); a probe's ``auto`` pooling of them is the last real token."""

    cache_pooled_dtype = "float16"  # the teacher cache keeps its pooled hidden states in float16 by default
    token_pooling = "last"

    def __init__(self, model: nn.Module, answer_ids: list[int], origin: Optional[tuple] = None):
        super().__init__()
        self.model = model
        self.register_buffer("answer_ids", torch.tensor(answer_ids, dtype=torch.long), persistent=False)
        self._origin = origin

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.long()
        ids, mask = left_align(ids, token_mask(ids))
        self.layout_mask = mask
        ids = ids.clamp_min(0)  # padding positions are masked out; any valid id will do
        out = self.model(input_ids=ids, attention_mask=mask.long(), position_ids=positions(mask), logits_to_keep=1)
        return out.logits[:, -1, self.answer_ids].float()


def resolve_answer_ids(tokenizer: Any, num_classes: int, answer_tokens: Optional[list], vocab: int) -> list[int]:
    """``answer_tokens`` (strings that are one token each, or ids) or the choice letters' tokens."""
    if answer_tokens is None:
        try:
            return answer_token_ids(tokenizer, num_classes)
        except ValueError as e:
            raise ConfigError("kwargs.answer_tokens", None, str(e)) from None
    if len(answer_tokens) != num_classes:
        raise ConfigError("kwargs.answer_tokens", answer_tokens, f"{num_classes} tokens, one per choice")
    ids = []
    for t in answer_tokens:
        tid = t if isinstance(t, int) else _one_token(tokenizer, t)
        if tid is None or not 0 <= tid < vocab:
            raise ConfigError("kwargs.answer_tokens", t, f"a string that is one token for this tokenizer, or an id in "
                                                         f"[0, {vocab})")
        ids.append(int(tid))
    return ids


def _one_token(tokenizer: Any, text: str) -> Optional[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


@MODELS.register("hf_causal_lm")
def hf_causal_lm(num_classes: int, *, path: str, dtype: Literal["float32", "bfloat16", "float16"] = "float32",
                 answer_tokens: Optional[list[Union[str, int]]] = None, tokenizer: Optional[str] = None,
                 config_only: bool = False, config: Optional[dict[str, Any]] = None) -> nn.Module:
    """A ``transformers`` causal LM from a local folder or hub name, answering ``num_classes`` choices.

    ``dtype`` is the weights' dtype (``bfloat16`` for large teachers on a GPU); ``answer_tokens`` overrides the
    answer tokens found from the tokenizer (``tokenizer``, default: ``path``); ``config_only`` builds a randomly
    initialised model from the folder's config (a student to train), with the values of ``config`` changed (e.g.
    fewer ``num_hidden_layers``)."""
    tf = import_transformers("hf_causal_lm")
    if dtype not in DTYPES:
        raise ConfigError("kwargs.dtype", dtype, "one of " + ", ".join(DTYPES))
    tok = load_tokenizer(tokenizer or path, "kwargs.tokenizer" if tokenizer else "kwargs.path")
    model = load_pretrained(tf.AutoModelForCausalLM, path, config_only, config, dtype=DTYPES[dtype])
    vocab = model.get_input_embeddings().num_embeddings
    ids = resolve_answer_ids(tok, num_classes, answer_tokens, vocab)
    return HFCausalLM(model, ids, None if config_only else (path, dtype, ids))


hf_causal_lm.loads_weights = loads_own_weights  # type: ignore[attr-defined]
