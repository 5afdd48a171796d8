"""Repair a task's rebuilt model through its norm layers (codec key ``repair=norm``).

A lossy codec's θ̂_t moves every layer's activations a little, and the errors add up layer after
layer. A norm layer's affine params (γ, β) can undo the drift at its output: after the layer,
each channel of θ̂_t's model is shifted and scaled so that its mean and variance on calibration
inputs are θ_t's, ``γ' = γ·r`` and ``β' = (β − μ̂)·r + μ`` with ``r = σ / σ̂``. That is REPAIR
(Jordan et al., "REPAIR: REnormalizing Permuted Activations for Interpolation Repair", ICLR 2023)
folded into the params the codec stores: the file and every runtime's rebuild rule stay as they
are, only the stored values of those params change (a delta's codes; for tall, tswitch and emr,
which store no norm param element by element, F16 correction entries where the re-fit moves one). Layers are fit in the order
the forward pass reaches them, each on the model whose earlier layers are already fit and stored
(``refit`` rounds each one as the codec stores it), so the later ones correct what the rounding left.

Needs torch, a model and inputs: the encoder's side, never the device's::

    from edgemerge.repair import norm_repair
    repair = norm_repair(build=lambda task, weights: my_model(weights), inputs=lambda task: my_batches)
    encode_bundle(v1, ckpts, {t: parse_codec("tswitch:density=0.3,repair=norm") for t in ckpts},
                  "out.safetensors", repair=repair)

Calibration inputs need no labels; a few hundred items of the task's training inputs are enough
(the per-channel statistics of each layer's output average over every position of every item).
Padded batches pass ``positions=`` (the attention mask), so that pad tokens do not count.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .errors import ConfigError

TINY = 1e-12  # a channel whose rebuilt variance is at most this, or DEAD × θ_t's (dead in θ̂_t), keeps its γ:
DEAD = 1e-8   # r would only amplify rounding noise


Positions = Callable[[tuple], np.ndarray]  # a batch -> 1 where a position counts, 0 where not (padding)


class _Reached(Exception):
    """Raised by the hook of the layer being fit: the rest of the forward pass is not needed."""


def _norm_modules(torch: Any, model: Any, refit_names: frozenset, resolve: Callable[[str], str]) -> list[tuple[str, Any, int]]:
    """(name, module, channel dims from the end: 0 for BatchNorm / GroupNorm's dim 1) of every norm
    layer with an affine weight and bias that the codec stores element by element."""
    nn = torch.nn
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
            tail = 0
        elif isinstance(m, nn.LayerNorm):
            tail = len(m.normalized_shape)
        else:
            continue
        if getattr(m, "weight", None) is None or getattr(m, "bias", None) is None:
            continue
        if resolve(f"{name}.weight") in refit_names and resolve(f"{name}.bias") in refit_names:
            out.append((name, m, tail))
    return out


def _stats(torch: Any, model: Any, layers: Sequence[tuple[str, Any, int]], batches: list[tuple],
           stop: str | None = None, order: list[str] | None = None, calls: dict[str, int] | None = None,
           positions: Positions | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per layer, the mean and variance (float64) of each channel of its output over the batches
    (over the positions ``positions(batch)`` marks, where given); ``stop``: the forward pass ends at
    that layer (its first call); ``order``: filled with the layers as first reached; ``calls``: with
    how many times each ran."""
    acc: dict[str, list] = {}
    hooks = []
    marked = None  # the position weights of the batch being run (the hooks read it)

    def hook_for(name: str, tail: int):
        def hook(module, args, output):
            x = output.detach().double()
            if not tail:  # BatchNorm / GroupNorm: channels on dim 1, moved last
                x, tail_ = x.movedim(1, -1), 1
            else:         # LayerNorm: the trailing normalized dims are the channels
                tail_ = tail
            where = tuple(x.shape[:x.dim() - tail_])
            x = x.reshape(-1, *x.shape[x.dim() - tail_:])
            s = acc.setdefault(name, [0.0, 0.0, 0.0])
            if order is not None and name not in order:
                order.append(name)
            if calls is not None:
                calls[name] = calls.get(name, 0) + 1
            if marked is None:
                s[0] += x.shape[0]
                s[1] = s[1] + x.sum(0)
                s[2] = s[2] + (x * x).sum(0)
            else:
                w = marked
                if tuple(w.shape) != where:
                    raise ConfigError(f"repair=norm: layer {name!r} outputs {tuple(output.shape)}, whose positions are "
                                      f"{list(where)}, but positions(batch) marked {list(w.shape)}: give a mask of the "
                                      "positions of the norm layers' outputs (a text model's attention mask, [batch, tokens])")
                w = w.reshape(-1, *([1] * tail_))
                s[0] += float(w.sum())
                s[1] = s[1] + (w * x).sum(0)
                s[2] = s[2] + (w * x * x).sum(0)
            if name == stop:
                raise _Reached
        return hook

    for name, m, tail in layers:
        hooks.append(m.register_forward_hook(hook_for(name, tail)))
    try:
        with torch.inference_mode():
            for inputs in batches:
                if positions is not None:
                    marked = torch.from_numpy(np.asarray(positions(inputs), np.float64))
                try:
                    model(*(torch.from_numpy(np.ascontiguousarray(x)) for x in inputs))
                except _Reached:
                    pass
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, (n, s1, s2) in acc.items():
        if n <= 0:
            raise ConfigError(f"repair=norm: positions(batch) marked no position of layer {name!r} in any calibration batch")
        mean = (s1 / n).numpy()
        out[name] = (mean, np.maximum((s2 / n).numpy() - mean * mean, 0.0))
    return out


def norm_repair(build: Callable[[str, Mapping[str, np.ndarray]], Any], inputs: Callable[[str], Iterable[tuple]],
                positions: Positions | None = None):
    """A repair for ``encode_bundle(repair=...)``: ``build(task, weights)`` returns the task's torch
    model with that state dict loaded, in eval mode; ``inputs(task)`` its calibration batches, each
    a tuple of numpy arrays (the model's positional inputs). Re-fits every BatchNorm, GroupNorm and
    LayerNorm layer whose affine weight and bias the codec stores element by element; layers the
    calibration inputs never reach, and layers a forward pass runs more than once, keep their
    values. ``positions(batch)``, where given, marks the positions that count (1) and those that do
    not (0, padding) as an array of the norm layers' position dims: a text model's attention mask
    [batch, tokens] for its LayerNorms' [batch, tokens, hidden] outputs. Without it every position
    counts: padded batches would fit each layer to statistics of pad tokens that no pooled output
    reads. One forward pass for θ_t's statistics, then one (up to the layer) per layer fit."""
    try:
        import torch
    except ImportError:
        raise ConfigError("repair=norm runs the model: pip install torch") from None

    def repair(task: str, teacher: Mapping[str, np.ndarray], student: Mapping[str, np.ndarray], refit) -> dict[str, np.ndarray]:
        batches = [tuple(b) for b in inputs(task)]
        if not batches:
            raise ConfigError(f"task {task!r}: repair=norm has no calibration inputs (inputs({task!r}) gave no batch)")
        ref, model = build(task, teacher), build(task, student)
        resolve = refit.bundle.resolve
        layers = _norm_modules(torch, model, refit.names, resolve)
        if not layers:
            raise ConfigError(f"task {task!r}: the model has no BatchNorm, GroupNorm or LayerNorm layer whose weight and bias "
                              "the codec stores element by element: repair=norm has nothing to re-fit")
        order: list[str] = []  # the layers as θ_t's forward pass first reaches them
        calls: dict[str, int] = {}
        want = _stats(torch, ref, _norm_modules(torch, ref, refit.names, resolve), batches, order=order, calls=calls,
                      positions=positions)
        # a layer run more than once a pass (one module shared by several places) has one γ, β for outputs of several
        # statistics, and the pass that fits it stops at its first call: it keeps its values
        order = [n for n in order if calls[n] == len(batches)]
        fitted: dict[str, np.ndarray] = {}
        mods = {n: (m, t) for n, m, t in layers}
        for name in order:
            m, tail = mods[name]
            mean_s, var_s = _stats(torch, model, [(name, m, tail)], batches, stop=name, positions=positions)[name]
            mean_t, var_t = want[name]
            live = var_s > np.maximum(TINY, DEAD * var_t)
            r = np.where(live, np.sqrt(var_t / np.where(live, var_s, 1.0)), 1.0)
            gamma = m.weight.detach().double().numpy()
            beta = m.bias.detach().double().numpy()
            new = {"weight": gamma * r.reshape(gamma.shape), "bias": ((beta - mean_s.reshape(beta.shape)) * r.reshape(beta.shape)
                                                                      + mean_t.reshape(beta.shape))}
            for key, value in new.items():
                full = f"{name}.{key}"
                stored = refit(full, value.astype(np.float32))
                fitted[full] = stored
                with torch.no_grad():
                    getattr(m, key).copy_(torch.from_numpy(stored.astype(np.float32)))  # exact: stored is in the param's dtype
        return fitted

    return repair
