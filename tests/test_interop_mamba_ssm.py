"""mamba_ssm MambaLMHeadModel checkpoints in and out of the zoo (zoo.interop.mamba2).

The test writes random state dicts in mamba_ssm's key layout (models/mixer_seq_simple.py,
modules/block.py, modules/mamba2.py, modules/mlp.py) with their MambaConfig, as a dict and as the
folder mamba_ssm's save_pretrained writes (config.json + pytorch_model.bin). The zoo's logits equal
an independent float64 model of mamba_ssm's layer (zoo/interop/mamba2_reference.py) for the defaults and
every supported option, greedy generations are identical, unsupported options fail naming
themselves, and zoo -> mamba_ssm -> zoo is exact.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.tolerances import INTEROP, INTEROP_FLOAT32_OF_MAX
from zoo import gin_config
from zoo.generate import generate
from zoo.interop import Mamba2LM, UnsupportedOptionError, load_mamba2, load_mamba_ssm, save_mamba_ssm
from zoo.interop.mamba2_config import SSM_CONFIG_DEFAULTS
from zoo.interop.mamba2_random import ssm_config, ssm_state_dict
from zoo.interop.mamba2_reference import reference_greedy, reference_logits

V = 61
OPTIONS = {  # MambaConfig / Mamba2 options that change the computation, at non-default values
    "defaults": {},
    "ngroups": dict(ssm_cfg=dict(ngroups=2)),
    "dt_limit": dict(ssm_cfg=dict(dt_limit=(0.02, 0.3))),
    "norm_before_gate": dict(ssm_cfg=dict(norm_before_gate=True, ngroups=2)),
    "rmsnorm_false": dict(ssm_cfg=dict(rmsnorm=False)),
    "D_has_hdim": dict(ssm_cfg=dict(D_has_hdim=True)),
    "d_ssm": dict(ssm_cfg=dict(d_ssm=32)),
    "bias": dict(ssm_cfg=dict(bias=True)),
    "conv_bias_false_d_conv_3": dict(ssm_cfg=dict(conv_bias=False, d_conv=3)),
    "expand_1": dict(ssm_cfg=dict(expand=1)),
    "rms_norm_false": dict(rms_norm=False),
    "d_intermediate": dict(d_intermediate=100),
    "untied": dict(tie_embeddings=False),
    "pad_vocab_size_multiple": dict(pad_vocab_size_multiple=16),
    "residual_in_fp32_false": dict(residual_in_fp32=False, fused_add_norm=False),
    "init_and_speed_only": dict(ssm_cfg=dict(A_init_range=(1, 4), dt_init_floor=1e-3, conv_init=0.1, dt_min=0.01,
                                             dt_max=0.2, use_mem_eff_path=False, sequence_parallel=False)),
}
PROMPT = [3, 1, 4, 1, 5, 9, 2]


def tokens(B=2, T=13, seed=1):
    return torch.randint(V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("option", OPTIONS)
def test_logits_and_greedy_equal_the_float64_model(option):
    config = ssm_config(**OPTIONS[option])
    sd = ssm_state_dict(config)
    zoo = load_mamba_ssm(sd, config=config)
    x = tokens()
    with torch.no_grad():
        got = zoo(x)
    want = reference_logits(sd, config, x)
    assert got.shape == want.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, want, **INTEROP[torch.float64])
    ours = generate(zoo, [PROMPT], max_new_tokens=6, greedy=True)[0]
    assert ours == reference_greedy(sd, config, PROMPT, 6)
    assert len(set(ours)) > 1


@pytest.mark.parametrize("option", ["defaults", "d_intermediate", "rms_norm_false"])
def test_float32_within_rounding_and_32_greedy_tokens(option):
    config = ssm_config(**OPTIONS[option])
    sd = ssm_state_dict(config, dtype=torch.float32)
    zoo = load_mamba_ssm(sd, config=config)
    assert zoo.embed.weight.dtype == torch.float32
    x = tokens()
    want = reference_logits(sd, config, x)
    with torch.no_grad():
        error = (zoo(x).double() - want).abs().max()
    assert error <= INTEROP_FLOAT32_OF_MAX * want.abs().max()
    if option == "defaults":
        assert generate(zoo, [PROMPT], max_new_tokens=32, greedy=True)[0] == reference_greedy(sd, config, PROMPT, 32)


def test_folder_like_save_pretrained_and_a_left_padded_batch(tmp_path):
    config = ssm_config(**OPTIONS["ngroups"])
    sd = ssm_state_dict(config)
    tmp_path.joinpath("config.json").write_text(json.dumps(config))
    torch.save(sd, tmp_path / "pytorch_model.bin")
    for zoo in (load_mamba_ssm(tmp_path), load_mamba2(tmp_path)):
        prompts = [PROMPT, PROMPT[3:], PROMPT[1:4]]
        assert generate(zoo, prompts, max_new_tokens=5, greedy=True) == [reference_greedy(sd, config, p, 5)
                                                                         for p in prompts]
    assert load_mamba_ssm(tmp_path, dtype=torch.float32).embed.weight.dtype == torch.float32


@pytest.mark.parametrize("option", ["defaults", "norm_before_gate", "d_ssm", "D_has_hdim", "rmsnorm_false",
                                    "d_intermediate", "rms_norm_false", "untied", "bias"])
def test_round_trip_zoo_mamba_ssm_zoo_is_exact(tmp_path, option):
    config = ssm_config(**OPTIONS[option])
    zoo = load_mamba_ssm(ssm_state_dict(config), config=config)
    save_mamba_ssm(zoo, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert set(written) == set(SSM_CONFIG_DEFAULTS) and written["ssm_cfg"]["layer"] == "Mamba2"
    back = load_mamba_ssm(tmp_path / "out")
    assert list(back.state_dict()) == list(zoo.state_dict())
    for k, v in zoo.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    saved = torch.load(tmp_path / "out" / "pytorch_model.bin", weights_only=True)
    original = ssm_state_dict(config)
    assert set(saved) == set(original)
    for k, v in original.items():
        assert torch.equal(saved[k], v), k  # the same mamba_ssm state dict, fc1 halves back in their order


def test_the_converted_model_s_gin_config_rebuilds_it():
    config = ssm_config(d_intermediate=100, rms_norm=False, ssm_cfg=dict(dt_limit=(0.02, math.inf), ngroups=2))
    zoo = load_mamba_ssm(ssm_state_dict(config), config=config)
    spec = Mamba2LM.from_model(zoo)
    assert spec.mixer["dt_limit"] == (0.02, None) and spec.mlp_hidden == 128 and spec.norm == "layernorm"
    gin_config.parse([], [spec.gin_config()])
    rebuilt = gin_config.build_model().double()
    rebuilt.load_state_dict(zoo.state_dict())
    x = tokens()
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), zoo(x))


@pytest.mark.parametrize("options,match", [
    (dict(attn_layer_idx=[1], attn_cfg=dict(num_heads=2)), "attn_layer_idx"),
    (dict(ssm_cfg=dict(layer="Mamba1")), "ssm_cfg.layer='Mamba1'"),
    (dict(ssm_cfg=dict(layer="Mamba3")), "ssm_cfg.layer='Mamba3'"),
    (dict(ssm_cfg=dict(activation="gelu")), "ssm_cfg has unknown Mamba2 arguments activation"),
    (dict(norm_epsilon=1e-6), "unknown fields norm_epsilon"),
    (dict(ssm_cfg=dict(process_group="pg")), "process_group"),
    (dict(ssm_cfg=dict(dt_limit=(0.1,))), "dt_limit"),
])
def test_unsupported_options_fail_naming_the_option(options, match):
    with pytest.raises(UnsupportedOptionError, match=match):
        load_mamba_ssm(ssm_state_dict(ssm_config()), config=ssm_config(**options))
    no_layer = ssm_config()
    del no_layer["ssm_cfg"]["layer"]  # mamba_ssm then builds Mamba1
    with pytest.raises(UnsupportedOptionError, match="ssm_cfg.layer='Mamba1'"):
        load_mamba_ssm(ssm_state_dict(ssm_config()), config=no_layer)


def test_weights_that_do_not_fit_the_config_are_named():
    config = ssm_config()
    sd = ssm_state_dict(config)
    del sd["backbone.layers.1.mixer.D"]
    sd["backbone.layers.0.mixer.extra"] = torch.zeros(1)
    sd["backbone.layers.0.mixer.dt_bias"] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"(?s)missing in checkpoint \(1\): backbone\.layers\.1\.mixer\.D.*not in config \(1\): "
                                         r"backbone\.layers\.0\.mixer\.extra.*dt_bias: checkpoint \(7,\)"):
        load_mamba_ssm(sd, config=config)
    tied = ssm_state_dict(config)
    tied["lm_head.weight"] = tied["lm_head.weight"] + 1
    with pytest.raises(ValueError, match="lm_head.weight differs from the embedding"):
        load_mamba_ssm(tied, config=config)
    with pytest.raises(ValueError, match="needs its MambaConfig"):
        load_mamba_ssm(ssm_state_dict(config))


def test_export_refuses_what_mamba_ssm_cannot_represent(tmp_path):
    model = Mamba2LM(vocab_size=V, dim=32, num_layers=1, norm_eps=1e-6, mixer=dict(head_dim=16)).build()
    with pytest.raises(UnsupportedOptionError, match="norm eps=1e-06"):
        save_mamba_ssm(model, tmp_path / "a")
    model = Mamba2LM(vocab_size=V, dim=32, num_layers=1, mixer=dict(head_dim=16, norm_eps=1e-3)).build()
    with pytest.raises(UnsupportedOptionError, match="Mamba2 norm_eps=0.001"):
        save_mamba_ssm(model, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_convert_tool_goes_between_all_three_formats(tmp_path, capsys):
    from tools.convert_mamba2 import main

    config = ssm_config(**OPTIONS["ngroups"])
    sd = ssm_state_dict(config, dtype=torch.float32)
    (tmp_path / "ssm").mkdir()
    (tmp_path / "ssm" / "config.json").write_text(json.dumps(config))
    torch.save(sd, tmp_path / "ssm" / "pytorch_model.bin")
    main([str(tmp_path / "ssm"), "--gin"])
    assert "Mamba2.num_groups = 2" in capsys.readouterr().out
    main([str(tmp_path / "ssm"), str(tmp_path / "hf"), "--to", "hf"])
    main([str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "mamba_ssm"])
    back = torch.load(tmp_path / "back" / "pytorch_model.bin", weights_only=True)
    assert set(back) == set(sd) and all(torch.equal(back[k], v) for k, v in sd.items())
    with pytest.raises(SystemExit):
        main([str(tmp_path / "ssm"), "--to", "hf"])  # no output folder
