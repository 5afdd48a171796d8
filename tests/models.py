"""Model factories the ONNX tests name as ``models:NAME`` (tests/ is on sys.path under pytest)."""

import numpy as np
import torch

from edgemerge.io import write_safetensors
from edgemerge.pipeline import MergeConfig, merge
from edgemerge.runtime import open_bundle


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


def make_tiny_suite(directory, heads=(2, 3, 4), seed=0):
    torch.manual_seed(seed)
    base = Tiny(heads[0])
    base_sd = {k: v for k, v in base.state_dict().items() if not k.startswith("head.")}
    write_safetensors(directory / "base.safetensors", {k: v.numpy() for k, v in base_sd.items()}, checksums=False)
    tasks = {}
    for t, n in enumerate(heads):
        m = Tiny(n)
        m.load_state_dict(base_sd, strict=False)
        with torch.no_grad():
            for p in m.enc.parameters():
                p.add_(0.05 * torch.randn_like(p))
        path = directory / f"t{t}.safetensors"
        write_safetensors(path, {k: v.numpy() for k, v in m.state_dict().items()}, checksums=False)
        tasks[f"t{t}"] = str(path)
    out = directory / "bundle.safetensors"
    merge(MergeConfig(str(directory / "base.safetensors"), tasks, "ties", private=("head.*",)), out)
    return open_bundle(out)


def torch_forward(bundle, task, x):
    w = bundle.task_weights(task)
    m = Tiny(w["head.weight"].shape[0])
    m.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in w.items()})
    with torch.no_grad():
        return m(torch.from_numpy(x)).numpy()


def as_bytes(t) -> bytes:
    """The raw bytes of a torch tensor on any device (bit-exact comparisons)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
