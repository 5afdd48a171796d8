"""Open an edgemerge bundle (docs/format.md) as memory-mapped numpy views, validating everything.

>>> b = open_bundle("tasks.safetensors")            # doctest: +SKIP
>>> b.tasks, b.task_weights("sst2")["fc.weight"]    # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, FormatError, TaskError, unknown_name
from .bits import BIT_ORDER, packed_nbytes, unpack_bits
from .codecs import (
    Codec, Recipe, SwitchPlan, dcodes_name, decode_codes, decode_planes, delta_name, dscale_name, dscales_name, fix_name, planes_name, quant_rows, rebuild,
    scales_name,
)
from .dtypes import FLOAT_DTYPES, VECTOR_DTYPES
from .safetensors import Header, map_file, parse_json, read_header, tensor_view

FORMAT_NAME = "edgemerge.bundle"
FORMAT_VERSION = 3  # the newest this reader knows; writers emit 1 unless a task needs a codec (2; 3: quantized deltas, half private tensors)
MANIFEST_KEY = "edgemerge.manifest"
CHECKSUM_KEY = "edgemerge.sha256"
MASK_POLICIES = ("tall", "none")
ROLES = ("merged", "carried")
VERIFY_POLICIES = ("first-use", "open", "off")
_TASK_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")


def check_task_name(name: str) -> str:
    """Task names become tensor-name parts and file names: letters, digits, ``_ . + -`` only."""
    if not isinstance(name, str) or not _TASK_RE.fullmatch(name):  # match() + $ would take "a\n"
        raise FormatError(
            f"task name {name!r} is not allowed: use 1-128 letters, digits, '_', '.', '+' or '-', starting with a letter or digit"
        )
    return name


def base_name(param: str) -> str:
    return f"base/{param}"


def elected_name(param: str) -> str:
    return f"elected/{param}"


def vector_name(param: str) -> str:
    return f"vector/{param}"


def mask_name(task: str, param: str) -> str:
    return f"mask/{task}/{param}"


def private_name(task: str, key: str) -> str:
    return f"task/{task}/{key}"


@dataclass(frozen=True)
class Param:
    """One parameter of θ0: merged (has τ and masks) or carried (integer buffers, stored once)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    role: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _expect(cond: bool, path: str, msg: str) -> None:
    if not cond:
        raise FormatError(f"{path}: {msg}")


def _parse_params(path: str, raw: Any) -> list[Param]:
    _expect(isinstance(raw, list), path, "manifest 'params' must be a list")
    params, seen = [], set()
    for i, p in enumerate(raw):
        ok = isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("shape"), list)
        _expect(ok and all(type(d) is int and d >= 0 for d in p["shape"]), path, f"manifest params[{i}] is malformed")
        _expect(p.get("role") in ROLES, path, f"param {p['name']!r}: role must be one of {ROLES}")
        _expect(p["name"] not in seen, path, f"param {p['name']!r} listed twice in the manifest")
        seen.add(p["name"])
        params.append(Param(p["name"], tuple(p["shape"]), str(p.get("dtype")), p["role"]))
    return params


def _check_tensor(header: Header, name: str, dtype: str, shape: tuple[int, ...], seen: set[str]) -> None:
    e = header.tensors.get(name)
    _expect(e is not None, header.path, f"tensor {name!r} named by the manifest is missing")
    _expect(e.dtype == dtype and e.shape == shape, header.path,
            f"tensor {name!r} is {e.dtype} {list(e.shape)}, the manifest says {dtype} {list(shape)}")
    seen.add(name)


