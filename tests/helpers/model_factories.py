"""Model factories that tests reach through import paths (``model_factories:tiny_mlp``)."""
from torch import nn


def tiny_mlp(num_classes: int, hidden: int = 8, in_features: int = 40) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def flexible(**kwargs) -> nn.Module:
    """Takes any keyword arguments (no num_classes)."""
    return nn.Linear(kwargs.get("in_features", 40), kwargs.get("out_features", 3))


def not_a_module(num_classes: int) -> dict:
    return {"num_classes": num_classes}


NOT_CALLABLE = 3
