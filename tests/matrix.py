"""The conformance matrix: real architectures × dtypes × checkpoint formats × merge methods, through
every path edgemerge has, each task's output compared with a torch forward of θ_t.

Used by ``tests/test_conformance.py`` (asserts every cell) and ``bench/conformance.py`` (writes the
table in docs/conformance.md). Architectures are Hugging Face ``transformers`` classes built from
tiny configs (random init, no download), each fine-tuned a few real Adam steps per task so task
vectors look like fine-tuning: GPT-2 (tied embeddings, Conv1D), BERT (``.bin``, task heads of
different sizes, integer buffers), Llama (RMSNorm, rotary, GQA), ResNet (BatchNorm, 0-d
``num_batches_tracked``), ViT (the edge-typical transformer; every Linear exported as a MatMul of a
transposed weight, which ONNX Runtime folds). The θ_t a cell checks against is rebuilt here from the
bundle's raw bytes (read with the ``safetensors`` library, not edgemerge) by docs/format.md §4.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np
import torch
import transformers as tf
from safetensors.numpy import load_file as st_load_numpy
from safetensors.torch import save_file as st_save

from edgemerge.errors import BackendError, EdgemergeError
from edgemerge.pipeline import MergeConfig, merge
from edgemerge.runtime import open_bundle
from edgemerge.runtime.torch_backend import tied_names

METHODS = ("task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "dare", "dare_ties", "consensus_ta", "consensus_ties")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FORMATS = ("safetensors", "sharded", "torch")
N_TASKS = 3
# ORT vs torch, max |y - ref| / max |ref|. fp32: the goal. fp16: both sides round every op's output
# to 11 significant bits (eps 2^-10 ≈ 9.8e-4) but in different orders and accumulation widths;
# after a few layers that is a few ulps of the largest logit: 8 ulps.
TOLERANCE = {"fp32": 1e-5, "fp16": 8 * 2.0 ** -10}
ROOT = Path(__file__).resolve().parent.parent
DTYPE_OF = {"F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}  # a safetensors dtype as numpy reads it


def _logits_of(cls):
    """``cls`` whose forward returns the logits tensor (state-dict names unchanged)."""

    def forward(self, *args):
        names = self.edgemerge_inputs
        return cls.forward(self, **dict(zip(names, args)), return_dict=True).logits

    return type(cls.__name__ + "Logits", (cls,), {"forward": forward})


@dataclass(frozen=True)
class Arch:
    name: str
    make: Callable[[int], torch.nn.Module]          # n_labels -> module (random init)
    inputs: tuple[str, ...]
    example: Callable[[], tuple]                    # fixed example inputs (float ones are cast per dtype)
    private: tuple[str, ...] = ()                   # task heads
    heads: tuple[int, ...] = (0,) * N_TASKS          # per task labels (0: no head)
    torch_file: str = "model.pt"
    what: str = ""
    persist: tuple[str, ...] = ()   # buffers saved with the weights, as older checkpoints of the family have them


def _ids(vocab=97, shape=(2, 7)):
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, vocab, shape, generator=g)


def _mask(shape=(2, 7)):
    m = torch.ones(shape, dtype=torch.long)
    m[1, -2:] = 0  # one padded row: masks must reach the attention
    return m


def _pixels():
    return (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7)),)


def _build(cls, config, inputs, persist=()):
    def make(n_labels: int):
        torch.manual_seed(0)
        kwargs = {"num_labels": n_labels} if n_labels else {}
        m = _logits_of(cls)(config(**kwargs))
        m.edgemerge_inputs = inputs
        for name in persist:  # e.g. BERT's int64 position_ids, Llama's rotary inv_freq: in the state dict
            owner, _, attr = name.rpartition(".")
            mod = m.get_submodule(owner)
            mod.register_buffer(attr, getattr(mod, attr), persistent=True)
        return m

    return make


_TEXT = dict(vocab_size=97, hidden_act="gelu", attn_implementation="eager")
ARCHS: dict[str, Arch] = {
    "gpt2": Arch("gpt2", _build(tf.GPT2LMHeadModel, lambda **k: tf.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=97, n_positions=32, use_cache=False, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager", **k), ("input_ids", "attention_mask")),
        ("input_ids", "attention_mask"), lambda: (_ids(), _mask()), what="tied wte = lm_head, Conv1D (x @ W)"),
    "bert": Arch("bert", _build(tf.BertForSequenceClassification, lambda **k: tf.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **_TEXT, **k), ("input_ids", "attention_mask"),
        ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")),
        ("input_ids", "attention_mask"), lambda: (_ids(), _mask()), private=("classifier.*",), heads=(2, 3, 4),
        torch_file="pytorch_model.bin", what=".bin, heads of 2/3/4 classes, int64 buffers (position_ids, token_type_ids)"),
    "llama": Arch("llama", _build(tf.LlamaForCausalLM, lambda **k: tf.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
        vocab_size=97, max_position_embeddings=32, use_cache=False, tie_word_embeddings=False,
        attn_implementation="eager", **k), ("input_ids", "attention_mask"), ("model.rotary_emb.inv_freq",)),
        ("input_ids", "attention_mask"), lambda: (_ids(), _mask()),
        what="RMSNorm, rotary (inv_freq saved: a float buffer no task changes), grouped-query attention"),
    "resnet": Arch("resnet", _build(tf.ResNetForImageClassification, lambda **k: tf.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], **k), ("pixel_values",)),
        ("pixel_values",), _pixels, private=("classifier.*",), heads=(3, 3, 5),
        what="BatchNorm (running stats, 0-d num_batches_tracked), Conv+BN fusion"),
    "vit": Arch("vit", _build(tf.ViTForImageClassification, lambda **k: tf.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **k), ("pixel_values",)),
        ("pixel_values",), _pixels, private=("classifier.*",), heads=(4, 4, 4),
        what="Linear as MatMul(x, Transpose(W)) (folded by ONNX Runtime), LayerNorm"),
}


def _cast_inputs(example: tuple, dtype) -> tuple:
    return tuple(a.to(dtype) if a.is_floating_point() else a for a in example)


def _finetune(model, arch: Arch, seed: int, steps: int = 3, lr: float = 3e-3) -> None:
    """A few real Adam steps on random labels (BatchNorm in train mode moves its statistics)."""
    g = torch.Generator().manual_seed(1000 + seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        x = tuple(a if not a.is_floating_point() else torch.randn(a.shape, generator=g) for a in arch.example())
        out = model(*x)
        target = torch.randint(0, out.shape[-1], out.shape[:-1], generator=g)
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]).float(), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _without_ties(state: dict) -> dict:
    """What ``save_pretrained`` writes to safetensors: a tied tensor once, under its first name."""
    drop = tied_names(state)
    return {k: v.contiguous() for k, v in state.items() if k not in drop}


def _write(state: dict, directory: Path, fmt: str, arch: Arch) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "torch":
        path = directory / arch.torch_file
        torch.save(state, path)  # keeps shared storage: tied names stay one tensor
        return str(path)
    flat = _without_ties(state)
    if fmt == "safetensors":
        path = directory / "model.safetensors"
        st_save(flat, str(path))
        return str(path)
    keys = list(flat)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        st_save({k: flat[k] for k in ks}, str(directory / name))
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return str(directory)


@dataclass
class Suite:
    """θ0 and N_TASKS fine-tuned checkpoints of one architecture in one dtype, in every format."""

    arch: Arch
    dtype: str
    root: Path
    paths: dict[str, dict[str, str]] = field(default_factory=dict)   # format -> {"__base__"|task: path}


def build_suite(arch: Arch, dtype: str, root: Path) -> Suite:
    suite = Suite(arch, dtype, root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = arch.make(arch.heads[0])
        base_f32 = {k: v.clone() for k, v in base.state_dict().items() if not _matches(k, arch.private)}
        states = {"__base__": base.to(DTYPES[dtype]).state_dict()}
        for t in range(N_TASKS):
            m = arch.make(arch.heads[t])
            torch.manual_seed(10 + t)
            if arch.private:  # a fresh head per task, sized for its labels
                for mod_name, mod in m.named_modules():
                    if any(_matches(mod_name + ".weight", [p]) for p in arch.private) and hasattr(mod, "reset_parameters"):
                        mod.reset_parameters()
            m.load_state_dict(base_f32, strict=False)
            _finetune(m, arch, t)
            states[f"t{t}"] = m.to(DTYPES[dtype]).state_dict()
    for fmt in FORMATS:
        suite.paths[fmt] = {name: _write(sd, root / fmt / name, fmt, arch) for name, sd in states.items()}
    return suite


def _matches(key: str, patterns) -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def merge_cell(suite: Suite, method: str, fmt: str) -> str:
    paths = suite.paths[fmt]
    out = suite.root / "bundles" / f"{method}.{fmt}.safetensors"
    out.parent.mkdir(exist_ok=True)
    cfg = MergeConfig(paths["__base__"], {t: paths[t] for t in paths if t != "__base__"}, method, private=suite.arch.private)
    merge(cfg, out)
    return str(out)


# -- the normative rule, independently ------------------------------------------------------------


def rule_weights(bundle_path: str, task: str) -> dict[str, np.ndarray]:
    """θ_task by docs/format.md §4 from the raw tensors (the safetensors library's reader)."""
    raw = st_load_numpy(bundle_path)
    with open(bundle_path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        manifest = json.loads(json.loads(f.read(n))["__metadata__"]["edgemerge.manifest"])
    out = {}
    for p in manifest["params"]:
        b = raw[f"base/{p['name']}"]
        if p["role"] == "carried":
            out[p["name"]] = b
            continue
        v = raw[f"vector/{p['name']}"]
        if manifest["mask"]["policy"] == "tall":
            bits = np.unpackbits(raw[f"mask/{task}/{p['name']}"], count=b.size, bitorder="big").astype(bool).reshape(b.shape)
        else:
            bits = np.ones(b.shape, bool)
        with np.errstate(over="ignore"):
            summed = (b.astype(np.float32) + v.astype(np.float32)).astype(b.dtype)
        out[p["name"]] = np.where(bits, summed, b)
    for k in manifest["private"].get(task, []):
        out[k] = raw[f"task/{task}/{k}"]
    return out


def rule_weights_v2(bundle_path: str, task: str) -> dict[str, np.ndarray]:
    """θ_task of a v2 bundle by docs/format.md §4 (every codec), from the raw tensors, with lzma and
    numpy only: the planes tensor is decoded here, not by edgemerge."""
    import lzma

    raw = st_load_numpy(bundle_path)
    with open(bundle_path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        manifest = json.loads(json.loads(f.read(n))["__metadata__"]["edgemerge.manifest"])
    codec = next(t for t in manifest["tasks"] if t["name"] == task).get("codec", {"name": "tall", "planes": "raw"})
    name, xz, k_fix = codec["name"], codec.get("planes") == "xz", codec.get("correction", 0)
    stream = raw.get(f"planes/{task}")
    data = (lzma.decompress(stream.tobytes()) if xz else stream.tobytes()) if stream is not None else b""
    pos, fixes = 0, raw.get(f"fix/{task}")
    dcodes = raw.get(f"dcodes/{task}")  # a quantized delta's codes as one xz stream, params in manifest order
    dcodes, cpos = (lzma.decompress(dcodes.tobytes()) if dcodes is not None else b""), 0
    spos = 0  # v3: every param's scales in dscale/<task>, params in manifest order

    def bits(count):
        nonlocal pos
        k = (count + 7) // 8
        out = np.unpackbits(np.frombuffer(data[pos : pos + k], np.uint8), count=count, bitorder="big").astype(bool)
        pos += k
        return out

    out, used, j = {}, 0, 0
    for p in manifest["params"]:
        b = raw[f"base/{p['name']}"]
        if p["role"] == "carried":
            out[p["name"]] = b
            continue
        b32 = b.astype(np.float32).reshape(-1)
        with np.errstate(over="ignore"):
            if name == "emr":  # the task's presence plane over the elected vector, times its rescaler
                on = bits(b.size)
                res = np.where(on, b32 + raw[f"scale/{task}"][j] * raw[f"elected/{p['name']}"].astype(np.float32).reshape(-1), b32)
            elif name == "tall":
                if xz:
                    on = bits(b.size)
                elif manifest["mask"]["policy"] == "tall":
                    on = np.unpackbits(raw[f"mask/{task}/{p['name']}"], count=b.size, bitorder="big").astype(bool)
                else:
                    on = np.ones(b.size, bool)
                v32 = raw[f"vector/{p['name']}"].astype(np.float32).reshape(-1)
                if codec.get("scale") == "ls":  # the selected τ_MTL times the tensor's float32 scale
                    v32 = raw[f"scale/{task}"][j] * v32
                res = np.where(on, b32 + v32, b32)
            elif name == "tswitch":
                on = bits(b.size)
                neg = np.zeros(b.size, bool)
                neg[np.flatnonzero(on)] = bits(int(on.sum()))
                c = raw[f"scale/{task}"][j]
                res = np.where(on, b32 + np.where(neg, -c, c), b32)
            elif codec["dtype"] in ("I8", "I4"):
                if codec.get("codes") == "lowrank":  # docs/format.md: a record per param; the factor product in int64 here
                    rows = b.shape[0] if b.ndim >= 2 else 1
                    cols = b.size // rows if rows else 0
                    kind, cpos = dcodes[cpos], cpos + 1
                    if kind == 0:
                        q, cpos = np.frombuffer(dcodes[cpos : cpos + b.size], np.int8), cpos + b.size
                    else:
                        rank, cpos = int.from_bytes(dcodes[cpos : cpos + 4], "little"), cpos + 4
                        e = np.frombuffer(dcodes[cpos : cpos + rows * (rank > 0)], np.uint8).astype(np.int64)[:, None]
                        cpos += rows * (rank > 0)
                        fa = np.frombuffer(dcodes[cpos : cpos + rows * rank], np.int8).reshape(rows, rank).astype(np.int64)
                        cpos += rows * rank
                        fb = np.frombuffer(dcodes[cpos : cpos + rank * cols], np.int8).reshape(rank, cols).astype(np.int64)
                        cpos += rank * cols
                        q = (np.clip((fa @ fb + ((1 << e) >> 1)) >> e, -127, 127) if rank else np.zeros((rows, cols))).astype(np.int8)
                elif codec.get("codes") == "xz":
                    k = b.size if codec["dtype"] == "I8" else (b.size + 1) // 2
                    q = np.frombuffer(dcodes[cpos : cpos + k], np.int8 if codec["dtype"] == "I8" else np.uint8)
                    cpos += k
                else:
                    q = raw[f"delta/{task}/{p['name']}"]
                if codec["dtype"] == "I4":  # nibbles, high first, two's complement
                    q = np.stack([q >> 4, q & 15], axis=1).reshape(-1)[: b.size].astype(np.int8)
                    q = np.where(q > 7, q - 16, q).astype(np.int8)
                rows = b.shape[0] if b.ndim >= 2 else 1
                if manifest["format_version"] >= 3:  # one scale with lowrank codes, else one per row
                    k = 1 if codec.get("codes") == "lowrank" else rows
                    s, spos = raw[f"dscale/{task}"][spos : spos + k], spos + k
                else:  # v2: a tensor per param; a scale per row, or with lowrank codes one for every row
                    s = raw[f"dscale/{task}/{p['name']}"]
                assert s.shape == (rows,) or (s.shape == (1,) and codec.get("codes") == "lowrank"), "dscale shape"
                res = b32 + (q.reshape(rows, -1).astype(np.float32) * np.broadcast_to(s, (rows,))[:, None]).reshape(-1)
            else:
                res = b32 + raw[f"delta/{task}/{p['name']}"].astype(np.float32).reshape(-1)
            res = res.astype(b.dtype)
            if k_fix:
                at = np.flatnonzero(bits(b.size))
                res[at] = (res[at].astype(np.float32) + fixes[used : used + at.size].astype(np.float32)).astype(b.dtype)
                used += at.size
        j += 1
        out[p["name"]] = res.reshape(b.shape)
    assert pos == len(data) and used == k_fix and cpos == len(dcodes), "planes or codes tensor not consumed exactly"
    assert manifest["format_version"] < 3 or spos == raw.get(f"dscale/{task}", np.zeros(0)).size, "dscale/<task> not consumed exactly"
    half = codec.get("private", {"keys": []})  # float32 private tensors stored in F16 / BF16: read as float32
    for k in manifest["private"].get(task, []):
        out[k] = raw[f"task/{task}/{k}"]
        if k in half["keys"]:
            assert out[k].dtype == DTYPE_OF[half["dtype"]], f"private {k} is {out[k].dtype}, the codec says {half['dtype']}"
            out[k] = out[k].astype(np.float32)
    return out


# a mix of three codecs per architecture (bert and vit share one); lowrank codes go to gpt2, whose
# matrices are wide enough to be factored (resnet's test model has none: its codes would stay raw)
_TALL_LS = "tall:planes=xz,scale=ls,correction=0.01"
# private=F16 / BF16 go to the archs with private tensors (heads; resnet's per-task BatchNorm statistics)
CODEC_MIXES = {"gpt2": ("tswitch:density=0.3,correction=0.01", "delta:dtype=I8,codes=lowrank,bits=2,correction=0.001", _TALL_LS),
               "resnet": ("tswitch:density=0.3,repair=norm,private=F16", "delta:dtype=F16,correction=0.001,private=BF16", _TALL_LS),
               "bert": ("emr:planes=xz,repair=norm,private=F16", "emr:planes=raw", "tall:planes=raw,scale=ls,private=BF16"),
               "vit": ("emr:planes=xz,correction=0.01", "emr:planes=raw,private=F16", "tall:planes=raw,scale=ls"),
               "llama": ("tswitch:density=0.3,planes=raw", "delta:dtype=I4,qmax=3,codes=xz,correction=0.001", "delta:dtype=I8,qmax=2,codes=xz")}


def run_codec_cell(suite: Suite, exported: dict, emflat: str | None = None) -> Result:
    """A v2 bundle with one task per codec (tswitch, delta, TALL with xz planes and a least-squares
    scale, emr), most with a correction, through extract, TaskSession (both modes), TorchTaskModel (both CPU
    kernels) and the flat image (version 2) with the C applier where ``emflat`` is built."""
    from edgemerge.codecs import encode_bundle, parse_codec
    from edgemerge.export.flat import rebuild, write_flat
    from edgemerge.runtime.session import TaskSession
    from edgemerge.runtime.torch_backend import TorchTaskModel

    t0 = time.perf_counter()
    arch, dtype = suite.arch, suite.dtype
    r = Result(arch.name, dtype, "codecs")
    v1 = merge_cell(suite, "ties", "safetensors")
    paths = suite.paths["safetensors"]
    tasks = [t for t in paths if t != "__base__"]
    path = v1.replace(".safetensors", ".v2.safetensors")
    mix = CODEC_MIXES[arch.name]
    encode_bundle(v1, {t: paths[t] for t in tasks}, {t: parse_codec(c) for t, c in zip(tasks, mix)}, path,
                  repair=_norm_repair(arch, dtype))
    bundle = open_bundle(path, verify=True)
    for t, c, e in zip(tasks, mix, bundle.manifest["tasks"]):
        if "repair=norm" in c and not (e["codec"].get("repaired") and bundle.codecs[t].correction):
            r.failures.append(f"task {t}: {c} re-fit nothing or stored no correction entry; the cell no longer tests the repair")
    for t, c in zip(tasks, mix):  # an xz encoding given is an xz encoding stored (the encoder falls back where it loses)
        for enc in ("xz", "lowrank"):
            if f"codes={enc}" in c and bundle.codecs[t].codes != enc:
                r.failures.append(f"task {t}: codes={enc} was stored raw; the cell no longer tests the {enc} codes")
        if "private=" in c and dtype == "fp32" and not bundle.codecs[t].private_keys:  # fp16/bf16 heads stay as they are
            r.failures.append(f"task {t}: {c} stored no private tensor in a half dtype; the cell no longer tests it")
    rules = {t: rule_weights_v2(path, t) for t in bundle.tasks}
    refs = {t: reference(arch, dtype, rules[t]) for t in bundle.tasks}
    ok = all(same_bytes(np.asarray(bundle.task_weights(t)[k]), rules[t][k]) for t in bundle.tasks for k in rules[t])
    r.paths["extract"] = "exact" if ok else "DIFFER"
    if not ok:
        r.failures.append("extract differs from the normative rule")
    _onnx_paths(r, bundle, exported, refs, arch, dtype, TaskSession)
    _torch_paths(r, bundle, rules, refs, arch, dtype, TorchTaskModel)
    _flat_path(r, bundle, rules, emflat, write_flat, rebuild)
    bundle.close()
    r.seconds = time.perf_counter() - t0
    return r


def _norm_repair(arch: Arch, dtype: str):
    """repair=norm for the cell's tasks: the arch's model with the weights given, calibrated on its
    example inputs (given as float32 numpy, cast to the cell's dtype on the way in)."""
    from edgemerge.repair import norm_repair

    dt = DTYPES[dtype]

    def build(task, weights):
        m = model_with(arch, dtype, dict(weights))
        m.register_forward_pre_hook(lambda mod, args: tuple(a.to(dt) if a.is_floating_point() else a for a in args))
        return m

    return norm_repair(build, lambda task: [tuple(a.numpy() for a in arch.example())])


def _to_torch(a: np.ndarray) -> torch.Tensor:
    a = np.ascontiguousarray(a).reshape(a.shape)
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def model_with(arch: Arch, dtype: str, weights: dict[str, np.ndarray]) -> torch.nn.Module:
    head = next((w.shape[0] for k, w in weights.items() if _matches(k, arch.private) and k.endswith("weight")), 0)
    m = arch.make(head).to(DTYPES[dtype]).eval()
    missing, unexpected = m.load_state_dict({k: _to_torch(v) for k, v in weights.items()}, strict=False)
    ties = tied_names(m.state_dict(keep_vars=True))
    assert not unexpected and all(k in ties for k in missing), (missing, unexpected)
    return m


def reference(arch: Arch, dtype: str, weights: dict[str, np.ndarray]) -> np.ndarray:
    m = model_with(arch, dtype, weights)
    with torch.no_grad():
        return m(*_cast_inputs(arch.example(), DTYPES[dtype])).float().numpy()


def factory_for(arch: Arch, dtype: str):
    def factory(task, shapes):
        head = next((s[0] for k, s in shapes.items() if _matches(k, arch.private) and k.endswith("weight")), 0)
        return arch.make(head).to(DTYPES[dtype]), _cast_inputs(arch.example(), DTYPES[dtype])

    return factory


def ort_feeds(arch: Arch, dtype: str) -> dict[str, np.ndarray]:
    out = {}
    for name, a in zip(arch.inputs, _cast_inputs(arch.example(), DTYPES[dtype])):
        out[name] = (a.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if a.dtype == torch.bfloat16 else a.numpy())
    return out


def relative(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(y.astype(np.float32) - ref).max() / max(np.abs(ref).max(), 1e-30))


def same_bytes(a, b) -> bool:
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# -- one cell ---------------------------------------------------------------------------------------


@dataclass
class Result:
    """What one cell found per path: 'exact', a max relative difference, or an edgemerge error."""

    arch: str
    dtype: str
    method: str
    paths: dict[str, str] = field(default_factory=dict)
    worst: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def run_cell(suite: Suite, method: str, exported: dict, emflat: str | None) -> Result:
    """Every path for one (arch, dtype, method); ``exported`` holds the ONNX export of this suite."""
    from edgemerge.export.flat import rebuild, write_flat
    from edgemerge.runtime.session import TaskSession
    from edgemerge.runtime.torch_backend import TorchTaskModel

    t0 = time.perf_counter()
    arch, dtype = suite.arch, suite.dtype
    r = Result(arch.name, dtype, method)
    bundles = {fmt: merge_cell(suite, method, fmt) for fmt in FORMATS}
    path = bundles["safetensors"]
    bundle = open_bundle(path, verify=True)
    r.paths["merge+verify"] = "exact"
    ref_tensors = st_load_numpy(path)
    for fmt in ("sharded", "torch"):  # the input format never changes a byte of the bundle's tensors
        other = st_load_numpy(bundles[fmt])
        if set(other) != set(ref_tensors) or not all(same_bytes(other[k], ref_tensors[k]) for k in other):
            r.failures.append(f"bundle from {fmt} differs from the one from safetensors")
    r.paths["formats"] = "identical" if not any("differs" in f for f in r.failures) else "DIFFER"
    rules = {t: rule_weights(path, t) for t in bundle.tasks}
    refs = {t: reference(arch, dtype, rules[t]) for t in bundle.tasks}
    # extract: the bytes a user gets equal the rule
    ok = all(same_bytes(np.asarray(bundle.task_weights(t)[k]), rules[t][k]) for t in bundle.tasks for k in rules[t])
    ok &= all(set(bundle.task_weights(t)) == set(rules[t]) for t in bundle.tasks)
    r.paths["extract"] = "exact" if ok else "DIFFER"
    if not ok:
        r.failures.append("extract differs from the normative rule")
    _onnx_paths(r, bundle, exported, refs, arch, dtype, TaskSession)
    _torch_paths(r, bundle, rules, refs, arch, dtype, TorchTaskModel)
    _flat_path(r, bundle, rules, emflat, write_flat, rebuild)
    bundle.close()
    r.seconds = time.perf_counter() - t0
    return r


def _onnx_paths(r: Result, bundle, exported: dict, refs, arch, dtype, TaskSession) -> None:
    if "error" in exported:
        r.paths["export onnx"] = "error: " + exported["error"]
        return
    r.paths["export onnx"] = "ok" if not exported["problems"] else "INCOMPLETE"
    r.failures += [f"export onnx: {p}" for p in exported["problems"]]
    feeds = ort_feeds(arch, dtype)
    for key, mode, graph in (("TaskSession inputs", "inputs", exported["switchable"]),
                             ("TaskSession few-rows", "inputs", exported["few-rows"]),
                             ("TaskSession sessions", "sessions", exported["plain"])):
        try:
            s = TaskSession(bundle, graph, mode=mode)
            worst = 0.0
            for t in [*bundle.tasks, bundle.tasks[0]]:  # and back: no drift
                s.switch(t)
                worst = max(worst, relative(s.run(feeds)[0], refs[t]))
        except EdgemergeError as exc:  # a runtime that cannot serve this dtype must say so, naming the fix
            msg = str(exc)
            half = "bfloat16" if "bfloat16" in msg else "float16" if "float16" in msg else None
            r.paths[key] = f"refused: ORT CPU has no {half} kernel for a node" if half else f"ERROR: {msg[:120]}"
            if not (isinstance(exc, BackendError) and half and dtype != "fp32" and "export the model in float32" in msg):
                r.failures.append(f"{key}: {msg[:300]}")
            continue
        r.worst[key] = worst
        r.paths[key] = f"{worst:.1e}"
        if worst > TOLERANCE[dtype]:
            r.failures.append(f"{key}: max relative difference {worst:.3g} > {TOLERANCE[dtype]:g}")


def _torch_paths(r: Result, bundle, rules, refs, arch, dtype, TorchTaskModel) -> None:
    for kernel in ("numpy", "torch"):
        key = f"TorchTaskModel {kernel}"
        model = arch.make(next((w.shape[0] for k, w in rules[bundle.tasks[0]].items()
                                if _matches(k, arch.private) and k.endswith("weight")), 0)).to(DTYPES[dtype])
        try:
            tm = TorchTaskModel(bundle, model, kernel=kernel)
        except BackendError as exc:
            r.paths[key] = "refused: " + str(exc).split(";")[0][-60:]
            if "kernel='torch'" not in str(exc):
                r.failures.append(f"{key}: refusal does not name the fix: {exc}")
            continue
        exact = True
        for t in [*bundle.tasks, bundle.tasks[0]]:
            tm.switch(t)
            state = tm.model.state_dict()
            exact &= all(same_bytes(_np(state[k]), rules[t][k]) for k in rules[t])
            with torch.no_grad():
                y = tm(*_cast_inputs(arch.example(), DTYPES[dtype])).float().numpy()
            exact &= same_bytes(y, refs[t])
        r.paths[key] = "exact" if exact else "DIFFER"
        if not exact:
            r.failures.append(f"{key}: weights or outputs differ from torch with θ_t")


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _flat_path(r: Result, bundle, rules, emflat: str | None, write_flat, rebuild) -> None:
    img = bundle.path + ".img"
    write_flat(bundle, img)
    exact = True
    for t in bundle.tasks:
        ref = rebuild(img, t)
        exact &= sorted(ref) == sorted(p.name for p in bundle.merged)
        # float32 values already rounded to the model's dtype (v2 "round"): exact after the cast
        exact &= all(same_bytes(v.reshape(rules[t][k].shape).astype(rules[t][k].dtype), rules[t][k]) for k, v in ref.items())
        if emflat is not None:
            out = img + f".{t}.f32"
            subprocess.run([emflat, img, t, out], check=True, capture_output=True)
            got = np.fromfile(out, "<f4")
            want = np.concatenate([v.reshape(-1) for v in ref.values()]) if ref else np.zeros(0, "<f4")
            exact &= same_bytes(got, want.astype("<f4"))
    r.paths["flat + C applier" if emflat else "flat (numpy)"] = "exact" if exact else "DIFFER"
    if not exact:
        r.failures.append("flat image rebuild differs from θ_t")


def export_suite(suite: Suite, bundle_path: str) -> dict:
    """Switchable + plain graphs for this (arch, dtype), shared by every method's bundle (same θ0)."""
    from edgemerge.export.onnx import export_onnx

    kw = dict(input_names=list(suite.arch.inputs), output_names=["logits"])
    try:
        e = export_onnx(bundle_path, factory_for(suite.arch, suite.dtype), str(suite.root / "onnx"), **kw)
        few = export_onnx(bundle_path, factory_for(suite.arch, suite.dtype), str(suite.root / "onnx-few-rows"), layout="few-rows", **kw)
    except EdgemergeError as exc:
        return {"error": str(exc)}
    return {"switchable": e.switchable, "few-rows": few.switchable, "plain": e.plain, "unused": e.unused,
            "problems": graph_problems(e.switchable, bundle_path, suite.arch) + graph_problems(few.switchable, bundle_path, suite.arch)}


def graph_problems(switchable: str, bundle_path: str, arch: Arch) -> list[str]:
    """What would make a switch silently partial: a float bundle weight that is not a graph input
    (the exporter merges byte-identical initializers, so a weight can vanish into another's name;
    integer buffers such as num_batches_tracked are legitimately unused by an eval graph), or an
    initializer named like a model tensor (it would stay θ0 for every task)."""
    import onnx

    g = onnx.load(switchable).graph
    inputs, inits = {i.name for i in g.input}, {i.name for i in g.initializer}
    b = open_bundle(bundle_path)
    floats = {"F32", "F16", "BF16", "F64"}
    managed = {p.name for p in b.params if p.dtype in floats}
    managed |= {k for t, keys in b.private_keys.items() for k in keys if b.header.tensors[f"task/{t}/{k}"].dtype in floats}
    ties = tied_names(arch.make(arch.heads[0]).state_dict(keep_vars=True))
    model_keys = set(arch.make(arch.heads[0]).state_dict()) - set(ties)
    problems = [f"bundle weight {n!r} is not an input of the switchable graph" for n in sorted(managed - inputs)]
    problems += [f"initializer {n!r} is a model tensor left as a constant" for n in sorted(inits & model_keys)]
    return problems


def compile_emflat(directory: Path) -> str | None:
    cc = next((c for c in ("cc", "gcc", "clang") if subprocess.run(["which", c], capture_output=True).returncode == 0), None)
    if cc is None:
        return None
    out = directory / "emflat_apply"
    subprocess.run([cc, "-std=c99", "-O2", "-ffp-contract=off", "-o", str(out), str(ROOT / "edgemerge/devices/c/emflat.c")],
                   check=True)
    return str(out)


def run_matrix(root: Path, archs=tuple(ARCHS), dtypes=tuple(DTYPES), methods=METHODS, log=None) -> list[Result]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    emflat = compile_emflat(root)
    results = []
    for a in archs:
        for d in dtypes:
            suite = build_suite(ARCHS[a], d, root / f"{a}-{d}")
            exported = None
            for m in methods:
                if exported is None:
                    exported = export_suite(suite, merge_cell(suite, m, "safetensors"))
                res = run_cell(suite, m, exported, emflat)
                results.append(res)
                if log:
                    log(res)
    return results
