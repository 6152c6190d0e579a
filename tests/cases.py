"""Random input cases for every op, shared by the conformance suite (never zeros).

Tags: "tiny" cases also run the Triton backends in the CPU interpreter; "gpu" cases run on CUDA only
(sizes that matter there: the feedback solve's row groups, head dims up to 256, P = N = 128);
"large" cases run in half precision only (their float32 Triton kernels take minutes to compile).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch

from kernels.packing import seq_idx_from_cu_seqlens


@dataclass
class Case:
    id: str
    make: callable  # (dtype, device) -> (args tuple, kwargs dict); float tensors get gradients checked
    tags: set = field(default_factory=set)


def seed_of(case_id: str) -> int:
    """A seed from the case id, the same in every process (unlike hash(), which is salted per process)."""
    return zlib.crc32(case_id.encode())


def _r(*shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


def _packed(lengths, device):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)
    return seq_idx_from_cu_seqlens(cu)


def strided_view(t: torch.Tensor, pad: int) -> torch.Tensor:
    """The values of t as a non-contiguous view: a slice of a wider random buffer (the last dim
    keeps stride 1, every other stride grows by `pad`; 1-D tensors get stride 2), as when a layer
    splits one projection into several inputs. Different pads give inputs different strides."""
    if t.ndim == 1:
        wide = torch.randn(2 * t.shape[0], dtype=torch.float64).to(dtype=t.dtype, device=t.device)
        wide[::2] = t
        return wide[::2]
    wide = torch.randn(*t.shape[:-1], t.shape[-1] + pad, dtype=torch.float64).to(dtype=t.dtype, device=t.device)
    wide[..., :t.shape[-1]] = t
    return wide[..., :t.shape[-1]]


def _strided_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Every float input as a strided view, each with its own strides."""
    pads = iter(range(1, 100, 2))
    view = lambda t: strided_view(t, next(pads)) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    return tuple(view(a) for a in args), {k: view(v) for k, v in kwargs.items()}


# ---------------------------------------------------------------- attention
def attention_case(B, Tq, S, H, Hkv, d, window=None, packed=None, strided=False, tags=()):
    def make(dtype, device):
        torch.manual_seed(seed_of(name))
        kw = {}
        if window is not None:
            kw["window"] = window
        if packed is not None:
            kw["seq_idx"] = _packed(packed, device).expand(B, S).contiguous()
        args = (_r(B, Tq, H, d, dtype=dtype, device=device), _r(B, S, Hkv, d, dtype=dtype, device=device),
                _r(B, S, Hkv, d, dtype=dtype, device=device))
        return _strided_inputs(args, kw) if strided else (args, kw)
    name = (f"B{B}-Tq{Tq}-S{S}-H{H}-Hkv{Hkv}-d{d}" + (f"-w{window}" if window else "") + ("-packed" if packed else "")
            + ("-strided" if strided else ""))
    return Case(name, make, set(tags))


ATTENTION_CASES = [
    attention_case(2, 1, 1, 2, 2, 32, tags={"tiny"}),
    attention_case(2, 7, 7, 4, 2, 32, tags={"tiny"}),
    attention_case(1, 33, 33, 2, 1, 64),
    attention_case(2, 17, 17, 2, 2, 100),
    attention_case(2, 3, 12, 4, 4, 32, tags={"tiny"}),  # decoding: queries are the last 3 of 12 keys
    attention_case(2, 19, 19, 2, 2, 32, window=5),
    attention_case(1, 20, 20, 2, 1, 32, packed=[7, 1, 12], tags={"tiny", "packed"}),
    attention_case(2, 9, 13, 4, 2, 32, window=6, strided=True, tags={"tiny", "strided"}),
    attention_case(2, 300, 300, 4, 1, 128, window=100, packed=[100, 1, 199], tags={"gpu", "packed"}),
    attention_case(1, 70, 70, 2, 1, 256, strided=True, tags={"gpu", "large", "strided"}),
]


