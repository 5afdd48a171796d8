"""Model factories the ONNX tests name as ``models:NAME`` (tests/ is on sys.path under pytest)."""

import torch


class Tiny(torch.nn.Module):
    """Two hidden layers and a task head whose size comes from the weights being loaded."""

    def __init__(self, n_classes: int):
        super().__init__()
        self.enc = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.Tanh())
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, n_classes)

    def forward(self, x):
        return self.head(self.norm(self.enc(x)))


def tiny(task, shapes):
    return Tiny(shapes["head.weight"][0]), (torch.zeros(2, 8),)


class Twin(torch.nn.Module):
    """Two LayerNorms and a bias that are byte-identical in θ0 (ones, ones, zeros)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.LayerNorm(8), torch.nn.LayerNorm(8)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.b(torch.tanh(self.a(x))))


def twin(task):
    return Twin(), (torch.zeros(2, 8),)
