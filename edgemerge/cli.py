"""Command line: thin adapters (parse -> validate -> one library call -> render with rich)."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .errors import ConfigError, EdgemergeError

console = Console(stderr=False)
err_console = Console(stderr=True)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@contextmanager
def progress_bar(quiet: bool) -> Iterator[Any]:
    """A callback (stage, done, total): one rich bar per stage on a terminal; plain lines (at most one
    per 10% of a stage, and its end) when the output is a log; nothing with --quiet. A stage that runs
    again (the next merge's "write bundle") starts its bar afresh, with its own total."""
    if quiet:
        yield None
        return
    if not err_console.is_terminal:
        shown: dict[str, int] = {}

        def log(stage: str, done: int, total: int) -> None:
            tenth = done * 10 // max(total, 1)
            if done == 1 or done == total or tenth != shown.get(stage):
                err_console.print(f"{escape(stage)}: {done}/{total}", highlight=False)
            shown[stage] = -1 if done == total else tenth

        yield log
        return
    with Progress(TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=False) as prog:
        bars: dict[str, Any] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in bars or (done <= 1 and prog.tasks[bars[stage]].finished):
                bars[stage] = prog.add_task(stage, total=total)
            prog.update(bars[stage], completed=done, total=total)

        yield update


class Main(click.Group):
    """Turn EdgemergeError into one red line and exit code 2; no traceback for user mistakes."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgemergeError as exc:
            # the message is text, not markup: "pip install 'edgemerge[onnx]'" must keep its [onnx]
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            sys.exit(2)


@click.group(cls=Main)
@click.version_option(__version__, prog_name="edgemerge")
def main() -> None:
    """Merge N task checkpoints into one bundle (θ0 + τ_MTL + 1-bit masks) and switch tasks on devices."""


def _parse_kv(items: tuple[str, ...], what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{what} {item!r} must look like KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _parse_tasks(items: tuple[str, ...], option: str = "--task", value: str = "PATH") -> dict[str, str]:
    """NAME=VALUE per item (a task name each, once)."""
    tasks: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"{option} {item!r} must look like NAME={value}")
        if name in tasks:
            raise ConfigError(f"task {name!r} given twice to {option}")
        tasks[name] = path
    return tasks


def bundle_kernels(b, kernel_name) -> str:
    """The mask kernel(s) a switch of this bundle runs, per θ0 dtype (e.g. 'c-avx2 (F16)')."""
    from .runtime.dtypes import DTYPES

    from .runtime.kernel import _cmask

    dtypes = sorted({p.dtype for p in b.params if p.role == "merged"})
    out = ", ".join(f"{kernel_name(DTYPES[d], DTYPES[b.vector_dtype])} ({d})" for d in dtypes) or "none (nothing merged)"
    if any(c.name != "tall" for c in b.codecs.values()):  # tswitch, emr and delta run the C plan or plain numpy
        out += "; other codecs: " + ("C" if _cmask() is not None else "numpy (the C extension is off or not built: several times slower)")
    return out


def _parse_ties(items) -> dict[str, str]:
    ties = {}
    for item in items:
        alias, sep, kept = item.partition("=")
        if not sep or not alias or not kept:
            raise ConfigError(f"--tie {item!r} must be ALIAS=KEPT, e.g. lm_head.weight=transformer.wte.weight")
        ties[alias] = kept
    return ties


@main.command()
@click.argument("base", type=click.Path())
@click.option("--task", "tasks", multiple=True, required=True, metavar="NAME=PATH", help="A task checkpoint (repeat).")
@click.option("--method", default="ties", show_default=True, help="Merge method (see `edgemerge methods`).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Method parameter, e.g. density=0.2 (repeat).")
@click.option("--masks", type=click.Choice(["tall", "none"]), default="tall", show_default=True, help="Per-task TALL masks, or one merged model.")
@click.option("--lambdas", default="0.2,0.3,0.4,0.5,0.6", show_default=True, help="TALL λ grid, comma separated.")
@click.option("--private", multiple=True, metavar="PATTERN", help="Keys stored whole per task, e.g. 'head.*' (repeat).")
@click.option("--tie", "ties", multiple=True, metavar="ALIAS=KEPT",
              help="Two names of one tensor in files that hold both copies (e.g. lm_head.weight=transformer.wte.weight): "
                   "stored once (repeat). Ties in torch files are found by themselves.")
@click.option("--statistics", type=click.Choice(["per-task", "merge"]), default="per-task", show_default=True,
              help="Running statistics (BatchNorm running_mean/var): kept whole per task, or merged like weights.")
@click.option("--vector-dtype", type=click.Choice(["auto", "F32", "F16", "BF16"]), default="auto", show_default=True,
              help="Storage dtype of τ_MTL (auto: θ0's, that of most of its float elements).")
@click.option("--target", type=float, default=None, metavar="PERCENT",
              help="Choose each task's codec (bundle format v2): the cheapest candidate whose rebuilt weights keep "
                   "PERCENT of τ_t's energy (a data-free proxy; the Python API takes a validation score instead).")
@click.option("--candidate", "candidates", multiple=True, metavar="SPEC",
              help="A codec --target may choose (repeat; default: the built-in list, see `edgemerge encode --help`).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Bundle file to write (.safetensors).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def merge(base, tasks, method, params, masks, lambdas, private, ties, statistics, vector_dtype, target, candidates, output,
          as_json, quiet) -> None:
    """Merge task checkpoints of BASE into one bundle."""
    from .pipeline import MergeConfig, merge as run_merge

    try:
        grid = tuple(float(x) for x in lambdas.split(","))
    except ValueError:
        raise ConfigError(f"--lambdas {lambdas!r} must be comma-separated numbers") from None
    cfg = MergeConfig(base=base, tasks=_parse_tasks(tasks), method=method, params=_parse_kv(params, "--param"),
                      masks=masks, lambdas=grid, private=tuple(private), statistics=statistics, vector_dtype=vector_dtype,
                      ties=_parse_ties(ties))
    chosen = None
    with progress_bar(quiet or as_json) as prog:
        if target is None:
            report = run_merge(cfg, output, progress=prog)
        else:
            _check_target_options(target, candidates, output, [base, *cfg.tasks.values()])
            with _scratch_dir(output) as tmp:  # the v1 bundle lives only until the v2 one is written
                v1 = os.path.join(tmp, "merged.safetensors")
                report = run_merge(cfg, v1, progress=prog)
                chosen = _encode_to_target(v1, cfg.tasks, target, candidates, output, prog, tmp)
            report.path, report.bundle_bytes = output, os.path.getsize(output)
    if as_json:
        from dataclasses import asdict

        click.echo(json.dumps({**asdict(report), **({"codecs": chosen} if chosen else {})}, indent=2))
        return
    table = Table(title=f"{report.method} → {report.path}")
    for col in ("task", "λ_t", "mask density", "‖θ̂_t − θ_t‖", "relative"):
        table.add_column(col, justify="right" if col != "task" else "left")
    for t in report.tasks:
        lam = "-" if t.lam is None else f"{t.lam:g}"
        table.add_row(t.name, lam, f"{t.density:.3f}", f"{t.error:.4g}", f"{t.relative_error:.3f}")
    console.print(table)
    unchanged = f" ({report.n_unchanged:,} more that no task changed, stored once)" if report.n_unchanged else ""
    if chosen:
        _codec_table(chosen, f"codecs chosen for {target:g}% weight fidelity")
    console.print(f"{report.n_params:,} merged parameters{unchanged}, {len(report.tasks)} tasks: inputs {_human(report.input_bytes)} "
                  f"→ bundle {_human(report.bundle_bytes)} in {report.seconds:.1f} s")


def _check_target_options(target: float, candidates, output: str, inputs) -> None:
    """Everything --target needs, checked before any work."""
    from .codecs import check_target, parse_codec
    from .io import check_writable, refuse_inputs

    check_target(target)
    for c in candidates:
        parse_codec(c)
    refuse_inputs(output, inputs)
    check_writable(output)


@contextmanager
def _scratch_dir(output: str) -> Iterator[str]:
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix=".edgemerge-", dir=os.path.dirname(os.path.abspath(output)))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _encode_to_target(bundle: str, tasks: dict[str, str], target: float, candidates, output: str, prog, tmp: str) -> list[dict]:
    """Per task the cheapest codec that keeps ``target``% weight fidelity, written to ``output``;
    returns the manifest's task entries."""
    from .codecs import CANDIDATES, choice_notes, encode_bundle, select_codecs

    choices = select_codecs(bundle, tasks, None, target, os.path.join(tmp, "candidate.safetensors"),
                            tuple(candidates) or CANDIDATES, progress=prog)
    manifest = encode_bundle(bundle, tasks, {t: c.spec for t, c in choices.items()}, output, progress=prog,
                             notes=choice_notes(choices, target, "weight fidelity"))
    return manifest["tasks"]


def _codec_table(entries: list[dict], title: str) -> None:
    table = Table(title=title)
    for col in ("task", "codec", "bits/param", "fixes", "rel. error", "chosen by"):
        table.add_column(col, justify="left" if col in ("task", "codec", "chosen by") else "right", overflow="fold")
    for t in entries:
        c = t["codec"]
        stored = ",".join(f"{k}={c[k]}" for k in ("planes", "dtype", "codes", "scale", "repaired") if k in c)
        why = c.get("chosen_by")
        table.add_row(t["name"], f"{c['name']}:{stored}", f"{c['bits_per_param']:.3f}", f"{c['correction']:,}",
                      f"{c['relative_error']:.4f}" if "relative_error" in c else "-",
                      "-" if not why else ("not scored" if why["score"] is None else f"{why['score']:.2f}%")
                      + ("" if why["met"] else " (not met: fallback)"))
    console.print(table)


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--task", "tasks", multiple=True, metavar="NAME=PATH",
              help="The checkpoint a task was merged from (repeat); needed by every codec but plain tall.")