# ---------------------------------------------------------------- feedback_solve
def feedback_case(B, T, D, Dk=None, P=0, packed=None, gamma_max=0.999, strided=False, tags=()):
    Dk = Dk or D

    def make(dtype, device):
        torch.manual_seed(seed_of(name))
        sign = torch.where(torch.rand(B, T) < 0.5, -1.0, 1.0)
        gamma = (sign * gamma_max * (1 - 0.05 * torch.rand(B, T))).to(dtype=dtype, device=device)
        kw = {}
        if P:
            kw["past_k"] = _r(B, P, Dk, dtype=dtype, device=device)
            kw["past_s"] = _r(B, P, D, dtype=dtype, device=device)
        if packed is not None:
            kw["seq_idx"] = _packed(packed, device).expand(B, P + T).contiguous()
        args = (_r(B, T, D, dtype=dtype, device=device), _r(B, T, Dk, dtype=dtype, device=device),
                _r(B, T, Dk, dtype=dtype, device=device), gamma)
        return _strided_inputs(args, kw) if strided else (args, kw)
    name = (f"B{B}-T{T}-D{D}" + (f"-Dk{Dk}" if Dk != D else "") + (f"-P{P}" if P else "") + ("-packed" if packed else "")
            + ("-strided" if strided else ""))
    return Case(name, make, set(tags))


FEEDBACK_CASES = [
    feedback_case(2, 1, 16, tags={"tiny"}),
    feedback_case(2, 2, 16, tags={"tiny"}),
    feedback_case(2, 15, 32, tags={"tiny"}),
    feedback_case(2, 16, 32),
    feedback_case(1, 17, 32),
    feedback_case(2, 65, 64),
    feedback_case(2, 40, 100),
    feedback_case(2, 3, 32, P=9, tags={"tiny"}),  # chunked prefill / decoding against a cache
    feedback_case(1, 21, 32, packed=[6, 1, 14], tags={"tiny", "packed"}),
    feedback_case(2, 18, 24, Dk=16, P=4, strided=True, tags={"tiny", "strided"}),
    # the chunked backend's block boundaries at its default C = 128: C - 1, C, C + 1, and several
    # blocks with a cache and segments that start mid-block
    feedback_case(1, 127, 16),
    feedback_case(1, 128, 16),
    feedback_case(1, 129, 16, Dk=8),
    feedback_case(1, 300, 16, P=5, packed=[40, 1, 150, 114], tags={"packed"}),
    feedback_case(1, 600, 64, tags={"gpu"}),  # crosses the Triton solve's 512-row groups
    feedback_case(2, 300, 128, P=40, packed=[100, 1, 239], strided=True, tags={"gpu", "packed", "strided"}),
]


# ---------------------------------------------------------------- ssd
def ssd_case(B, T, H, P, G, N, init=False, packed=None, chunk_size=16, strided=False, tags=()):
    def make(dtype, device):
        torch.manual_seed(seed_of(name))
        kw = dict(chunk_size=chunk_size)
        if init:
            kw["initial_state"] = _r(B, H, P, N, dtype=dtype, device=device)
        if packed is not None:
            kw["seq_idx"] = _packed(packed, device).expand(B, T).contiguous()
        dt = torch.nn.functional.softplus(torch.randn(B, T, H) - 1).to(dtype=dtype, device=device)
        A = (-torch.exp(torch.randn(H) * 0.5)).to(dtype=dtype, device=device)
        args = (_r(B, T, H, P, dtype=dtype, device=device), dt, A, _r(B, T, G, N, dtype=dtype, device=device),
                _r(B, T, G, N, dtype=dtype, device=device))
        return _strided_inputs(args, kw) if strided else (args, kw)
    name = (f"B{B}-T{T}-H{H}-P{P}-G{G}-N{N}-c{chunk_size}" + ("-init" if init else "") + ("-packed" if packed else "")
            + ("-strided" if strided else ""))
    return Case(name, make, set(tags))


