"""MNIST-1D models: ``mnist1d_cnn`` / ``mnist1d_cnn_small`` (three Conv1d layers and a linear head) and
``mnist1d_mlp``; input ``(B, 40)`` or ``(B, 1, 40)``."""
from __future__ import annotations

import torch
from torch import nn

from kdray.errors import ConfigError
from kdray.models.registry import MODELS, PosInt


def _as_sequence(x: torch.Tensor) -> torch.Tensor:
    """(B, L) -> (B, 1, L); (B, 1, L) unchanged."""
    return x.unsqueeze(1) if x.dim() == 2 else x


def _conv_len(length: int, kernel: int, stride: int, padding: int) -> int:
    return (length + 2 * padding - kernel) // stride + 1


class MNIST1DCNN(nn.Module):
    """Three Conv1d + ReLU layers (kernel ``kernel`` stride 1, kernel 3 stride 1, kernel 3 stride 2;
    "same" padding) and a linear head on the flattened last feature map."""

    def __init__(self, num_classes: int, channels: int = 32, kernel: int = 5, in_length: int = 40,
                 in_channels: int = 1):
        super().__init__()
        length = in_length
        layers = []
        for i, (c_in, k, stride) in enumerate([(in_channels, kernel, 1), (channels, 3, 1), (channels, 3, 2)], start=1):
            pad = k // 2
            length = _conv_len(length, k, stride, pad)
            if length < 1:
                raise ConfigError("kwargs.in_length", in_length, f"a length long enough for the three convs (kernel {kernel})")
            layers += [(f"conv{i}", nn.Conv1d(c_in, channels, k, stride=stride, padding=pad)), (f"relu{i}", nn.ReLU())]
        for name, mod in layers:
            self.add_module(name, mod)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels * length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _as_sequence(x)
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        x = self.relu3(self.conv3(x))
        return self.fc(self.flatten(x))


class MNIST1DMLP(nn.Module):
    """``depth`` hidden Linear + ReLU layers (``fc1, relu1, ...``) and a linear ``head``."""

    def __init__(self, num_classes: int, hidden: int = 100, depth: int = 2, in_features: int = 40):
        super().__init__()
        self.depth = depth
        width = in_features
        for i in range(1, depth + 1):
            self.add_module(f"fc{i}", nn.Linear(width, hidden))
            self.add_module(f"relu{i}", nn.ReLU())
            width = hidden
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i in range(1, self.depth + 1):
            x = getattr(self, f"relu{i}")(getattr(self, f"fc{i}")(x))
        return self.head(x)


@MODELS.register("mnist1d_cnn")
def mnist1d_cnn(num_classes: int, channels: PosInt = 32, kernel: PosInt = 5, in_length: PosInt = 40) -> nn.Module:
    """The MNIST-1D teacher CNN (about 93-94% test accuracy on the default data)."""
    return MNIST1DCNN(num_classes, channels=channels, kernel=kernel, in_length=in_length)


@MODELS.register("mnist1d_cnn_small")
def mnist1d_cnn_small(num_classes: int, channels: PosInt = 8, kernel: PosInt = 5, in_length: PosInt = 40) -> nn.Module:
    """A narrow student CNN with the teacher's layout."""
    return MNIST1DCNN(num_classes, channels=channels, kernel=kernel, in_length=in_length)


@MODELS.register("mnist1d_mlp")
def mnist1d_mlp(num_classes: int, hidden: PosInt = 100, depth: PosInt = 2, in_features: PosInt = 40) -> nn.Module:
    """A student MLP (about 60-70% test accuracy on the default data)."""
    return MNIST1DMLP(num_classes, hidden=hidden, depth=depth, in_features=in_features)
