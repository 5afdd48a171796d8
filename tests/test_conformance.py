"""The conformance matrix (tests/matrix.py): every architecture × dtype × merge method through every
path -- merge from safetensors, a sharded folder and a torch file (byte-identical bundles), verify,
extract (bytes = the normative rule), ONNX export, TaskSession in both modes (inputs mode over the fast
and the few-rows layouts), TorchTaskModel with
each CPU kernel, the flat image + the C applier -- each task's output against a torch forward of θ_t.
A path that cannot serve a cell must refuse with an edgemerge error that names the fix; anything
else fails the cell. ``bench/conformance.py`` prints the same cells as docs/conformance.md.
"""

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

import matrix  # noqa: E402

_SUITES: dict = {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("conformance")
    return root, matrix.compile_emflat(root)


def _suite(root, arch, dtype):
    key = (arch, dtype)
    if key not in _SUITES:
        suite = matrix.build_suite(matrix.ARCHS[arch], dtype, root / f"{arch}-{dtype}")
        _SUITES[key] = (suite, matrix.export_suite(suite, matrix.merge_cell(suite, "ties", "safetensors")))
    return _SUITES[key]


EXPECTED = {  # every path a cell must report, and what it may say
    "merge+verify": {"exact"}, "formats": {"identical"}, "extract": {"exact"}, "export onnx": {"ok"},
    "TorchTaskModel numpy": {"exact"}, "TorchTaskModel torch": {"exact"}, "flat + C applier": {"exact"},
}


@pytest.mark.parametrize("method", matrix.METHODS)
@pytest.mark.parametrize("dtype", list(matrix.DTYPES))
@pytest.mark.parametrize("arch", list(matrix.ARCHS))
def test_cell(workdir, arch, dtype, method):
    root, emflat = workdir
    assert emflat is not None, "a C compiler is needed for the C applier column"
    suite, exported = _suite(root, arch, dtype)
    r = matrix.run_cell(suite, method, exported, emflat)
    assert r.failures == [], r.failures
    for path, allowed in EXPECTED.items():
        assert r.paths.get(path) in allowed, (path, r.paths.get(path))
    for mode in ("inputs", "few-rows", "sessions"):
        got = r.paths[f"TaskSession {mode}"]
        if dtype == "fp32":  # float32 graphs always run, within 1e-5 of torch
            assert r.worst[f"TaskSession {mode}"] <= 1e-5, got
        else:
            assert got.startswith("refused: ORT CPU has no") or r.worst[f"TaskSession {mode}"] <= matrix.TOLERANCE[dtype], got
    assert r.paths["TorchTaskModel numpy"] == "exact"


@pytest.mark.parametrize("dtype", list(matrix.DTYPES))
@pytest.mark.parametrize("arch", list(matrix.ARCHS))
def test_codec_cell(workdir, arch, dtype):
    """Format v2: tswitch, delta (float or quantized) and xz-planes TALL tasks, with corrections, in one bundle."""
    root, emflat = workdir
    assert emflat is not None, "a C compiler is needed for the C applier column"
    suite, exported = _suite(root, arch, dtype)
    r = matrix.run_codec_cell(suite, exported, emflat)
    assert r.failures == [], r.failures
    for path in ("extract", "TorchTaskModel numpy", "TorchTaskModel torch", "flat + C applier"):
        assert r.paths.get(path) == "exact", (path, r.paths)
    for mode in ("inputs", "few-rows", "sessions"):
        got = r.paths[f"TaskSession {mode}"]
        if dtype == "fp32":
            assert r.worst[f"TaskSession {mode}"] <= 1e-5, got
        else:
            assert got.startswith("refused: ORT CPU has no") or r.worst[f"TaskSession {mode}"] <= matrix.TOLERANCE[dtype], got
