"""A ViT-B/16-sized image classifier (≈ 86 M parameters) built from plain ops, for benchmarks.

Factory for ``edgemerge export onnx --model vit:factory`` (with bench/ on sys.path).
"""

from __future__ import annotations

import torch

DIM, DEPTH, HEADS, MLP, PATCH, IMAGE = 768, 12, 12, 3072, 16, 224


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(DIM), torch.nn.LayerNorm(DIM)
        self.qkv, self.proj = torch.nn.Linear(DIM, 3 * DIM), torch.nn.Linear(DIM, DIM)
        self.fc1, self.fc2 = torch.nn.Linear(DIM, MLP), torch.nn.Linear(MLP, DIM)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) * (DIM // HEADS) ** -0.5, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, n, DIM))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class ViT(torch.nn.Module):
    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.patch = torch.nn.Conv2d(3, DIM, PATCH, PATCH)
        self.cls = torch.nn.Parameter(torch.zeros(1, 1, DIM))
        self.pos = torch.nn.Parameter(torch.zeros(1, (IMAGE // PATCH) ** 2 + 1, DIM))
        self.blocks = torch.nn.ModuleList(Block() for _ in range(DEPTH))
        self.norm = torch.nn.LayerNorm(DIM)
        self.head = torch.nn.Linear(DIM, n_classes)

    def forward(self, img):
        x = self.patch(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


def factory(task: str, shapes: dict):
    return ViT(shapes["head.weight"][0]), (torch.zeros(1, 3, IMAGE, IMAGE),)
