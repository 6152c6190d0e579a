"""Trust per device: check backends against `reference` on this device, remember the result.

Backends registered with `needs_validation=True` (this project's own Triton kernels) are not picked
by automatic selection on a device until they have passed here, with the same torch / Triton / CUDA
versions. `validate()` runs each such backend on the op's validation cases (small awkward shapes:
odd lengths, grouped heads, windows, segments, caches, strided views, large head and state dims),
float32 and bfloat16, forward and every gradient, against the `reference` backend computed in
float64 from the same inputs, and stores the verdict:

    import kernels
    print(kernels.validate())                       # this device; prints one row per case and dtype
    python tools/validate.py                        # the same from the shell (--help for options)

Results live in `cache_file()`: $ZOO_CACHE_DIR/validation.json, by default
~/.cache/sessa-zoo/validation.json ($XDG_CACHE_HOME is honoured), keyed by the device's name and
the versions (kernels.dispatch.device_key). A new GPU model, torch, Triton or CUDA means validating
again. Ops added later register their cases with `register_cases(op, cases)`.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from kernels.dispatch import OPS, VALIDATED, UnvalidatedBackendWarning, device_key
from kernels.packing import seq_idx_from_cu_seqlens

# max |backend - reference| / max |reference|, forward and each gradient: far below the O(1) of a wrong
# mask or stride, above bf16 rounding of the tensor-core operands amplified by the feedback solve
TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 4e-2, torch.float16: 1e-2}
DTYPES = (torch.float32, torch.bfloat16)
FORMAT = 1

Make = Callable[[torch.dtype, torch.device], tuple[tuple, dict]]


@dataclass
class Case:
    name: str
    make: Make  # (dtype, device) -> (args, kwargs); float tensors get gradients checked
    large: bool = False  # head / state dims whose float32 Triton kernels take minutes to compile


CASES: dict[str, list[Case]] = {}


def register_cases(op: str, cases: list[Case]) -> None:
    """Validation cases of `op` (replaces earlier ones): what validate() runs for its backends."""
    CASES[op] = list(cases)


# ------------------------------------------------------------------------------------------ inputs
def _gen(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(sum(map(ord, name)))


def _randn(g: torch.Generator, *shape: int, dtype: torch.dtype, device: torch.device, strided: bool = False) -> Tensor:
    """Random values; `strided`: as a non-contiguous slice of a wider buffer (a layer's split projection)."""
    t = torch.randn(*shape[:-1], shape[-1] + (3 if strided else 0), generator=g)
    return t.to(device=device, dtype=dtype)[..., :shape[-1]]


def _segments(lengths: list[int], B: int, device: torch.device) -> Tensor:
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return seq_idx_from_cu_seqlens(cu).expand(B, -1).contiguous().to(device)


def attention_case(name: str, B: int, Tq: int, S: int, H: int, Hkv: int, d: int, window: int | None = None,
                   packed: list[int] | None = None, strided: bool = False, large: bool = False) -> Case:
    def make(dtype, device):
        g = _gen(name)
        kw = {} if window is None else dict(window=window)
        if packed:
            kw["seq_idx"] = _segments(packed, B, device)
        return tuple(_randn(g, B, n, h, d, dtype=dtype, device=device, strided=strided)
                     for n, h in ((Tq, H), (S, Hkv), (S, Hkv))), kw
    return Case(name, make, large)


def feedback_case(name: str, B: int, T: int, D: int, Dk: int | None = None, P: int = 0,
                  packed: list[int] | None = None, strided: bool = False) -> Case:
    Dk = Dk or D

    def make(dtype, device):
        g = _gen(name)
        gamma = (torch.where(torch.rand(B, T, generator=g) < 0.5, -1.0, 1.0) * 0.99).to(device=device, dtype=dtype)
        kw = {}
        if P:
            kw.update(past_k=_randn(g, B, P, Dk, dtype=dtype, device=device),
                      past_s=_randn(g, B, P, D, dtype=dtype, device=device))
        if packed:
            kw["seq_idx"] = _segments(packed, B, device)
        f, q, k = (_randn(g, B, T, n, dtype=dtype, device=device, strided=strided) for n in (D, Dk, Dk))
        return (f, q, k, gamma), kw
    return Case(name, make)


def ssd_case(name: str, B: int, T: int, H: int, P: int, G: int, N: int, init: bool = False,
             packed: list[int] | None = None, strided: bool = False, large: bool = False) -> Case:
    def make(dtype, device):
        g = _gen(name)
        dt = torch.nn.functional.softplus(torch.randn(B, T, H, generator=g) - 1).to(device=device, dtype=dtype)
        A = (-torch.exp(torch.randn(H, generator=g) * 0.5)).to(device=device, dtype=dtype)
        kw = dict(chunk_size=64)
        if init:
            kw["initial_state"] = _randn(g, B, H, P, N, dtype=dtype, device=device)
        if packed:
            kw["seq_idx"] = _segments(packed, B, device)
        x = _randn(g, B, T, H, P, dtype=dtype, device=device, strided=strided)
        Bm, Cm = (_randn(g, B, T, G, N, dtype=dtype, device=device, strided=strided) for _ in range(2))
        return (x, dt, A, Bm, Cm), kw
    return Case(name, make, large)


def state_case(name: str, op: str, B: int, T: int, H: int, dk: int, dv: int, g: str | None, init: bool = False,
               packed: list[int] | None = None, strided: bool = False, final: bool = True) -> Case:
    """A `linear_attention` (g: "key" per key channel, "head", None) or `delta_rule` (g: "head", None;
    unit keys, beta in (0, 1)) case; log decays in about (-6, 0)."""
    def make(dtype, device):
        gen = _gen(name)
        decay = lambda *s: torch.nn.functional.logsigmoid(torch.randn(*s, generator=gen) * 2 + 2).to(device=device, dtype=dtype)  # noqa: E731
        q, k, v = (_randn(gen, B, T, H, n, dtype=dtype, device=device, strided=strided) for n in (dk, dk, dv))
        args = [q, k, v]
        if op == "delta_rule":
            k = torch.nn.functional.normalize(k.float(), dim=-1).to(dtype)
            beta = torch.sigmoid(torch.randn(B, T, H, generator=gen)).to(device=device, dtype=dtype)
            args = [q, k, v, beta]
        args.append({"key": lambda: decay(B, T, H, dk), "head": lambda: decay(B, T, H), None: lambda: None}[g]())
        kw = dict(chunk_size=64, return_final_state=final)
        if init:
            kw["initial_state"] = _randn(gen, B, H, dk, dv, dtype=dtype, device=device)
        if packed:
            kw["seq_idx"] = _segments(packed, B, device)
        return tuple(args), kw
    return Case(name, make)


register_cases("attention", [
    attention_case("T77-H4-Hkv2-d64", 2, 77, 77, 4, 2, 64),
    attention_case("Tq5-S150-Hkv1-d128-window64", 2, 5, 150, 4, 1, 128, window=64),
    attention_case("T200-packed-strided", 1, 200, 200, 2, 2, 32, packed=[70, 1, 129], strided=True),
    attention_case("T70-d256", 1, 70, 70, 2, 1, 256, large=True),
])
register_cases("feedback_solve", [
    feedback_case("T300-D128", 2, 300, 128),
    feedback_case("T200-D96-past50-packed", 2, 200, 96, P=50, packed=[70, 1, 179]),
    feedback_case("T600-D64-row-groups", 1, 600, 64),
    feedback_case("T65-D64-Dk32-strided", 2, 65, 64, Dk=32, strided=True),
])
register_cases("ssd", [
    ssd_case("T300-P64-G2-N64-init-packed", 2, 300, 4, 64, 2, 64, init=True, packed=[100, 1, 199]),
    ssd_case("T129-P128-N128", 1, 129, 2, 128, 1, 128, large=True),
    ssd_case("T77-H3-P24-N20-strided", 2, 77, 3, 24, 1, 20, strided=True),
])
register_cases("linear_attention", [
    state_case("T300-dk64-gkey-init-packed", "linear_attention", 2, 300, 2, 64, 64, "key", init=True, packed=[100, 1, 199]),
    state_case("T129-dk128-dv128-ghead", "linear_attention", 1, 129, 2, 128, 128, "head"),
    state_case("T77-dk24-dv40-nog-init-strided", "linear_attention", 2, 77, 3, 24, 40, None, init=True, strided=True),
])
register_cases("delta_rule", [
    state_case("T300-dk64-g-init-packed", "delta_rule", 2, 300, 2, 64, 64, "head", init=True, packed=[100, 1, 199]),
    state_case("T129-dk128-dv128-nog", "delta_rule", 1, 129, 2, 128, 128, None),
    state_case("T77-dk24-dv40-g-init-strided", "delta_rule", 2, 77, 3, 24, 40, "head", init=True, strided=True),
])


# ------------------------------------------------------------------------------------------ checking
def _floats(args: tuple, kwargs: dict) -> list[Tensor]:
    return [t for t in (*args, *kwargs.values()) if isinstance(t, Tensor) and t.is_floating_point()]


def _leafy(args: tuple, kwargs: dict, dtype: torch.dtype | None = None) -> tuple[tuple, dict]:
    """Fresh leaf copies of the float inputs (cast to `dtype` if given), requiring gradients; views
    stay views of a fresh buffer so strided layouts survive."""
    def leaf(t):
        if not (isinstance(t, Tensor) and t.is_floating_point()):
            return t
        if dtype is not None:
            return t.detach().to(dtype).requires_grad_(True)
        base = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
        return base.copy_(t.detach()).requires_grad_(True)
    return tuple(leaf(a) for a in args), {k: leaf(v) for k, v in kwargs.items()}


def forward_backward(op: str, backend: str, args: tuple, kwargs: dict, dtype: torch.dtype | None = None):
    """Outputs and the gradients of <outputs, fixed random cotangents> for every float input (None for
    inputs the outputs do not depend on) of `backend`, on leaf copies of the inputs (cast to `dtype`)."""
    args, kwargs = _leafy(args, kwargs, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnvalidatedBackendWarning)  # checking it is the point
        out = OPS[op](*args, backend=backend, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(1)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum() for o in outs)
    return outs, torch.autograd.grad(loss, _floats(args, kwargs), allow_unused=True)


def relative_error(got: Tensor | None, want: Tensor | None) -> float:
    """max |got - want| / max |want| (inf for a missing or non-finite result, 0 when both are absent)."""
    if want is None:
        return 0.0 if got is None or not got.any() else math.inf
    if got is None or not torch.isfinite(got).all():
        return math.inf
    scale = want.abs().max().clamp_min(1e-6)
    return ((got.double() - want.double()).abs().max() / scale).item()


@dataclass
class Row:
    op: str
    backend: str
    case: str
    dtype: str
    forward: float = math.nan
    grads: float = math.nan
    note: str = ""  # why it was skipped, or the error it raised

    @property
    def ran(self) -> bool:
        return not math.isnan(self.forward)

    def passed(self, tolerance: float) -> bool:
        return self.ran and max(self.forward, self.grads) <= tolerance


def check_case(op: str, backend: str, case: Case, dtype: torch.dtype, device: torch.device) -> Row:
    """One backend on one case: errors of its output and gradients relative to reference in float64."""
    row = Row(op, backend, case.name, str(dtype).removeprefix("torch."))
    args, kwargs = case.make(dtype, device)
    why = OPS[op].backends[backend].reason(*args, **kwargs)
    if why is not None:
        row.note = f"skipped: {why}"
        return row
    try:
        want, want_grads = forward_backward(op, "reference", args, kwargs, torch.float64)
        got, got_grads = forward_backward(op, backend, args, kwargs)
    except Exception as e:  # a kernel error is a failed row, never an abort
        row.forward = math.inf
        row.note = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        return row
    row.forward = max(relative_error(g, w) for g, w in zip(got, want))
    row.grads = max((relative_error(g, w) for g, w in zip(got_grads, want_grads)), default=0.0)
    return row


# ------------------------------------------------------------------------------------------ the store
def cache_file() -> Path:
    """Where validation results are kept (see the module docstring)."""
    root = os.environ.get("ZOO_CACHE_DIR")
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sessa-zoo"
    return Path(root) / "validation.json"


def _read() -> dict:
    path = cache_file()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"format": FORMAT, "results": {}}
    except (OSError, ValueError) as e:
        raise RuntimeError(f"cannot read the validation cache {path}: {e}; delete it to start afresh") from None
    if data.get("format") != FORMAT:
        return {"format": FORMAT, "results": {}}
    return data


