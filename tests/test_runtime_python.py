"""edgemerge.runtime stays importable on the oldest Python a Jetson ships with that we claim (3.8,
JetPack 5.x; README "On the device"). No 3.8 interpreter is on the CI machine, so its sources are
parsed with the 3.8 grammar and searched for what 3.8 lacks at run time (annotations are not
evaluated: every file has ``from __future__ import annotations``)."""

import ast
import pathlib
import subprocess
import sys

import pytest

RUNTIME = pathlib.Path(__file__).resolve().parent.parent / "edgemerge" / "runtime"
OLDEST = (3, 8)
NEWER_METHODS = {"removeprefix", "removesuffix", "bit_count", "is_integer"}  # str 3.9, int 3.10/3.12
BUILTIN_GENERICS = {"dict", "list", "tuple", "set", "frozenset", "type"}


def _annotation_nodes(tree) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        anns = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            anns = [a.annotation for a in [*node.args.args, *node.args.kwonlyargs, *node.args.posonlyargs,
                                            node.args.vararg, node.args.kwarg] if a is not None] + [node.returns]
        elif isinstance(node, ast.AnnAssign):
            anns = [node.annotation]
        for a in anns:
            if a is not None:
                ids |= {id(n) for n in ast.walk(a)}
    return ids


def problems_for_py38(source: str) -> list[str]:
    tree = ast.parse(source, feature_version=OLDEST)  # a SyntaxError for 3.9+ grammar
    out = []
    in_ann = _annotation_nodes(tree)
    if in_ann and not any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and
                          any(a.name == "annotations" for a in n.names) for n in tree.body):
        out.append("no `from __future__ import annotations`: annotations would be evaluated")
    for node in ast.walk(tree):
        if id(node) in in_ann:
            continue
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in BUILTIN_GENERICS:
            out.append(f"line {node.lineno}: {node.value.id}[...] evaluated at run time (3.9+)")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr) and \
                any(isinstance(x, ast.Constant) and x.value is None for x in (node.left, node.right)):
            out.append(f"line {node.lineno}: `X | None` evaluated at run time (3.10+)")
        if isinstance(node, ast.Attribute) and node.attr in NEWER_METHODS:
            out.append(f"line {node.lineno}: .{node.attr} (newer than 3.8)")
        if isinstance(node, ast.Attribute) and node.attr == "cache" and isinstance(node.value, ast.Name) and node.value.id == "functools":
            out.append(f"line {node.lineno}: functools.cache (3.9+)")
        if isinstance(node, ast.Call) and any(k.arg == "strict" for k in node.keywords) and isinstance(node.func, ast.Name) \
                and node.func.id == "zip":
            out.append(f"line {node.lineno}: zip(strict=) (3.10+)")
        if isinstance(node, ast.Call) and any(k.arg in ("slots", "kw_only") for k in node.keywords):
            out.append(f"line {node.lineno}: dataclass(slots/kw_only) (3.10+)")
    return out


def _device_files() -> list[pathlib.Path]:
    """Every edgemerge source a device loads: what importing the runtime and its backends pulls
    in (torch blocked), plus every runtime file."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "import edgemerge.runtime, edgemerge.runtime.session, edgemerge.runtime.torch_backend, edgemerge.runtime.trt_backend\n"
            "print('\\n'.join(sorted(m.__file__ for n, m in sys.modules.items() if n.startswith('edgemerge') and m and m.__file__)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return sorted({pathlib.Path(p) for p in out} | set(RUNTIME.glob("*.py")))


@pytest.mark.parametrize("path", _device_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_device_sources_run_on_python_38(path):
    assert problems_for_py38(path.read_text()) == []


def test_the_checker_finds_what_38_lacks():
    assert problems_for_py38("from __future__ import annotations\nx: dict[str, int] = {}\n") == []
    bad = "from __future__ import annotations\nimport functools\nT = dict[str, int]\n" \
          "def f(s):\n    return s.removeprefix('a'), zip([], [], strict=True), functools.cache\n"
    assert len(problems_for_py38(bad)) == 4
    with pytest.raises(SyntaxError):
        problems_for_py38("from __future__ import annotations\nmatch x:\n    case 1:\n        pass\n")
    assert problems_for_py38("x = 1\n") == []
    assert problems_for_py38("def f(x: int) -> None:\n    return int | None\n") == [
        "no `from __future__ import annotations`: annotations would be evaluated", "line 2: `X | None` evaluated at run time (3.10+)"]
