"""Switch tasks inside a torch model: ``TorchTaskModel`` (torch is imported when one is made).

>>> m = TorchTaskModel(open_bundle("tasks.safetensors"), model.cuda())   # doctest: +SKIP
>>> m.switch("sst2"); logits = m(input_ids, attention_mask)               # doctest: +SKIP

``switch`` rewrites the model's parameters in place as θ_t = θ0 + m_t ⊙ τ_MTL (absolute weights,
never deltas). Kernels (``kernel=``):

- ``"numpy"`` (default on CPU): the CPU kernel of ``kernel.py`` (C, numba or numpy) writes straight into the
  parameters' storage from the memory-mapped bundle; nothing but θ_t is resident.
- ``"triton"`` (default on CUDA when Triton imports) and ``"torch"`` (any device): θ0, τ_MTL and every
  task's packed masks are resident on the device in a flat layout (:class:`FlatWeights`) and the
  model's parameters become views into one flat output buffer, so a switch is one kernel launch per
  dtype and hands nothing over. Triton does it in one fused pass; ``"torch"`` unpacks the bits and
  selects with torch ops, in blocks.

On CUDA a switch synchronizes the device before writing (no kernel of any stream may still read
the old weights) and after (so the time returned is real and every stream sees the new weights).
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import numpy as np

from ..errors import BackendError, ConfigError, FormatError
from .bundle import Bundle, open_bundle
from .session import Switchable

KERNELS = ("auto", "numpy", "torch", "triton")
ALIGN = 128  # elements; every parameter's slice of a flat buffer starts here (a multiple of 8 bits)
BLOCK = 1 << 24  # elements per block of the torch-ops kernel (bounds its temporaries)
_NUMPY_OK = ("F32", "F16", "BF16", "F64")


def _torch():
    try:
        import torch
    except ImportError:
        raise BackendError("the torch backend needs torch: pip install 'edgemerge[torch]'") from None
    return torch


def torch_dtype(name: str):
    torch = _torch()
    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
    if name not in table:
        raise FormatError(f"dtype {name} has no torch equivalent")
    return table[name]


def to_torch(arr: np.ndarray, dtype: str, device) -> Any:
    """A bundle view (read-only, possibly bfloat16 via ml_dtypes) as a torch tensor on ``device``."""
    torch = _torch()
    flat = np.ascontiguousarray(arr).reshape(np.shape(arr))  # ascontiguousarray makes 0-d arrays 1-d
    if dtype == "BF16":  # torch does not know ml_dtypes' bfloat16: move the bits as int16
        flat = flat.view(np.int16)
    with warnings.catch_warnings():  # read-only mmap: torch warns, we only ever read from it
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(flat)
    if dtype == "BF16":
        t = t.view(torch.bfloat16)
    return t.to(device, copy=True)


def tied_names(state: dict) -> dict[str, str]:
    """alias -> canonical for tensors that are one tensor under two names (same storage, offset,
    shape, strides and dtype), as torch.save keeps a tied embedding / output layer. The first
    name in the state dict's order is canonical."""
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for k, t in state.items():
        if t.device.type == "meta" or t.numel() == 0:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if ident in first:
            aliases[str(k)] = first[ident]
        else:
            first[ident] = str(k)
    return aliases


def numpy_view(t) -> np.ndarray:
    """A numpy array sharing a CPU tensor's storage (bfloat16 through its int16 bits, as ml_dtypes)."""
    torch = _torch()
    t = t.detach()
    if t.dtype == torch.bfloat16:
        from .dtypes import DTYPES

        return t.view(torch.int16).numpy().view(DTYPES["BF16"])
    return t.numpy()


