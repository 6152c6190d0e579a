"""`tools/bench.py layer` and `decode` cover every registered mixer (a user's too) and their tables
are consistent with what they measured: ratios are to attention in the same run, tokens/s follow
from the step times, the decoding-state column is each mixer's state, peak memory is at least the
block's output; `recurrence`'s ratios are the quotients of its printed times; the benchmarks'
allocator setting keeps a freed large block resident. Nothing here judges speed (that is measured,
not tested)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch
from torch import nn

from blocks.mixer import Mixer
from zoo.bench import decode, layer
from zoo.registry import REGISTRY


class BenchUserMixer(Mixer):
    """A user's mixer for the coverage tests: y_t = W (x_1 + ... + x_t) / t."""

    def __init__(self, dim: int):
        super().__init__()
        self.ops = {}
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, *, seq_idx=None, state=None):
        steps = torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[:, None]
        return self.proj(x.cumsum(1) / steps)


@pytest.fixture
def user_mixer():
    REGISTRY.add_mixer("bench_user", BenchUserMixer)
    try:
        yield "bench_user"
    finally:
        REGISTRY.mixers.pop("bench_user")


def _args(module, argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv.split())


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield threads
    torch.set_num_threads(threads)


def test_decode_covers_every_mixer_and_is_consistent(keep_threads):
    B, steps, prefill = 2, 3, 5
    results = decode.run(_args(decode, f"--batch {B} --dim 64 --heads 2 --prefill {prefill} --steps {steps} "
                                       f"--repeats 1 --threads {keep_threads}"))
    decodes = [n for n in REGISTRY.mixers if _decodes(n)]  # a test module may register one that does not
    assert list(results) == ["attention"] + [n for n in decodes if n != "attention"]
    base = results["attention"]["tokens_per_s"]
    for name, r in results.items():
        assert r["prefill_s"] > 0 and r["decode_s"] > 0, name
        assert r["tokens_per_s"] == pytest.approx(B * steps / r["decode_s"])
        assert r["vs_attention"] == pytest.approx(r["tokens_per_s"] / base)
        block = decode.build(name, 64, 2, None)
        per_token = block.mixer.state_numbers_per_token()
        if per_token is not None:  # a cache that grows: numbers per token
            assert r["state"] == f"{per_token} / token", name
        else:  # a constant state: what allocate_state holds, whatever the length (a window's ring: up to the window)
            numbers = int(r["state"].removesuffix(" const"))
            state = block.allocate_state(1, prefill + steps)
            assert numbers == sum(t.numel() for t in vars(state).values() if torch.is_tensor(t) and t.is_floating_point())
            if getattr(block.mixer, "window", None) is None:
                assert decode.state_size(block, 100 * (prefill + steps)) == r["state"], name
    assert results["attention"]["vs_attention"] == 1.0


def _decodes(name: str) -> bool:
    try:
        decode.build(name, 64, 2, None).allocate_state(1, 1)
    except NotImplementedError:
        return False
    return True


def test_decode_models_option(keep_threads, capsys):
    results = decode.run(_args(decode, f"--batch 1 --dim 64 --heads 2 --prefill 3 --steps 2 --repeats 1 "
                                       f"--threads {keep_threads} --models sessa"))
    assert list(results) == ["attention", "sessa"]
    # single decoding steps take the one-row solve; the prefill (5 tokens) too, under automatic selection
    assert "backends used: attention: sdpa; feedback_solve: reference" in capsys.readouterr().out.splitlines()
    with pytest.raises(ValueError, match="--models: unknown.*nosuch"):
        decode.run(_args(decode, "--models nosuch"))


def test_layer_covers_every_mixer(keep_threads, user_mixer):
    Ts = (8, 16)
    rows = layer.run(_args(layer, f"--T {' '.join(map(str, Ts))} --batch 1 --dim 64 --heads 2 --repeats 1 "
                                  f"--threads {keep_threads} --no-memory"))
    names = layer.model_names()
    assert user_mixer in names and {"sessa-dense", "sessa-chunked"} <= set(names) and "sessa" not in names
    assert [(T, n) for T, n, *_ in rows] == [(T, n) for T in Ts for n in names]
    assert all(fw > 0 and tr > 0 and peak is None for _, _, fw, tr, peak in rows)


def test_layer_pins_the_documented_backends():
    assert layer.build("attention", 16, 2).mixer.ops == {"attention": "sdpa"}
    assert layer.build("sessa-dense", 16, 2).mixer.ops == {"attention": "sdpa", "feedback_solve": "reference"}
    assert layer.build("sessa-chunked", 16, 2).mixer.ops == {"attention": "sdpa", "feedback_solve": "chunked"}
    assert layer.build("gla", 16, 2).mixer.ops == {"linear_attention": "auto"}
    assert layer.build("retnet", 16, 2).mixer.num_heads == 2  # --heads reaches mixers that take num_heads


