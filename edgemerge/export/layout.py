"""The switchable graph's GEMMs in the layout ONNX Runtime runs fastest with a weight that is a
graph input (issue 16).

ONNX Runtime pre-packs a constant GEMM weight once, at session build; a weight fed as an input is
packed again on every run, and the cost depends on its layout. A weight read directly as B --
``MatMul(x, W)`` or ``Gemm(x, W)`` with W as [K, N]: GPT-2's Conv1D, any ``x @ W`` -- is cheaper
fed transposed to ``Gemm(x, Wᵀ, transB=1)`` (GPT-2 small on 2 cores, `bench/inference_bench.py`:
1×64 tokens 1.33× the plain model → 1.21×, 1×16 1.89× → 1.55×).
Such a weight is declared [N, K] and listed in the ``edgemerge.transposed`` metadata; the runtime
rebuilds θ_t in that order (``TaskSession`` keeps θ0, τ and the masks of those weights
transposed; the mask rule is elementwise, so the fed values are θ_t's bytes, permuted).
Activations of rank > 2 are reshaped to 2-D around the Gemm, and a 1-D weight added right after
becomes Gemm's C.

Tried and *not* done: ``MatMul(x, Transpose(W))`` -- a Linear on 3-D activations -- rewritten to
``Gemm(x, W, transB=1)`` (with reshapes, or as ``com.microsoft.FusedMatMul``) was no faster on a
MiniLM-sized BERT in a one-off experiment (not kept as a benchmark), so that form keeps the
exporter's graph.

Only float32 weights read by nothing else (no other op, no subgraph) are rewritten.

``weights_left_layout`` (export ``layout="few-rows"``) goes one step further for calls with few
rows: every GEMM whose weight W is a graph input fed [N, K] -- ``Gemm(x, W, transB=1)`` and
``MatMul(x, Transpose(W))`` -- becomes ``(W @ xᵀ)ᵀ``: ``Transpose(MatMul(W, Transpose(x)))``. The
weight is then GEMM's left operand, which ONNX Runtime's MLAS reads in place; only the small
activation is packed per call. Measured on 2 cores (`bench/inference_bench.py`): far faster at
batch 1 for short sequences (MiniLM 1×16 tokens, GPT-2 1×16 and 1×64), slower where a call has
a few hundred rows over wide weights (ViT-B, 197 patches): a choice for the deployment, not a
default. The weights are fed exactly as in the fast layout.
"""

from __future__ import annotations

from typing import Any

FLOAT = 1  # onnx.TensorProto.FLOAT


def _uses(graph) -> dict[str, list[tuple[Any, int]]]:
    """Tensor name -> (node, input index) of every reader; graph outputs and names read inside
    subgraphs count as a reader ``(None, -1)`` that no rewrite may touch."""
    uses: dict[str, list[tuple[Any, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            uses.setdefault(name, []).append((node, i))
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                for inner in sub.node:
                    for name in inner.input:
                        uses.setdefault(name, []).append((None, -1))
    for out in graph.output:
        uses.setdefault(out.name, []).append((None, -1))
    return uses


def _attr(node, name: str, default):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _ranks(model) -> dict[str, int]:
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is an optimization here: unknown ranks take the N-d path
        return {}
    ranks = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            ranks[vi.name] = len(t.shape.dim)
    return ranks


class _Builder:
    def __init__(self, prefix: str):
        self.prefix, self.count, self.nodes = prefix, 0, []

    def name(self, what: str) -> str:
        self.count += 1
        return f"{self.prefix}/{what}_{self.count}"

    def const(self, values: list[int]) -> str:
        from onnx import helper, numpy_helper
        import numpy as np

        out = self.name("const")
        self.nodes.append(helper.make_node("Constant", [], [out], name=out,
                                           value=numpy_helper.from_array(np.array(values, dtype=np.int64))))
        return out

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        from onnx import helper

        out = output or self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op), **attrs))
        return out


def _gemm(b: _Builder, a: str, w: str, bias: str | None, n: int, k: int, rank: int | None, out: str, **attrs) -> None:
    """``out = a @ wᵀ (+ bias)`` as one Gemm with transB=1; a of any rank ≥ 2."""
    ins = [w] + ([bias] if bias else [])
    if rank == 2:
        b.node("Gemm", [a, *ins], out, transB=1, **attrs)
        return
    lead = b.node("Slice", [b.node("Shape", [a]), b.const([0]), b.const([-1])])
    flat = b.node("Reshape", [a, b.const([-1, k])])
    y = b.node("Gemm", [flat, *ins], transB=1, **attrs)
    b.node("Reshape", [y, b.node("Concat", [lead, b.const([n])], axis=0)], out)