def apply_mask_torch(base, vector, packed, out, block: int = BLOCK, scale: float | None = None) -> None:
    """The select kernel with torch ops: out = bit ? f32(base) + f32(vector) : f32(base), flat tensors;
    with ``scale`` (scaled tall) the vector is f32(scale · f32(vector)) first."""
    torch = _torch()
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=base.device)
    c = None if scale is None else torch.tensor(float(np.float32(scale)), dtype=torch.float32, device=base.device)
    n = base.numel()
    for s in range(0, n, block):  # block is a multiple of 8: each block starts on a mask byte
        e = min(n, s + block)
        bits = ((packed[s // 8 : (e + 7) // 8].unsqueeze(1) >> shifts) & 1).reshape(-1)[: e - s].bool()
        b, v = base[s:e].float(), vector[s:e].float()
        out[s:e].copy_(torch.where(bits, b + (v if c is None else c * v), b))


def apply_sign_torch(base, presence, sign, scale, out, block: int = BLOCK) -> None:
    """The tswitch rule with torch ops: out = p ? f32(base) + (s ? -c : c) : f32(base), flat tensors."""
    torch = _torch()
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=base.device)
    c = torch.tensor(float(np.float32(scale)), dtype=torch.float32, device=base.device)
    n = base.numel()
    for s in range(0, n, block):
        e = min(n, s + block)
        p = ((presence[s // 8 : (e + 7) // 8].unsqueeze(1) >> shifts) & 1).reshape(-1)[: e - s].bool()
        sg = ((sign[s // 8 : (e + 7) // 8].unsqueeze(1) >> shifts) & 1).reshape(-1)[: e - s].bool()
        b = base[s:e].float()
        out[s:e].copy_(torch.where(p, b + torch.where(sg, -c, c), b))


def triton_available(device) -> bool:
    if getattr(device, "type", str(device)) != "cuda":
        return False
    try:
        from . import triton_kernel  # noqa: F401
    except ImportError:
        return False
    return True


class FlatWeights:
    """θ0, τ_MTL and every task's codec data resident on one device, grouped by dtype into flat
    buffers: TALL masks, tswitch presence/sign planes (+ one scale per param), delta vectors, and
    correction positions/values.

    Param p of a group occupies ``[offset, offset + numel)`` of the group's buffers; offsets are
    multiples of ``ALIGN``, so its mask bits start at byte ``offset // 8`` of the task's mask buffer.
    Padding elements hold zeros in θ0 and τ and zero bits, and so stay zero in the output.
    """

    def __init__(self, bundle: Bundle, names: list[str], device, kernel: str):
        torch = _torch()
        self.kernel, self.device = kernel, device
        self.groups: dict[str, dict[str, Any]] = {}
        params = {p.name: p for p in bundle.params}
        for name in names:
            p = params[name]
            g = self.groups.setdefault(p.dtype, {"offsets": {}, "size": 0})
            g["offsets"][name] = g["size"]
            g["size"] += -(-p.numel // ALIGN) * ALIGN
        self.codecs = bundle.codecs
        planes = lambda size: torch.zeros(size // 8, dtype=torch.uint8, device=device)  # noqa: E731
        for dtype, g in self.groups.items():
            size = g["size"]
            g["base"] = torch.zeros(size, dtype=torch_dtype(dtype), device=device)
            g["out"] = torch.zeros(size, dtype=torch_dtype(dtype), device=device)
            if bundle.shared:
                g["vector"] = torch.zeros(size, dtype=torch_dtype(bundle.vector_dtype), device=device)
            if bundle.elected:  # EMR's elected vector
                g["elected"] = torch.zeros(size, dtype=torch_dtype(bundle.vector_dtype), device=device)
            g["masks"] = {t: planes(size) for t, c in self.codecs.items() if c.name != "delta"}
            g["signs"] = {t: planes(size) for t, c in self.codecs.items() if c.name == "tswitch"}
            g["scales"] = {t: {} for t, c in self.codecs.items() if c.has_scales}
            quant = {t for t, c in self.codecs.items() if c.name == "delta" and c.qscale_rows}
            g["deltas"] = {t: torch.zeros(size, dtype=torch.int8 if t in quant else torch_dtype(c.dtype), device=device)
                           for t, c in self.codecs.items() if c.name == "delta"}
            g["qscales"] = {t: {} for t in quant}
            fixes: dict[str, tuple[list, list]] = {t: ([], []) for t, c in self.codecs.items() if c.correction}
            for name, o in g["offsets"].items():
                n = params[name].numel
                g["base"][o : o + n] = to_torch(bundle.base(name).reshape(-1), dtype, device)
                if bundle.shared:
                    g["vector"][o : o + n] = to_torch(bundle.vector(name).reshape(-1), bundle.vector_dtype, device)
                if bundle.elected:
                    g["elected"][o : o + n] = to_torch(bundle.elected_vector(name).reshape(-1), bundle.vector_dtype, device)
                for t, c in self.codecs.items():
                    r = bundle.recipe(t, name)
                    if c.name != "delta":
                        m = g["masks"][t][o // 8 : (o + n + 7) // 8]
                        if r.presence is None:  # a bundle without masks: every task uses all of τ
                            m.fill_(0xFF)
                        else:
                            m.copy_(to_torch(r.presence, "U8", device))
                    if c.has_scales:
                        g["scales"][t][name] = r.scale
                    if c.name == "tswitch":
                        g["signs"][t][o // 8 : (o + n + 7) // 8].copy_(to_torch(r.sign, "U8", device))
                    elif c.name == "delta" and t in quant:
                        g["deltas"][t][o : o + n] = torch.from_numpy(np.ascontiguousarray(r.codes())).to(device)
                        g["qscales"][t][name] = (torch.from_numpy(r.qscale.copy()).to(device), r.qgrid)
                    elif c.name == "delta":
                        g["deltas"][t][o : o + n] = to_torch(r.delta, c.dtype, device)
                    if c.correction:
                        fixes[t][0].append(r.fix_index + o)
                        fixes[t][1].append(r.fix_value)
            g["fixes"] = {t: (torch.from_numpy(np.concatenate(i)).to(device), torch.from_numpy(np.concatenate(v)).to(device))
                          for t, (i, v) in fixes.items()}
        self.shapes = {n: params[n].shape for n in names}

    def view(self, name: str):
        """The slice of the output buffer that holds parameter ``name`` (its shape)."""
        for g in self.groups.values():
            if name in g["offsets"]:
                o = g["offsets"][name]
                return g["out"][o : o + math.prod(self.shapes[name])].view(self.shapes[name])
        raise KeyError(name)

    def apply(self, task: str) -> None:
        codec = self.codecs[task]
        for g in self.groups.values():
            if codec.name == "tswitch":  # torch ops per param (one scale each); no Triton kernel yet
                for name, o in g["offsets"].items():
                    e = o + math.prod(self.shapes[name])
                    apply_sign_torch(g["base"][o:e], g["masks"][task][o // 8 :], g["signs"][task][o // 8 :],
                                     g["scales"][task][name], g["out"][o:e])
            elif codec.name == "delta" and task in g["qscales"]:  # codes × row scale, per param
                for name, (scale, (a, b, _)) in g["qscales"][task].items():
                    o = g["offsets"][name]
                    delta = (g["deltas"][task][o : o + a * b].float().view(a, b) * scale[:, None]).reshape(-1)
                    g["out"][o : o + a * b].copy_(g["base"][o : o + a * b].float() + delta)
            elif codec.name == "delta":
                apply_mask_torch(g["base"], g["deltas"][task], _all_set(g), g["out"])
            elif codec.scale == "ls" or codec.name == "emr":  # torch ops per param (one scale each)
                vector = g["elected" if codec.name == "emr" else "vector"]
                for name, o in g["offsets"].items():
                    e = o + math.prod(self.shapes[name])
                    apply_mask_torch(g["base"][o:e], vector[o:e], g["masks"][task][o // 8 :], g["out"][o:e],
                                     scale=g["scales"][task][name])
            elif self.kernel == "triton":
                from .triton_kernel import apply_mask_triton

                apply_mask_triton(g["base"], g["vector"], g["masks"][task], g["out"])
            else:
                apply_mask_torch(g["base"], g["vector"], g["masks"][task], g["out"])
            if task in g["fixes"]:
                idx, val = g["fixes"][task]
                g["out"][idx] = (g["out"][idx].float() + val).to(g["out"].dtype)

    @property
    def nbytes(self) -> int:
        def tensors(g):
            yield from (g[k] for k in ("base", "vector", "elected", "out") if k in g)
            for k in ("masks", "signs", "deltas"):
                yield from g[k].values()
            for pair in g["fixes"].values():
                yield from pair
        return sum(t.numel() * t.element_size() for g in self.groups.values() for t in tensors(g))


def _all_set(g):
    """A mask buffer with every bit set (the delta rule is the select with every bit on)."""
    if "all" not in g:
        g["all"] = _torch().full((g["size"] // 8,), 0xFF, dtype=_torch().uint8, device=g["base"].device)
    return g["all"]


def _set_tensor(model, name: str, value) -> None:
    """Rebind parameter or buffer ``name`` of ``model`` to ``value`` (same object for parameters)."""
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters:
        mod._parameters[attr].data = value
    else:
        mod._buffers[attr] = value


def _tie(model, name: str, tensor) -> None:
    """Make ``name`` the very same Parameter/buffer object as ``tensor`` (as tie_weights does), so
    any later rebinding of one is seen by the other."""
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    (mod._parameters if attr in mod._parameters else mod._buffers)[attr] = tensor


class TorchTaskModel(Switchable):
    """A torch model plus a bundle; ``switch(task)`` then call it like the model."""

    def __init__(self, bundle: Bundle | str, model, kernel: str = "auto", strict: bool = True):
        torch = _torch()
        if kernel not in KERNELS:
            raise ConfigError(f"unknown kernel {kernel!r}; valid: {', '.join(KERNELS)}")
        self.bundle = open_bundle(bundle) if isinstance(bundle, str) else bundle
        self.model = model.eval()
        state = model.state_dict(keep_vars=True)
        self.device = next(iter(state.values())).device if state else torch.device("cpu")
        for alias, target in self.bundle.aliases.items():  # one tensor in the bundle: make it one here
            if alias in state and target in state and tied_names({target: state[target], alias: state[alias]}) == {}:
                _tie(model, alias, state[target])
        state = model.state_dict(keep_vars=True)
        self._check_model(state, strict)
        merged = [p.name for p in self.bundle.params if p.role == "merged"]
        numpy_ok = self.device.type == "cpu" and all(self.bundle.param(n).dtype in _NUMPY_OK for n in merged)
        if kernel == "auto":
            kernel = "triton" if triton_available(self.device) else "numpy" if numpy_ok else "torch"
        if kernel == "triton" and not triton_available(self.device):
            raise BackendError(f"kernel 'triton' needs a CUDA device and triton; the model is on {self.device}")
        if kernel == "numpy" and not numpy_ok:
            raise BackendError(f"kernel 'numpy' needs a CPU model with {'/'.join(_NUMPY_OK)} weights; use kernel='torch'")
        self.kernel = kernel
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            for p in self.bundle.params:
                if p.role == "carried":
                    state[p.name].copy_(to_torch(self.bundle.base(p.name), p.dtype, self.device))
        self._flat = FlatWeights(self.bundle, merged, self.device, kernel) if kernel != "numpy" else None
        if self._flat is not None:
            for n in merged:
                _set_tensor(model, n, self._flat.view(n))
        self._outs = {n: numpy_view(state[n]) for n in merged} if self._flat is None else {}
        self._plans: dict[str, Any] = {}  # 'numpy' kernel: per task, built at its first switch
        self._private = {t: {k: to_torch(v, self.bundle.private_dtype(t, k), self.device)
                             for k, v in self.bundle.private(t).items()} for t in self.bundle.tasks}
        self._init_switching()

    def _check_model(self, state: dict, strict: bool) -> None:
        """Model tensors vs the bundle: one error listing every mismatch."""
        problems = []
        for p in self.bundle.params:
            t = state.get(p.name)
            if t is None:
                problems.append(f"bundle parameter {p.name!r} is not in the model")
            elif tuple(t.shape) != p.shape or t.dtype != torch_dtype(p.dtype):
                problems.append(f"{p.name!r}: model has {t.dtype} {list(t.shape)}, bundle has {p.dtype} {list(p.shape)}")
            elif t.device != self.device:
                problems.append(f"{p.name!r} is on {t.device}, the model's first tensor on {self.device}: move the whole model")
        private = {k for keys in self.bundle.private_keys.values() for k in keys}
        problems += [f"task tensor {k!r} is not in the model" for k in sorted(private - set(state))]
        if strict:
            ties = tied_names(state)  # a model tensor tied to a covered one is rewritten with it
            covered = {ties.get(k, k) for k in private | {p.name for p in self.bundle.params}}
            problems += [f"model tensor {k!r} is not in the bundle and would keep its constructor values "
                         "(pass strict=False if that is intended)" for k in state if ties.get(k, k) not in covered]
        if problems:
            raise FormatError(f"the model does not match {self.bundle.path}:\n  " + "\n  ".join(problems))

    def _switch_locked(self, task: str) -> float:
        torch = _torch()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            if self._flat is not None:
                self._flat.apply(task)
            else:
                if task not in self._plans:
                    self._plans[task] = self.bundle.switch_plan(task, self._outs)
                self._plans[task].run()
            for k, v in self._private[task].items():
                _set_tensor(self.model, k, v)
        if cuda:
            torch.cuda.synchronize(self.device)
        self.current = task
        return time.perf_counter() - t0

    def __call__(self, *args, task: str | None = None, **kwargs):
        """Run the current task, or ``task`` (switching first if needed, atomically with the run)."""
        torch = _torch()

        def forward():
            with torch.inference_mode():
                return self.model(*args, **kwargs)

        return self._locked(task, forward)

    def resident_bytes(self) -> int:
        """Device bytes held besides the model: θ0, τ, masks and the flat output (0 for 'numpy')."""
        return self._flat.nbytes if self._flat is not None else 0