def _write(data: dict) -> None:
    path = cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)  # atomic: a reader sees the old file or the new one


def load() -> None:
    """Fill dispatch's set of validated (device, op, backend) from the cache file."""
    VALIDATED.clear()
    try:
        results = _read()["results"]
    except RuntimeError:
        return  # an unreadable cache trusts nothing; validate() reports the problem
    for key, entries in results.items():
        for name, entry in entries.items():
            if entry.get("passed"):
                op, _, backend = name.partition("/")
                VALIDATED.add((key, op, backend))


def results(device: torch.device | str | None = None) -> dict[str, dict]:
    """Stored verdicts for `device` (default: the current CUDA device, else CPU): {"op/backend": entry}."""
    return _read()["results"].get(device_key(_device(device)), {})


def forget(device: torch.device | str | None = None) -> None:
    """Drop the stored verdicts of `device` (with the versions in use)."""
    data = _read()
    data["results"].pop(device_key(_device(device)), None)
    _write(data)
    load()


def _device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# ------------------------------------------------------------------------------------------ validate
@dataclass
class Report:
    device: str
    rows: list[Row] = field(default_factory=list)
    verdicts: dict[str, bool] = field(default_factory=dict)  # "op/backend" -> passed
    missing: list[str] = field(default_factory=list)  # "op/backend" with no validation cases

    @property
    def ok(self) -> bool:
        return all(self.verdicts.values())

    def __str__(self) -> str:
        lines = [f"validation on {self.device}",
                 f"{'op':<16} {'backend':<10} {'dtype':<9} {'case':<34} {'forward':>9} {'grads':>9}  result"]
        for r in self.rows:
            tol = TOLERANCE[getattr(torch, r.dtype)]
            result = r.note if not r.ran or math.isinf(r.forward) else ("ok" if r.passed(tol) else f"FAIL (> {tol:.0e})")
            errs = f"{r.forward:9.1e} {r.grads:9.1e}" if r.ran and not math.isinf(r.forward) else f"{'':9} {'':9}"
            lines.append(f"{r.op:<16} {r.backend:<10} {r.dtype:<9} {r.case:<34} {errs}  {result}")
        for name, passed in self.verdicts.items():
            lines.append(f"{name}: {'validated' if passed else 'NOT validated'}")
        lines += [f"{name}: no validation cases for its op (stays unvalidated)" for name in self.missing]
        return "\n".join(lines)


