"""Small models mixing every supported layer type, for engine-vs-reference tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cross_entropy(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


def squared_error(outputs, targets):
    return 0.5 * (outputs - targets).square().flatten(1).sum(1)


class Mixed(nn.Module):
    """Embedding -> Conv1d('same') -> LayerNorm over tokens; image -> grouped Conv2d (reflect pad,
    stride 2) -> GroupNorm -> PReLU (torch.func fallback); Linear head. The Linear head is called on
    a 3-D input too (tokens as leading dims) and the tanh block shares one Linear twice."""

    def __init__(self, vocab=11, classes=5):
        super().__init__()
        self.embedding = nn.Embedding(vocab, 6, padding_idx=0)
        self.conv1d = nn.Conv1d(6, 8, 3, padding="same", dilation=2)
        self.layer_norm = nn.LayerNorm(8)
        self.shared = nn.Linear(8, 8)
        self.conv2d = nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2, padding_mode="reflect")
        self.group_norm = nn.GroupNorm(2, 4)
        self.prelu = nn.PReLU()
        self.head = nn.Linear(8 + 4 * 4 * 4, classes)

    def forward(self, x):
        tokens = x[:, :7].long().abs() % self.embedding.num_embeddings
        image = x[:, 7:].reshape(-1, 2, 8, 8)
        h = self.conv1d(self.embedding(tokens).transpose(1, 2)).transpose(1, 2)  # [N, T, 8]
        h = torch.tanh(self.shared(torch.tanh(self.shared(self.layer_norm(h)))))  # weight sharing
        g = self.prelu(self.group_norm(self.conv2d(image))).flatten(1)
        return self.head(torch.cat([h.mean(1), g], 1))


def mixed_batch(n: int, dtype=torch.float64):
    x = torch.randn(n, 7 + 2 * 64, dtype=dtype) * 3
    x[:, 0] = 0.0  # one padding token per example
    return x, torch.randint(0, 5, (n,))


class TiedLM(nn.Module):
    """Embedding whose weight is tied to the output projection (as in language models)."""

    def __init__(self, vocab=9, width=4):
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.out = nn.Linear(width, vocab, bias=False)
        self.out.weight = self.embedding.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.mix(self.embedding(tokens))).mean(1))


def conv_net(padding="same", padding_mode="zeros", groups=1, stride=1, dilation=1, kernel_size=3):
    return nn.Sequential(
        nn.Conv2d(
            4,
            6,
            kernel_size,
            stride=stride,
            padding=padding if stride == 1 else 1,
            dilation=dilation,
            groups=groups,
            padding_mode=padding_mode,
        ),
        nn.GroupNorm(3, 6),
        nn.ReLU(inplace=True),  # in-place after a captured layer must not corrupt its gradient
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 3),
    )
