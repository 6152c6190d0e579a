"""Training cost of one GatedBlock per registered mixer vs attention, over T.

Every mixer in the registry (the library's and any a user registered before the run), each in the
paper's wrapper, GatedBlock; attention is the baseline and Sessa runs twice:
    attention      GatedBlock(Attention), on the `sdpa` backend                      the baseline
    sessa-dense    GatedBlock(Sessa), feedback_solve pinned to `reference` (T x T matrices)
    sessa-chunked  GatedBlock(Sessa), feedback_solve pinned to `chunked`   (blocks of C tokens)
    <name>         GatedBlock(<registered mixer>) with --heads heads where it takes num_heads, its
                   other defaults, and the automatic backend choice (`chunked` for the recurrences)
Every `attention` op runs on `sdpa`. Defaults: B=4, D=256, 4 heads, float32, 2 threads, T in
512 1024 2048 4096 8192. --models picks some (attention is always included).

Time: inference forward (torch.no_grad) and a training step (forward + backward of y.sum(),
parameter gradients included), best of --repeats; the models alternate inside every repeat so all
see the same machine load. Ratios are to attention at the same T.

Peak memory: each (model, T) runs once more in a fresh subprocess. Before the step it calls
malloc_trim(0) (free heap pages go back to the OS, so resident memory = live memory), reads VmRSS,
resets the kernel's high-water mark (`echo 5 > /proc/self/clear_refs`), runs one training step and
reads VmHWM. Peak = VmHWM - VmRSS: every byte the step touched beyond the model and its input
(activations, saved tensors, gradients, workspaces, allocator slack), as the OS sees it. Linux only.
The timing process keeps freed memory for reuse (tools/bench.py, zoo.bench.keep_freed_memory); the
memory subprocesses run with the system's malloc.

The dense reference is skipped ("over budget") when its estimated T x T buffers,
DENSE_BUFFERS * B * T^2 * 4 bytes, exceed --dense-budget-gib. At the end, two markdown tables
summarise the run: training-step time and peak memory of every model as multiples of attention's.

    python tools/bench.py layer
    python tools/bench.py layer --T 512 2048 --models gla retnet --plot layer.png
    python tools/bench.py layer --chunk-sweep --T 1024 2048 4096     # picks chunked's default C
    python tools/bench.py layer --compile --T 512 --no-memory           # adds torch.compile'd rows

--compile adds each model compiled with torch.compile (inductor, fullgraph=True; the same weights),
timed after its compilation; ratios stay relative to eager attention.
"""

from __future__ import annotations

import argparse
import ctypes
import inspect
import multiprocessing as mp
import os
import time
from functools import partial
from typing import Callable

import torch

from blocks.gated_block import GatedBlock
from blocks.mixer import Mixer
from kernels.feedback_solve import chunked
from zoo.plots import pyplot, save_figure
from zoo.registry import REGISTRY

