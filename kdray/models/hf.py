"""Hugging Face: ``hf_sequence_classifier`` wraps ``AutoModelForSequenceClassification`` (needs the optional
``transformers`` package); the inner model's paths are reachable under ``model.``. The language-model wrapper
``hf_causal_lm`` is :mod:`kdray.models.hf_lm`; the helpers both share are here.

A factory that loads trained weights of its own (from a fine-tuned folder or hub name) says so through its
``loads_weights(kwargs)`` attribute: such a model is a teacher as it is, with neither ``teacher.checkpoint`` nor
``teacher.recipe``, and its ``weights_fingerprint()`` keys the teacher cache by the folder's files (hashed once,
see :mod:`kdray.core.fingerprint`) instead of hashing every weight on every run."""
from __future__ import annotations

import contextlib
import difflib
import logging
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from kdray.config import stable_hash
from kdray.core.fingerprint import folder_fingerprint
from kdray.core.hf_package import import_transformers as _import_checked
from kdray.core.text import right_align, token_mask
from kdray.errors import ConfigError
from kdray.models.registry import MODELS

log = logging.getLogger("kdray")



def import_transformers(name: str = "hf_sequence_classifier"):
    """``transformers``, installed and new enough (:mod:`kdray.core.hf_package`), else a ConfigError on the model's
    name."""
    return _import_checked("model.name", name)


def loads_own_weights(kwargs: dict) -> bool:
    """A Hugging Face factory loads trained weights unless ``config_only`` builds it from its config."""
    return not kwargs.get("config_only", False)


def local_fingerprint(path: str, *extra: object) -> Optional[str]:
    """The fingerprint of a local model folder (with ``extra`` facts that change the outputs, e.g. the dtype);
    None for a hub name (the teacher cache then hashes the weights)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return None
    return stable_hash([folder_fingerprint(folder), *map(str, extra)])


def load_pretrained(auto_class: Any, path: str, config_only: bool, config: Optional[dict] = None,
                    **kwargs: Any) -> nn.Module:
    """``auto_class.from_pretrained(path)``, or a random model from the folder's config (with the values of
    ``config`` in place of its own, e.g. fewer layers for a student); a folder or name that does not load is a
    ConfigError on ``kwargs.path``."""
    tf = import_transformers()
    if config and not config_only:
        raise ConfigError("kwargs.config", config, "only with config_only: true (a randomly initialised model built "
                                                   "from the folder's config with these values changed)")
    try:
        if config_only:
            dtype = kwargs.pop("dtype", None)
            model = auto_class.from_config(changed_config(tf.AutoConfig.from_pretrained(path, **kwargs), config or {}))
            return model.to(dtype) if dtype is not None else model
        with library_warnings_off(tf):
            model, info = auto_class.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError("kwargs.path", path, f"a model folder or hub name transformers can load ({e})") from None
    report_new_weights(model, sorted(info.get("missing_keys", ())), path)
    return model


def changed_config(cfg: Any, values: dict) -> Any:
    """``cfg`` with ``values`` set; a name the config does not have is refused with the closest it has."""
    known = set(cfg.to_dict())
    for name, value in values.items():
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=4)
            raise ConfigError(f"kwargs.config.{name}", value, f"a field of the model's config"
                                                              f"{' (closest: ' + ', '.join(close) + ')' if close else ''}")
        setattr(cfg, name, value)
    return cfg


@contextlib.contextmanager
def library_warnings_off(tf: Any) -> Iterator[None]:
    """``transformers``' own logger at ERROR for one load (its multi-line report of the weights it initialised is
    replaced by :func:`report_new_weights`'s one line); its verbosity is restored after."""
    verbosity = tf.utils.logging.get_verbosity()
    tf.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        tf.utils.logging.set_verbosity(verbosity)


