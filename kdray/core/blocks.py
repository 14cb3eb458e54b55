"""Which layers of a teacher matter: the candidates a probe is fitted on, found from the model's structure.

:func:`block_paths` lists a model's blocks in the order it defines them:

* a Hugging Face model (a module with a ``config`` that counts its layers, ``num_hidden_layers``): the shallowest
  list of exactly that many modules, i.e. the transformer's blocks (``model.model.layers.N`` of a decoder,
  ``model.bert.encoder.layer.N`` of BERT, ``model.distilbert.transformer.layer.N`` ...). Mixture-of-Experts
  models keep their experts in lists deeper inside each block, so the blocks are found whatever the
  ``transformers`` version;
* any other model: its named top-level modules, where a stage (a ``Sequential`` or ``ModuleList`` of two or more
  blocks with parameters, as a ResNet's ``layer1``) stands for its blocks: every block but the last, then the
  stage itself (whose output is its last block's);
* an ensemble (``member_paths``): each member's, under its name; a model of the user's own may list its
  candidates itself with a ``probe_layers()`` method.

:func:`resolve_pooling` turns the pooling ``auto`` into what it means for a layer: the last real token for a
decoder-only language model's hidden states, the mean over real tokens for an encoder's, the spatial mean for a
feature map.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from kdray.core.hooks import split_layer, token_owner

STAGE_TYPES = (nn.Sequential, nn.ModuleList)


def block_paths(model: nn.Module) -> list[str]:
    """The model's probe candidates (see the module docstring), as module paths."""
    own = getattr(model, "probe_layers", None)
    if callable(own):
        return list(own())
    members = getattr(model, "member_paths", None)
    if members:
        modules = dict(model.named_modules())
        return [f"{m}.{p}" for m in members for p in block_paths(modules[m])]
    stacks = transformer_stacks(model)
    return [p for stack in stacks for p in stack] if stacks else top_level_paths(model)


def layer_count(module: nn.Module) -> Optional[int]:
    """How many blocks a Hugging Face model's config says it has (None for other modules)."""
    config = getattr(module, "config", None)
    for name in ("num_hidden_layers", "n_layers", "n_layer", "num_layers"):
        n = getattr(config, name, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def transformer_stacks(model: nn.Module) -> list[list[str]]:
    """For each outermost module of ``model`` whose config counts its layers, the paths of its blocks: the
    shallowest ``ModuleList`` below it with exactly that many entries."""
    stacks: list[list[str]] = []
    claimed: list[str] = []
    for name, module in model.named_modules():
        n = layer_count(module)
        if n is None or any(name == c or name.startswith(c + ".") for c in claimed):
            continue
        lists = [(sub.count(".") if sub else -1, sub) for sub, m in module.named_modules()
                 if isinstance(m, nn.ModuleList) and len(m) == n]
        if lists:
            sub = min(lists)[1]
            prefix = ".".join(p for p in (name, sub) if p)
            stacks.append([f"{prefix}.{i}" for i in range(n)])
            claimed.append(name)
    return stacks


def top_level_paths(model: nn.Module) -> list[str]:
    """The named top-level modules; a stage of blocks stands for its blocks (all but the last) and itself."""
    out = []
    for name, child in model.named_children():
        blocks = [n for n, b in child.named_children() if any(True for _ in b.parameters())]
        if isinstance(child, STAGE_TYPES) and len(blocks) >= 2:
            out += [f"{name}.{b}" for b in blocks[:-1]]
        out.append(name)
    return out


def resolve_pooling(model: nn.Module, layer: str, pooling: str) -> str:
    """``pooling`` as it applies to ``layer`` of ``model``: ``auto`` becomes the token pooling of the wrapper that
    lays out the layer's tokens (``last`` for a decoder, ``seq_mean`` for an encoder), else ``mean``."""
    if pooling != "auto":
        return pooling
    owner = token_owner(model, split_layer(layer)[0])
    return getattr(owner, "token_pooling", "seq_mean") if owner is not None else "mean"