@click.option("--codec", "default", default=None, metavar="SPEC",
              help="Codec for every task (default tswitch): tall[:planes=raw|xz,scale=ls], tswitch[:density=0.1,planes=xz|raw], "
                   "emr[:planes=xz|raw] (needs every task's checkpoint), delta[:dtype=F16|BF16|F32|I8|I4] (I8 / I4 also qmax=N, "
                   "fit=mse|absmax|step with step=MULTIPLE of the tensor's RMS of τ, codes=raw|xz; I8 also codes=lowrank,bits=B: "
                   "int8 SVD factors, B bits per param as stored); any takes "
                   "correction=SHARE (e.g. 0.001) and private=F16|BF16 (the task's float32 heads and statistics in that dtype).")
@click.option("--codec-for", "per_task", multiple=True, metavar="NAME=SPEC", help="Codec for one task (repeat).")
@click.option("--target", type=float, default=None, metavar="PERCENT",
              help="Instead of --codec: per task the cheapest candidate whose rebuilt weights keep PERCENT of τ_t's "
                   "energy (a data-free proxy); none does: delta:dtype=F16, and the manifest says so.")
@click.option("--candidate", "candidates", multiple=True, metavar="SPEC", help="A codec --target may choose (repeat).")
@click.option("-o", "--output", required=True, type=click.Path(), help="v2 (or v3) bundle to write.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def encode(bundle, tasks, default, per_task, target, candidates, output, quiet) -> None:
    """Re-encode BUNDLE's tasks with per-task codecs (bundle format v2)."""
    from .codecs import encode_bundle, parse_codec
    from .runtime import open_bundle

    paths = _parse_tasks(tasks) if tasks else {}
    if target is not None:
        if default or per_task:
            raise ConfigError("--target chooses every task's codec: drop --codec / --codec-for, or drop --target")
        _check_target_options(target, candidates, output, [bundle, *paths.values()])
        with progress_bar(quiet) as prog, _scratch_dir(output) as tmp:
            entries = _encode_to_target(bundle, paths, target, candidates, output, prog, tmp)
        _codec_table(entries, f"{bundle} → {output}, codecs chosen for {target:g}% weight fidelity")
        console.print(f"bundle {_human(os.path.getsize(bundle))} → {_human(os.path.getsize(output))}")
        return
    if candidates:
        raise ConfigError("--candidate is for --target")
    chosen = {name: parse_codec(spec) for name, spec in _parse_tasks(per_task, "--codec-for", "SPEC").items()}
    with open_bundle(bundle) as b:
        codecs = {t: chosen.get(t) or parse_codec(default or "tswitch") for t in b.tasks}
        unknown = sorted(set(chosen) - set(b.tasks))
        if unknown:
            raise ConfigError(f"--codec-for names unknown task(s) {', '.join(unknown)}; tasks: {', '.join(b.tasks)}")
        with progress_bar(quiet) as prog:
            manifest = encode_bundle(b, paths, codecs, output, progress=prog)
    _codec_table(manifest["tasks"], f"{bundle} → {output}")
    console.print(f"bundle {_human(os.path.getsize(bundle))} → {_human(os.path.getsize(output))}")


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(bundle, as_json) -> None:
    """Tasks, λ_t, densities, sizes per section, storage vs N separate checkpoints."""
    from .inspect import summarize
    from .runtime import open_bundle

    with open_bundle(bundle) as b:
        s = summarize(b)
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    console.print(f"[bold]{s['path']}[/]  format v{s['format_version']}, method {s['method'].get('name')}, "
                  f"masks {s['mask']['policy']}, τ_MTL {s['vector_dtype']}, {s['n_params']:,} merged params")
    for alias, kept in s["aliases"].items():
        console.print(f"tied: {escape(alias)} is stored as {escape(kept)}")
    stats = s["statistics"] or {}
    if stats.get("per_task"):
        console.print(f"running statistics kept per task: {len(stats['per_task'])} tensors")
    t = Table("task", "codec", "λ_t", "density", "bits / param", "recon error")
    for task in s["tasks"]:
        lam = "-" if task["lambda"] is None else f"{task['lambda']:g}"
        err = "-" if task["recon_error"] is None else f"{task['recon_error']:.4g}"
        t.add_row(task["name"], task["codec"], lam, "-" if task["density"] is None else f"{task['density']:.3f}",
                  f"{task['bits_per_param']:.3f}", err)
    console.print(t)
    sizes = Table("section", "bytes")
    for k, v in s["sections"].items():
        sizes.add_row(k, _human(v))
    sizes.add_row("[bold]bundle", f"[bold]{_human(s['bundle_bytes'])}  ({s['bits_per_param_per_task']:.3f} bits / param / task "
                  "beyond θ0)")
    sizes.add_row("N separate (source dtype)", f"{_human(s['separate_bytes_source_dtype'])}  (bundle = {s['ratio_vs_source_dtype']:.1%})")
    sizes.add_row("N separate (fp32)", f"{_human(s['separate_bytes_fp32'])}  (bundle = {s['ratio_vs_fp32']:.1%})")
    console.print(sizes)


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--task", required=True, help="Task to rebuild.")
@click.option("-o", "--output", required=True, type=click.Path(), help="safetensors file to write θ_t to.")
def extract(bundle, task, output) -> None:
    """Write θ_t of one task as a plain safetensors state dict."""
    from .io import refuse_inputs, write_safetensors
    from .runtime import open_bundle

    refuse_inputs(output, [bundle], "bundle")
    with open_bundle(bundle) as b:
        b.check_task(task)
        weights = b.task_weights(task)
        write_safetensors(output, weights, {"edgemerge.task": task, "edgemerge.bundle_base_id": b.base_id}, checksums=False)
    console.print(f"wrote {task} ({len(weights)} tensors) → {output}")


@main.command()
@click.argument("bundle", type=click.Path())
def verify(bundle) -> None:
    """Check structure and every tensor's sha256."""
    from .runtime import open_bundle

    with open_bundle(bundle, verify=True) as b:
        console.print(f"[green]ok[/] {bundle}: {len(b.header.tensors)} tensors, {len(b.tasks)} tasks, checksums match")


@main.command()
def methods() -> None:
    """List merge methods with their defaults and papers."""
    from .methods import METHODS

    t = Table("method", "what", "defaults", "paper")
    for m in METHODS.values():
        t.add_row(m.name, m.title, ", ".join(f"{k}={v}" for k, v in m.defaults.items()), m.paper)
    console.print(t)


@main.command()
@click.option("--suite", type=click.Choice(["text", "vision"]), default="vision", show_default=True,
              help="vision: EfficientNet-Lite0 on 8 image tasks; text: all-MiniLM-L6-v2 on 5 text tasks.")
@click.option("--tasks", default=None, help="Comma-separated subset of the suite's tasks.")
@click.option("--out", default="edgemerge-demo", show_default=True, type=click.Path(), help="Folder for bundle, ONNX, report, plots.")
@click.option("--seed", default=0, show_default=True)
@click.option("--steps", type=int, default=None, help="Fine-tuning steps per task [vision: 300 of 32; text: 200 of 16].")
@click.option("--lr", type=float, default=None, help="Fine-tuning learning rate [vision 1e-4, text 3e-4] (merging is sensitive to it).")
@click.option("--no-deploy", is_flag=True, help="Skip the ONNX Runtime deploy step.")
@click.option("--quiet", is_flag=True)
def demo(suite, tasks, out, seed, steps, lr, no_deploy, quiet) -> None:
    """The main job: real model, real data: fine-tune, merge, TALL bundle, deploy, report."""
    from .demo import LABELS, MERGED, DemoOptions, run_demo

    opts = DemoOptions(suite=suite, tasks=tuple(tasks.split(",")) if tasks else None, out=out, seed=seed,
                       steps=steps, lr=lr, deploy=not no_deploy)
    with progress_bar(quiet) as prog:
        r = run_demo(opts, prog)
    methods = ["zero_shot", "finetuned", *MERGED, "tall"]
    o = r.options
    t = Table(title=f"Test accuracy % (normalized = / fine-tuned) — suite {suite}, seed {seed}, lr {o['lr']:g}, {o['steps']} steps")
    t.add_column("task")
    for m in methods:
        t.add_column(LABELS[m], justify="right")
    for task in r.tasks:
        t.add_row(task, *[f"{100 * r.accuracy[m][task]:.1f}" + ("" if m in ("zero_shot", "finetuned") else
                          f" ({100 * r.normalized(m, task):.0f}%)") for m in methods])
    t.add_row("[bold]mean", *[f"{100 * sum(r.accuracy[m].values()) / len(r.tasks):.1f}" + ("" if m in ("zero_shot", "finetuned") else
              f" ({100 * sum(r.normalized(m, x) for x in r.tasks) / len(r.tasks):.0f}%)") for m in methods])
    console.print(t)
    s = r.storage
    console.print(f"storage: {len(r.tasks)} checkpoints {_human(s['n_checkpoints'])} → TALL bundle {_human(s['tall_bundle'])} "
                  f"({s['tall_bundle'] / s['n_checkpoints']:.0%}); λ_t: " + ", ".join(f"{k}={v}" for k, v in r.tall_lambda.items()))
    if r.deploy:
        d = r.deploy
        ok = sum(d["matches_torch"].values())
        console.print(f"deploy: ONNX Runtime accuracy equals torch on {ok}/{len(r.tasks)} tasks; switch p50 {d['switch_ms_p50']:.1f} ms; "
                      f"bundle + graph {_human(d['bundle_bytes'] + d['onnx_bytes'])} vs {len(r.tasks)} ONNX files {_human(d['per_task_onnx_bytes'])}")
    from .demo import headline

    console.print(escape(headline(r)))
    console.print(f"report: {os.path.join(out, 'report.md')}  ({r.seconds['total']:.0f} s)")


@main.command()
def devices() -> None:
    """List the device profiles `edgemerge plan` knows, with their sources."""
    from .devices.profiles import DEVICES, JETPACK_SOURCE

    t = Table("name", "device", "RAM", "DRAM bandwidth", "storage", "JetPack → TensorRT")
    for d in DEVICES.values():
        t.add_row(d.name, d.title, _human(d.ram_bytes), f"{d.bandwidth / 1e9:.1f} GB/s", ", ".join(d.storage),
                  ", ".join(f"{k}→{v}" for k, v in d.tensorrt.items()) or "-")
    console.print(t)
    console.print(f"Sources: per device in edgemerge/devices/profiles.py; JetPack map: {JETPACK_SOURCE}.")


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--device", "device_name", required=True, help="A profile from `edgemerge devices`.")
@click.option("--runtime", type=click.Choice(["inputs", "sessions"]), default="inputs", show_default=True)
@click.option("--storage", default=None, help="Storage medium (default: the device's first).")
@click.option("--efficiency", type=float, default=None, help="Kernel efficiency vs memcpy (default: measured here when this host is the device's "
                   "architecture, else a stated 25-100% range).")
@click.option("--activation-mb", type=float, default=0.0, help="Activation memory of your model, MiB.")
@click.option("--json", "as_json", is_flag=True)
def plan(bundle, device_name, runtime, storage, efficiency, activation_mb, as_json) -> None:
    """Project fit, storage, cold start and switch time of BUNDLE on a device (projections, not measurements)."""
    import platform

    from .devices.plan import DEVICE_ARCH, UNMEASURED_EFFICIENCY, measure_efficiency, project, sizes
    from .devices.profiles import get_device
    from .runtime import open_bundle

    device = get_device(device_name)
    host = platform.machine().lower()
    if efficiency is not None:
        eff, basis = efficiency, "as given (--efficiency)"
    elif host in (DEVICE_ARCH, "arm64"):
        eff, basis = measure_efficiency(), f"measured on this {host} host against its memcpy"
    else:
        eff = UNMEASURED_EFFICIENCY
        basis = (f"not measured: this host is {host}, the device {DEVICE_ARCH} (another kernel loop), so the switch is "
                 f"a range over {UNMEASURED_EFFICIENCY[0]:.0%}-{UNMEASURED_EFFICIENCY[1]:.0%} of peak bandwidth; run plan on "
                 "the device or pass --efficiency")
    with open_bundle(bundle) as b:
        s = sizes(b)
        p = project(s, device, runtime, storage, eff, int(activation_mb * 2**20))
    if as_json:
        click.echo(json.dumps(p, indent=2))
        return
    t = Table(title=f"{bundle} on {device.title} — projections from data-sheet figures, not measurements")
    t.add_column("")
    t.add_column("edgemerge bundle", justify="right")
    t.add_column("N separate models", justify="right")
    t.add_row("fits in RAM", f"{'yes' if p['fits'] else 'NO'}: {_human(p['resident_bytes'])} of {_human(p['available_bytes'])}",
              _human(p["separate_resident_bytes"]))
    for part, nbytes in p["resident_parts"].items():
        t.add_row(f"  of which {part}", _human(nbytes), "")
    t.add_row("storage", _human(p["bundle_storage_bytes"]), _human(p["separate_storage_bytes"]))
    t.add_row(f"cold start ({p['storage']})", f"{p['cold_start_s']:.2f} s", "")
    fast, slow = p["switch_s_range"]
    shown = f"{1e3 * slow:.1f} ms" if fast == slow else f"{1e3 * fast:.1f}-{1e3 * slow:.1f} ms"
    t.add_row("task switch (warm)", shown, f"{1e3 * p['separate_load_s']:.0f} ms (load from {p['storage']})")
    t.add_row(f"task switch (cold page cache, {p['storage']})",
              f"{p['cold_switch_s']:.2f} s: reads {_human(p['cold_switch_read_bytes'])} = "
              f"{p['cold_read_vs_checkpoint']:.2f}× one checkpoint", f"{p['separate_load_s']:.2f} s")
    t.add_row("RAM to keep switches warm", f"{_human(p['warm_ram_bytes'])} ({'fits' if p['fits'] else 'does NOT fit'})", "")
    console.print(t)
    console.print(f"switch = {_human(p['kernel_bytes'])} touched ÷ ({device.bandwidth / 1e9:.1f} GB/s peak × efficiency); "
                  f"efficiency {escape(basis)}. Warm means θ0, {'the shared vector (τ_MTL or elected), ' if s.reads_vector else ''}the task's codec data "
                  "(masks, planes, δ) and head stay in RAM (the 'bundle data' row); "
                  "from a cold page cache a switch first reads them from storage (the cold-start row). "
                  "See edgemerge/devices/plan.py")


@main.group()
def export() -> None:
    """Export a bundle for a runtime (ONNX, TensorRT, flat image)."""


@export.command("onnx")
@click.argument("bundle", type=click.Path())
@click.option("--model", "factory", required=True, metavar="PKG.MODULE:FUNC",
              help="Factory returning the nn.Module (or (module, example_inputs)) for a task.")
@click.option("-o", "--output-dir", required=True, type=click.Path(), help="Folder for the .onnx files.")
@click.option("--input-name", "input_names", multiple=True, help="Names of the data inputs, in order (repeat).")
@click.option("--output-name", "output_names", multiple=True, help="Names of the outputs (repeat).")
@click.option("--task", default=None, help="Bake this task's θ_t into the plain graph (default θ0).")
@click.option("--opset", default=17, show_default=True)
@click.option("--layout", type=click.Choice(["fast", "few-rows", "auto", "exporter"]), default="fast",
              show_default=True,
              help="fast: the switchable graph's GEMMs take weights as [N, K] with transB=1 (faster in ONNX Runtime); "
                   "few-rows: also as (W @ xᵀ)ᵀ, faster for batch 1 and short sequences, slower at a few hundred rows "
                   "per call (docs/BENCHMARKS.md); auto: both graphs, the runtime times them per input shape and runs "
                   "the faster; exporter: keep the graph as torch wrote it.")
def export_onnx_cmd(bundle, factory, output_dir, input_names, output_names, task, opset, layout) -> None:
    """Write <model>.plain.onnx (initializers) and <model>.switchable.onnx (weights as inputs)."""
    from .export.onnx import export_onnx

    sys.path.insert(0, ".")  # factories usually live in the user's working directory
    res = export_onnx(bundle, factory, output_dir, input_names=input_names or None,
                      output_names=output_names or ("output",), task=task, opset=opset, switchable=task is None,
                      layout=layout)
    console.print(f"plain graph → {res.plain}")
    if res.switchable:
        fed = f", {len(res.transposed)} of them fed transposed" if res.transposed else ""
        console.print(f"switchable graph → {res.switchable} ({len(res.weights)} weights as inputs{fed})")
    if res.alternate:
        console.print(f"few-rows graph → {res.alternate} (same feeds; TaskSession runs the faster per input shape)")
    if res.unused:
        console.print(f"[yellow]not used by the graph:[/] {', '.join(res.unused)}")


@export.command("tensorrt")
@click.argument("bundle", type=click.Path())
@click.option("--onnx", "onnx_path", required=True, type=click.Path(), help="The plain graph from `edgemerge export onnx`.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Engine (plan) file to write.")
@click.option("--strip", is_flag=True, help="Weightless plan (STRIP_PLAN, TensorRT ≥ 10.0), refit from the bundle at load.")
@click.option("--fp16", is_flag=True, help="Allow FP16 kernels.")
@click.option("--trtexec-only", is_flag=True, help="Only print the equivalent trtexec commands (no TensorRT needed).")
def export_tensorrt_cmd(bundle, onnx_path, output, strip, fp16, trtexec_only) -> None:
    """Build a refittable TensorRT engine for TrtTaskSession (refittable in the bundle's weights)."""
    from .export.tensorrt import build_engine, managed_weights, trtexec_lines
    from .runtime import open_bundle

    names = managed_weights(open_bundle(bundle), onnx_path)
    click.echo(f"{len(names)} weights will be refittable; equivalent trtexec commands (build; build + time a refit):")
    for line in trtexec_lines(onnx_path, output, strip, fp16):
        click.echo(f"  {line}")  # plain: a command line must not be wrapped or styled
    if trtexec_only:
        return
    plan = build_engine(bundle, onnx_path, output, strip=strip, fp16=fp16)
    console.print(f"TensorRT {plan['tensorrt']}: {', '.join(plan['flags'])} → {output} ({_human(plan['bytes'])})")
    for note in plan["notes"]:
        console.print(f"[yellow]note:[/] {note}")


@export.command("flat")
@click.argument("bundle", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path())
@click.option("--encoding", type=click.Choice(["F32", "F16", "Q16"]), default="F32", show_default=True,
              help="θ0 and the shared vectors as float32, float16 or 16-bit fixed point (Q-format per tensor).")
@click.option("--align", type=click.Choice(["64", "4096"]), default="64", show_default=True)
def export_flat_cmd(bundle, output, encoding, align) -> None:
    """Flat little-endian image + the C reference applier in edgemerge/devices/c/emflat.c."""
    from .export.flat import write_flat

    errors = write_flat(bundle, output, encoding, int(align))
    worst = max(errors.items(), key=lambda kv: kv[1]["max_abs"], default=None)
    with open(output, "rb") as f:
        version = int.from_bytes(f.read(12)[8:12], "little")
    console.print(f"wrote {output} (version {version}{'' if version == 1 else ': per-task codecs'}, "
                  f"{_human(os.path.getsize(output))}, {encoding}, {align}-byte sections)")
    if worst and worst[1]["max_abs"] > 0:
        console.print(f"largest quantization error: {worst[1]['max_abs']:.3g} (max abs) in {worst[0]}; "
                      f"mean rms {sum(e['rms'] for e in errors.values()) / len(errors):.3g}")


def _load_inputs(items: tuple[str, ...]) -> dict[str, Any] | Any:
    import numpy as np

    def load(path: str):
        try:
            return np.load(path, allow_pickle=False)
        except OSError as exc:
            raise ConfigError(f"--input {path}: {exc.strerror or 'cannot read'}; give a .npy file (np.save)") from None
        except ValueError as exc:  # not a .npy file, or one holding pickled objects
            raise ConfigError(f"--input {path}: not a plain .npy array ({exc})") from None

    if len(items) == 1 and "=" not in items[0]:
        return load(items[0])
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            raise ConfigError(f"--input {item!r}: use NAME=FILE.npy when the model has several inputs")
        out[name] = load(path)
    return out


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--onnx", "onnx_path", required=True, type=click.Path(), help="The switchable (or plain, with --mode sessions) graph.")
@click.option("--task", required=True)
@click.option("--input", "inputs", multiple=True, required=True, metavar="[NAME=]FILE.npy")
@click.option("--mode", type=click.Choice(["inputs", "sessions"]), default="inputs", show_default=True)
@click.option("-o", "--output", type=click.Path(), help="Save the first output as .npy.")
@click.option("--verify", "verify", type=click.Choice(["first-use", "open", "off"]), default="first-use", show_default=True,
              help="Check each tensor's sha256 when first read, all at open, or not at all (trust the storage).")
def run(bundle, onnx_path, task, inputs, mode, output, verify) -> None:
    """Run one task of BUNDLE on ONNX Runtime."""
    import numpy as np

    from .runtime import open_bundle
    from .runtime.session import TaskSession

    s = TaskSession(open_bundle(bundle, verify=verify), onnx_path, mode=mode)
    outs = s.run(_load_inputs(inputs), task=task)
    if output:
        from .io import atomic_output

        output = output if output.endswith(".npy") else output + ".npy"  # as np.save names it
        with atomic_output(output) as tmp, open(tmp, "wb") as f:  # replaced, never written through a link
            np.save(f, outs[0])
    for name, arr in zip(s.output_names, outs):
        console.print(f"{name}: shape {list(arr.shape)} {arr.dtype}")
        console.print(np.array2string(arr, threshold=20, precision=4))


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--onnx", "onnx_path", required=True, type=click.Path())
@click.option("--input", "inputs", multiple=True, required=True, metavar="[NAME=]FILE.npy")
@click.option("--mode", type=click.Choice(["inputs", "sessions"]), default="inputs", show_default=True)
@click.option("--rounds", default=3, show_default=True, help="Passes through all tasks.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--verify", "verify", type=click.Choice(["first-use", "open", "off"]), default="first-use", show_default=True,
              help="Check each tensor's sha256 when first read, all at open, or not at all (trust the storage).")
def bench(bundle, onnx_path, inputs, mode, rounds, as_json, verify) -> None:
    """Switch latency, inference latency, storage and peak RSS on this machine."""
    from .measure import bench_session, memcpy_seconds, peak_rss_bytes, percentile
    from .runtime import open_bundle
    from .runtime.kernel import kernel_name
    from .runtime.session import TaskSession

    s = TaskSession(open_bundle(bundle, verify=verify), onnx_path, mode=mode)
    res = bench_session(s, _load_inputs(inputs), rounds=rounds)
    res["memcpy_p50_ms"] = 1e3 * percentile(memcpy_seconds(s.bundle), 50)
    res["switch_vs_memcpy"] = res["switch_p50_ms"] / res["memcpy_p50_ms"] if res["memcpy_p50_ms"] else float("nan")
    res["bundle_bytes"] = os.path.getsize(bundle)
    res["onnx_bytes"] = os.path.getsize(onnx_path)
    res["peak_rss_bytes"] = peak_rss_bytes()
    res["mode"] = mode
    res["kernel"] = bundle_kernels(s.bundle, kernel_name)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    t = Table(title=f"{bundle} on ONNX Runtime ({mode} mode), {len(s.tasks)} tasks")
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_row("switch p50 / p95", f"{res['switch_p50_ms']:.2f} / {res['switch_p95_ms']:.2f} ms")
    t.add_row("memcpy of the merged weights", f"{res['memcpy_p50_ms']:.2f} ms (switch = {res['switch_vs_memcpy']:.2f}×)")
    t.add_row("mask kernel", res["kernel"])
    t.add_row("inference p50 / p95", f"{res['infer_p50_ms']:.2f} / {res['infer_p95_ms']:.2f} ms")
    t.add_row("storage: bundle + graph", _human(res["bundle_bytes"] + res["onnx_bytes"]))
    t.add_row("peak RSS", _human(res["peak_rss_bytes"]))
    console.print(t)


if __name__ == "__main__":  # pragma: no cover
    main()
