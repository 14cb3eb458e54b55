"""Hugging Face: ``hf_sequence_classifier`` wraps ``AutoModelForSequenceClassification`` (needs the optional
``transformers`` package); the inner model's paths are reachable under ``model.``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kdray.errors import ConfigError
from kdray.models.registry import MODELS

HF_INSTALL_HINT = "pip install 'kdray[hf]' (needs the optional transformers package)"


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("model.name", "hf_sequence_classifier", HF_INSTALL_HINT) from None
    return transformers


class HFSequenceClassifier(nn.Module):
    """``forward(input_ids)`` -> logits; the attention mask marks positions != ``pad_token_id``."""

    def __init__(self, model: nn.Module, pad_token_id: int = 0):
        super().__init__()
        self.model = model
        self.pad_token_id = int(pad_token_id)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        input_ids = input_ids.long()
        attention_mask = (input_ids != self.pad_token_id).long()
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


@MODELS.register("hf_sequence_classifier")
def hf_sequence_classifier(num_classes: int, *, path: str, config_only: bool = False,
                           pad_token_id: Optional[int] = None) -> nn.Module:
    """A ``transformers`` sequence classifier from a local folder or hub name.

    ``config_only`` builds a randomly initialised model from the folder's config. ``pad_token_id``
    defaults to the model config's pad token id, or 0 when it has none.
    """
    tf = _import_transformers()
    try:
        if config_only:
            config = tf.AutoConfig.from_pretrained(path, num_labels=num_classes)
            model = tf.AutoModelForSequenceClassification.from_config(config)
        else:
            model = tf.AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_classes)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError("kwargs.path", path, f"a model folder or hub name transformers can load ({e})") from None
    if pad_token_id is None:
        pad_token_id = getattr(model.config, "pad_token_id", None)
        pad_token_id = 0 if pad_token_id is None else pad_token_id
    return HFSequenceClassifier(model, pad_token_id)
