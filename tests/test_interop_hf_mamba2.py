"""Hugging Face Mamba2ForCausalLM checkpoints in and out of the zoo (zoo.interop.mamba2).

Tiny random HF models are saved to a temporary folder and loaded: logits equal HF's within float32
rounding (HF computes its norms and scan in float32 even for float64 weights, so float64 is also
checked against an independent float64 model at 1e-10), greedy generations are identical, for the
defaults and every supported option; unsupported options fail naming themselves; zoo -> HF -> zoo
is exact and transformers loads what the zoo writes.
"""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch

from blocks.mamba2 import Mamba2
from blocks.residual_block import ResidualBlock
from tests.tolerances import INTEROP
from zoo import gin_config
from zoo.generate import generate
from zoo.interop import Mamba2LM, UnsupportedOptionError, load_hf_mamba2, load_mamba2, save_hf_mamba2
from zoo.interop.mamba2_random import HF_BASE, hf_model
from zoo.interop.mamba2_reference import hf_to_reference_config, hf_to_ssm_state_dict, reference_greedy, reference_logits
from zoo.models import CausalLM
from zoo.stack import Stack

transformers = pytest.importorskip("transformers")
from transformers import Mamba2Config, Mamba2ForCausalLM  # noqa: E402

V = HF_BASE["vocab_size"]
OPTIONS = {  # every Mamba2Config option that changes the computation, at a non-default value
    "defaults": {},
    "tie_word_embeddings": dict(tie_word_embeddings=True),
    "time_step_limit": dict(time_step_limit=(0.05, 0.4)),
    "use_bias": dict(use_bias=True),
    "use_conv_bias": dict(use_conv_bias=False),
    "layer_norm_epsilon": dict(layer_norm_epsilon=0.05),
    "residual_in_fp32": dict(residual_in_fp32=False),
    "n_groups_1_conv_kernel_2": dict(n_groups=1, conv_kernel=2),
    "expand_1_heads_2": dict(expand=1, num_heads=2),
}
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


def tokens(B=3, T=19, seed=1):
    return torch.randint(V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def saved(tmp_path):
    def save(dtype=torch.float32, **options):
        model = hf_model(dtype, **options)
        model.save_pretrained(tmp_path / "hf")
        return model, tmp_path / "hf"
    return save


def _reference(folder, x):
    config = json.loads((folder / "config.json").read_text())
    from safetensors.torch import load_file
    sd = hf_to_ssm_state_dict(load_file(folder / "model.safetensors"))
    return reference_logits(sd, hf_to_reference_config(config), x), sd, hf_to_reference_config(config)


@pytest.mark.parametrize("option", OPTIONS)
def test_float32_logits_and_greedy_equal_hf(saved, option):
    hf, folder = saved(torch.float32, **OPTIONS[option])
    zoo = load_hf_mamba2(folder)
    assert isinstance(zoo, CausalLM) and zoo.embed.weight.dtype == torch.float32
    x = tokens()
    with torch.no_grad():
        want, got = hf(x).logits, zoo(x)
    torch.testing.assert_close(got, want, **INTEROP[torch.float32])
    # greedy: the zoo's cached decoding against HF's generate without a cache (its forward pass; HF's
    # one-token decoding step ignores time_step_limit, the zoo applies it in both)
    steps = 32 if option == "defaults" else 8
    ours = generate(zoo, [PROMPT], max_new_tokens=steps, greedy=True)[0]
    theirs = hf.generate(torch.tensor([PROMPT]), max_new_tokens=steps, do_sample=False, use_cache=False)
    assert ours == theirs[0, len(PROMPT):].tolist()
    assert len(set(ours)) > 1  # the random model does not just repeat one token


@pytest.mark.parametrize("option", ["defaults", "time_step_limit", "use_bias", "layer_norm_epsilon", "tie_word_embeddings"])
def test_float64_equals_an_independent_float64_model(saved, option):
    hf, folder = saved(torch.float64, **{**OPTIONS[option], "residual_in_fp32": False})
    zoo = load_hf_mamba2(folder)
    assert zoo.embed.weight.dtype == torch.float64
    x = tokens(B=2, T=13)
    want, sd, cfg = _reference(folder, x)
    with torch.no_grad():
        got, theirs = zoo(x), hf(x).logits
    torch.testing.assert_close(got, want, **INTEROP[torch.float64])
    torch.testing.assert_close(got, theirs.double(), **INTEROP[torch.float32])  # HF's own float32 internals
    assert generate(zoo, [PROMPT[:5]], max_new_tokens=8, greedy=True)[0] == reference_greedy(sd, cfg, PROMPT[:5], 8)


def test_left_padded_greedy_batch_equals_hf_generate_with_its_cache(saved):
    hf, folder = saved(torch.float32)
    zoo = load_hf_mamba2(folder)
    prompts = [PROMPT, PROMPT[2:5], PROMPT[1:]]
    L = max(map(len, prompts))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False)[:, L:].tolist()
    assert generate(zoo, prompts, max_new_tokens=32, greedy=True) == theirs