def report_new_weights(model: nn.Module, missing: list[str], path: str) -> None:
    """One log line when the folder lacked some of the model's weights: a pretrained encoder without a task head
    (e.g. saved from ``BertModel``) gets a new, untrained head, so its logits mean nothing until it is trained or
    distilled (its hidden states, what probes read, are the pretrained ones)."""
    if not missing:
        return
    base = getattr(model, "base_model_prefix", "")
    if base and all(not k.startswith(base + ".") for k in missing):
        head = "classification head" if "SequenceClassification" in type(model).__name__ else "task head"
        log.info("%s: %s has no %s: a new, untrained one (%s) is added, so the model must be trained or distilled "
                 "before its logits mean anything (its pretrained blocks are loaded)", type(model).__name__, path,
                 head, ", ".join(missing))
    else:
        log.warning("%s: %d weights are not in %s and start untrained: %s", type(model).__name__, len(missing), path,
                    ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))


class FolderWeights(nn.Module):
    """A wrapped Hugging Face model whose weights are those of its folder until something else is loaded into it
    or it is trained (then :meth:`forget_fingerprint`): :meth:`weights_fingerprint` is the folder's (hashed when
    first asked, so a model that never keys a teacher cache, e.g. a student, costs no hashing), or None."""

    _origin: Optional[tuple] = None  # (folder, facts that change the outputs) the weights came from
    _fingerprint: Optional[str] = None

    def weights_fingerprint(self) -> Optional[str]:
        if self._fingerprint is None and self._origin is not None:
            self._fingerprint = local_fingerprint(*self._origin)
        return self._fingerprint

    def forget_fingerprint(self) -> None:
        self._origin = self._fingerprint = None

    def load_state_dict(self, *args: Any, **kwargs: Any):
        self.forget_fingerprint()
        return super().load_state_dict(*args, **kwargs)


class TokenLayout:
    """A wrapper that lays out its token-id batches itself: ``layout_mask`` is the (B, T) mask of real tokens of its
    last forward, in the layout its hidden states have (read by :class:`kdray.core.hooks.FeatureHooks`), and
    ``token_pooling`` is how a probe reads a token sequence of it by default (pooling ``auto``)."""

    layout_mask: Optional[torch.Tensor] = None
    token_pooling = "seq_mean"


class HFSequenceClassifier(TokenLayout, FolderWeights):
    """``forward(input_ids)`` -> logits; the attention mask marks real tokens: not kdray's padding (-1) and not
    ``pad_token_id``. Rows are laid out padded on the right whatever side they come padded on (encoders count
    positions from the first token), so a padded prompt is computed as it would be alone; a probe's ``auto``
    pooling of its hidden states is the mean over the real tokens."""

    def __init__(self, model: nn.Module, pad_token_id: int = 0, origin: Optional[tuple] = None):
        super().__init__()
        self.model = model
        self.pad_token_id = int(pad_token_id)
        self._origin = origin

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        input_ids = input_ids.long()
        ids, mask = right_align(input_ids, token_mask(input_ids, self.pad_token_id))
        ids = torch.where(mask, ids, torch.full_like(ids, self.pad_token_id))
        self.layout_mask = mask
        return self.model(input_ids=ids, attention_mask=mask.long()).logits


@MODELS.register("hf_sequence_classifier")
def hf_sequence_classifier(num_classes: int, *, path: str, config_only: bool = False,
                           pad_token_id: Optional[int] = None, config: Optional[dict[str, Any]] = None) -> nn.Module:
    """A ``transformers`` sequence classifier from a local folder or hub name.

    ``config_only`` builds a randomly initialised model from the folder's config, with the values of ``config``
    changed (e.g. ``{num_hidden_layers: 2, hidden_size: 128, intermediate_size: 512}`` for a small student that
    reads the teacher's tokenizer). ``pad_token_id`` defaults to the model config's pad token id, or 0 when it has
    none.
    """
    tf = import_transformers()
    model = load_pretrained(tf.AutoModelForSequenceClassification, path, config_only, config, num_labels=num_classes)
    if pad_token_id is None:
        pad_token_id = getattr(model.config, "pad_token_id", None)
        pad_token_id = 0 if pad_token_id is None else pad_token_id
    return HFSequenceClassifier(model, pad_token_id, None if config_only else (path, num_classes, pad_token_id))


hf_sequence_classifier.loads_weights = loads_own_weights  # type: ignore[attr-defined]
