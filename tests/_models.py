"""Small models covering the layer kinds and model shapes gram() must handle."""

import torch
from torch import nn


def mlp(k: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.GELU(), nn.Linear(8, k))


def cnn(k: int = 4) -> nn.Module:
    # stride, padding (incl. 'same' and a non-zero padding mode), dilation, groups, BatchNorm.
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(inplace=True),
        nn.Conv2d(6, 6, 3, padding="same", dilation=2, groups=3, padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv2d(6, 4, 2, stride=1, groups=2, bias=False),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, k),
    )


def cnn_input(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 12, 12)


class TinyTransformer(nn.Module):
    def __init__(self, d: int = 16, k: int = 3):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=24, dropout=0.1, batch_first=True)
        self.head = nn.Linear(d, k)

    def forward(self, x):
        return self.head(self.encoder(x).mean(dim=1))


class SharedLinear(nn.Module):
    """One Linear applied twice: its weight's gradient sums both uses."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(5, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


class TiedHead(nn.Module):
    """An embedding tied to the output projection (the same Parameter registered twice)."""

    def __init__(self, vocab: int = 11, d: int = 6):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.proj = nn.Linear(d, vocab, bias=False)
        self.proj.weight = self.embed.weight

    def forward(self, tokens):
        return self.proj(torch.tanh(self.mix(self.embed(tokens).mean(dim=1))))


def frozen_mlp() -> nn.Module:
    model = mlp()
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    return model


def resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=10)
