"""The Python flat-image reader and the C applier agree bit for bit (issue 13, item 4): on structured
mutants of real images, and on one constructed image per disagreement the issue found."""

import struct

import numpy as np
import pytest

import flatfuzz
from edgemerge.export.flat import CODES, ENTRY, HEADER, TASK, read_flat

N_MUTANTS = 1500


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("flatdiff")
    return d, flatfuzz.build_library(d), flatfuzz.seed_images(d)


def test_mutants_are_accepted_or_refused_alike(setup):
    d, lib, seeds = setup
    rng = np.random.default_rng(2026)
    outcomes = {"accepted": 0, "refused": 0}
    for i in range(N_MUTANTS):
        data, tasks = seeds[list(seeds)[i % len(seeds)]]
        m = flatfuzz.mutate(data, rng)
        problem = flatfuzz.compare(lib, d / "m.img", m, tasks)
        assert problem is None, f"mutant {i}: {problem}"
        outcomes["accepted" if flatfuzz.c_rebuild(lib, m, tasks[0]) is not None else "refused"] += 1
    assert min(outcomes.values()) > N_MUTANTS // 10, outcomes  # the mutants exercise both outcomes


def _patch(data: bytes, row: int, field: int, fmt: str, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into("<" + fmt, b, HEADER.size + ENTRY.size * row + field, value)
    return bytes(b)


def _find(path, data, kind: int, name: str | None = None) -> int:
    path.write_bytes(data)
    _, entries, _ = read_flat(str(path))
    return next(i for i, e in enumerate(entries) if e.kind == kind and (name is None or e.name == name) and e.numel > 1)


def _both_refuse(lib, path, data: bytes, tasks) -> None:
    assert flatfuzz.compare(lib, path, data, tasks) is None
    assert all(flatfuzz.c_rebuild(lib, data, t) is None for t in tasks)


def test_each_root_cause_is_refused_by_both(setup):
    d, lib, seeds = setup
    data, tasks = seeds["F32"]
    p = d / "case.img"
    vec = _find(p, data, 1, "a.weight")
    base = struct.unpack_from("<I", data, HEADER.size + ENTRY.size * vec + 12)[0]
    mask = _find(p, data, 2, "a.weight")
    # a vector with another element count than its base (Python used to broadcast it)
    one = _patch(_patch(_patch(_patch(data, vec, 32, "Q", 1), vec, 24, "Q", 4), vec, 44, "I", 1), vec, 56, "I", 1)
    _both_refuse(lib, p, one, tasks)
    # a mask of another dtype with the right byte count
    _both_refuse(lib, p, _patch(data, mask, 4, "I", CODES["I8"]), tasks)
    # a non-float base that has a vector (I32 has F32's byte count)
    _both_refuse(lib, p, _patch(data, base, 4, "I", CODES["I32"]), tasks)
    # duplicate task names (Python rebuilt the first, C the last)
    n = struct.unpack_from("<I", data, 20)[0]
    rows = HEADER.size + ENTRY.size * n
    dup = bytearray(data)
    dup[rows + TASK.size:rows + 2 * TASK.size] = dup[rows:rows + TASK.size]
    _both_refuse(lib, p, bytes(dup), tasks)
    # a vector whose name differs from its base's (names were not checked in C)
    name_off = struct.unpack_from("<I", data, HEADER.size + ENTRY.size * vec + 48)[0]
    names_off = struct.unpack_from("<Q", data, 40)[0]
    renamed = bytearray(data)
    renamed[names_off + name_off] ^= 0x20
    _both_refuse(lib, p, bytes(renamed), tasks)
    # numel 0 with dims whose running product overflows 64 bits before the zero
    huge = data
    for k, dim in enumerate([0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0]):
        huge = _patch(huge, vec, 56 + 4 * k, "I", dim)
    huge = _patch(_patch(_patch(huge, vec, 44, "I", 4), vec, 32, "Q", 0), vec, 24, "Q", 0)
    _both_refuse(lib, p, huge, tasks)
    # two base entries of the same name, and a row copied over another (two vectors for one param)
    copied = bytearray(data)
    src, dst = HEADER.size + ENTRY.size * vec, HEADER.size + ENTRY.size * mask
    copied[dst:dst + ENTRY.size] = copied[src:src + ENTRY.size]
    _both_refuse(lib, p, bytes(copied), tasks)


def test_an_empty_section_may_sit_inside_another(setup):
    """It holds no bytes: both readers accept it and rebuild the same θ_t."""
    d, lib, seeds = setup
    data, tasks = seeds["F32"]
    p = d / "empty.img"
    p.write_bytes(data)
    _, entries, _ = read_flat(str(p))
    empty = next(i for i, e in enumerate(entries) if e.nbytes == 0)
    inside = next(e for e in entries if e.nbytes > 64)  # an aligned offset strictly inside its bytes
    moved = _patch(data, empty, 16, "Q", inside.offset + 64)
    assert flatfuzz.compare(lib, p, moved, tasks) is None
    assert flatfuzz.c_rebuild(lib, moved, tasks[0]) == flatfuzz.c_rebuild(lib, data, tasks[0]) is not None
