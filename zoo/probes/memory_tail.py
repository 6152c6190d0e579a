"""Memory tail: how strongly the input at position tau still influences the output at tau + l.

    result = probe(model, inputs, label="SASA", sources=(0, 1, 2, 3), fit_range=(16, 1000))
    print(format_table([result]));  plot([result], "memory_tail.png")

Two measurements (the curves are functions of the lag l = 0 .. T - 1 - max(sources)):

* `jacobian`: the end-to-end influence ||dy_{tau+l} / dx_tau||_F, its root mean square over the
  inputs and the source positions tau. For a model (anything with `embed` and `stack`, i.e.
  CausalLM and SequenceClassifier) x is the token embedding and y the final hidden state (after
  the final norm, before the head); for any other (B, T, D) -> (B, T, D) module (a Stack, a block,
  a mixer) x and y are its input and output. Forward-mode AD (`torch.func.jvp`): a tangent at one
  source position gives the whole column of Jacobian blocks below it in one pass; the tangents of
  every (input, source, direction) are batched as rows. `directions=None` pushes all D unit
  directions (the exact Frobenius norm); `directions=K` pushes K Gaussian directions per source
  (an unbiased estimate of its square: E||J w||^2 = ||J||_F^2).
* `kernel layer i` (every Sessa layer with feedback): the fixed-routing kernel
  |[(I - B_fb)^-1]_{tau+l, tau}|, B_fb[t, j] = gamma_t alpha_{t,j}, on the layer's actual routing
  and gains for these inputs, averaged over inputs and sources. Columns of the inverse are solved,
  never formed: feedback_solve with one-hot right-hand sides (I - B_fb) X = E, one channel per
  source. With it the routing statistics of the theory: c2 = max_{t,j} t * alpha_{t,j}, max |gamma|,
  and the tail exponent they bound, -(1 - max|gamma| * c2) when max|gamma| * c2 < 1.

Fits over a lag range [lo, hi]: the log-log slope (a power law l^slope is a straight line on
log-log axes) on log-spaced lags, and the semi-log decay rate (exp(-rate * l) is straight on
semi-log axes) on every lag, each with its R^2. The better R^2 says which law the tail follows.
A curve that is exactly 0 from some lag on (a sliding window) records that lag as its `cutoff`
and is fitted below it. Where the weights fix the tail in closed form (fixed decays, windows:
zoo.probes.predictions), the result carries that prediction next to the measured fits.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import jvp

from blocks.mixer import Mixer
from kernels.feedback_solve import feedback_solve, routing_weights, strict_past
from zoo.probes.construction import feedback_layers
from zoo.probes.predictions import TailPrediction, predicted_tail
from zoo.plots import pyplot, save_figure

# Backends with forward-mode AD for the Jacobian (sdpa attention and the chunked feedback solve
# have none); the probe pins them on its copy of the model while it computes the Jacobian.
FORWARD_AD_BACKENDS = {"attention": "reference", "feedback_solve": "reference"}


# ----------------------------------------------------------------------------- results

@dataclass
class Fit:
    """Fits of log(value) over lags lo..hi: log v = loglog_intercept + slope * log l (on log-spaced
    lags) and log v = semilog_intercept - rate * l (on every lag), each with its R^2."""

    lo: int
    hi: int
    slope: float
    slope_r2: float
    loglog_intercept: float
    rate: float
    rate_r2: float
    semilog_intercept: float


@dataclass
class Routing:
    """Routing statistics of one Sessa layer on the probe's inputs (rows t >= 1)."""

    c2: float  # max_{t,j} t * alpha_{t,j} (1 for uniform routing)
    gamma_abs_max: float  # max_t |gamma_t|
    gamma_mean: float  # mean_t gamma_t

    @property
    def predicted_exponent(self) -> float | None:
        """-(1 - max|gamma| * c2), the theory's bound on the kernel's log-log slope; None when
        max|gamma| * c2 >= 1 (the theory then gives no power-law bound)."""
        product = self.gamma_abs_max * self.c2
        return -(1.0 - product) if product < 1.0 else None


