"""Measure how closely converted checkpoints match their originals (the numbers in docs/interop.md).

    python tools/interop_parity.py            # needs the hf extra; run from the repository root

For tiny random models (zoo/interop/mamba2_random.py, as the tests use), prints markdown tables of:
  - Hugging Face Mamba2ForCausalLM -> zoo, per option: max |logit difference| in float32 and
    bfloat16 (and each bfloat16 model's distance to the float32 logits), whether 32 greedy tokens
    agree (zoo.generate against transformers' generate without a cache);
  - left padding in transformers and in the zoo: a padded row against the row alone;
  - mamba_ssm state dicts -> zoo, per option: max |logit difference| in float64 against an
    independent float64 model of mamba_ssm's layer;
  - a Sessa / Mamba-2 / Sessa / attention hybrid through save_pretrained / AutoModelForCausalLM:
    max |logit difference| and greedy agreement on a left-padded batch.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from zoo import cli, gin_config  # noqa: E402
from zoo.generate import generate  # noqa: E402
from zoo.interop import load_hf_mamba2, load_mamba_ssm  # noqa: E402
from zoo.interop.hf import ZooForCausalLM  # noqa: E402
from zoo.interop.mamba2_random import hf_model, ssm_config, ssm_state_dict  # noqa: E402
from zoo.interop.mamba2_reference import reference_logits  # noqa: E402

HF_OPTIONS = {
    "defaults": {}, "tie_word_embeddings": dict(tie_word_embeddings=True),
    "time_step_limit=(0.05, 0.4)": dict(time_step_limit=(0.05, 0.4)), "use_bias": dict(use_bias=True),
    "use_conv_bias=False": dict(use_conv_bias=False), "layer_norm_epsilon=0.05": dict(layer_norm_epsilon=0.05),
    "residual_in_fp32=False": dict(residual_in_fp32=False),
}
SSM_OPTIONS = {
    "defaults": {}, "ngroups=2": dict(ssm_cfg=dict(ngroups=2)), "dt_limit": dict(ssm_cfg=dict(dt_limit=(0.02, 0.3))),
    "norm_before_gate": dict(ssm_cfg=dict(norm_before_gate=True, ngroups=2)),
    "rmsnorm=False": dict(ssm_cfg=dict(rmsnorm=False)), "D_has_hdim": dict(ssm_cfg=dict(D_has_hdim=True)),
    "d_ssm=32": dict(ssm_cfg=dict(d_ssm=32)), "bias": dict(ssm_cfg=dict(bias=True)),
    "conv_bias=False": dict(ssm_cfg=dict(conv_bias=False)), "rms_norm=False": dict(rms_norm=False),
    "d_intermediate=100": dict(d_intermediate=100), "tie_embeddings=False": dict(tie_embeddings=False),
}
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


def hf_table() -> list[str]:
    rows = ["| Hugging Face option | float32: max abs diff | max abs logit | bfloat16: max abs diff | bfloat16 error vs "
            "float32, HF / zoo | 32 greedy tokens equal |", "|---|---|---|---|---|---|"]
    x = torch.randint(101, (3, 19), generator=torch.Generator().manual_seed(1))
    for name, options in HF_OPTIONS.items():
        with tempfile.TemporaryDirectory() as folder:
            hf = hf_model(torch.float32, **options)
            hf.save_pretrained(folder)
            zoo = load_hf_mamba2(folder)
            with torch.no_grad():
                want = hf(x).logits
                diff32 = (zoo(x) - want).abs().max().item()
                ours16, theirs16 = zoo.bfloat16()(x).float(), hf.bfloat16()(x).logits.float()
                diff16 = (ours16 - theirs16).abs().max().item()
                err_hf, err_zoo = ((t - want).abs().max().item() for t in (theirs16, ours16))
            zoo.float()
            hf.float()
            ours = generate(zoo, [PROMPT], max_new_tokens=32, greedy=True)[0]
            theirs = hf.generate(torch.tensor([PROMPT]), max_new_tokens=32, do_sample=False, use_cache=False)
            same = ours == theirs[0, len(PROMPT):].tolist()
            rows.append(f"| {name} | {diff32:.1e} | {want.abs().max().item():.1f} | {diff16:.1e} | "
                        f"{err_hf:.1e} / {err_zoo:.1e} | {same} |")
    return rows


def hf_padding_table() -> list[str]:
    """transformers' left padding: a row padded by 3 against the same row alone (the zoo's is exact)."""
    rows = ["| Hugging Face option | left-padded row vs row alone, transformers: max abs diff | zoo |", "|---|---|---|"]
    prompt = [3, 1, 4, 1, 5]
    ids, mask = torch.tensor([[0, 0, 0, *prompt]]), torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    for name, options in (("defaults", {}), ("use_bias", dict(use_bias=True))):
        with tempfile.TemporaryDirectory() as folder:
            hf = hf_model(torch.float32, **options)
            hf.save_pretrained(folder)
            zoo = load_hf_mamba2(folder)
        with torch.no_grad():
            theirs = (hf(ids, attention_mask=mask).logits[0, 3:] - hf(torch.tensor([prompt])).logits[0]).abs().max()
            seq_idx = torch.tensor([[-1, -1, -1, 0, 0, 0, 0, 0]])
            ours = (zoo(ids, seq_idx=seq_idx)[0, 3:] - zoo(torch.tensor([prompt]))[0]).abs().max()
        rows.append(f"| {name} | {theirs.item():.1e} | {ours.item():.1e} |")
    return rows


def ssm_table() -> list[str]:
    rows = ["| mamba_ssm option | float64 max abs diff | max abs logit |", "|---|---|---|"]
    x = torch.randint(61, (2, 13), generator=torch.Generator().manual_seed(1))
    for name, options in SSM_OPTIONS.items():
        config = ssm_config(**options)
        sd = ssm_state_dict(config)
        want = reference_logits(sd, config, x)
        with torch.no_grad():
            diff = (load_mamba_ssm(sd, config=config)(x) - want).abs().max().item()
        rows.append(f"| {name} | {diff:.1e} | {want.abs().max().item():.1f} |")
    return rows


def hybrid_table() -> list[str]:
    gin_config.parse(["base/lm.gin", "hybrids/sessa_mamba2_attention.gin", "sizes/tiny.gin"],
                     ["VOCAB = 97", "NUM_LAYERS = 4", "CausalLM.tie_embeddings = False"])
    torch.manual_seed(0)
    model = gin_config.build_model().eval()
    with torch.no_grad():
        model.embed.weight.normal_(std=1.0)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15], [16, 17, 18, 19, 20]]
    with tempfile.TemporaryDirectory() as folder:
        ZooForCausalLM.from_zoo(model, gin_config.operative_config()).save_pretrained(folder)
        loaded = AutoModelForCausalLM.from_pretrained(folder)
    x = torch.randint(97, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (loaded(x).logits - model(x)).abs().max().item()
    L = max(map(len, prompts))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    out = loaded.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False)[:, L:].tolist()
    same = out == generate(model, prompts, max_new_tokens=32, greedy=True)
    return ["| hybrid SMSA (Sessa, Mamba-2, Sessa, attention) | value |", "|---|---|",
            f"| max abs logit diff after save_pretrained / AutoModelForCausalLM.from_pretrained | {diff:.1e} |",
            f"| HF generate (greedy, 32 tokens, 4 left-padded prompts) == zoo.generate | {same} |"]


def main(argv: list[str] | None = None) -> None:
    cli.parser(__doc__).parse_args(argv)
    for table in (hf_table(), hf_padding_table(), ssm_table(), hybrid_table()):
        print("\n".join(table) + "\n")


if __name__ == "__main__":
    cli.run(main)