SSD_CASES = [
    ssd_case(2, 1, 2, 8, 1, 8, tags={"tiny"}),
    ssd_case(2, 15, 4, 8, 2, 8, tags={"tiny"}),
    ssd_case(1, 16, 2, 16, 1, 16, chunk_size=16),
    ssd_case(2, 37, 4, 8, 2, 16, chunk_size=16),
    ssd_case(2, 20, 2, 8, 1, 8, init=True, chunk_size=8, tags={"tiny"}),
    ssd_case(1, 23, 2, 8, 1, 8, packed=[5, 1, 17], chunk_size=8, tags={"tiny", "packed"}),
    ssd_case(2, 21, 4, 8, 2, 16, init=True, strided=True, tags={"tiny", "strided"}),
    ssd_case(2, 300, 4, 64, 2, 64, init=True, packed=[100, 1, 199], chunk_size=64, tags={"gpu", "packed"}),
    ssd_case(1, 200, 2, 128, 1, 128, chunk_size=64, strided=True, tags={"gpu", "large", "strided"}),
]


# ---------------------------------------------------------------- linear_attention and delta_rule
def _log_decay(*shape, dtype, device):
    """log decays in about (-6, 0): strong and weak forgetting in one tensor."""
    return torch.nn.functional.logsigmoid(torch.randn(*shape, dtype=torch.float64) * 2 + 2).to(dtype=dtype, device=device)


def _state_op_kwargs(B, T, H, dk, dv, init, packed, chunk_size, scale, dtype, device):
    kw = dict(chunk_size=chunk_size)
    if scale is not None:
        kw["scale"] = scale
    if init:
        kw["initial_state"] = _r(B, H, dk, dv, dtype=dtype, device=device)
    if packed is not None:
        kw["seq_idx"] = _packed(packed, device).expand(B, T).contiguous()
    return kw


def _state_op_name(B, T, H, dk, dv, g, init, packed, chunk_size, scale):
    return (f"B{B}-T{T}-H{H}-dk{dk}-dv{dv}-g{g}-c{chunk_size}" + ("-init" if init else "")
            + ("-packed" if packed else "") + (f"-scale{scale}" if scale is not None else ""))


def linear_attention_case(B, T, H, dk, dv, g="key", init=False, packed=None, chunk_size=16, scale=None, tags=()):
    """g: "key" (B, T, H, dk) per key channel, "head" (B, T, H), or None."""
    def make(dtype, device):
        torch.manual_seed(seed_of(name))
        gate = {"key": lambda: _log_decay(B, T, H, dk, dtype=dtype, device=device),
                "head": lambda: _log_decay(B, T, H, dtype=dtype, device=device), None: lambda: None}[g]()
        args = (_r(B, T, H, dk, dtype=dtype, device=device), _r(B, T, H, dk, dtype=dtype, device=device),
                _r(B, T, H, dv, dtype=dtype, device=device), gate)
        return args, _state_op_kwargs(B, T, H, dk, dv, init, packed, chunk_size, scale, dtype, device)
    name = _state_op_name(B, T, H, dk, dv, g, init, packed, chunk_size, scale)
    return Case(name, make, set(tags))