def fast_gemm_layout(model, weights: set[str]) -> list[str]:
    """Rewrite ``model`` (the switchable graph, weights as inputs) in place; return the weights
    now fed transposed."""
    from onnx import helper

    g = model.graph
    inputs = {i.name: i for i in g.input if i.name in weights}
    shapes = {}
    for name, vi in inputs.items():
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if t.elem_type == FLOAT and len(dims) == 2 and None not in dims:
            shapes[name] = dims
    uses = _uses(g)
    ranks = _ranks(model)
    replace: dict[int, list] = {}   # id(node) -> nodes that take its place
    drop: set[int] = set()
    transposed: list[str] = []
    b = _Builder("edgemerge_layout")

    def bias_of(node, n: int) -> tuple[str | None, str]:
        """A 1-D float weight of size n added right after ``node``: fold it into Gemm's C."""
        out = node.output[0]
        readers = uses.get(out, [])
        if len(readers) != 1 or readers[0][0] is None or readers[0][0].op_type != "Add":
            return None, out
        add = readers[0][0]
        other = add.input[1 - readers[0][1]]
        vi = inputs.get(other)
        if vi is None or len(uses.get(other, [])) != 1 or vi.type.tensor_type.elem_type != FLOAT:
            return None, out
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        if dims != [n]:
            return None, out
        drop.add(id(add))
        return other, add.output[0]

    for w, (d0, d1) in shapes.items():
        readers = uses.get(w, [])
        if not readers or any(node is None for node, _ in readers):
            continue
        if not all(i == 1 and (node.op_type == "MatMul" and node.input[0] != w or
                               node.op_type == "Gemm" and not _attr(node, "transB", 0)) for node, i in readers):
            continue
        k, n = d0, d1  # W is [K, N]: fed as Wᵀ = [N, K]
        for node, _ in readers:
            if node.op_type == "Gemm":
                keep = [a for a in node.attribute if a.name != "transB"]
                del node.attribute[:]
                node.attribute.extend([*keep, helper.make_attribute("transB", 1)])
                continue
            bias, out = bias_of(node, n)
            b.nodes = []
            _gemm(b, node.input[0], w, bias, n, k, ranks.get(node.input[0]), out)
            replace[id(node)] = b.nodes
        dims = inputs[w].type.tensor_type.shape.dim
        dims[0].dim_value, dims[1].dim_value = n, k
        transposed.append(w)
    if replace or drop:
        new = []
        for node in g.node:
            if id(node) in replace:
                new.extend(replace[id(node)])
            elif id(node) not in drop:
                new.append(node)
        del g.node[:]
        g.node.extend(new)
        del g.value_info[:]  # shapes of rewritten tensors are re-inferred by the runtime
    return transposed


def _left(b: _Builder, x: str, w: str, bias: str | None, n: int, k: int, rank: int | None, out: str) -> None:
    """``out = x @ wᵀ (+ bias)`` as ``Transpose(MatMul(w, Transpose(x)))``; x of any rank ≥ 1."""
    flat = x if rank == 2 else b.node("Reshape", [x, b.const([-1, k])])
    yt = b.node("MatMul", [w, b.node("Transpose", [flat], perm=[1, 0])])
    y = b.node("Transpose", [yt], out if rank == 2 and not bias else None, perm=[1, 0])
    if bias:
        y = b.node("Add", [y, bias], out if rank == 2 else None)
    if rank != 2:
        lead = b.node("Slice", [b.node("Shape", [x]), b.const([0]), b.const([-1])])
        b.node("Reshape", [y, b.node("Concat", [lead, b.const([n])], axis=0)], out)


def weights_left_layout(model, weights: set[str]) -> int:
    """Rewrite ``model`` in place (after ``fast_gemm_layout``): every GEMM that reads a weight input
    W as [N, K] -- ``Gemm(x, W[, C], transB=1)`` with transA 0 and alpha = beta = 1, or
    ``MatMul(x, Transpose(W))`` -- computes ``(W @ xᵀ)ᵀ`` instead. W's feed is unchanged; other
    readers of W are left as they are. Returns how many GEMMs were rewritten."""
    g = model.graph
    shapes = {}
    for vi in g.input:
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if vi.name in weights and t.elem_type == FLOAT and len(dims) == 2 and None not in dims:
            shapes[vi.name] = dims
    uses, ranks = _uses(g), _ranks(model)
    transposes = {n.output[0]: n for n in g.node if n.op_type == "Transpose" and n.input[0] in shapes
                  and _attr(n, "perm", [1, 0]) in ([1, 0], (1, 0))}
    replace: dict[int, list] = {}
    b = _Builder("edgemerge_left")
    for node in g.node:
        if node.op_type == "Gemm" and len(node.input) >= 2 and node.input[1] in shapes and _attr(node, "transB", 0) == 1 \
                and _attr(node, "transA", 0) == 0 and _attr(node, "alpha", 1.0) == 1.0 and _attr(node, "beta", 1.0) == 1.0:
            w, bias = node.input[1], (node.input[2] if len(node.input) > 2 and node.input[2] else None)
        elif node.op_type == "MatMul" and node.input[1] in transposes and node.input[0] != node.input[1]:
            w, bias = transposes[node.input[1]].input[0], None
        else:
            continue
        n, k = shapes[w]
        b.nodes = []
        _left(b, node.input[0], w, bias, n, k, ranks.get(node.input[0]), node.output[0])
        replace[id(node)] = b.nodes
    if not replace:
        return 0
    left = {id(t) for name, t in transposes.items()
            if all(reader is not None and id(reader) in replace and reader.op_type == "MatMul" for reader, _ in uses.get(name, []))}
    new = []
    for node in g.node:
        if id(node) in replace:
            new.extend(replace[id(node)])
        elif id(node) not in left:  # a Transpose(W) whose every reader now reads W itself
            new.append(node)
    del g.node[:]
    g.node.extend(new)
    del g.value_info[:]
    return len(replace)
