"""What a model's weights predict for its end-to-end memory tail, where they fix it in closed form.

    tail = predicted_tail(model)      # None, or TailPrediction(rate=0.02, lower_bound=False, cutoff=None)
    print(tail.describe())            # "rate 0.02" / "rate >= 0.02" / "zero from lag 64"

Per mixer (docs/memory_tail.md):

    mixer                                   tail of the influence of x_tau on y_(tau+l)
    RetNet (decays gamma_h = 1 - 2^(-5-h))  exp(-rate l), rate = -log(max_h gamma_h): the slowest head
    GLA with an input-independent gate      exp(-rate l), rate = the smallest -g over key channels
      (W_2 = 0: g = logsigmoid(b) / normalizer)
    Mamba-2 with a fixed step (dt rows 0)   exp(-rate l), rate = min_h exp(A_log) softplus(dt_bias)
    Gated DeltaNet with a fixed gate        at least exp(-rate l), rate = min_h exp(A_log) softplus(dt_bias):
      (a_proj = 0)                          the delta rule's erasure (I - beta k k^T) only adds decay
    sliding-window attention                exactly 0 from lag window on (the query sees window - 1 steps back)
    anything else (attention, Sessa,        no closed form here (power laws: the probe's Sessa kernels
      data-dependent gates, DeltaNet)       carry the theory's exponent instead)

A stack: every layer must have a prediction. Its rate is the slowest layer's (exponential paths
compose into the slowest exponential; windows only add finite support), and a stack of windows
only is zero from lag 1 + sum(window - 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blocks.attention import Attention
from blocks.gated_deltanet import GatedDeltaNet
from blocks.gla import GatedLinearAttention
from blocks.mamba2 import Mamba2
from blocks.mixer import Mixer
from blocks.retnet import MultiScaleRetention
from blocks.sessa import Sessa


@dataclass(frozen=True)
class TailPrediction:
    """rate: the tail is exp(-rate * l) (None: finite support only); lower_bound: it decays at least
    that fast; cutoff: the influence is exactly 0 from this lag on (None: never)."""

    rate: float | None = None
    lower_bound: bool = False
    cutoff: int | None = None

    def describe(self) -> str:
        if self.rate is not None:
            return f"rate {'>= ' if self.lower_bound else ''}{self.rate:.4g}"
        return f"zero from lag {self.cutoff}"


def _zero(weight: torch.Tensor) -> bool:
    return not bool(weight.any())


def mixer_tail(mixer: Mixer) -> TailPrediction | None:
    """The prediction of one mixer (see the module docstring), or None where its weights fix none."""
    with torch.no_grad():
        if isinstance(mixer, MultiScaleRetention):
            return TailPrediction(rate=-float(mixer.log_decay.max()))
        if isinstance(mixer, GatedLinearAttention):
            second = mixer.gk_proj[-1]
            if not _zero(second.weight):
                return None
            g = F.logsigmoid(second.bias.double()) / mixer.gate_logit_normalizer
            return TailPrediction(rate=-float(g.max()))
        if isinstance(mixer, GatedDeltaNet):
            if not mixer.decay or not _zero(mixer.a_proj.weight):
                return None
            rate = torch.exp(mixer.A_log.double()) * F.softplus(mixer.dt_bias.double())
            return TailPrediction(rate=float(rate.min()), lower_bound=True)
        if isinstance(mixer, Mamba2):
            if not _zero(mixer.in_proj.weight[-mixer.num_heads:]):  # dt depends on the input
                return None
            dt = F.softplus(mixer.dt_bias.double())
            if mixer.dt_limit is not None:
                dt = dt.clamp(min=mixer.dt_limit[0], max=mixer.dt_limit[1])
            return TailPrediction(rate=float((torch.exp(mixer.A_log.double()) * dt).min()))
        if isinstance(mixer, Attention) and not isinstance(mixer, Sessa) and mixer.window is not None:
            return TailPrediction(cutoff=mixer.window)
    return None


def predicted_tail(module: nn.Module) -> TailPrediction | None:
    """The prediction for a model, stack, block or mixer: None unless every mixer in it has one."""
    mixers = [m for m in module.modules() if isinstance(m, Mixer)]
    tails = [mixer_tail(m) for m in mixers]
    if not tails or any(t is None for t in tails):
        return None
    rated = [t for t in tails if t.rate is not None]
    if not rated:
        return TailPrediction(cutoff=1 + sum(t.cutoff - 1 for t in tails))
    slowest = min(t.rate for t in rated)
    return TailPrediction(rate=slowest, lower_bound=any(t.lower_bound and t.rate <= slowest for t in rated))