LINEAR_ATTENTION_CASES = [
    linear_attention_case(2, 1, 2, 4, 4, tags={"tiny"}),  # one decoding step
    linear_attention_case(2, 1, 1, 4, 3, g="head", init=True, tags={"tiny"}),  # one decoding step from a state
    linear_attention_case(1, 7, 2, 3, 2, chunk_size=3, tags={"tiny"}),
    linear_attention_case(1, 6, 2, 3, 2, g=None, init=True, chunk_size=4, tags={"tiny"}),
    linear_attention_case(1, 8, 1, 3, 2, g="head", init=True, packed=[2, 1, 5], chunk_size=3, tags={"tiny", "packed"}),
    linear_attention_case(1, 16, 2, 8, 8, g="head", chunk_size=16),  # exactly one chunk
    linear_attention_case(2, 37, 3, 16, 8, chunk_size=32),  # key-channel decays: chunks capped at 16
    linear_attention_case(2, 33, 2, 8, 16, g=None, chunk_size=8, scale=0.3),
    linear_attention_case(1, 23, 2, 8, 8, init=True, packed=[5, 1, 17], chunk_size=8, tags={"packed"}),
    linear_attention_case(1, 40, 2, 8, 4, g=None, packed=[8, 1, 31], chunk_size=8, tags={"packed"}),  # starts on a boundary
    linear_attention_case(2, 70, 2, 8, 8, g="head", init=True, chunk_size=64),  # the default chunk, T > C
    linear_attention_case(2, 300, 2, 64, 64, init=True, packed=[100, 1, 199], chunk_size=64, tags={"gpu", "packed"}),
    linear_attention_case(1, 200, 2, 128, 128, g="head", chunk_size=64, tags={"gpu"}),
]


def delta_rule_case(B, T, H, dk, dv, g="head", init=False, packed=None, chunk_size=16, scale=None, tags=()):
    """g: "head" (B, T, H) or None; keys L2-normalised (what the op assumes), beta in (0, 1)."""
    def make(dtype, device):
        torch.manual_seed(seed_of(name))
        k = torch.nn.functional.normalize(torch.randn(B, T, H, dk, dtype=torch.float64), dim=-1).to(dtype=dtype, device=device)
        beta = torch.sigmoid(torch.randn(B, T, H, dtype=torch.float64)).to(dtype=dtype, device=device)
        gate = _log_decay(B, T, H, dtype=dtype, device=device) if g == "head" else None
        args = (_r(B, T, H, dk, dtype=dtype, device=device), k, _r(B, T, H, dv, dtype=dtype, device=device), beta, gate)
        return args, _state_op_kwargs(B, T, H, dk, dv, init, packed, chunk_size, scale, dtype, device)
    name = _state_op_name(B, T, H, dk, dv, g, init, packed, chunk_size, scale)
    return Case(name, make, set(tags))


DELTA_RULE_CASES = [
    delta_rule_case(2, 1, 2, 4, 4, tags={"tiny"}),  # one decoding step
    delta_rule_case(2, 1, 1, 4, 3, g=None, init=True, tags={"tiny"}),  # one decoding step from a state
    delta_rule_case(1, 7, 2, 3, 2, chunk_size=3, tags={"tiny"}),
    delta_rule_case(1, 6, 2, 3, 2, g=None, init=True, chunk_size=4, tags={"tiny"}),
    delta_rule_case(1, 8, 1, 3, 2, init=True, packed=[2, 1, 5], chunk_size=3, tags={"tiny", "packed"}),
    delta_rule_case(1, 16, 2, 8, 8, chunk_size=16),  # exactly one chunk
    delta_rule_case(2, 37, 3, 16, 8, chunk_size=16),
    delta_rule_case(2, 33, 2, 8, 16, g=None, chunk_size=8, scale=0.3),
    delta_rule_case(1, 23, 2, 8, 8, init=True, packed=[5, 1, 17], chunk_size=8, tags={"packed"}),
    delta_rule_case(1, 40, 2, 8, 4, g=None, packed=[8, 1, 31], chunk_size=8, tags={"packed"}),  # starts on a boundary
    delta_rule_case(2, 70, 2, 16, 8, init=True, chunk_size=64),  # the default chunk, T > C
    delta_rule_case(2, 300, 2, 64, 64, init=True, packed=[100, 1, 199], chunk_size=64, tags={"gpu", "packed"}),
    delta_rule_case(1, 200, 2, 128, 128, g=None, chunk_size=64, tags={"gpu"}),
]

CASES = {"attention": ATTENTION_CASES, "feedback_solve": FEEDBACK_CASES, "ssd": SSD_CASES,
         "linear_attention": LINEAR_ATTENTION_CASES, "delta_rule": DELTA_RULE_CASES}
