"""The `fla` backends through the real flash-linear-attention kernels, in Triton's CPU interpreter.

    python -m tests.fla_interpreter                     # one JSON line per case: errors against reference
    python -m tests.fla_interpreter --validation-cases  # kernels.validation's cases, float32 and float16 (minutes)

Needs flash-linear-attention 0.6 and triton installed (`pip install torch==2.13.0 '.[fla,triton]'`);
run in its own process by tests/test_fla_interpreter.py, because it adapts Triton and FLA for the
interpreter process-wide: every autotuner keeps its first config (benchmarking needs a GPU), and
FLA's kernel modules get a `range` whose loop counters are interpreter scalars while a kernel runs
(FLA calls `.to()` on them; the interpreter leaves them Python ints). bfloat16 is not checked: the
interpreter mishandles FLA's bfloat16 kernels (O(1e9) errors there, float16 is fine).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import builtins  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import pkgutil  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime import autotuner, interpreter  # noqa: E402

import kernels  # noqa: E402
from kernels.validation import relative_error  # noqa: E402
from tests.cases import seed_of  # noqa: E402

_in_kernel = [False]


def _adapt_for_interpreter() -> None:
    init, launch = autotuner.Autotuner.__init__, interpreter.GridExecutor.__call__

    def first_config_only(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.configs = self.configs[:1]

    def launch_flagged(self, *args, **kwargs):
        _in_kernel[0] = True
        try:
            return launch(self, *args, **kwargs)
        finally:
            _in_kernel[0] = False

    def kernel_range(*bounds):
        if not _in_kernel[0]:
            return builtins.range(*bounds)
        bounds = [int(b.data.item()) if hasattr(b, "data") else int(b) for b in bounds]
        return (tl.full([], i, tl.int32) for i in builtins.range(*bounds))

    autotuner.Autotuner.__init__ = first_config_only
    interpreter.GridExecutor.__call__ = launch_flagged
    import fla.ops
    for info in pkgutil.walk_packages(fla.ops.__path__, "fla.ops."):
        try:
            importlib.import_module(info.name).range = kernel_range
        except Exception:  # modules for other hardware (e.g. Ascend) do not import here
            pass


# (op, g: "key" / "head" / None, dtype, options): every mapping path of both backends
CASES = [
    ("linear_attention", "key", "float32", dict(B=2, T=20, init=True, final=True, seq=True)),
    ("linear_attention", "head", "float32", dict(B=2, T=70, init=True, final=True, scale=0.3)),
    ("linear_attention", None, "float32", dict(B=2, T=20, final=True, seq=True, dk=3, dv=5)),
    ("linear_attention", "key", "float16", dict(B=1, T=33, init=True, final=True)),
    ("delta_rule", "head", "float32", dict(B=2, T=20, init=True, final=True, seq=True)),
    ("delta_rule", None, "float32", dict(B=2, T=70, init=True, final=True, scale=0.3)),
    ("delta_rule", None, "float16", dict(B=2, T=20, init=True, final=True, seq=True, dk=12, dv=20)),
    ("delta_rule", "head", "float16", dict(B=1, T=33)),
]


def check(op: str, g_kind: str | None, dtype_name: str, c: dict) -> dict:
    """Errors (max |fla - reference| / max |reference|) of the outputs and of every gradient."""
    gen = torch.Generator().manual_seed(seed_of(f"{op}-{g_kind}-{dtype_name}-{sorted(c.items())}"))
    B, T, H, dk, dv, dtype = c["B"], c["T"], 2, c.get("dk", 16), c.get("dv", 16), getattr(torch, dtype_name)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    args = [r(B, T, H, dk), F.normalize(r(B, T, H, dk), dim=-1), r(B, T, H, dv)]
    if op == "delta_rule":
        args.append(torch.rand(B, T, H, generator=gen))
    args.append({"key": lambda: F.logsigmoid(r(B, T, H, dk)), "head": lambda: F.logsigmoid(r(B, T, H)),
                 None: lambda: None}[g_kind]())
    kw = dict(return_final_state=c.get("final", False))
    if "scale" in c:
        kw["scale"] = c["scale"]
    if c.get("init"):
        kw["initial_state"] = r(B, H, dk, dv)
    if c.get("seq"):  # row 0: segments of 5, 1, 14 steps; row 1: 6, 14 (lengths for T = 20)
        kw["seq_idx"] = torch.tensor([[0] * 5 + [1] + [2] * (T - 6), [3] * 6 + [4] * (T - 6)])[:B]
    floats = lambda a, kw, to: ([None if t is None else t.to(to).requires_grad_(True) for t in a],  # noqa: E731
                                {k: v.to(to).requires_grad_(True) if torch.is_tensor(v) and v.is_floating_point() else v
                                 for k, v in kw.items()})
    results = []
    for backend, to in (("fla", dtype), ("reference", torch.float64)):
        a, k = floats(args, kw, to)
        out = kernels.get_op(op).backends[backend].fn(*a, **k)
        outs = out if isinstance(out, tuple) else (out,)
        g = torch.Generator().manual_seed(1)
        loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum() for o in outs)
        leaves = [t for t in (*a, *k.values()) if torch.is_tensor(t) and t.requires_grad]
        results.append((outs, torch.autograd.grad(loss, leaves)))
    (got, got_grads), (want, want_grads) = results
    return dict(op=op, g=g_kind, dtype=dtype_name, case=c,
                forward=max(relative_error(a, b) for a, b in zip(got, want)),
                grads=max(relative_error(a, b) for a, b in zip(got_grads, want_grads)))


def validation_cases() -> None:
    """kernels.validation's cases of both ops (what tools/gpu_check.py runs on a GPU) with the CPU checks
    of the backends lifted, float32 and float16."""
    from kernels import fla_utils, validation

    fla_utils.supports = lambda *args, **kwargs: None
    for op in ("linear_attention", "delta_rule"):
        kernels.get_op(op).backends["fla"]._availability = (None,)
        for case in validation.CASES[op]:
            for dtype in (torch.float32, torch.float16):
                r = validation.check_case(op, "fla", case, dtype, torch.device("cpu"))
                print(json.dumps(dict(op=op, case=r.case, dtype=r.dtype, forward=r.forward, grads=r.grads, note=r.note)),
                      flush=True)


def main() -> None:
    warnings.simplefilter("ignore")  # FLA warns that Triton has no GPU here
    _adapt_for_interpreter()
    if "--validation-cases" in sys.argv[1:]:
        validation_cases()
        return
    for case in CASES:
        print(json.dumps(check(*case)), flush=True)


if __name__ == "__main__":
    main()
