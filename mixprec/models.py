"""Small built-in models and synthetic data for demos, benchmarks and convergence tests: a GPT
(decoder-only transformer) and the token stream of a fixed random Markov chain, whose entropy is
the best loss any model can reach, so "how close to the floor" is measurable."""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Block(nn.Module):
    """A pre-norm transformer block: causal self-attention for the GPT, full for the ViT."""

    def __init__(self, d: int, heads: int, bias: bool = True, causal: bool = True) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.ln_1, self.ln_2 = nn.LayerNorm(d, bias=bias), nn.LayerNorm(d, bias=bias)
        self.attn, self.proj = nn.Linear(d, 3 * d, bias=bias), nn.Linear(d, d, bias=bias)
        self.fc, self.fc_proj = nn.Linear(d, 4 * d, bias=bias), nn.Linear(4 * d, d, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x))))


class GPT(nn.Module):
    """GPT-2's architecture at any size, with an output head of its own (GPT-2 ties it to the
    token embedding): GPT(50257, 1024, 12, 768, 12) is GPT-2 124M plus a 50257 x 768 head."""

    def __init__(self, vocab: int, ctx: int, layers: int, d: int, heads: int, bias: bool = True) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads, bias) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, bias=bias)
        self.head = nn.Linear(d, vocab, bias=False)
        for name, p in self.named_parameters():  # GPT-2's initialisation
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class ViT(nn.Module):
    """A Vision Transformer (ViT-L/16 at 224 x 224 is ViT(224, 16, 24, 1024, 16)): patches by a
    strided convolution, a class token, learned positions, full-attention blocks, a linear head."""

    def __init__(self, image: int, patch: int, layers: int, d: int, heads: int, classes: int = 1000) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, stride=patch)
        tokens = (image // patch) ** 2 + 1
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, tokens, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads, causal=False) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x[:, 0]))


class MarkovText:
    """Token sequences from a fixed random Markov chain over `vocab` tokens, each token having
    `branching` likely successors. entropy() is the lowest achievable cross-entropy (nats)."""

    def __init__(self, vocab: int, branching: int = 4, seed: int = 0, device: str | torch.device = "cpu") -> None:
        gen = torch.Generator().manual_seed(seed)
        logits = torch.full((vocab, vocab), -8.0)
        for row in range(vocab):
            logits[row, torch.randperm(vocab, generator=gen)[:branching]] = torch.randn(branching, generator=gen)
        self.probs = logits.softmax(dim=1).to(device)  # sampled where the model trains: no copies
        self.vocab = vocab
        self.device = torch.device(device)
        self.gen = torch.Generator(device=self.device).manual_seed(seed + 1)

    def entropy(self) -> float:
        probs = self.probs.double().cpu()
        stationary = torch.full((self.vocab,), 1.0 / self.vocab, dtype=torch.float64)
        for _ in range(200):
            stationary = stationary @ probs
        per_row = -(probs * probs.clamp_min(1e-30).log()).sum(dim=1)
        return float((stationary * per_row).sum())

    def batch(self, batch: int, length: int) -> tuple[Tensor, Tensor]:
        """(inputs, targets) on the chain's device: targets are inputs shifted by one token."""
        tokens = torch.empty(batch, length + 1, dtype=torch.long, device=self.device)
        tokens[:, 0] = torch.randint(self.vocab, (batch,), generator=self.gen, device=self.device)
        for i in range(length):
            tokens[:, i + 1] = torch.multinomial(self.probs[tokens[:, i]], 1, generator=self.gen).squeeze(1)
        return tokens[:, :-1], tokens[:, 1:]


class MLP(nn.Module):
    """A GELU multi-layer perceptron classifier: `depth` hidden layers of width `hidden`."""

    def __init__(self, dim: int, hidden: int, classes: int, depth: int = 2) -> None:
        super().__init__()
        widths = [dim] + [hidden] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = F.gelu(layer(x))
        return self.head(x)


class CNN(nn.Module):
    """A small convolutional classifier for images of shape (3, size, size): conv-BN-ReLU stages
    that halve the resolution, global average pooling, a linear head."""

    def __init__(self, classes: int = 10, widths: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        stages, channels = [], 3
        for width in widths:
            stages += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*stages)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class TeacherData:
    """Labelled synthetic inputs: x ~ N(0, 1) of `shape`, labels from a fixed random linear
    teacher, so a model can learn them and the loss falls."""

    def __init__(self, shape: tuple[int, ...], classes: int, seed: int = 0, device: str | torch.device = "cpu") -> None:
        gen = torch.Generator().manual_seed(seed)
        self.shape, self.device = tuple(shape), torch.device(device)
        self.teacher = torch.randn(math.prod(shape), classes, generator=gen).to(self.device)
        self.gen = torch.Generator(device=self.device).manual_seed(seed + 1)

    def batch(self, batch: int) -> tuple[Tensor, Tensor]:
        x = torch.randn((batch, *self.shape), generator=self.gen, device=self.device)
        return x, (x.flatten(1) @ self.teacher).argmax(dim=1)
