"""The bundle reader under structured mutants (issue 13, item 6): a FormatError or a bundle every
tool can use, valid for the safetensors library too, never a traceback, never other weights."""

import json
import struct

import numpy as np
import pytest
from click.testing import CliRunner

import bundlefuzz
from edgemerge.cli import main
from edgemerge.errors import FormatError
from edgemerge.runtime import open_bundle
from models import make_tiny_suite

N_MUTANTS = 1500


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    d = tmp_path_factory.mktemp("bundlefuzz")
    b = make_tiny_suite(d)
    return d, open(b.path, "rb").read(), bundlefuzz.weights_of(b)


def test_mutants_fail_only_with_format_error(seed):
    d, data, original = seed
    rng = np.random.default_rng(13)
    runner = CliRunner()
    outcomes = {"accepted": 0, "refused": 0}
    for i in range(N_MUTANTS):
        outcomes[bundlefuzz.check(d / "m.safetensors", bundlefuzz.mutate(data, rng), original, runner, main)] += 1
    assert outcomes["accepted"] > N_MUTANTS // 20 and outcomes["refused"] > N_MUTANTS // 2, outcomes


def _edit(data: bytes, fn) -> bytes:
    header, rest = bundlefuzz.split(data)
    return bundlefuzz.join(fn(header), rest)


def _manifest(fn):
    def edit(header):
        m = json.loads(header["__metadata__"]["edgemerge.manifest"])
        fn(m)
        header["__metadata__"]["edgemerge.manifest"] = bundlefuzz._dump(m)
        return bundlefuzz._dump(header)

    return edit


def _tensor(field, value):
    def edit(header):
        name = next(k for k in header if k != "__metadata__")
        header[name][field] = value
        return bundlefuzz._dump(header)

    return edit


@pytest.mark.parametrize("edit, message", [
    (_tensor("dtype", ["F32"]), "unknown dtype"),
    (_tensor("shape", [0, 2**80]), "beyond what an array can hold"),
    (_tensor("shape", [1] * 65), "beyond what an array can hold"),
    (_tensor("shape", "DEEP"), "not valid JSON"),
    (_tensor("data_offsets", "LONG_INT"), "not valid JSON"),
    (_manifest(lambda m: m.update(format_version=0)), "'format_version' must be an integer ≥ 1"),
    (_manifest(lambda m: m["tasks"][0].update(density="high")), "'density' must be a number"),
    (_manifest(lambda m: m.update(options=3)), "manifest 'options' must be an object"),
    (_manifest(lambda m: m.update(aliases={"x": "y"})), "alias 'x' -> 'y'"),
])
def test_named_mutants_are_one_line_format_errors(seed, edit, message):
    d, data, _ = seed
    p = d / "named.safetensors"
    p.write_bytes(_edit(data, edit))
    with pytest.raises(FormatError, match=message) as e:
        open_bundle(p)
    assert "\n" not in str(e.value) and str(p) in str(e.value)


def test_a_bundle_cannot_claim_a_header_over_the_librarys_cap(seed):
    d, data, _ = seed
    p = d / "cap.safetensors"
    p.write_bytes(struct.pack("<Q", 100_000_001) + data[8:])
    with pytest.raises(FormatError, match="more than the 100000000-byte cap"):
        open_bundle(p)