@dataclass
class Curve:
    """One influence curve: values[l] at lag l = 0 .. len - 1."""

    name: str  # "jacobian" or "kernel layer <i>"
    values: np.ndarray  # (L,)
    fit: Fit | None = None  # None: too few nonzero lags in the fit range
    routing: Routing | None = None

    @property
    def cutoff(self) -> int | None:
        """The lag from which every value is exactly 0 (None: the curve never vanishes for good)."""
        nonzero = np.flatnonzero(self.values != 0)
        end = int(nonzero[-1]) + 1 if len(nonzero) else 0
        return end if end < len(self.values) else None

    @property
    def lags(self) -> np.ndarray:
        return np.arange(len(self.values))


@dataclass
class ProbeResult:
    """Every curve measured on one model."""

    label: str
    seq_len: int
    sources: tuple[int, ...]
    curves: list[Curve] = field(default_factory=list)
    prediction: TailPrediction | None = None  # of the end-to-end ("jacobian") tail, from the weights

    def to_json(self) -> dict:
        return {"label": self.label, "seq_len": self.seq_len, "sources": list(self.sources),
                "prediction": asdict(self.prediction) if self.prediction else None,
                "curves": [{"name": c.name, "values": c.values.tolist(), "cutoff": c.cutoff,
                            "fit": asdict(c.fit) if c.fit else None,
                            "routing": ({**asdict(c.routing), "predicted_exponent": c.routing.predicted_exponent}
                                        if c.routing else None)} for c in self.curves]}


# ----------------------------------------------------------------------------- measurements

def _check_sources(sources: Sequence[int], T: int) -> Tensor:
    src = torch.as_tensor(list(sources), dtype=torch.long)
    if src.numel() == 0 or src.ndim != 1 or int(src.min()) < 0 or int(src.max()) >= T - 1:
        raise ValueError(f"sources must be a non-empty list of positions in [0, T - 1) = [0, {T - 1}); "
                         f"got {list(sources)}")
    return src