class Bundle:
    """A validated, memory-mapped bundle. Views are read-only and valid until ``close()``.

    ``verify`` (docs/runtime.md, "Integrity"): ``"first-use"`` (default) hashes each tensor the
    first time anything reads it and refuses it if it does not match its checksum; ``"open"``
    hashes every tensor when the bundle is opened; ``"off"`` trusts the storage. The file must not
    be changed in place while open: edgemerge's writers replace files atomically (a new inode, so
    an open bundle keeps its bytes); a truncation or rewrite in place is detected at the next switch.
    """

    def __init__(self, path: str, header: Header, manifest: dict[str, Any], verify: str = "first-use"):
        if verify not in VERIFY_POLICIES:
            raise ConfigError(unknown_name("verify policy", verify, VERIFY_POLICIES))
        self.path = path
        self.header = header
        self.manifest = manifest
        self.tasks: tuple[str, ...] = tuple(t["name"] for t in manifest["tasks"])
        self.params: list[Param] = _parse_params(path, manifest["params"])
        self.merged: list[Param] = [p for p in self.params if p.role == "merged"]
        self.vector_dtype: str = manifest["vector_dtype"]
        self.mask_policy: str = manifest["mask"]["policy"]
        self.private_keys: dict[str, list[str]] = {t: list(manifest["private"].get(t, [])) for t in self.tasks}
        self.version: int = manifest["format_version"]
        self.codecs: dict[str, Codec] = {t["name"]: Codec.parse(f"{path}: task {t['name']!r}", t.get("codec") if self.version >= 2 else None)
                                         for t in manifest["tasks"]}
        self.shared = any(c.shared for c in self.codecs.values())  # τ_MTL is stored
        self.elected = any(c.name == "emr" for c in self.codecs.values())  # EMR's elected vector is stored
        self._merged_pos = {p.name: i for i, p in enumerate(self.merged)}
        self._recipes: dict[tuple[str, str], Recipe] = {}  # views and decoded planes: built once per (task, param)
        self._decoded: dict[tuple[str, str], Any] = {}  # ("planes" | "dcodes", task) -> what that stream decodes to
        self._decode_lock = threading.Lock()
        self.aliases: dict[str, str] = dict(manifest.get("aliases", {}))  # tied name -> stored param
        self.checksums: dict[str, str] = self._parse_checksums()
        self._dscale_at: dict[str, list[int]] = {}  # v3: task -> where each merged param's scales start in dscale/<task>
        self._validate_tensors()
        self.verify_policy = verify
        self._verified: set[str] = set()
        self._verify_lock = threading.Lock()
        st = os.stat(path)
        self._identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        self._mm = map_file(path)

    # -- validation -------------------------------------------------------------------------
    def _parse_checksums(self) -> dict[str, str]:
        raw = self.header.metadata.get(CHECKSUM_KEY)
        if raw is None:
            return {}
        sums = parse_json(raw, f"{self.path}: {CHECKSUM_KEY} metadata")
        ok = isinstance(sums, dict) and all(
            isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for v in sums.values()
        )
        _expect(ok and set(sums) == set(self.header.tensors), self.path,
                f"{CHECKSUM_KEY} must give one sha256 per tensor")
        return sums

    def _validate_tensors(self) -> None:
        h, seen = self.header, set()
        _expect(self.vector_dtype in VECTOR_DTYPES, self.path, f"vector_dtype must be one of {VECTOR_DTYPES}")
        _expect(self.mask_policy in MASK_POLICIES, self.path, f"mask policy must be one of {MASK_POLICIES}")
        for t, c in self.codecs.items():
            _expect(not (c.name == "tall" and c.planes == "xz" and self.mask_policy != "tall"), self.path,
                    f"task {t!r}: xz planes of a tall codec need mask policy 'tall'")
            for name in [n for n, on in ((planes_name(t), c.uses_planes_tensor), (dcodes_name(t), c.uses_codes_tensor)) if on]:
                e = h.tensors.get(name)
                _expect(e is not None and e.dtype == "U8" and len(e.shape) == 1, self.path,
                        f"task {t!r} ({c.describe()}) needs a 1-D U8 tensor {name!r}")
                seen.add(name)
            if c.has_scales:
                _check_tensor(h, scales_name(t), "F32", (len(self.merged),), seen)
            if c.correction:
                _check_tensor(h, fix_name(t), "F16", (c.correction,), seen)
            if c.qscale_rows and self.version >= 3:
                counts = [c.qscale_count(p.shape) for p in self.merged]
                self._dscale_at[t] = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).tolist()
                _check_tensor(h, dscales_name(t), "F32", (self._dscale_at[t][-1],), seen)
        for p in self.params:
            _check_tensor(h, base_name(p.name), p.dtype, p.shape, seen)
            if p.role == "carried":
                continue
            _expect(p.dtype in FLOAT_DTYPES, self.path, f"merged param {p.name!r} has non-float dtype {p.dtype}")
            if self.shared:
                _check_tensor(h, vector_name(p.name), self.vector_dtype, p.shape, seen)
            if self.elected:
                _check_tensor(h, elected_name(p.name), self.vector_dtype, p.shape, seen)
            for t, c in self.codecs.items():
                if c.name == "tall" and c.planes == "raw" and self.mask_policy == "tall":
                    _check_tensor(h, mask_name(t, p.name), "U8", (packed_nbytes(p.numel),), seen)
                elif c.uses_codes_tensor:
                    pass  # in dcodes/<task>, checked where it is decoded
                elif c.name == "delta" and c.dtype == "I4":
                    _check_tensor(h, delta_name(t, p.name), "U8", ((p.numel + 1) // 2,), seen)
                elif c.name == "delta":
                    _check_tensor(h, delta_name(t, p.name), c.dtype, p.shape, seen)
                if c.qscale_rows and self.version < 3:  # v2: a tensor per param; lowrank codes may hold one scale for every row
                    e = h.tensors.get(dscale_name(t, p.name))
                    one = c.codes == "lowrank" and e is not None and e.shape == (1,)
                    _check_tensor(h, dscale_name(t, p.name), "F32", (1,) if one else (quant_rows(p.shape),), seen)
        for t, keys in self.private_keys.items():
            half = self.codecs[t].private_keys
            _expect(set(half) <= set(keys), self.path, f"task {t!r}: codec 'private' names keys the task has no private tensor for")
            for k in keys:
                e = h.tensors.get(private_name(t, k))
                _expect(e is not None, self.path, f"private tensor {private_name(t, k)!r} is missing")
                _expect(k not in half or e.dtype == self.codecs[t].private, self.path,
                        f"private tensor {e.name!r} is {e.dtype}, the codec says {self.codecs[t].private}")
                seen.add(e.name)
        names = {p.name for p in self.params}
        for a, c in self.aliases.items():
            _expect(c in names and a not in names, self.path,
                    f"alias {a!r} -> {c!r}: the target must be a param and the alias must not")
        extra = sorted(set(h.tensors) - seen)
        _expect(not extra, self.path, f"tensors not described by the manifest: {', '.join(extra[:5])}")

    # -- access -----------------------------------------------------------------------------
    def _view(self, name: str) -> np.ndarray:
        if self._mm is None:
            raise FormatError(f"{self.path}: bundle is closed")
        view = tensor_view(self._mm, self.header, name)
        if self.verify_policy == "first-use" and name not in self._verified and self.checksums:
            with self._verify_lock:
                if name not in self._verified:
                    if _sha256(view) != self.checksums[name]:
                        raise FormatError(f"{self.path}: tensor {name!r} does not match its checksum (damaged storage?); "
                                          "nothing was served from it. `edgemerge verify` lists every damaged tensor; "
                                          "restore the file")
                    self._verified.add(name)
        return view

    def check_file(self) -> None:
        """FormatError if the open file was truncated or rewritten in place (same inode, another
        size or mtime): reading on could crash with SIGBUS or serve other bytes than were checked.
        A file replaced by a new one (atomic write, rename) is fine: the mapping keeps the old."""
        try:
            st = os.stat(self.path)
        except OSError:
            return
        dev, ino, size, mtime = self._identity
        if (st.st_dev, st.st_ino) == (dev, ino) and (st.st_size, st.st_mtime_ns) != (size, mtime):
            what = f"truncated to {st.st_size} of {size} bytes" if st.st_size < size else "rewritten in place"
            raise FormatError(f"{self.path} was {what} while open; it is not served any more. Replace bundles "
                              "atomically (write a new file, then rename it) and open the new one")

    def check_task(self, task: str) -> str:
        if task not in self.tasks:
            raise TaskError(f"{self.path}: {unknown_name('task', task, self.tasks)}")
        return task

    def resolve(self, name: str) -> str:
        """The stored param for ``name`` (itself, or the param a tied name is one tensor with)."""
        return self.aliases.get(name, name)

    def base(self, param: str) -> np.ndarray:
        return self._view(base_name(param))

    def vector(self, param: str) -> np.ndarray:
        return self._view(vector_name(param))

    def elected_vector(self, param: str) -> np.ndarray:
        """EMR's elected vector u of a merged param (stored when some task's codec is emr)."""
        return self._view(elected_name(param))

    def task_vector(self, task: str, param: str) -> np.ndarray | None:
        """The shared vector ``task``'s codec reads: τ_MTL (tall), the elected vector (emr), or None."""
        c = self.codecs[self.check_task(task)]
        return self.vector(param) if c.shared else self.elected_vector(param) if c.name == "emr" else None

    def packed_mask(self, task: str, param: str) -> np.ndarray | None:
        """Packed TALL mask bytes, or None when the bundle has no masks (every task uses all of τ).
        A task of another codec has no TALL mask: paths that only know masks fail here, loudly."""
        self.check_task(task)
        c = self.codecs[task]
        if not c.plain_tall:
            what = f"the {c.name!r} codec" if c.name != "tall" else "a TALL mask plus a " + (
                "scale" if c.scale != "none" else "correction")
            raise FormatError(f"{self.path}: task {task!r} uses {what}; this path reads plain TALL masks only "
                              "(TaskSession, TorchTaskModel, TrtTaskSession and extract serve every codec)")
        return self.tall_presence(task, param)

    def tall_presence(self, task: str, param: str) -> np.ndarray | None:
        """A TALL task's packed mask (decoded from xz planes when stored so), None without masks."""
        if self.mask_policy != "tall":
            return None
        if self.codecs[task].planes == "xz":
            return self._planes(task)[self._merged_index(param)]["presence"]
        return self._view(mask_name(task, param))

    def _merged_index(self, param: str) -> int:
        i = self._merged_pos.get(param)
        if i is None:
            raise FormatError(f"{self.path}: no merged parameter {param!r}")
        return i

    def _once(self, key: tuple[str, str], build: Any) -> Any:
        """``build()`` once per key, at first use (under the decode lock), kept while the bundle is open."""
        if key not in self._decoded:
            with self._decode_lock:
                if key not in self._decoded:
                    self._decoded[key] = build()
        return self._decoded[key]

    def _planes(self, task: str) -> list[dict[str, np.ndarray]]:
        """The task's bit planes, decoded once (first use) into the packed planes the kernels take."""
        return self._once(("planes", task), lambda: self._decode_planes(task))

    def _decode_planes(self, task: str) -> list[dict[str, np.ndarray]]:
        c = self.codecs[task]
        planes = decode_planes(f"{self.path}: tensor {planes_name(task)!r}", c, self._view(planes_name(task)),
                               [p.numel for p in self.merged])
        if c.correction:
            k = 0
            for d in planes:  # where each param's values start in fix/<task>
                d["fix_start"], k = k, k + d["fix"].size
            _expect(k == c.correction, self.path, f"task {task!r}: the fix planes mark {k} positions, the codec declares {c.correction}")
        return planes

    def _codes(self, task: str) -> list[np.ndarray]:
        """A quantized delta's xz or lowrank codes, decoded once (first use) into the per-param codes the kernels take."""
        return self._once(("dcodes", task), lambda: decode_codes(f"{self.path}: tensor {dcodes_name(task)!r}", self.codecs[task],
                                                                 self._view(dcodes_name(task)), [p.shape for p in self.merged]))

    def recipe(self, task: str, param: str) -> Recipe:
        """What rebuilds merged param ``param`` of ``task`` (its codec's planes, scale, δ, correction);
        built once per (task, param) and kept while the bundle is open."""
        r = self._recipes.get((task, param))
        if r is None:
            r = self._recipes[(task, param)] = self._make_recipe(task, param)
        return r

    def _make_recipe(self, task: str, param: str) -> Recipe:
        self.check_task(task)
        c, i = self.codecs[task], self._merged_index(param)
        planes = self._planes(task)[i] if c.uses_planes_tensor else {}
        fix = {}
        if c.correction:
            start, idx = planes["fix_start"], planes["fix"]
            fix = {"fix_index": idx, "fix_value": self._view(fix_name(task))[start : start + idx.size].astype(np.float32)}
        if c.name == "tall":  # scale ls: the scaled select
            ls = {"scale": float(self._view(scales_name(task))[i]), "scaled": True} if c.scale == "ls" else {}
            return Recipe("tall", presence=self.tall_presence(task, param), **ls, **fix)
        if c.name == "tswitch":
            return Recipe("tswitch", presence=planes["presence"], sign=planes["sign"],
                          scale=float(self._view(scales_name(task))[i]), **fix)
        if c.name == "emr":  # the scaled select over the elected vector
            return Recipe("tall", presence=planes["presence"], scale=float(self._view(scales_name(task))[i]), scaled=True, **fix)
        p = self.merged[i]
        if c.qscale_rows:
            rows = quant_rows(p.shape)
            codes = self._codes(task)[i] if c.uses_codes_tensor else self._view(delta_name(task, param)).reshape(-1)
            if c.dtype == "I4" and p.numel % 2 and codes[-1] & 15:  # as decode_codes checks the xz codes
                raise FormatError(f"{self.path}: {delta_name(task, param)} has its padding nibble set; the file is damaged")
            return Recipe("delta", delta=codes, packed4=c.dtype == "I4",
                          qscale=np.ascontiguousarray(np.broadcast_to(self._qscales(task, i), (rows,))),
                          qgrid=(rows, p.numel // rows if rows else 0, 0), **fix)
        return Recipe("delta", delta=self._view(delta_name(task, param)).reshape(-1), **fix)

    def _qscales(self, task: str, i: int) -> np.ndarray:
        """The stored scales of a quantized delta's ``i``-th merged param: [rows] or [1]."""
        at = self._dscale_at.get(task)
        if at is None:  # v2
            return np.asarray(self._view(dscale_name(task, self.merged[i].name)), np.float32)
        return np.asarray(self._view(dscales_name(task))[at[i] : at[i + 1]], np.float32)

    def mask(self, task: str, param: str) -> np.ndarray:
        p = self.param(param)
        packed = self.packed_mask(task, param)
        if packed is None:
            return np.ones(p.shape, dtype=bool)
        return unpack_bits(packed, p.numel, mask_name(task, param)).reshape(p.shape)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise FormatError(f"{self.path}: no parameter {name!r}")

    def private(self, task: str) -> dict[str, np.ndarray]:
        self.check_task(task)
        half = self._once(("private", task), lambda: {  # stored F16 / BF16: float32, cast once, read-only as the file's views
            k: np.lib.stride_tricks.as_strided(self._view(private_name(task, k)).astype(np.float32), writeable=False)
            for k in self.codecs[task].private_keys})
        return {k: half[k] if k in half else self._view(private_name(task, k)) for k in self.private_keys[task]}

    def private_dtype(self, task: str, key: str) -> str:
        """The dtype ``private(task)[key]`` is served in (F32 where the codec stores it in a half dtype)."""
        return "F32" if key in self.codecs[task].private_keys else self.header.tensors[private_name(task, key)].dtype

    def task_weight(self, task: str, param: Param) -> np.ndarray:
        """θ_t for one parameter (a fresh array for merged params, a view for carried ones)."""
        base = self.base(param.name)
        if param.role == "carried":
            return base
        return self.rebuild_into(task, param.name, np.empty(param.shape, dtype=base.dtype))

    def rebuild_into(self, task: str, param: str, out: np.ndarray) -> np.ndarray:
        """θ_t of merged param ``param`` written into ``out`` (θ0's shape and dtype) by the task's
        codec; the fast kernels are bit-identical to the rule (runtime/codecs.py)."""
        vector = self.task_vector(task, param)
        return rebuild(self.base(param), vector, self.recipe(task, param), out)

    def plan_item(self, task: str, param: str, out: np.ndarray) -> tuple:
        """What a ``SwitchPlan`` takes to rebuild merged param ``param`` of ``task`` into ``out``."""
        return self.base(param), self.task_vector(task, param), self.recipe(task, param), out

    def switch_plan(self, task: str, outs: dict[str, np.ndarray]) -> SwitchPlan:
        """θ_t of every merged param in ``outs`` (param name -> its output array), rebuilt by one
        ``SwitchPlan``: build it once per task and output set, ``run()`` it per switch."""
        return SwitchPlan([self.plan_item(task, p, out) for p, out in outs.items()])

    def task_weights(self, task: str) -> dict[str, np.ndarray]:
        """The full state dict of task ``task``: rebuilt params, carried buffers, private tensors."""
        self.check_task(task)
        self.check_file()
        out = {p.name: self.task_weight(task, p) for p in self.params}
        out.update(self.private(task))
        return out

    @property
    def base_id(self) -> str:
        """Identity of θ0: sha256 over the base tensors' names and digests (docs/format.md)."""
        h = hashlib.sha256()
        for p in sorted(self.params, key=lambda p: p.name):
            digest = self.checksums.get(base_name(p.name)) or _sha256(self.base(p.name))
            h.update(f"{p.name}\t{digest}\n".encode())
        return h.hexdigest()

    def verify(self) -> None:
        """Re-hash every tensor; FormatError naming each damaged tensor."""
        _expect(bool(self.checksums), self.path, "bundle has no checksums to verify against")
        if self._mm is None:
            raise FormatError(f"{self.path}: bundle is closed")
        bad = [n for n in sorted(self.header.tensors) if _sha256(tensor_view(self._mm, self.header, n)) != self.checksums[n]]
        _expect(not bad, self.path, f"checksum mismatch (damaged data) in tensor(s): {', '.join(bad)}")
        self._verified.update(self.header.tensors)

    def close(self) -> None:
        self._recipes.clear()  # they hold views of the mapping
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # views still alive; the mapping goes when they do
                pass
            self._mm = None

    def __enter__(self) -> "Bundle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sha256(arr: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))).hexdigest()


def parse_manifest(path: str, header: Header) -> dict[str, Any]:
    """Check the manifest's own structure (the tensors are checked by ``Bundle``)."""
    raw = header.metadata.get(MANIFEST_KEY)
    _expect(raw is not None, path, f"not an edgemerge bundle (no {MANIFEST_KEY!r} metadata)")
    m = parse_json(raw, f"{path}: manifest", strict=True)
    _expect(isinstance(m, dict) and m.get("format") == FORMAT_NAME, path, f"manifest 'format' must be {FORMAT_NAME!r}")
    version = m.get("format_version")
    _expect(type(version) is int and version >= 1, path, "manifest 'format_version' must be an integer ≥ 1")
    _expect(version <= FORMAT_VERSION, path,
            f"bundle format v{version} is newer than this edgemerge reads (v{FORMAT_VERSION}); upgrade edgemerge "
            "(pip install -U edgemerge)")
    for key, kind in (("tasks", list), ("params", list), ("private", dict), ("mask", dict), ("method", dict)):
        _expect(isinstance(m.get(key), kind), path, f"manifest {key!r} must be a {kind.__name__}")
    _expect(len(m["tasks"]) > 0, path, "manifest lists no tasks")
    names = []
    for t in m["tasks"]:
        _expect(isinstance(t, dict) and isinstance(t.get("name"), str), path, "manifest task entries need a 'name'")
        try:
            names.append(check_task_name(t["name"]))
        except FormatError as exc:
            raise FormatError(f"{path}: {exc}") from None
        for key in ("lambda", "density", "recon_error"):  # optional; what inspect shows, when present
            v = t.get(key)
            _expect(v is None or type(v) in (int, float), path, f"task {t['name']!r}: {key!r} must be a number, got {str(v)[:40]}")
    _expect(len(set(names)) == len(names), path, "manifest lists a task twice")
    for key in ("options", "base", "aliases"):  # optional objects a tool reads (inspect, plan)
        _expect(isinstance(m.get(key, {}), dict), path, f"manifest {key!r} must be an object")
    stats = m.get("options", {}).get("statistics", {})
    _expect(isinstance(stats, dict) and isinstance(stats.get("per_task", []), list), path,
            "manifest options 'statistics' must be an object with a 'per_task' list")
    aliases = m.get("aliases", {})
    _expect(isinstance(aliases, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()),
            path, "manifest 'aliases' must map tied names to param names")
    _expect(set(m["private"]) <= set(names), path, "manifest 'private' names a task that is not listed")
    _expect(all(isinstance(v, list) and all(isinstance(k, str) for k in v) for v in m["private"].values()), path,
            "manifest 'private' must map tasks to lists of tensor names")
    _expect(m.get("vector_dtype") in VECTOR_DTYPES, path, f"manifest 'vector_dtype' must be one of {', '.join(VECTOR_DTYPES)}")
    _expect(m["mask"].get("policy") in MASK_POLICIES, path, f"manifest mask 'policy' must be one of {', '.join(MASK_POLICIES)}")
    _expect(m["mask"]["policy"] == "none" or m["mask"].get("bit_order") == BIT_ORDER, path,
            f"mask bit_order must be {BIT_ORDER!r}")
    return m


def open_bundle(path: str | os.PathLike, verify: bool | str = "first-use") -> Bundle:
    """Open and validate a bundle. ``verify``: "first-use" (default: each tensor is checked against
    its sha256 the first time it is read), "open" or True (every tensor now), "off" or False."""
    path = os.fspath(path)
    policy = {True: "open", False: "off"}.get(verify, verify) if isinstance(verify, bool) else verify
    header = read_header(path)
    bundle = Bundle(path, header, parse_manifest(path, header), "first-use" if policy == "open" else policy)
    if policy == "open":
        bundle.verify()
    return bundle