def _verdict(rows: list[Row]) -> bool:
    ran = [r for r in rows if r.ran]
    return bool(ran) and all(r.passed(TOLERANCE[getattr(torch, r.dtype)]) for r in ran)


def validate(ops: list[str] | None = None, backends: list[str] | None = None, device: torch.device | str | None = None,
             dtypes: tuple[torch.dtype, ...] = DTYPES, store: bool = True,
             progress: Callable[[Row], None] | None = None, quick: bool = False) -> Report:
    """Check backends on `device` (default: the current CUDA device, else CPU) against reference.

    ops / backends: which to check (default: every backend registered with needs_validation=True;
    name others to check them too). A backend is validated when every case it accepts passes in every
    dtype and at least one ran; `store` writes the verdicts to cache_file() and dispatch trusts the
    passed ones at once. `progress(row)` is called after each row. `quick` runs the large cases in
    half precision only (a quick check, never stored)."""
    device = _device(device)
    report = Report(device_key(device))
    for op_name in ops or list(OPS):
        op = OPS[op_name]
        names = [b for b in op.backends if b != "reference" and (b in backends if backends else op.backends[b].needs_validation)]
        for backend in names:
            if op_name not in CASES:
                report.missing.append(f"{op_name}/{backend}")
                continue
            rows = []
            for case in CASES[op_name]:
                for dtype in dtypes:
                    if quick and case.large and dtype == torch.float32:
                        continue
                    rows.append(check_case(op_name, backend, case, dtype, device))
                    if progress is not None:
                        progress(rows[-1])
            report.rows += rows
            report.verdicts[f"{op_name}/{backend}"] = _verdict(rows)
    if store and report.verdicts and not quick:
        data = _read()
        entries = data["results"].setdefault(report.device, {})
        when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        for name, passed in report.verdicts.items():
            op_name, _, backend = name.partition("/")
            rows = [r for r in report.rows if r.op == op_name and r.backend == backend]
            entries[name] = dict(passed=passed, when=when, ran=sum(r.ran for r in rows),
                                 skipped=sum(not r.ran for r in rows),
                                 worst={r.dtype: max(x.forward if math.isinf(x.forward) else max(x.forward, x.grads)
                                                     for x in rows if x.ran and x.dtype == r.dtype)
                                        for r in rows if r.ran},
                                 failures=[f"{r.case} {r.dtype}: {r.note or f'{max(r.forward, r.grads):.1e}'}"
                                           for r in rows if r.ran and not r.passed(TOLERANCE[getattr(torch, r.dtype)])])
        _write(data)
        load()
    return report


load()