def jacobian_curve(fn: Callable[[Tensor], Tensor], x: Tensor, sources: Sequence[int], directions: int | None = None,
                   generator: torch.Generator | None = None, rows_per_pass: int | None = None) -> np.ndarray:
    """RMS over inputs and sources of ||d fn(x)_{tau+l} / d x_tau||_F for l = 0 .. T - 1 - max(sources).

    fn: maps (N, T, D) -> (N, T, D') row by row (rows never interact).  x: (B, T, D) inputs.
    directions: None = all D unit tangents (exact); K = K Gaussian tangents per (input, source).
    rows_per_pass: tangent rows per jvp pass (default: about 2^23 / T^2, bounding the T x T buffers).
    Returns a float64 array (L,), L = T - max(sources)."""
    B, T, D = x.shape
    src = _check_sources(sources, T).to(x.device)
    S, L = len(src), T - int(src.max())
    if directions is None:
        K, scale = D, 1.0
        tangent = lambda b, s, k: torch.nn.functional.one_hot(k, D).to(x.dtype)  # noqa: E731
    else:
        if directions < 1:
            raise ValueError(f"directions must be None (exact) or >= 1; got {directions}")
        K, scale = directions, 1.0 / directions
        w = torch.randn(B, S, K, D, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
        tangent = lambda b, s, k: w[b, s, k]  # noqa: E731
    rows = rows_per_pass or max(1, min(B * S * K, 2 ** 23 // (T * T)))
    index = torch.arange(B * S * K, device=x.device)
    b_all, s_all, k_all = index // (S * K), (index // K) % S, index % K
    total = torch.zeros(S, L, dtype=torch.float64, device=x.device)  # sum over inputs and directions
    lag = torch.arange(L, device=x.device)
    for start in range(0, len(index), rows):
        b, s, k = (t[start:start + rows] for t in (b_all, s_all, k_all))
        xs = x[b]
        ts = torch.zeros_like(xs)
        ts[torch.arange(len(b), device=x.device), src[s]] = tangent(b, s, k)
        _, dy = jvp(fn, (xs,), (ts,))
        squared = dy.detach().double().square().sum(-1)  # (n, T): ||J w||^2 at every target
        total.index_add_(0, s, squared.gather(1, src[s][:, None] + lag))
    return (total.sum(0) * scale / (B * S)).sqrt().cpu().numpy()


def feedback_kernel_curve(q_b: Tensor, k_b: Tensor, gamma: Tensor, sources: Sequence[int]) -> np.ndarray:
    """Mean over inputs and sources of |[(I - B_fb)^-1]_{tau+l, tau}|, B_fb = gamma * alpha(q_b, k_b).

    q_b, k_b: (B, T, Dk) feedback queries and keys;  gamma: (B, T) gains.
    Solves (I - B_fb) X = E with one one-hot channel per source (feedback_solve). Returns (L,)."""
    B, T, _ = q_b.shape
    src = _check_sources(sources, T).to(q_b.device)
    S, L = len(src), T - int(src.max())
    channel = torch.arange(S, device=q_b.device)
    e = torch.zeros(B, T, S, dtype=q_b.dtype, device=q_b.device)
    e[:, src, channel] = 1.0
    columns = feedback_solve(e, q_b, k_b, gamma)  # (B, T, S): column tau_s of the inverse in channel s
    rows = src[None, :] + torch.arange(L, device=q_b.device)[:, None]  # (L, S)
    return columns[:, rows, channel].abs().double().mean(dim=(0, 2)).cpu().numpy()


def routing_statistics(q_b: Tensor, k_b: Tensor, gamma: Tensor, block: int = 512) -> Routing:
    """c2 = max_{t>=1, j<t} t * alpha_{t,j}, max |gamma_t| and mean gamma_t over t >= 1.

    q_b, k_b (B, T, Dk), gamma (B, T). alpha is built `block` query rows at a time (never T x T at once)."""
    T = q_b.shape[1]
    if T < 2:
        raise ValueError(f"routing statistics need T >= 2; got T={T}")
    mask = strict_past(T, 0, q_b.device)
    c2 = 0.0
    for a in range(1, T, block):
        alpha = routing_weights(q_b[:, a:a + block], k_b, mask[:, a:a + block])  # (B, n, T)
        t = torch.arange(a, a + alpha.shape[1], device=q_b.device, dtype=alpha.dtype)
        c2 = max(c2, float((alpha * t[:, None]).amax()))
    g = gamma[:, 1:].double()
    return Routing(c2=c2, gamma_abs_max=float(g.abs().max()), gamma_mean=float(g.mean()))


def fit_tail(values: np.ndarray, lo: int, hi: int, points: int = 64) -> Fit:
    """Log-log slope (on ~`points` log-spaced lags) and semi-log rate (every lag) of values[lo..hi]."""
    values = np.asarray(values, dtype=np.float64)
    if not (isinstance(lo, (int, np.integer)) and isinstance(hi, (int, np.integer)) and 1 <= lo < hi < len(values)):
        raise ValueError(f"fit_range must be integers 1 <= lo < hi < {len(values)} (the longest lag + 1); "
                         f"got ({lo}, {hi})")
    grid = np.unique(np.round(np.geomspace(lo, hi, points)).astype(int))
    lags = np.arange(lo, hi + 1)
    if (values[lags] <= 0).any():
        raise ValueError(f"the curve is zero somewhere in lags {lo}..{hi}: no log fit possible")
    slope, c_log, r2_log = _line_fit(np.log(grid), np.log(values[grid]))
    neg_rate, c_semi, r2_semi = _line_fit(lags.astype(np.float64), np.log(values[lags]))
    return Fit(lo=int(lo), hi=int(hi), slope=slope, slope_r2=r2_log, loglog_intercept=c_log,
               rate=-neg_rate, rate_r2=r2_semi, semilog_intercept=c_semi)


def _line_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least squares y = c + m x -> (m, c, R^2)."""
    m, c = np.polyfit(x, y, 1)
    residual = y - (c + m * x)
    total = ((y - y.mean()) ** 2).sum()
    return float(m), float(c), float(1.0 - (residual ** 2).sum() / total) if total > 0 else 1.0


# ----------------------------------------------------------------------------- models

def is_model(module: nn.Module) -> bool:
    """A token model (CausalLM, SequenceClassifier): embedding + stack (+ final norm)."""
    return isinstance(getattr(module, "embed", None), nn.Embedding) and isinstance(getattr(module, "stack", None), nn.Module)


def random_inputs(module: nn.Module, batch_size: int, seq_len: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform random tokens (B, T) for a model, standard normal (B, T, D) for any other module
    (its width from `module.dim`)."""
    if is_model(module):
        return torch.randint(module.embed.num_embeddings, (batch_size, seq_len), generator=generator)
    dim = getattr(module, "dim", None)
    if not isinstance(dim, int):
        raise ValueError(f"{type(module).__name__} has no integer `dim`: pass the inputs (B, T, D) yourself")
    return torch.randn(batch_size, seq_len, dim, generator=generator)


def task_inputs(task, batch_size: int, seq_len: int | None = None, split: str = "validation") -> Tensor:
    """Tokens (B, T) of the first `batch_size` examples of a task split, cut to a common length:
    `seq_len`, or the shortest example's length when None (longer than every example: ValueError)."""
    examples = [task.split(split)[i]["tokens"] for i in range(batch_size)]
    shortest = min(len(t) for t in examples)
    T = shortest if seq_len is None else seq_len
    if T > shortest:
        raise ValueError(f"seq_len={seq_len} is longer than the shortest of the first {batch_size} {split} "
                         f"examples ({shortest} tokens): pass a smaller seq_len")
    return torch.stack([t[:T] for t in examples])


def _probe_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy in `dtype`, eval mode, without gradients on the weights."""
    module = copy.deepcopy(module).to(dtype).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


@contextlib.contextmanager
def forward_ad_backends(module: nn.Module) -> Iterator[None]:
    """Pin FORWARD_AD_BACKENDS in every mixer of `module` that calls the op (restored on exit)."""
    saved = [(m, dict(m.ops)) for m in module.modules() if isinstance(m, Mixer)]
    try:
        for m, ops in saved:
            m.ops.update({op: backend for op, backend in FORWARD_AD_BACKENDS.items() if op in ops})
        yield
    finally:
        for m, ops in saved:
            m.ops.clear()
            m.ops.update(ops)


def _capture_inputs(layers: list[nn.Module]) -> tuple[list[Tensor], list]:
    """Forward pre-hooks storing each layer's input (its first positional argument)."""
    stored: list[Tensor] = []
    hooks = [layer.register_forward_pre_hook(lambda mod, args: stored.append(args[0])) for layer in layers]
    return stored, hooks


def probe(module: nn.Module, inputs: Tensor, *, label: str, sources: Sequence[int] = (0, 1, 2, 3),
          fit_range: tuple[int, int] | None = None, directions: int | None = None, jacobian: bool = True,
          dtype: torch.dtype = torch.float64, generator: torch.Generator | None = None) -> ProbeResult:
    """Measure the memory tail of `module` on `inputs` (tokens (B, T) for a model, else (B, T, D)).

    Curves: "jacobian" (unless jacobian=False) and "kernel layer <i>" for the i-th Sessa layer with
    feedback, each fitted over `fit_range` = (lo, hi) lags (default (L // 16, L - 1), L the number of
    lags), cut below a curve's `cutoff` (no fit when fewer than 2 lags are left). The result's
    `prediction` is zoo.probes.predicted_tail(module). The module is not changed (the probe works on
    a copy in `dtype`, float64 by default).
    """
    work = _probe_copy(module, dtype)
    model = is_model(work)
    if model:
        if inputs.dtype != torch.long or inputs.ndim != 2:
            raise ValueError(f"inputs of a model must be tokens (B, T) torch.long; got {inputs.dtype} {tuple(inputs.shape)}")
        device = work.embed.weight.device
        x = work.embed(inputs.to(device))
        norm = work.norm if isinstance(getattr(work, "norm", None), nn.Module) else nn.Identity()
        fn = lambda h: norm(work.stack(h))  # noqa: E731
    else:
        if inputs.ndim != 3:
            raise ValueError(f"inputs of a (B, T, D) -> (B, T, D) module must be (B, T, D); got {tuple(inputs.shape)}")
        device = next(work.parameters()).device
        x = inputs.to(device=device, dtype=dtype)
        fn = work
    T = x.shape[1]
    _check_sources(sources, T)
    result = ProbeResult(label=label, seq_len=T, sources=tuple(int(s) for s in sources),
                         prediction=predicted_tail(work))

    if jacobian:
        with forward_ad_backends(work):
            result.curves.append(Curve("jacobian", jacobian_curve(fn, x, sources, directions, generator)))
    sessas = feedback_layers(work)
    if sessas:
        stored, hooks = _capture_inputs([m for _, m in sessas])
        try:
            with torch.no_grad():
                fn(x)
        finally:
            for h in hooks:
                h.remove()
        with torch.no_grad():
            for i, ((_, mixer), a) in enumerate(zip(sessas, stored)):
                q_b, k_b, gamma = mixer._feedback_inputs(a)
                result.curves.append(Curve(f"kernel layer {i}", feedback_kernel_curve(q_b, k_b, gamma, sources),
                                           routing=routing_statistics(q_b, k_b, gamma)))
    for curve in result.curves:
        L = len(curve.values)
        lo, hi = fit_range if fit_range is not None else (max(1, L // 16), L - 1)
        if curve.cutoff is not None:
            hi = min(hi, curve.cutoff - 1)
            if hi <= lo:
                continue
        curve.fit = fit_tail(curve.values, lo, hi)
    return result


# ----------------------------------------------------------------------------- report

def _num(x: float | None, fmt: str = ".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def format_table(results: Sequence[ProbeResult]) -> str:
    """A markdown table: one row per curve, with its fits and (Sessa kernels) routing statistics.
    When a result has a prediction or a curve a cutoff, two more columns: the predicted tail of the
    end-to-end curve (rate, or where it is zero from) and the lag each curve is zero from."""
    tails = any(r.prediction or any(c.cutoff is not None for c in r.curves) for r in results)
    head = "| model | curve | fit lags | log-log slope | R² | semi-log rate | R² | predicted exponent | "
    head += "predicted | zero from lag | c2 | max abs γ |" if tails else "c2 | max abs γ |"
    lines = [head, "|---" * head.count(" | ") + "|---|"]
    for r in results:
        for c in r.curves:
            f, rt = c.fit, c.routing
            fits = (f"{f.lo}–{f.hi} | {f.slope:.3f} | {f.slope_r2:.4f} | {f.rate:.3g} | {f.rate_r2:.4f}" if f
                    else "– | – | – | – | –")
            row = f"| {r.label} | {c.name} | {fits} | {_num(rt.predicted_exponent if rt else None)} | "
            if tails:
                predicted = r.prediction.describe() if r.prediction and c.name == "jacobian" else "–"
                row += f"{predicted} | {'–' if c.cutoff is None else c.cutoff} | "
            lines.append(row + f"{_num(rt.c2 if rt else None, '.3g')} | {_num(rt.gamma_abs_max if rt else None)} |")
    return "\n".join(lines)


def plot(results: Sequence[ProbeResult], path: str | Path, title: str | None = None) -> Path:
    """One PNG, log-log axes: every curve (Jacobian solid, Sessa kernels dashed) from lag 1 and, over
    its fit range, the better of its two fits (thin black dotted: a straight power law, or the
    exponential, which bends down). Two panels when there are kernel curves."""
    plt = pyplot()

    panels = [("jacobian", "end-to-end ‖∂y(τ+ℓ)/∂x(τ)‖"), ("kernel", "Sessa kernel |(I − B_fb)⁻¹[τ+ℓ, τ]|")]
    panels = [p for p in panels if any(c.name.startswith(p[0]) for r in results for c in r.curves)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (prefix, heading) in zip(axes[0], panels):
        n = 0
        for r in results:
            for c in (c for c in r.curves if c.name.startswith(prefix)):
                color = colors[n % len(colors)]
                n += 1
                lags, v = c.lags[1:], c.values[1:]
                keep = v > 0
                name = r.label if prefix == "jacobian" else f"{r.label} {c.name.removeprefix('kernel ')}"
                f = c.fit
                if f is None:
                    ax.loglog(lags[keep], v[keep], "-" if prefix == "jacobian" else "--", color=color, lw=1.5,
                              label=f"{name}: zero from lag {c.cutoff}")
                    continue
                power = f.slope_r2 >= f.rate_r2
                law = f"ℓ^{f.slope:.2f}, R² {f.slope_r2:.3f}" if power else f"exp(−{f.rate:.3g} ℓ), R² {f.rate_r2:.3f}"
                ax.loglog(lags[keep], v[keep], "-" if prefix == "jacobian" else "--", color=color, lw=1.5,
                          label=f"{name}: {law}")
                fl = np.geomspace(f.lo, f.hi, 48)
                fitted = (np.exp(f.loglog_intercept) * fl ** f.slope if power
                          else np.exp(f.semilog_intercept - f.rate * fl))
                ax.loglog(fl, fitted, ":", color="black", lw=1.2)
        ax.set_xlabel("lag ℓ")
        ax.set_title(heading, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, dpi=90)
