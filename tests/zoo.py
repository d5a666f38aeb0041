"""Small models and data the tests build themselves: traced and scripted, one of each shape the
engines must handle, and scikit-learn's bundled digits (upsampled to 32×32) as real data."""

from __future__ import annotations

import copy
import io
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class SequentialCNN(nn.Module):
    """conv → BN → ReLU → pool → conv → BN → ReLU → pool → flatten → linear → linear."""

    def __init__(self, classes: int = 10, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc1 = nn.Linear(2 * width * 8 * 8, 64)
        self.fc2 = nn.Linear(64, classes)

    def forward(self, x):
        x = torch.flatten(self.features(x), 1)
        return self.fc2(F.relu(self.fc1(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)


class TinyResNet(nn.Module):
    """ResNet-style: stem, residual blocks with downsample branches, global pool, classifier."""

    def __init__(self, classes: int = 10, width: int = 16, in_channels: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 2 * width))
        self.layer3 = nn.Sequential(BasicBlock(2 * width, 4 * width, 2), BasicBlock(4 * width, 4 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class InceptionNet(nn.Module):
    """An inception-style block whose branches are joined with `cat`."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(16, 8, 1), nn.ReLU())
        self.b3 = nn.Sequential(nn.Conv2d(16, 12, 3, padding=1), nn.ReLU())
        self.b5 = nn.Sequential(nn.Conv2d(16, 4, 5, padding=2), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(24, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.b1(x), self.b3(x), self.b5(x)], dim=1)
        x = F.adaptive_avg_pool2d(self.mix(x), 1)
        return self.fc(torch.flatten(x, 1))


class MobileNetStyle(nn.Module):
    """Depthwise-separable blocks (depthwise 3×3 with groups=channels, then pointwise 1×1)."""

    def __init__(self, classes: int = 10):
        super().__init__()

        def separable(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                nn.BatchNorm2d(cin),
                nn.ReLU6(),
                nn.Conv2d(cin, cout, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU6(),
            )

        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(separable(16, 32, 2), separable(32, 64, 2), separable(64, 64, 1))
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.blocks(self.stem(x)).mean(dim=(2, 3))
        return self.fc(x)


class TransformerMLP(nn.Module):
    """A transformer-style MLP block: linear → GELU → linear with a residual, then a head."""

    def __init__(self, dim: int = 64, hidden: int = 256, classes: int = 10):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = x + self.down(F.gelu(self.up(self.norm(x))))
        return self.head(x)


class LoopIfNet(nn.Module):
    """Control flow that only scripting keeps: a data-dependent `if` and a loop."""

    def __init__(self, classes: int = 10, steps: int = 2):
        super().__init__()
        self.steps = steps
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.body = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        for _ in range(self.steps):
            x = F.relu(self.body(x)) + x
        if bool(x.mean() > 100.0):
            x = x * 0.5
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class FixedViewNet(nn.Module):
    """Reshapes to a constant size (`view(-1, 4096)`): channel pruning must skip that group."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(4096, classes)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv(x))))
        return self.fc(x.view(-1, 4096))


class LSTMClassifier(nn.Module):
    """Token ids → embedding → 2-layer LSTM → linear head (scripted)."""

    def __init__(self, vocab: int = 1000, dim: int = 64, hidden: int = 128, classes: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out[:, -1])


class TinyEncoder(nn.Module):
    """A small transformer encoder over token embeddings, mean-pooled to an embedding output."""

    def __init__(self, vocab: int = 1000, dim: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embed(tokens)).mean(dim=1)


class Spinner(nn.Module):
    """Busy for a while: `rounds` tanh of a tiny input (about 1 µs each), for jobs that must run long
    enough to be killed or waited behind."""

    def __init__(self, rounds: int):
        super().__init__()
        self.rounds = rounds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for _ in range(self.rounds):
            y = torch.tanh(y)
        return y


class SlowCheck(nn.Module):
    """A linear layer that is slow only on a batch of two, the samples the pipeline checks a step's
    output on: each step takes `rounds` µs or so, while measuring (batch 1, evaluation in 64s) stays
    fast. For jobs that must be caught, and killed, inside a given step."""

    def __init__(self, rounds: int):
        super().__init__()
        self.rounds = rounds
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        busy = x[:1, :1]
        if x.shape[0] == 2:
            for _ in range(self.rounds):
                busy = torch.tanh(busy)
        return self.linear(x) + busy * 0


class TwoInputEncoder(nn.Module):
    """A MiniLM-shaped miniature: token ids and an attention mask, masked mean pooling."""

    def __init__(self, vocab: int = 500, dim: int = 64, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embed(ids))
        weights = mask.unsqueeze(-1).float()
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return F.normalize(self.out(pooled), dim=-1)


def round_trip(model: torch.jit.ScriptModule) -> tuple[torch.jit.ScriptModule, int]:
    """Save and reload a TorchScript module as a user would; returns (reloaded, file size)."""
    buffer = io.BytesIO()
    torch.jit.save(model, buffer)
    size = buffer.tell()
    buffer.seek(0)
    return torch.jit.load(buffer), size


def trace(model: nn.Module, *example: torch.Tensor) -> torch.jit.ScriptModule:
    """Trace an eager model in eval mode."""
    return torch.jit.trace(model.eval(), example, check_trace=False)


def script(model: nn.Module) -> torch.jit.ScriptModule:
    """Script an eager model in eval mode (keeps control flow)."""
    try:
        return torch.jit.script(model.eval())
    except RuntimeError as exc:
        # torch.jit._builtins keys builtins by id(); when torch refreshes an op packet the old op
        # can be freed while its id stays registered, and a module attribute later allocated at
        # that address "is" a builtin ("builtin cannot be used as a value"). Seen about once in
        # ten full runs; a deep copy gives the attributes new addresses.
        if "builtin cannot be used as a value" not in str(exc):
            raise
        return torch.jit.script(copy.deepcopy(model).eval())


@lru_cache(maxsize=1)
def digits(size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8×8 digits, upsampled to `size`×`size`, split 1500 / 297.

    Returns (x_train, y_train, x_test, y_test); x is float32 [N, 1, size, size] in [0, 1].
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=generator)
    x, y = x[order], y[order]
    return x[:1500], y[:1500], x[1500:], y[1500:]


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int = 3,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> nn.Module:
    """A few epochs of Adam on hard labels; returns the model in eval mode."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y))
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    return model.eval()


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1]."""
    with torch.inference_mode():
        return float((model(x).argmax(dim=1) == y).float().mean())
