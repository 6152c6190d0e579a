"""Any zoo model as a Hugging Face transformers model (zoo.interop.hf): a hybrid Sessa / attention /
Mamba-2 model saved with save_pretrained and loaded with AutoModelForCausalLM gives identical logits;
HF generate (greedy, left-padded batch, the zoo's StackCache underneath) equals zoo.generate; beam
search and several sequences per prompt reorder the cache correctly; gin configs that import code
are refused unless trusted; without transformers the module says what to install.
"""

from __future__ import annotations

import importlib
import json
import sys

import pytest
import torch
from safetensors import safe_open

from tests.tolerances import INTEROP
from zoo import gin_config
from zoo.generate import generate

pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from blocks.rope import RotaryEmbedding  # noqa: E402
from zoo.interop import Mamba2LM, load_mamba_ssm  # noqa: E402
from zoo.interop.hf import MODEL_TYPE, ZooCache, ZooConfig, ZooForCausalLM, seq_idx_from_attention_mask  # noqa: E402

V = 97
HYBRID = ["base/lm.gin", "hybrids/sessa_mamba2_attention.gin", "sizes/tiny.gin"]
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15], [16, 17, 18, 19, 20]]


def build(tied: bool = False) -> tuple[torch.nn.Module, str]:
    """A tiny Sessa / Mamba-2 / Sessa / attention model with strong random weights, and its operative gin
    config. Untied, greedy outputs vary (a tied random model mostly repeats its input token)."""
    gin_config.parse(HYBRID, [f"VOCAB = {V}", "NUM_LAYERS = 4", f"CausalLM.tie_embeddings = {tied}"])
    torch.manual_seed(0)
    model = gin_config.build_model().eval()
    with torch.no_grad():
        model.embed.weight.normal_(std=1.0)
        for name, p in model.stack.named_parameters():
            if name.endswith(("W_out.weight", "out_proj.weight")):
                p.mul_(2.0)
    return model, gin_config.operative_config()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    gin_config.clear()
    model, text = build()
    folder = tmp_path_factory.mktemp("zoo_hf")
    ZooForCausalLM.from_zoo(model, text, pad_token_id=0).save_pretrained(folder)
    gin_config.clear()
    return model, folder


def left_padded(prompts, pad=0):
    L = max(map(len, prompts))
    ids = torch.tensor([[pad] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def test_auto_classes_load_a_saved_hybrid_with_identical_logits(saved):
    model, folder = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPE and "build_model.model = @CausalLM" in config["gin_config"]
    assert isinstance(AutoConfig.from_pretrained(folder), ZooConfig)
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(loaded, ZooForCausalLM) and not loaded.training
    assert loaded.model.stack.mixer_names == model.stack.mixer_names == ["sessa", "mamba2", "sessa", "attention"]
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    for (name, a), (_, b) in zip(model.named_modules(), loaded.model.named_modules()):
        if isinstance(a, RotaryEmbedding):  # non-persistent buffers come back with their values
            assert torch.equal(a.inv_freq, b.inv_freq), name
    x = torch.randint(V, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x))
        ids, mask = left_padded(PROMPTS)
        out = loaded(ids, attention_mask=mask).logits
        for b, p in enumerate(PROMPTS):  # a padded row computes as the row alone, up to float32 summation order
            torch.testing.assert_close(out[b, -len(p):], model(torch.tensor([p]))[0], atol=7e-6, rtol=7e-6)  # measured 8.9e-7


def test_hf_generate_greedy_equals_zoo_generate_on_a_left_padded_batch(saved):
    model, folder = saved
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    ids, mask = left_padded(PROMPTS)
    out = loaded.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
    want = generate(model, PROMPTS, max_new_tokens=32, greedy=True)
    assert out[:, ids.shape[1]:].tolist() == want
    assert all(len(set(row)) > 8 for row in want)
    # without a cache transformers recomputes the whole sequence every step: the same tokens
    again = loaded.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=False)
    assert again[:, ids.shape[1]:].tolist() == [row[:6] for row in want]


def test_the_cache_is_a_zoo_stack_cache_that_beam_search_reorders(saved):
    _, folder = saved
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    ids, mask = left_padded(PROMPTS[:2])
    result = loaded.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                             return_dict_in_generate=True)
    assert isinstance(result.cache, ZooCache) and result.cache.get_seq_length() == ids.shape[1] + 4
    kwargs = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False, early_stopping=True)
    beams = loaded.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(beams, loaded.generate(ids, attention_mask=mask, use_cache=False, **kwargs))