def test_round_trip_zoo_hf_zoo_is_exact_and_transformers_loads_it(saved, tmp_path):
    hf, folder = saved(torch.float32, time_step_limit=(0.01, 0.5), use_bias=True, use_conv_bias=False)
    zoo = load_hf_mamba2(folder)
    save_hf_mamba2(zoo, tmp_path / "again")
    back = load_hf_mamba2(tmp_path / "again")
    for (k, a), (k2, b) in zip(zoo.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    x = tokens()
    with torch.no_grad():
        assert torch.equal(back(x), zoo(x))
        reloaded = Mamba2ForCausalLM.from_pretrained(tmp_path / "again").eval()
        torch.testing.assert_close(reloaded(x).logits, hf(x).logits, atol=0, rtol=0)  # the same HF model
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_hf_mamba2(zoo, tmp_path / "again")
    save_hf_mamba2(zoo, tmp_path / "again", overwrite=True)


def test_a_zoo_built_model_exports_and_the_gin_config_rebuilds_it(tmp_path):
    spec = Mamba2LM(vocab_size=V, dim=32, num_layers=2, norm_eps=1e-5, tie_embeddings=False,
                    mixer=dict(state_dim=8, head_dim=16, num_groups=2, chunk_size=8, dt_limit=(0.0, 0.3)))
    torch.manual_seed(0)
    model = spec.build().eval()
    assert Mamba2LM.from_model(model).hf_config() == spec.hf_config()
    save_hf_mamba2(model, tmp_path / "m")
    hf = Mamba2ForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert hf.config.time_step_limit[1] == 0.3 and not hf.config.tie_word_embeddings
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), **INTEROP[torch.float32])
    gin_config.parse([], [spec.gin_config()])
    rebuilt = gin_config.build_model()
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model(x))
    assert load_mamba2(tmp_path / "m").state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("options,match", [
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(model_type="mamba"), "model_type='mamba'"),
    (dict(num_heads=3), "num_heads=3"),
    (dict(time_step_limit=[0.0]), "time_step_limit"),
])
def test_unsupported_configs_fail_naming_the_option(tmp_path, options, match):
    config = Mamba2Config(**HF_BASE).to_dict()
    config.update(options)
    with pytest.raises(UnsupportedOptionError, match=match):
        Mamba2LM.from_hf_config(config)


def test_missing_or_misshaped_weights_are_named(saved, tmp_path):
    _, folder = saved()
    config = json.loads((folder / "config.json").read_text())
    config["state_size"] = 4
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"shape mismatch.*backbone\.layers\.0\.mixer\.in_proj\.weight"):
        load_hf_mamba2(folder)
    config["state_size"], config["num_hidden_layers"] = 8, 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing in checkpoint \(\d+\): .*backbone\.layers\.2\.norm\.weight"):
        load_hf_mamba2(folder)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_mamba2(tmp_path / "nowhere")


@pytest.mark.parametrize("mixer,match", [
    (dict(norm_before_gate=True), "norm_before_gate"),
    (dict(D_per_channel=True), "D_per_channel"),
    (dict(gated_norm=False), "gated_norm"),
    (dict(ssm_dim=32), "ssm_dim"),
    (dict(norm_eps=1e-3), "norm_eps"),
    (dict(expand=1.5), "expand=1.5"),
])
def test_export_refuses_what_hf_cannot_represent(tmp_path, mixer, match):
    model = Mamba2LM(vocab_size=V, dim=32, num_layers=1, mixer=dict(state_dim=8, head_dim=16, **mixer)).build()
    with pytest.raises(UnsupportedOptionError, match=match):
        save_hf_mamba2(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_export_refuses_other_stacks_naming_the_layer(tmp_path):
    block = partial(ResidualBlock, mlp=None, norm="rmsnorm")
    hybrid = CausalLM(V, 32, lambda d: Stack(d, "MS", block=block), norm="rmsnorm")
    with pytest.raises(UnsupportedOptionError, match="layer 1's mixer is a Sessa"):
        save_hf_mamba2(hybrid, tmp_path / "x")
    mixed = CausalLM(V, 32, lambda d: Stack(d, [partial(block, mixer=partial(Mamba2, head_dim=16, state_dim=s))
                                                for s in (8, 16)]), norm="rmsnorm")
    with pytest.raises(UnsupportedOptionError, match=r"layer 0 and layer 1 differ in mixer"):
        save_hf_mamba2(mixed, tmp_path / "x")
    with pytest.raises(UnsupportedOptionError, match="final norm"):
        save_hf_mamba2(CausalLM(V, 32, lambda d: Stack(d, [partial(block, mixer=partial(Mamba2, head_dim=16))])),
                       tmp_path / "x")
    gated = CausalLM(V, 32, lambda d: Stack(d, "M"))
    with pytest.raises(UnsupportedOptionError, match="layer 0 is a GatedBlock"):
        save_hf_mamba2(gated, tmp_path / "x")
    with_mlp = Mamba2LM(vocab_size=V, dim=32, num_layers=1, mlp_hidden=128, mixer=dict(head_dim=16)).build()
    with pytest.raises(UnsupportedOptionError, match="MLP"):
        save_hf_mamba2(with_mlp, tmp_path / "x")


def test_mamba2_dt_limit_clamps_in_forward_and_decoding():
    m = Mamba2(16, state_dim=4, head_dim=8, dt_limit=(0.2, 0.3)).double()
    assert m.dt_limit == (0.2, 0.3) and Mamba2(16, head_dim=8, dt_limit=(0.0, math.inf)).dt_limit is None
    assert Mamba2(16, head_dim=8, dt_limit=(0.1, None)).dt_limit == (0.1, None)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    with torch.no_grad():
        full = m(x)
        state = m.allocate_state(2, 9)
        steps = torch.cat([m(x[:, t:t + 1], state=state) for t in range(9)], dim=1)
    torch.testing.assert_close(steps, full, **INTEROP[torch.float64])
    for bad in [(0.3, 0.2), (-1.0, 1.0), (0.1,)]:
        with pytest.raises(ValueError, match="dt_limit"):
            Mamba2(16, head_dim=8, dt_limit=bad)
