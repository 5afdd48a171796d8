"""ONNX Runtime's CPU GEMM with its weight as a graph input, against the same weight as a constant
it pre-packs (issue 16: why `inputs` mode stays above the plain model at one token on Linear models).

A chain of MiniLM's Linear shapes (6 layers × (4 × 384 → 384, 384 → 1536, 1536 → 384): 10.6 M
float32 weights, 42 MB, beyond a small CPU's last-level cache), one graph per variant, every weight bound once through IOBinding as `TaskSession` binds them, so a
call hands ONNX Runtime only the activations:

- ``constant``: Gemm(x, W, transB=1), W an initializer: what the plain model runs (MLAS packs W
  once, at session build);
- ``constant, no pre-pack``: the same graph with ``session.disable_prepacking``;
- ``input [N, K]``: Gemm(x, W, transB=1), W a graph input (the fast layout; Linear as exported);
- ``input [K, N]``: MatMul(x, W), W a graph input (Conv1D's layout);
- ``input on the left``: (W @ xᵀ)ᵀ, W a graph input (the few-rows layout).

Rows per call 1 / 4 / 16 / 64, on every core and on one; every variant's output is checked against
the constant's first; median of interleaved rounds (inference_bench's, each call repeated ~50 ms a round).

    python bench/gemm_bench.py [--rounds 11] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import git_rev, machine, table, write_section  # noqa: E402
from inference_bench import _interleaved  # noqa: E402

LAYERS, D, F = 6, 384, 1536
VARIANTS = ("constant", "constant, no pre-pack", "input [N, K]", "input [K, N]", "input on the left")


def weights(layers: int = LAYERS) -> list[np.ndarray]:
    """torch Linear weights, [out, in], per layer: q, k, v, o 384 → 384, up 384 → 1536, down 1536 → 384."""
    rng = np.random.default_rng(0)
    return [rng.standard_normal(shape, dtype=np.float32) * np.float32(0.05)
            for _ in range(layers) for shape in ((D, D),) * 4 + ((F, D), (D, F))]


def graph(variant: str, ws: list[np.ndarray], rows: int) -> tuple[bytes, dict[str, np.ndarray]]:
    """The variant's ONNX model and the weights it takes as inputs (name -> array, in its layout)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, feeds = [], [], {}
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, D])]
    cur = "x"
    for i, w in enumerate(ws):
        name, out = f"w{i}", f"h{i}"
        if variant.startswith("constant"):
            inits.append(numpy_helper.from_array(w, name))
        else:
            feeds[name] = np.ascontiguousarray(w.T) if variant == "input [K, N]" else w
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(feeds[name].shape)))
        if variant == "input [K, N]":
            nodes.append(helper.make_node("MatMul", [cur, name], [out]))
        elif variant == "input on the left":
            nodes += [helper.make_node("Transpose", [cur], [out + "_xt"], perm=[1, 0]),
                      helper.make_node("MatMul", [name, out + "_xt"], [out + "_yt"]),
                      helper.make_node("Transpose", [out + "_yt"], [out], perm=[1, 0])]
        else:
            nodes.append(helper.make_node("Gemm", [cur, name], [out], transB=1))
        cur = out
    g = helper.make_graph(nodes, "gemm_stack", inputs, [helper.make_tensor_value_info(cur, TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(), feeds


def runners(ws: list[np.ndarray], rows: int, threads: int) -> dict:
    """Per variant a call that runs it on fixed activations, weights bound once."""
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((rows, D), dtype=np.float32)
    fns, ref = {}, None
    for v in VARIANTS:
        model, feeds = graph(v, ws, rows)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as TaskSession runs
        if v == "constant, no pre-pack":
            opts.add_session_config_entry("session.disable_prepacking", "1")
        sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        binding = sess.io_binding()
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in feeds.values()]  # kept alive with the binding
        for name, value in zip(feeds, values):
            binding.bind_ortvalue_input(name, value)
        binding.bind_cpu_input("x", x)
        binding.bind_output(sess.get_outputs()[0].name, "cpu")

        def call(sess=sess, binding=binding, values=values):
            sess.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0]

        y = call()
        if ref is None:
            ref = y
        np.testing.assert_allclose(y, ref, rtol=1e-3, atol=1e-3, err_msg=f"{v} computes another product")
        fns[v] = call
    return fns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--rows", default="1,4,16,64")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    ws = weights()
    rows_out = []
    for threads in (0, 1):
        for rows in (int(r) for r in args.rows.split(",")):
            fns = runners(ws, rows, threads)
            med = _interleaved(fns, args.rounds)
            base = med["constant"]
            rows_out.append(["all" if threads == 0 else "1", str(rows), f"{1e3 * base:.3f} ms"]
                            + [f"{med[v] / base:.2f}×" for v in VARIANTS[1:]])
            print(" | ".join(rows_out[-1]), flush=True)
    headers = ["threads", "rows per call", "constant (pre-packed)"] + [f"{v} ÷ constant" for v in VARIANTS[1:]]
    body = (f"`python bench/gemm_bench.py --rounds {args.rounds}` — commit {git_rev()}; {LAYERS} × (4 × Gemm {D}→{D}, {D}→{F}, {F}→{D}), "
            f"{sum(w.size for w in ws) / 1e6:.1f} M float32 weights, each bound once through IOBinding; median of interleaved rounds.\n\n"
            f"Machine: {machine()}.\n\n" + table(headers, rows_out) + "\n\n"
            "At one row MLAS packs nothing: a weight that is an input goes to its one-row kernels (either layout), a constant "
            "to the pre-packed kernel, which this table shows faster; with pre-packing off the constant runs the one-row "
            "kernels too. From a few rows on, a weight input on B is packed per call, and the left-operand form (few-rows) "
            "packs only the activations. So no layout of an input reaches the constant at one row on ONNX Runtime's CPU "
            "provider: that, not our switch or binding, is what `inputs` mode pays at one token.")
    print(body)
    if not args.no_write:
        write_section("ONNX Runtime GEMM: weight as input vs pre-packed constant (issue 16)", body)


if __name__ == "__main__":
    main()