def test_sampling_with_several_sequences_per_prompt_matches_the_uncached_path(saved):
    _, folder = saved
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    ids, mask = left_padded(PROMPTS[:2])
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=True, num_return_sequences=3, top_k=30)
    torch.manual_seed(5)
    cached = loaded.generate(ids, **kwargs)
    torch.manual_seed(5)
    assert torch.equal(cached, loaded.generate(ids, use_cache=False, **kwargs))


def test_labels_give_the_shifted_next_token_loss(saved):
    model, folder = saved
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    x = torch.randint(V, (2, 11), generator=torch.Generator().manual_seed(2))
    out = loaded(x, labels=x)
    want = torch.nn.functional.cross_entropy(model(x)[:, :-1].reshape(-1, V).float(), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, want)


def test_tied_embeddings_and_float64_round_trip(tmp_path):
    model, text = build(tied=True)
    model = model.double()
    hf = ZooForCausalLM.from_zoo(model, text)
    assert hf.get_output_embeddings() is None and hf.config.tie_word_embeddings
    hf.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "model.embed.weight" in f.keys() and not any("head" in k for k in f.keys())
    gin_config.clear()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    assert loaded.model.head is None and loaded.model.embed.weight.dtype == torch.float64
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    prompts = PROMPTS[:3]
    ids, mask = left_padded(prompts)
    out = loaded.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
    assert out[:, ids.shape[1]:].tolist() == generate(model, prompts, max_new_tokens=32, greedy=True)


def test_a_converted_mamba_ssm_model_goes_to_transformers(tmp_path):
    from zoo.interop.mamba2_random import ssm_config, ssm_state_dict
    config = ssm_config(ssm_cfg=dict(ngroups=2, dt_limit=(0.01, 0.5)), d_intermediate=100)
    zoo = load_mamba_ssm(ssm_state_dict(config, dtype=torch.float32), config=config)
    ZooForCausalLM.from_zoo(zoo, Mamba2LM.from_model(zoo).gin_config()).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    x = torch.randint(61, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, zoo(x))


def test_gin_configs_that_import_code_need_trust(tmp_path, saved):
    model, folder = saved
    config = json.loads((folder / "config.json").read_text())
    config["gin_config"] = "import json\n" + config["gin_config"]
    tmp_path.joinpath("config.json").write_text(json.dumps(config))
    tmp_path.joinpath("model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(PermissionError, match="import json.*trust_gin_imports=True"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_gin_imports=True)
    x = torch.randint(V, (1, 5))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x))


def test_a_checkpoint_that_does_not_fit_its_config_is_an_error(tmp_path, saved):
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    config["gin_config"] = config["gin_config"].replace("NUM_LAYERS = 4", "NUM_LAYERS = 8")
    tmp_path.joinpath("config.json").write_text(json.dumps(config))
    tmp_path.joinpath("model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"missing_keys \['model\.stack\.layers\.4\."):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_input_errors(saved):
    _, folder = saved
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="pad on the left only"):
        loaded(ids, attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="input_ids"):
        loaded(inputs_embeds=torch.zeros(1, 3, 64))
    with pytest.raises(TypeError, match="ZooCache"):
        loaded(ids, cache=object())
    with pytest.raises(ValueError, match="build_model.model"):
        ZooForCausalLM.from_zoo(loaded.model, "Stack.layout = 'S'")
    assert seq_idx_from_attention_mask(torch.ones(2, 5, dtype=torch.long), 3) is None
    assert seq_idx_from_attention_mask(torch.tensor([[0, 1, 1]]), 3).tolist() == [[-1, 0, 0]]


def test_without_transformers_the_module_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "zoo.interop.hf")
    with pytest.raises(ImportError, match=r"pip install 'sessa-zoo\[hf\]'"):
        importlib.import_module("zoo.interop.hf")


def test_the_convert_tool_writes_a_transformers_folder_of_the_zoo_model(tmp_path):
    from zoo.interop.mamba2_random import hf_model
    from tools.convert_mamba2 import main

    hf = hf_model(torch.float32, time_step_limit=(0.05, 0.4))
    hf.save_pretrained(tmp_path / "hf")
    main([str(tmp_path / "hf"), str(tmp_path / "zoo"), "--to", "zoo"])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "zoo")
    x = torch.randint(101, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, hf(x).logits, **INTEROP[torch.float32])
