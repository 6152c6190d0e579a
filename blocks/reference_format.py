"""Load and save one Sessa layer in the reference code's `state_dict` format (LibratioAI/sessa).

    sd = torch.load("layer.pt", map_location="cpu", weights_only=True)  # tensors only: never unpickles code
    block = load_reference_block(sd, num_heads=4)                       # -> GatedBlock(Sessa)
    sd = to_reference_state_dict(block)                                 # -> reference key names

Reference keys of one layer (`SessaLayer`): ln.{weight,bias}, W_in.{weight,bias},
mixer.{q,k,v}_proj.{weight,bias}, mixer.proj_fb.{weight,bias}, mixer.out_proj.weight (absent when
n_heads == 1), mixer.gamma_bias, mixer.gamma_ctx.weight, W_out.{weight,bias}; buffers
mixer.rope_inv_freq (with RoPE) and mixer.causal_mask_{f,fb}_full (with max_len), which we check
(frequencies) or ignore (masks). Checkpoints in float32, float16, bfloat16 or float64 load in
their own dtype; the frequencies are compared within that dtype's rounding.

Load files from untrusted sources with `weights_only=True` (as above): without it, torch.load of
a pickle can run arbitrary code (it is the default only from torch 2.6 on).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from blocks.gated_block import GatedBlock
from blocks.rope import RotaryEmbedding
from blocks.sessa import Sessa

ROPE_KEY = "mixer.rope_inv_freq"
IGNORED_KEYS = ("mixer.causal_mask_f_full", "mixer.causal_mask_fb_full")
OUT_PROJ_KEY = "mixer.out_proj.weight"


def _expected_shapes(D: int, kv_dim: int, out_proj: bool) -> dict[str, tuple[int, ...]]:
    shapes = {
        "ln.weight": (D,), "ln.bias": (D,),
        "W_in.weight": (2 * D, D), "W_in.bias": (2 * D,),
        "mixer.q_proj.weight": (D, D), "mixer.q_proj.bias": (D,),
        "mixer.k_proj.weight": (kv_dim, D), "mixer.k_proj.bias": (kv_dim,),
        "mixer.v_proj.weight": (kv_dim, D), "mixer.v_proj.bias": (kv_dim,),
        "mixer.proj_fb.weight": (2 * D, D), "mixer.proj_fb.bias": (2 * D,),
        "mixer.gamma_bias": (),
        "mixer.gamma_ctx.weight": (1, D),
        "W_out.weight": (D, D), "W_out.bias": (D,),
    }
    if out_proj:
        shapes[OUT_PROJ_KEY] = (D, D)
    return shapes


def _infer_heads(D: int, kv_dim: int, out_proj: bool, inv_freq: Tensor | None, num_heads: int | None) -> int:
    """Forward heads H: 1 without out_proj; else num_heads, or D / d with d from the RoPE frequencies."""
    if not out_proj:
        if num_heads not in (None, 1):
            raise ValueError(f"checkpoint has no {OUT_PROJ_KEY}, so it was saved with n_heads=1; got num_heads={num_heads}")
        return 1
    if num_heads is None:
        if inv_freq is None:
            raise ValueError(f"checkpoint has {OUT_PROJ_KEY} (n_heads > 1) and no {ROPE_KEY} to infer the "
                             "head dim from: pass num_heads")
        head_dim = 2 * inv_freq.numel()
        if head_dim == 0 or D % head_dim:
            raise ValueError(f"{ROPE_KEY} has {inv_freq.numel()} frequencies, i.e. head dim {head_dim}, "
                             f"which does not divide D={D}; pass num_heads")
        return D // head_dim
    if num_heads < 2 or D % num_heads:
        raise ValueError(f"checkpoint has {OUT_PROJ_KEY}, so n_heads > 1 dividing D={D}; got num_heads={num_heads}")
    return num_heads


def load_reference_block(state_dict: dict[str, Tensor], *, num_heads: int | None = None,
                         num_kv_heads: int | None = None, gamma_max: float = 0.999, rope: bool = True,
                         ln_eps: float = 1e-5) -> GatedBlock:
    """A GatedBlock(Sessa) holding the weights of one reference `SessaLayer` state_dict.

    D comes from the shapes, H_kv·d from mixer.k_proj. H is 1 when mixer.out_proj.weight is absent;
    otherwise `num_heads`, or inferred from mixer.rope_inv_freq (d/2 frequencies) when present.
    `num_kv_heads`, `rope`, if given, are checked against the checkpoint. The block has the dtype of
    mixer.q_proj.weight and lives on the CPU. Raises ValueError naming the offending key.
    """
    if "ln.weight" not in state_dict:
        raise ValueError("state_dict has no 'ln.weight': not a reference SessaLayer state_dict "
                         f"(keys: {', '.join(sorted(state_dict)) or 'none'})")
    D = state_dict["ln.weight"].shape[0]
    if "mixer.k_proj.weight" not in state_dict:
        raise ValueError("state_dict is missing 'mixer.k_proj.weight'")
    kv_dim = state_dict["mixer.k_proj.weight"].shape[0]
    out_proj = OUT_PROJ_KEY in state_dict
    inv_freq = state_dict.get(ROPE_KEY)

    expected = _expected_shapes(D, kv_dim, out_proj)
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected and key != ROPE_KEY and key not in IGNORED_KEYS]
    if missing or unexpected:
        raise ValueError(f"state_dict does not match a reference SessaLayer: missing {missing or 'none'}, "
                         f"unexpected {unexpected or 'none'}")
    for key, shape in expected.items():
        if tuple(state_dict[key].shape) != shape:
            raise ValueError(f"{key} has shape {tuple(state_dict[key].shape)}; expected {shape} for D={D}, H_kv*d={kv_dim}")

    H = _infer_heads(D, kv_dim, out_proj, inv_freq, num_heads)
    head_dim = D // H
    if kv_dim % head_dim or H % (kv_dim // head_dim):
        raise ValueError(f"mixer.k_proj.weight has {kv_dim} rows, not H_kv * d for a H_kv dividing H={H} (d={head_dim})")
    Hkv = kv_dim // head_dim
    if num_kv_heads is not None and num_kv_heads != Hkv:
        raise ValueError(f"num_kv_heads={num_kv_heads} does not match the checkpoint: mixer.k_proj.weight "
                         f"has {kv_dim} rows = {Hkv} heads of {head_dim}")
    if inv_freq is not None:
        if not rope:
            raise ValueError(f"rope=False but the checkpoint has {ROPE_KEY}: it was saved with RoPE on")
        want = RotaryEmbedding(head_dim).inv_freq
        if not inv_freq.is_floating_point():
            raise ValueError(f"{ROPE_KEY} must hold floating-point frequencies; got {inv_freq.dtype}")
        # a float16/bfloat16 checkpoint holds the float32 frequencies rounded to its dtype
        rtol = max(1e-6, torch.finfo(inv_freq.dtype).eps)
        if inv_freq.shape != want.shape or not torch.allclose(inv_freq.float().cpu(), want, rtol=rtol, atol=0):
            raise ValueError(f"{ROPE_KEY} (shape {tuple(inv_freq.shape)}, {inv_freq.dtype}) differs from the "
                             f"frequencies 10000^(-2i/d) for head dim d={head_dim} that this implementation uses")

    dtype = state_dict["mixer.q_proj.weight"].dtype
    block = GatedBlock(D, partial(Sessa, num_heads=H, num_kv_heads=Hkv, gamma_max=gamma_max, rope=rope), ln_eps=ln_eps)
    block.to(dtype)
    block.load_state_dict({key: state_dict[key] for key in expected}, strict=True)
    return block


def to_reference_state_dict(block: GatedBlock) -> dict[str, Tensor]:
    """The reference SessaLayer state_dict of a GatedBlock(Sessa) (with mixer.rope_inv_freq when RoPE is on;
    without the max_len masks, so build the reference layer with max_len=None or load with strict=False)."""
    if not isinstance(block, GatedBlock) or not isinstance(block.mixer, Sessa):
        raise TypeError(f"block must be a GatedBlock with a Sessa mixer; got {type(block).__name__}"
                        f"({type(getattr(block, 'mixer', None)).__name__})")
    mixer = block.mixer
    if not mixer.feedback:
        raise ValueError("the reference format has no Sessa without the feedback branch (feedback=False)")
    if mixer.rope is not None and mixer.rope.base != 10000.0:
        raise ValueError(f"the reference format fixes the RoPE base at 10000; this block has "
                         f"rope_base={mixer.rope.base:g}")
    sd = {key: value.detach().clone() for key, value in block.state_dict().items()}
    if mixer.rope is not None:  # the reference keeps the buffer in the layer's dtype
        sd[ROPE_KEY] = mixer.rope.inv_freq.detach().to(mixer.q_proj.weight.dtype).clone()
    return sd
