"""``capture_streaming`` hands over exactly what ``capture`` records, module by module during
the backward: reused modules, in-place operations after a layer, token-id inputs and layers
the input gradient never reaches (a parameter-only branch) included."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from influx.grads.capture import capture, capture_streaming


def loss_fn(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="none")


class Branchy(nn.Module):
    """A conv + GroupNorm residual block (in-place add and ReLU), a Linear used twice, and a
    Linear fed only by a parameter (its output never depends on the inputs)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.shared = nn.Linear(16, 16)
        self.bias_net = nn.Linear(3, 16)
        self.seed = nn.Parameter(torch.randn(1, 3))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        out = self.norm(self.conv(x))
        out += x[:, :1].expand_as(out)  # in place on the GroupNorm's output
        out = torch.relu_(out)
        h = F.adaptive_avg_pool2d(out, 2).flatten(1)
        h = self.shared(torch.tanh(self.shared(h)))
        # one row per example, none of them depending on the inputs
        return self.head(h + self.bias_net(self.seed.expand(x.shape[0], 3)))


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(self.embed(ids).mean(1))


def _compare(model, inputs, targets):
    modules = {name: m for name, m in model.named_modules() if name and not list(m.children())}
    params = list(model.parameters())
    _, expected = capture(model, loss_fn, inputs, targets, modules, params)
    order, got = [], {}

    def on_module(name, calls):
        order.append(name)
        got[name] = calls

    losses = capture_streaming(model, loss_fn, inputs, targets, modules, on_module, params)
    torch.testing.assert_close(losses, loss_fn(model(inputs), targets), rtol=0, atol=0)
    called = {name for name, calls in expected.items() if calls}
    assert set(got) == called and len(order) == len(called)  # each module handed over once
    for name in called:
        assert len(got[name]) == len(expected[name])
        for mine, theirs in zip(got[name], expected[name], strict=True):
            for a, b in zip(mine.args, theirs.args, strict=True):
                if isinstance(a, torch.Tensor):
                    assert torch.equal(a, b)
            torch.testing.assert_close(mine.grad_output, theirs.grad_output, rtol=1e-12, atol=0)
    return order


def test_streaming_capture_matches_capture_on_a_branchy_net():
    torch.manual_seed(0)
    model = Branchy().double()
    x, y = torch.randn(6, 3, 4, 4, dtype=torch.float64), torch.randint(0, 5, (6,))
    order = _compare(model, x, y)
    # Handed over during the backward, so in reverse order of the forward (head first); the
    # parameter-only branch comes last, from the second capture.
    assert order.index("head") < order.index("shared") < order.index("norm") < order.index("conv")
    assert order[-1] == "bias_net"


def test_streaming_capture_with_token_ids():
    torch.manual_seed(1)
    model = Tokens().double()
    ids, y = torch.randint(0, 11, (5, 7)), torch.randint(0, 3, (5,))
    assert _compare(model, ids, y) == ["head", "embed"]
