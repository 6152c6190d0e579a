"""Explicit constructions: set a model's weights so a mixer's routing is known in closed form.

    model = explicit_construction(CausalLM(...), uniform_routing=True, gain=0.5)
    # every Sessa layer: q_b = k_b = 0, so alpha_{t,j} = 1/t, and gamma_t = 0.5 for every token

    build_model.model = @explicit_construction        # gin (import zoo.probes.configurables)
    explicit_construction.model = @CausalLM
    explicit_construction.gain = 0.5

What each option sets and what the theory predicts (docs/memory_tail.md):
  * uniform_routing: Sessa's feedback projection (proj_fb weight and bias) is zero, so q_b = k_b = 0
    and alpha_{t,j} = 1/t over the strict past (c2 = max t * alpha = 1).
  * gain: Sessa's gain is the constant gain: gamma_ctx.weight = 0 and
    gamma_bias = atanh(gain / gamma_max). With uniform routing the kernel
    [(I - B_fb)^-1]_{tau + l, tau} decays as l^-(1 - gain).
  * uniform_attention: attention layers' query projection is zero, so every score is 0 and a query
    at t averages the values at j <= t: the influence of x_tau on y_t is proportional to 1/(t + 1).
  * mamba2_step, mamba2_decay: Mamba-2 layers get the fixed step dt = mamba2_step (dt rows of
    in_proj zero, dt_bias = softplus^-1(step)) and A = -mamba2_decay in every head, so the state
    forgets by exp(-decay * step) per token: exponential decay in the lag.
  * fixed_gate: the data-dependent log decay of Gated DeltaNet (g = -exp(A_log) softplus(x W_a +
    dt_bias)) and GLA (g = logsigmoid(x W_1 W_2 + b) / normalizer) becomes the constant -fixed_gate
    in every head and key channel: a_proj = 0, A_log = log(fixed_gate), softplus(dt_bias) = 1 (Gated
    DeltaNet); W_2 = 0, b = logit(exp(-fixed_gate * normalizer)) (GLA). The state then forgets by
    exp(-fixed_gate) per token (GLA: exactly that rate; Gated DeltaNet: at least that rate, the delta
    rule's erasure adds to it). fixed_gate = 0 turns the decay off (g = 0 exactly).
  * constant_beta: Gated DeltaNet and DeltaNet get beta_t = sigmoid(0) = 1/2 for every token (b_proj = 0).
  * RetNet needs no construction: its decays 1 - 2^(-5-h) are fixed by design (a model with RetNet
    layers counts as matched by any option, so one config serves every layout); uniform_attention
    also acts on sliding-window attention, whose influence is then 1/min(t + 1, window) inside the
    window and exactly 0 from lag `window` on.

The weights stay trainable; the construction is a starting point for probes, not a constraint.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from blocks.attention import Attention
from blocks.gated_deltanet import GatedDeltaNet
from blocks.gla import GatedLinearAttention
from blocks.mamba2 import Mamba2
from blocks.retnet import MultiScaleRetention
from blocks.sessa import Sessa


def feedback_layers(model: nn.Module) -> list[tuple[str, Sessa]]:
    """(module name, mixer) of every Sessa mixer with a feedback branch in `model`, in order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Sessa) and m.feedback]