SESSA_SOLVES = {"sessa-dense": "reference", "sessa-chunked": "chunked"}
# Live (B, T, T) float32 buffers of the dense reference at the peak of a training step: measured
# (peak(sessa-dense) - peak(sessa-chunked)) / (B T^2 4 bytes) = 7.1 at T = 2048 and 4096.
DENSE_BUFFERS = 7


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--T", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192], help="sequence lengths")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dense-budget-gib", type=float, default=4.0,
                        help="skip the dense reference when DENSE_BUFFERS * B * T^2 * 4 bytes exceed this")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of time and memory against T")
    parser.add_argument("--chunk-sweep", action="store_true",
                        help="instead: time sessa-chunked for each --chunks size (pick the default C)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    parser.add_argument("--compile", action="store_true", help="also time each model under torch.compile")
    parser.add_argument("--models", nargs="+", default=None,
                        help=f"models to time next to attention (default: all of {', '.join(model_names())})")


def model_names() -> list[str]:
    """attention first, then every registered mixer in registration order (Sessa as dense and chunked)."""
    names = ["attention"]
    for name in REGISTRY.mixers:
        names += list(SESSA_SOLVES) if name == "sessa" else [name] if name != "attention" else []
    return names


def source_of(name: str) -> Callable[..., Mixer]:
    """The registered mixer class (or factory) behind model `name`."""
    return REGISTRY.mixer("sessa" if name in SESSA_SOLVES else name).source


def build(name: str, dim: int, heads: int, source: Callable[..., Mixer] | None = None) -> GatedBlock:
    """GatedBlock(mixer `name`) as described in the module docstring; `source` defaults to the
    registry's (passed explicitly to the memory subprocess, which may not know a mixer registered at run time)."""
    source = source_of(name) if source is None else source
    kwargs = {"num_heads": heads} if "num_heads" in inspect.signature(source).parameters else {}
    block = GatedBlock(dim, partial(source, **kwargs))
    ops = block.mixer.ops  # the layer's pins (blocks.mixer.Mixer.ops), read at every call
    if "attention" in ops:
        ops["attention"] = "sdpa"
    if name in SESSA_SOLVES:
        ops["feedback_solve"] = SESSA_SOLVES[name]
    return block


def train_step(model: GatedBlock, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()


def dense_bytes(B: int, T: int) -> int:
    return DENSE_BUFFERS * B * T * T * 4


# ---------------------------------------------------------------- peak memory (one subprocess per point)
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_worker(name: str, source: Callable[..., Mixer], T: int, B: int, D: int, heads: int, threads: int,
                 chunk: int, out: mp.Queue) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    chunked.set_chunk_size(chunk)
    model = build(name, D, heads, source)
    x = torch.randn(B, T, D)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    train_step(model, x)
    out.put((_status_kib("VmHWM") - before) * 1024)


def peak_bytes(name: str, T: int, args: argparse.Namespace, chunk: int) -> int:
    """Peak extra resident bytes of one training step, measured in a fresh process."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_peak_worker,
                    args=(name, source_of(name), T, args.batch, args.dim, args.heads, args.threads, chunk, out))
    p.start()
    result = out.get()
    p.join()
    return result


# ---------------------------------------------------------------- time (in process, models alternating)
def best_times(models: dict[str, GatedBlock], x: torch.Tensor, repeats: int) -> dict[str, tuple[float, float]]:
    """{name: (forward seconds, training-step seconds)}, best of `repeats`, models interleaved."""
    for m in models.values():  # warm-up (compiled models compile here: a grad and a no-grad graph)
        train_step(m, x)
        with torch.no_grad():
            m(x)
    best = {n: (float("inf"), float("inf")) for n in models}
    for _ in range(repeats):
        for n, m in models.items():
            start = time.perf_counter()
            with torch.no_grad():
                m(x)
            mid = time.perf_counter()
            train_step(m, x)
            end = time.perf_counter()
            best[n] = (min(best[n][0], mid - start), min(best[n][1], end - mid))
    return best


def _load() -> str:
    """The machine's load average (timings are only comparable on an otherwise idle machine)."""
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def run_layer(args: argparse.Namespace) -> list[tuple[int, str, float, float, int | None]]:
    """Time (and measure) every selected model at every T; prints the tables and returns the rows
    (T, model, forward seconds, training-step seconds, peak bytes or None)."""
    C = chunked.get_chunk_size()
    print(f"layer: GatedBlock fwd / fwd+bwd, B={args.batch} D={args.dim} heads={args.heads} float32 "
          f"threads={args.threads}, chunked C={C}, best of {args.repeats}; peak = extra resident MiB of one "
          f"training step (fresh process); {_load()}")
    head = f"{'T':>5} {'model':<22} {'fwd ms':>8} {'x attn':>7} {'fwd+bwd ms':>11} {'x attn':>7} {'peak MiB':>9} {'x attn':>7}"
    print(head)
    rows = []
    order = selected(args)
    for T in args.T:
        names = [n for n in order if n != "sessa-dense" or dense_bytes(args.batch, T) <= args.dense_budget_gib * 2**30]
        torch.manual_seed(0)
        models = {n: build(n, args.dim, args.heads) for n in names}
        if args.compile:
            torch._dynamo.reset()
            models.update({f"{n}+compile": torch.compile(models[n], fullgraph=True) for n in names})
        x = torch.randn(args.batch, T, args.dim)
        times = best_times(models, x, args.repeats)
        del models
        peaks = {n: None if args.no_memory else peak_bytes(n, T, args, C) for n in names}
        for n in [m + suffix for m in order for suffix in ("", "+compile") if suffix == "" or args.compile]:
            if n not in times:
                print(f"{T:>5} {n:<22} over budget: ~{dense_bytes(args.batch, T) / 2**30:.1f} GiB of T x T buffers "
                      f"> --dense-budget-gib {args.dense_budget_gib}")
                continue
            (fw, tr), (fw0, tr0) = times[n], times["attention"]
            peak = peaks.get(n)
            mem = "" if peak is None else f"{_mib(peak):>9} {peak / peaks['attention']:>6.2f}x"
            print(f"{T:>5} {n:<22} {1e3 * fw:>8.1f} {fw / fw0:>6.2f}x {1e3 * tr:>11.1f} {tr / tr0:>6.2f}x {mem}", flush=True)
            rows.append((T, n, fw, tr, peak))
    print(f"done; {_load()}")
    print(summary(rows, order))
    if args.plot:
        plot(rows, args.plot, f"GatedBlock, B={args.batch} D={args.dim} heads={args.heads}, {args.threads} threads",
             order)
    return rows


def selected(args: argparse.Namespace) -> list[str]:
    """The models to time: attention, then --models (every model by default), checked."""
    known = model_names()
    if args.models is None:
        return known
    unknown = [n for n in args.models if n not in known]
    if unknown:
        raise ValueError(f"--models: unknown {unknown}; known: {', '.join(known)}")
    return ["attention"] + [n for n in known if n in args.models and n != "attention"]


def summary(rows: list, order: list[str]) -> str:
    """Markdown: per model and T, the training step's time and peak memory as multiples of attention's
    (attention's own row: milliseconds and MiB)."""
    Ts = sorted({r[0] for r in rows})
    by = {(r[0], r[1]): r for r in rows}
    head = "| model | " + " | ".join(f"T = {T}" for T in Ts) + " |"
    out = []
    for title, col, unit in (("training step (forward + backward)", 3, "ms"), ("peak memory of a training step", 4, "MiB")):
        lines = [f"{title}: attention in {unit}, the others as multiples of attention", "", head,
                 "|---" * (len(Ts) + 1) + "|"]
        for n in [m + s for m in order for s in ("", "+compile") if any(r[1] == m + s for r in rows)]:
            cells = []
            for T in Ts:
                r, base = by.get((T, n)), by.get((T, "attention"))
                if r is None or r[col] is None or base is None or base[col] is None:
                    cells.append("–")
                elif n == "attention":
                    cells.append(f"{1e3 * r[col]:.1f}" if col == 3 else _mib(r[col]))
                else:
                    cells.append(f"{r[col] / base[col]:.2f}x")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def run_sweep(args: argparse.Namespace) -> None:
    print(f"chunk sweep: GatedBlock(Sessa) with chunked feedback_solve, fwd+bwd ms (best of {args.repeats}, "
          f"chunk sizes interleaved) / peak MiB; B={args.batch} D={args.dim} heads={args.heads} threads={args.threads}; "
          f"{_load()}")
    print(f"{'T':>5} " + " ".join(f"{f'C={c}':>14}" for c in args.chunks))
    for T in args.T:
        torch.manual_seed(0)
        model = build("sessa-chunked", args.dim, args.heads)
        x = torch.randn(args.batch, T, args.dim)
        best = {c: float("inf") for c in args.chunks}
        for c in args.chunks:  # warm-up
            chunked.set_chunk_size(c)
            train_step(model, x)
        for _ in range(args.repeats):
            for c in args.chunks:
                chunked.set_chunk_size(c)
                start = time.perf_counter()
                train_step(model, x)
                best[c] = min(best[c], time.perf_counter() - start)
        chunked.set_chunk_size(None)
        peaks = {c: "" if args.no_memory else f"/{_mib(peak_bytes('sessa-chunked', T, args, c))}" for c in args.chunks}
        print(f"{T:>5} " + " ".join(f"{f'{1e3 * best[c]:.0f}{peaks[c]}':>14}" for c in args.chunks), flush=True)
    print(f"done; {_load()}")


def plot(rows: list, path: str, title: str, order: list[str]) -> None:
    """Training-step time, the same as a multiple of attention's, and peak memory, against T (log axes);
    attention in black, every other model its own colour and marker."""
    plt = pyplot()

    fig, (ax_t, ax_r, ax_m) = plt.subplots(1, 3, figsize=(16, 5))
    base = {r[0]: r for r in rows if r[1] == "attention"}
    others = [n for n in order if n != "attention"]
    colours = {n: plt.cm.tab10(i % 10) for i, n in enumerate(others)}  # beyond ten models the lines turn dashed
    for i, n in enumerate(order):
        pts = [r for r in rows if r[1] == n]
        if not pts:
            continue
        style = dict(color="black", lw=2.5, marker="s") if n == "attention" else \
            dict(color=colours[n], lw=1.5, marker="ovD^<>ph*X"[i % 10], ls="-" if others.index(n) < 10 else "--")
        ax_t.plot([r[0] for r in pts], [1e3 * r[3] for r in pts], label=n, **style)
        ax_r.plot([r[0] for r in pts if r[0] in base], [r[3] / base[r[0]][3] for r in pts if r[0] in base], label=n,
                  **style)
        mem = [r for r in pts if r[4] is not None]
        if mem:
            ax_m.plot([r[0] for r in mem], [r[4] / 2**20 for r in mem], label=n, **style)
    Ts = sorted({r[0] for r in rows})
    for ax, label in ((ax_t, "training step: forward + backward (ms)"), (ax_r, "training step / attention's"),
                      (ax_m, "peak memory of a training step (MiB)")):
        ax.set(xscale="log", yscale="log", xlabel="T", ylabel=label)
        ax.set_xticks(Ts, [str(t) for t in Ts])
        ax.minorticks_off()
        ax.grid(True, which="both", alpha=0.3)
    ax_r.axhline(1.0, color="black", lw=1, ls="--")
    ax_r.set_yticks([0.1, 0.2, 0.5, 1, 2, 5], ["0.1", "0.2", "0.5", "1", "2", "5"])
    ax_t.legend(fontsize=8)
    fig.suptitle(title)
    print(f"wrote {save_figure(fig, path)}")


def run(args: argparse.Namespace) -> list | None:
    torch.set_num_threads(args.threads)
    if args.chunk_sweep:
        run_sweep(args)
        return None
    return run_layer(args)