def test_layer_peak_memory_in_a_fresh_process(keep_threads, user_mixer):
    """Peak memory is measured in a subprocess (a user's mixer registered at run time too) and is at
    least the block's output, B * T * D float32 numbers."""
    B, T, D = 2, 1024, 32
    rows = layer.run(_args(layer, f"--T {T} --batch {B} --dim {D} --heads 2 --repeats 1 --threads {keep_threads} "
                                  f"--models {user_mixer}"))
    assert [n for _, n, *_ in rows] == ["attention", user_mixer]
    for _, name, _, _, peak in rows:
        assert peak >= B * T * D * 4, name


def test_layer_summary_is_relative_to_attention():
    MiB = 2**20
    rows = [(8, "attention", 1.0, 0.002, 10 * MiB), (8, "gla", 1.0, 0.003, 5 * MiB),
            (16, "attention", 1.0, 0.004, 20 * MiB), (16, "gla", 1.0, 0.002, None), (16, "retnet", 1.0, 0.001, 40 * MiB)]
    text = layer.summary(rows, ["attention", "gla", "retnet"])
    split = text.index("peak memory of a training step")
    time_table, memory_table = text[:split], text[split:]
    assert "| attention | 2.0 | 4.0 |" in time_table and "| gla | 1.50x | 0.50x |" in time_table
    assert "| retnet | – | 0.25x |" in time_table
    assert "| attention | 10 | 20 |" in memory_table and "| gla | 0.50x | – |" in memory_table
    assert "| retnet | – | 2.00x |" in memory_table


def test_layer_models_option_rejects_unknown_names():
    with pytest.raises(ValueError, match="--models: unknown.*nosuch"):
        layer.run(_args(layer, "--models nosuch --no-memory"))


def test_recurrence_compares_chunked_with_reference_and_attention(keep_threads, capsys):
    """One row per (workload, T, chunk size) with both ratios, each the quotient of the times printed
    beside it; above --max-reference-T the reference cells are empty."""
    from zoo.bench import recurrence

    recurrence.run(_args(recurrence, "--T 16 32 --max-reference-T 16 --repeats 1 --batch 1 --heads 2 --dk 4 --dv 8 "
                                     "--attention-head-dim 8 --chunk-size 4 8"))
    rows = [line.strip("|").split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    body = [[c.strip() for c in r] for r in rows[1:]]
    assert len(body) == 12 and all(len(r) == 13 for r in body)
    assert [r[2] for r in body] == ["4", "8"] * 6

    def quotient(ratio: str, num: str, den: str) -> bool:  # printed to 0.1 ms and 0.01x (0.1x for ref / chunked)
        q, n, d = float(ratio.rstrip("x")), float(num), float(den)
        return abs(q - n / d) <= n / d * (0.05 / n + 0.05 / d) + 0.05

    for r in body:
        for first in (3, 8):  # forward, then forward + backward: ref, chunked, ref / chunked, attention, attention / chunked
            ref, chunked, ratio, attn, attn_ratio = r[first:first + 5]
            assert quotient(attn_ratio, attn, chunked), r
            if r[1] == "16":
                assert quotient(ratio, ref, chunked), r
            else:
                assert ref == ratio == "-"


KEEP_PROBE = """
import ctypes, sys, torch
import zoo.bench
if sys.argv[1] == "keep":
    print(zoo.bench.keep_freed_memory())
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
x = torch.ones(2 ** 24)  # 64 MiB: above glibc's largest default mmap threshold (32 MiB)
before = rss()
del x
print("freed MiB", before - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc are Linux's")
def test_keep_freed_memory_keeps_a_large_block_resident():
    """With the default glibc malloc a freed 64 MiB tensor is unmapped at once (its pages must be
    faulted in again next time); after keep_freed_memory() it stays for reuse."""
    freed = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", KEEP_PROBE, mode], capture_output=True, text=True, check=True).stdout
        freed[mode] = int(out.split("freed MiB")[1])
        if mode == "keep":
            assert "keeps freed blocks" in out
    assert freed["default"] >= 60 and freed["keep"] <= 4, freed


def test_layer_plot_writes_a_png(tmp_path):
    rows = [(T, n, 0.01, t * T / 512, None if n == "b" else 2**20 * T) for T in (512, 1024)
            for n, t in (("attention", 1.0), ("a", 0.5), ("b", 2.0))]
    layer.plot(rows, str(tmp_path / "layer.png"), "title", ["attention", "a", "b"])
    assert (tmp_path / "layer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