@torch.no_grad()
def explicit_construction(model: nn.Module | Callable[[], nn.Module], uniform_routing: bool = False,
                          gain: float | None = None, uniform_attention: bool = False,
                          mamba2_step: float | None = None, mamba2_decay: float = 1.0,
                          fixed_gate: float | None = None, constant_beta: bool = False) -> nn.Module:
    """Apply the constructions in the module docstring to every matching mixer of `model` (a module,
    or a factory called first, as gin passes `@CausalLM`). Returns the model, changed in place.
    Options without a matching mixer are skipped (one config serves layouts 'S', 'A', 'M', ...).

    Raises ValueError naming the option when it is out of range, or when nothing matched at all."""
    if not (uniform_routing or gain is not None or uniform_attention or mamba2_step is not None
            or fixed_gate is not None or constant_beta):
        raise ValueError("explicit_construction: set at least one of uniform_routing, gain, uniform_attention, "
                         "mamba2_step, fixed_gate, constant_beta")
    if fixed_gate is not None and not (isinstance(fixed_gate, (int, float)) and 0 <= fixed_gate < math.inf):
        raise ValueError(f"explicit_construction: fixed_gate must be a finite number >= 0; got fixed_gate={fixed_gate!r}")
    model = model if isinstance(model, nn.Module) else model()
    changed = 0
    if uniform_routing or gain is not None:
        for _, mixer in feedback_layers(model):
            if uniform_routing:
                mixer.proj_fb.weight.zero_()
                mixer.proj_fb.bias.zero_()
            if gain is not None:
                if not abs(gain) < mixer.gamma_max:
                    raise ValueError(f"explicit_construction: gain must satisfy |gain| < gamma_max={mixer.gamma_max}; "
                                     f"got gain={gain}")
                mixer.gamma_ctx.weight.zero_()
                mixer.gamma_bias.fill_(math.atanh(gain / mixer.gamma_max))
            changed += 1
    if uniform_attention:
        # Sessa subclasses Attention (its forward branch); only the attention mixers themselves are meant
        for mixer in (m for m in model.modules() if isinstance(m, Attention) and not isinstance(m, Sessa)):
            mixer.q_proj.weight.zero_()
            changed += 1
    if mamba2_step is not None:
        if not (mamba2_step > 0 and mamba2_decay > 0):
            raise ValueError(f"explicit_construction: mamba2_step and mamba2_decay must be > 0; "
                             f"got mamba2_step={mamba2_step}, mamba2_decay={mamba2_decay}")
        for mixer in (m for m in model.modules() if isinstance(m, Mamba2)):
            mixer.in_proj.weight[-mixer.num_heads:].zero_()  # the dt rows (in_proj -> z, xBC, dt)
            mixer.dt_bias.fill_(mamba2_step + math.log(-math.expm1(-mamba2_step)))  # softplus^-1
            mixer.A_log.fill_(math.log(mamba2_decay))
            changed += 1
    if fixed_gate is not None:
        for mixer in (m for m in model.modules() if isinstance(m, GatedDeltaNet) and m.decay):
            mixer.a_proj.weight.zero_()
            mixer.A_log.fill_(math.log(fixed_gate) if fixed_gate > 0 else -math.inf)  # exp(A_log) = fixed_gate
            mixer.dt_bias.fill_(math.log(math.expm1(1.0)))  # softplus(dt_bias) = 1
            changed += 1
        for mixer in (m for m in model.modules() if isinstance(m, GatedLinearAttention)):
            second = mixer.gk_proj[-1]
            second.weight.zero_()
            keep = math.exp(-fixed_gate * mixer.gate_logit_normalizer)  # sigmoid(b) = keep
            second.bias.fill_(math.log(keep / -math.expm1(-fixed_gate * mixer.gate_logit_normalizer))
                              if fixed_gate > 0 else math.inf)
            changed += 1
    if constant_beta:
        for mixer in (m for m in model.modules() if isinstance(m, GatedDeltaNet)):  # DeltaNet included
            mixer.b_proj.weight.zero_()
            changed += 1
    # RetNet's decays are fixed by design: it is its own construction, so a config of these options serves it too
    changed += sum(isinstance(m, MultiScaleRetention) for m in model.modules())
    if not changed:
        raise ValueError(f"explicit_construction: {type(model).__name__} has no layer the requested options act on "
                         "(Sessa with feedback for uniform_routing / gain, Attention for uniform_attention, Mamba2 "
                         "for mamba2_step, Gated DeltaNet or GLA for fixed_gate, Gated DeltaNet or DeltaNet for "
                         "constant_beta)")
    return model
