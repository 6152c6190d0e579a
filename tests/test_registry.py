"""Registry and gin wiring: clear errors for names and patterns, a user mixer and a user backend
registered with one decorator each, per-layer backend pins through gin scopes, the summary."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import kernels
from blocks.mixer import Mixer
from blocks.sessa import Sessa
from kernels.attention import attention
from kernels.attention.reference import attention_reference
from zoo import gin_config
from zoo.registry import REGISTRY, Registry, register_mixer
from zoo.stack import Stack
from zoo.summary import summarize


# ---------------------------------------------------------------- what a user writes in their own module
@register_mixer("cumavg", symbol="C")
class CumulativeAverage(Mixer):
    """y_t = scale * mean_{j<=t} W x_j: a causal mixer with no op of its own."""

    invariant_exemptions = {"decode": "no decoding state", "packing": "ignores seq_idx"}

    def __init__(self, dim: int, scale: float = 1.0, backends: dict[str, str] | None = None):
        super().__init__()
        self.dim, self.scale, self.ops = dim, scale, {}
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, *, seq_idx: Tensor | None = None, state=None) -> Tensor:
        steps = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[:, None]
        return self.scale * self.proj(x).cumsum(dim=1) / steps


@pytest.fixture
def user_attention_backend():
    """A user backend for the duration of one test: lowest priority, never auto-picked."""

    @attention.register("reference_copy", priority=-1)
    def attention_reference_copy(q, k, v, **kwargs):
        return attention_reference(q, k, v, **kwargs)

    yield
    attention.unregister("reference_copy")
# ----------------------------------------------------------------


def test_unknown_names_list_valid_ones():
    with pytest.raises(KeyError, match=r"unknown mixer 'sesa'; valid: .*attention, .*mamba2, .*sessa, sessa_nofb"):
        REGISTRY.mixer("sesa")
    with pytest.raises(KeyError, match=r"unknown block 'gate'; valid: gated, residual"):
        Stack(16, "S", block="gate")


def test_invalid_pattern_names_symbol_index_and_valid_symbols():
    with pytest.raises(ValueError, match=r"layout 'SAXA': unknown mixer symbol 'X' at index 2; "
                                         r"valid symbols: A=attention, .*M=mamba2, N=sessa_nofb, .*S=sessa, W=sliding_window"):
        Stack(16, "SAXA")
    with pytest.raises(ValueError, match="non-empty string"):
        Stack(16, "")


def test_symbols_and_names_are_checked():
    with pytest.raises(ValueError, match="symbol 'S' is already used by mixer 'sessa'"):
        REGISTRY.add_mixer("sessa2", Sessa, "S")
    with pytest.raises(ValueError, match="symbol must be one letter or digit"):
        REGISTRY.add_mixer("sessa2", Sessa, "SS")
    with pytest.raises(ValueError, match="mixer 'sessa' is already registered"):
        REGISTRY.add_mixer("sessa", CumulativeAverage)
    assert "sessa2" not in REGISTRY.mixers


def test_hooks_wrap_past_and_future_entries():
    registry = Registry()
    registry.add_mixer("a", Sessa, "A")
    registry.add_hook(lambda kind, name, factory: ("wrapped", factory))
    registry.add_mixer("b", Sessa, "B")
    assert registry.mixer("a").factory == ("wrapped", Sessa) == registry.mixer("b").factory
    assert registry.mixer("a").source is Sessa


def test_user_mixer_from_pattern_and_gin():
    gin_config.parse(["default.gin"], ["LAYOUT = 'SC'", "layer3/CumulativeAverage.scale = 3.0"])
    model = gin_config.build_model()
    mixers = [layer.mixer for layer in model.stack.layers]
    assert [type(m) for m in mixers] == [Sessa, CumulativeAverage] * 2  # the plain class, not a gin wrapper
    assert (mixers[1].scale, mixers[3].scale) == (1.0, 3.0)
    assert model(torch.randint(256, (1, 6))).shape == (1, 6, 256)
    assert "layer3/CumulativeAverage.scale = 3.0" in gin_config.operative_config()
    assert [row.mixer for row in summarize(model).rows] == ["sessa", "cumavg"] * 2
    assert model.stack.pattern == "SCSC"


def test_per_layer_override_through_scope():
    gin_config.parse(["default.gin"], ["layer1/Attention.window = 3", "layer0/Sessa.gamma_max = 0.5"])
    layers = gin_config.build_model().stack.layers
    assert layers[1].mixer.window == 3 and layers[3].mixer.window is None
    assert layers[0].mixer.gamma_max == 0.5 and layers[2].mixer.gamma_max == 0.999


def test_backend_pinned_per_layer_shows_in_summary(user_attention_backend):
    gin_config.parse(["default.gin"], ["layer2/Sessa.backends = {'feedback_solve': 'reference'}",
                                       "layer3/Attention.backends = {'attention': 'reference_copy'}"])
    rows = summarize(gin_config.build_model()).rows
    assert rows[2].backends["feedback_solve"] == ["reference"] and rows[2].pinned == {"feedback_solve": "reference"}
    assert rows[0].pinned == {}  # unpinned: dispatch chooses (at T = 8 that may be reference too)
    assert rows[3].backends["attention"] == ["reference_copy"]
    text = str(summarize(gin_config.build_model()))
    assert "feedback_solve=reference*" in text and "attention=reference_copy*" in text


def test_backend_overlay_pins_every_layer():
    gin_config.parse(["default.gin", "backends/reference.gin"], ["LAYOUT = 'SMNA'"])
    for row in summarize(gin_config.build_model()).rows:
        assert row.backends and all(b == ["reference"] for b in row.backends.values()), row


def test_pinned_backend_that_cannot_run_lists_every_backend():
    unavailable = {n: b.unavailable_reason() for n, b in attention.backends.items() if b.unavailable_reason()}
    if not unavailable:
        pytest.skip("every attention backend runs here (xformers needs CUDA to be unavailable)")
    name, why = next(iter(unavailable.items()))
    gin_config.parse(["default.gin"], [f"layer1/Attention.backends = {{'attention': '{name}'}}"])
    model = gin_config.build_model()
    with pytest.raises(kernels.BackendError) as info:
        summarize(model)
    message = str(info.value)
    assert f"pinned backend {name!r} cannot run ({why})" in message
    for backend in attention.backends:
        assert f"- {backend} (priority" in message


def test_unknown_backend_name_is_rejected_at_build():
    gin_config.parse(["default.gin"], ["layer0/Sessa.backends = {'attention': 'nope'}"])
    with pytest.raises(Exception, match="unknown backend 'nope' for op 'attention'; valid: auto, .*reference"):
        gin_config.build_model()


def test_explicit_list_layout_from_gin():
    gin_config.parse(["default.gin"], [
        "Stack.layout = [@layer0/GatedBlock, @layer1/ResidualBlock, @layer2/GatedBlock]",
        "NUM_LAYERS = 3",
        "layer0/GatedBlock.mixer = @Sessa",
        "layer1/ResidualBlock.mixer = @Attention",
        "layer1/Attention.window = 8",
        "layer2/GatedBlock.mixer = @CumulativeAverage",
        "layer2/CumulativeAverage.scale = 2.0",
    ])
    model = gin_config.build_model()
    stack = model.stack
    assert stack.pattern is None and stack.mixer_names == ["sessa", "attention", "cumavg"]
    assert stack.layers[0].mixer.num_heads == 2  # sizes/tiny.gin's Sessa.num_heads still applies
    assert stack.layers[1].mixer.window == 8 and stack.layers[2].mixer.scale == 2.0
    assert [r.block for r in summarize(model).rows] == ["gated", "residual", "gated"]
