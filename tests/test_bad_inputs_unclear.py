"""The bad-input matrix, group "unclear": inputs whose error used to come from deep inside torch,
gin or a kernel without saying which argument or file was wrong. Each case asserts the exception
type and that the message names the argument or file (tests/bad_inputs.py)."""

from __future__ import annotations

import json
import shutil
from functools import partial

import pytest
import torch
from torch import nn

from blocks.gated_block import GatedBlock
from blocks.reference_format import load_reference_block, to_reference_state_dict
from blocks.residual_block import ResidualBlock
from blocks.sessa import Sessa
from kernels.attention import attention
from kernels.dispatch import BackendError
from kernels.feedback_solve import feedback_solve
from kernels.packing import seq_idx_from_cu_seqlens
from kernels.ssd import ssd
from tests.bad_inputs import Bad, cli, ctx, finished_run, run_case  # noqa: F401  (fixtures)
from zoo import gin_config
from zoo.cache import StackCache
from zoo.generate import generate
from zoo.gin_config import GinConfigError
from zoo.models import CausalLM, SequenceClassifier
from zoo.registry import UnknownNameError
from zoo.stack import Stack
from zoo.train import checkpoint
from zoo.train.checkpoint import CheckpointCorruptError, CheckpointMismatchError
from zoo.train.loop import TrainConfig

V, D = 32, 16


def lm(layout: str = "SA", dim: int = D) -> CausalLM:
    return CausalLM(V, dim, partial(Stack, layout=layout))


def clf() -> SequenceClassifier:
    return SequenceClassifier(V, 4, D, partial(Stack, layout="SA"))


def tokens(B: int = 1, T: int = 6) -> torch.Tensor:
    return torch.randint(V, (B, T))


def x(B: int = 1, T: int = 6, dim: int = D, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(B, T, dim, dtype=dtype)


# ----------------------------------------------------------------------------- damaged checkpoints

def _ckpt(ctx):
    model = lm()
    weights, _ = checkpoint.gather(model)
    return model, checkpoint.write(ctx.tmp / "ckpt", 3, weights, {"step": 3, "w": torch.ones(3)})


def _damage(ctx, name: str, how: str, manifest: bool):
    """Damage one file of a checkpoint (with or without its manifest), then load it."""
    model, folder = _ckpt(ctx)
    path = folder / name
    data = path.read_bytes()
    if how == "truncate":
        data = data[: len(data) // 2]
    elif how == "empty":
        data = b""
    elif how == "garbage":
        data = b"this is not a checkpoint at all" * 4
    elif how == "flip":  # one byte in the middle: same size, other content
        middle = len(data) // 2
        data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]
    elif how == "append":
        data = data + b"\0"
    path.write_bytes(data)
    if not manifest:
        (folder / checkpoint.MANIFEST).unlink()
    if name == checkpoint.STATE:
        checkpoint.read_state(folder)
    else:
        checkpoint.load_model_weights(model, folder)


def _bad_manifest(ctx, text: str):
    model, folder = _ckpt(ctx)
    (folder / checkpoint.MANIFEST).write_text(text)
    checkpoint.load_model_weights(model, folder)


def _state_not_a_dict(ctx):
    _, folder = _ckpt(ctx)
    torch.save([1, 2, 3], folder / checkpoint.STATE)
    (folder / checkpoint.MANIFEST).unlink()
    checkpoint.read_state(folder)


def _evaluate_damaged_run(ctx):
    run = ctx.tmp / "run"
    shutil.copytree(ctx.run_folder(), run)
    weights = checkpoint.latest(run / "checkpoints") / checkpoint.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    cli("evaluate", run)


def _generate_damaged_file(ctx):
    _, folder = _ckpt(ctx)
    (folder / checkpoint.WEIGHTS).write_bytes(b"\1" * 64)
    cli("generate", "--gin_param", f"VOCAB = {V}", "--gin_param", f"DIM = {D}", "--gin_param", "NUM_LAYERS = 2",
        "--checkpoint", folder / checkpoint.WEIGHTS, "--prompt_ids", "1 2", "--max_new_tokens", "1")


def _mismatch(ctx):
    _, folder = _ckpt(ctx)
    checkpoint.load_model_weights(lm(dim=24), folder)


CHECKPOINTS = [
    *[Bad(f"{name.split('.')[0]}_{how}{'' if manifest else '_no_manifest'}",
          lambda c, n=name, h=how, m=manifest: _damage(c, n, h, m), CheckpointCorruptError, name,
          absent=("weights_only=False",))
      for name in (checkpoint.WEIGHTS, checkpoint.STATE)
      for how, manifest in [("truncate", True), ("truncate", False), ("empty", False), ("garbage", False),
                            ("flip", True), ("append", True)]],
    Bad("manifest_not_json", lambda c: _bad_manifest(c, "{not json"), CheckpointCorruptError, "manifest.json"),
    Bad("manifest_without_files", lambda c: _bad_manifest(c, json.dumps({"step": 3})), CheckpointCorruptError,
        "manifest.json"),
    Bad("state_not_a_dict", _state_not_a_dict, CheckpointCorruptError, "state.pt"),
    Bad("weights_of_another_model", _mismatch, CheckpointMismatchError, ("model.safetensors", "embed.weight")),
    Bad("evaluate_damaged_run", _evaluate_damaged_run, SystemExit, "model.safetensors"),
    Bad("generate_damaged_file", _generate_damaged_file, SystemExit, "model.safetensors"),
    Bad("resolve_empty_folder", lambda c: checkpoint.resolve(c.tmp), FileNotFoundError, "no checkpoint found"),
]


# ----------------------------------------------------------------------------- model inputs

def _decode_then_backward():
    model = lm()
    cache = StackCache.allocate(model, 1, 10)
    model(tokens(T=4), cache=cache).sum().backward()


def _cache_of(model_args: tuple, use: tuple, **cache_kwargs):
    other = lm(*model_args)
    cache = StackCache.allocate(other, 1, 10, **cache_kwargs)
    lm(*use)(tokens(T=4), cache=cache)


INPUTS = [
    Bad("tokens_on_other_device", lambda c: lm()(tokens().to("meta")), ValueError, "tokens"),
    Bad("tokens_float", lambda c: lm()(tokens().float()), TypeError, "tokens"),
    Bad("tokens_list", lambda c: lm()([[1, 2, 3]]), TypeError, "tokens"),
    Bad("tokens_1d", lambda c: lm()(torch.arange(4)), ValueError, "tokens"),
    Bad("tokens_outside_vocab", lambda c: lm()(torch.full((1, 4), V)), ValueError, "tokens"),
    Bad("classifier_positions_float", lambda c: clf()(tokens(), torch.tensor([2.0])), ValueError, "positions"),
    Bad("classifier_positions_outside", lambda c: clf()(tokens(), torch.tensor([9])), ValueError, "positions"),
    Bad("stack_x_float64", lambda c: Stack(D, "SA")(x(dtype=torch.float64)), ValueError, ("x", "float64")),
    Bad("stack_x_bfloat16", lambda c: Stack(D, "SA")(x(dtype=torch.bfloat16)), ValueError, ("x", "bfloat16")),
    Bad("stack_x_int", lambda c: Stack(D, "SA")(torch.ones(1, 4, D, dtype=torch.long)), ValueError, "x"),
    Bad("stack_x_other_device", lambda c: Stack(D, "SA")(x().to("meta")), ValueError, "x"),
    Bad("stack_x_2d", lambda c: Stack(D, "SA")(torch.randn(4, D)), ValueError, "x"),
    Bad("stack_x_width", lambda c: Stack(D, "SA")(x(dim=D + 1)), ValueError, "x"),
    Bad("stack_x_list", lambda c: Stack(D, "SA")([[0.0] * D]), TypeError, "x"),
    Bad("stack_seq_idx_shape", lambda c: Stack(D, "SA")(x(), seq_idx=torch.zeros(1, 5, dtype=torch.long)), ValueError,
        "seq_idx"),
    Bad("stack_seq_idx_1d", lambda c: Stack(D, "SA")(x(), seq_idx=torch.zeros(6, dtype=torch.long)), ValueError,
        "seq_idx"),
    Bad("stack_seq_idx_float", lambda c: Stack(D, "SA")(x(), seq_idx=torch.zeros(1, 6)), TypeError, "seq_idx"),
    Bad("stack_seq_idx_list", lambda c: Stack(D, "SA")(x(), seq_idx=[[0] * 6]), TypeError, "seq_idx"),
    Bad("stack_seq_idx_other_device", lambda c: Stack(D, "SA")(x(), seq_idx=torch.zeros(1, 6, dtype=torch.long,
                                                                                            device="meta")),
        ValueError, "seq_idx"),
    Bad("lm_seq_idx_float", lambda c: lm()(tokens(), seq_idx=torch.zeros(1, 6)), TypeError, "seq_idx"),
    Bad("lm_seq_idx_shape", lambda c: lm()(tokens(), seq_idx=torch.zeros(1, 4, dtype=torch.long)), ValueError, "seq_idx"),
    # cu_seqlens
    Bad("cu_seqlens_list", lambda c: lm()(tokens(), cu_seqlens=[0, 2, 6]), TypeError, "cu_seqlens"),
    Bad("cu_seqlens_float", lambda c: lm()(tokens(), cu_seqlens=torch.tensor([0.0, 2.0, 6.0])), TypeError, "cu_seqlens"),
    Bad("cu_seqlens_2d", lambda c: lm()(tokens(), cu_seqlens=torch.tensor([[0, 2, 6]])), ValueError, "cu_seqlens"),
    Bad("cu_seqlens_not_from_zero", lambda c: lm()(tokens(), cu_seqlens=torch.tensor([1, 6])), ValueError, "cu_seqlens"),
    Bad("cu_seqlens_decreasing", lambda c: lm()(tokens(), cu_seqlens=torch.tensor([0, 4, 2, 6])), ValueError,
        "cu_seqlens"),
    Bad("cu_seqlens_wrong_total", lambda c: lm()(tokens(), cu_seqlens=torch.tensor([0, 2, 5])), ValueError, "cu_seqlens"),
    Bad("cu_seqlens_with_batch", lambda c: lm()(tokens(2), cu_seqlens=torch.tensor([0, 6])), ValueError, "cu_seqlens"),
    Bad("cu_seqlens_and_seq_idx", lambda c: lm()(tokens(), cu_seqlens=torch.tensor([0, 6]),
                                                 seq_idx=torch.zeros(1, 6, dtype=torch.long)), ValueError, "seq_idx"),
    Bad("cu_seqlens_helper_list", lambda c: seq_idx_from_cu_seqlens([0, 3]), TypeError, "cu_seqlens"),
    # caches
    Bad("cache_other_width", lambda c: _cache_of(("SA", 32), ("SA", D)), ValueError, "cache"),
    Bad("cache_other_layer_order", lambda c: _cache_of(("AS",), ("SA",)), ValueError, "cache"),
    Bad("cache_other_mixers", lambda c: _cache_of(("SS",), ("SA",)), ValueError, "cache"),
    Bad("cache_other_depth", lambda c: _cache_of(("SAS",), ("SA",)), ValueError, "cache"),
    Bad("cache_other_batch", lambda c: lm()(tokens(2, 4), cache=StackCache.allocate(lm(), 1, 10)), ValueError,
        "cache"),
    Bad("cache_too_short", lambda c: lm()(tokens(1, 4), cache=StackCache.allocate(lm(), 1, 3)), ValueError, "cache"),
    Bad("cache_not_a_cache", lambda c: lm()(tokens(), cache={"k": None}), TypeError, "cache"),
    Bad("cache_backward_through_decoding", lambda c: _decode_then_backward(), RuntimeError, ("cache", "no_grad")),
    Bad("cache_allocate_batch_zero", lambda c: StackCache.allocate(lm(), 0, 8), ValueError, "batch_size"),
    Bad("cache_allocate_max_len_float", lambda c: StackCache.allocate(lm(), 1, 8.0), ValueError, "max_len"),
    Bad("cache_allocate_for_linear", lambda c: StackCache.allocate(nn.Linear(2, 2), 1, 8), TypeError, "model"),
    # generate()
    Bad("generate_classifier", lambda c: generate(clf(), [[1, 2]], max_new_tokens=2), TypeError, ("model", "classifier")),
    Bad("generate_stack", lambda c: generate(Stack(D, "SA"), [[1, 2]], max_new_tokens=2), TypeError, "model"),
    Bad("generate_linear", lambda c: generate(nn.Linear(2, 2), [[1, 2]], max_new_tokens=2), TypeError, "model"),
    Bad("generate_string_model", lambda c: generate("default.gin", [[1, 2]], max_new_tokens=2), TypeError, "model"),
    Bad("generate_prompts_tensor", lambda c: generate(lm(), torch.ones(1, 2, dtype=torch.long), max_new_tokens=2),
        ValueError, "prompts"),
    Bad("generate_prompt_empty", lambda c: generate(lm(), [[1], []], max_new_tokens=2), ValueError, "prompts[1]"),
    Bad("generate_prompt_strings", lambda c: generate(lm(), [["a", "b"]], max_new_tokens=2), ValueError, "prompts"),
    Bad("generate_max_new_tokens_zero", lambda c: generate(lm(), [[1]], max_new_tokens=0), ValueError, "max_new_tokens"),
    Bad("generate_temperature_string", lambda c: generate(lm(), [[1]], max_new_tokens=1, temperature="1"), ValueError,
        "temperature"),
    Bad("generate_top_p_zero", lambda c: generate(lm(), [[1]], max_new_tokens=1, top_p=0.0), ValueError, "top_p"),
    Bad("generate_pad_id_float", lambda c: generate(lm(), [[1]], max_new_tokens=1, pad_id=1.5), ValueError, "pad_id"),
]


# ----------------------------------------------------------------------------- constructors, factories, reference format

def _reference_sd(**changes):
    block = GatedBlock(D, partial(Sessa, num_heads=2))
    sd = to_reference_state_dict(block)
    for key, value in changes.items():
        if value is None:
            sd.pop(key)
        else:
            sd[key] = value
    return sd


CONSTRUCTORS = [
    Bad("gated_block_mixer_name", lambda c: GatedBlock(D, "sessa"), TypeError, "mixer"),
    Bad("residual_block_mixer_name", lambda c: ResidualBlock(D, "attention"), TypeError, "mixer"),
    Bad("residual_block_mlp_name", lambda c: ResidualBlock(D, Sessa, mlp="mlp"), TypeError, "mlp"),
    Bad("lm_stack_pattern_string", lambda c: CausalLM(V, D, "SA"), TypeError, "stack"),
    Bad("classifier_stack_pattern_string", lambda c: SequenceClassifier(V, 4, D, "SA"), TypeError, "stack"),
    Bad("stack_layout_names", lambda c: Stack(D, ["sessa", "attention"]), TypeError, "layout"),
    Bad("stack_layout_int", lambda c: Stack(D, 42), TypeError, "layout"),
    Bad("stack_block_int", lambda c: Stack(D, "SA", block=3), TypeError, "block"),
    Bad("stack_block_unknown", lambda c: Stack(D, "SA", block="gatd"), UnknownNameError, "gatd"),
    Bad("stack_pattern_unknown_symbol", lambda c: Stack(D, "SQ"), ValueError, "'Q'"),
    Bad("stack_dim_zero", lambda c: Stack(0, "SA"), ValueError, "dim"),
    Bad("stack_num_layers_not_multiple", lambda c: Stack(D, "SA", num_layers=3), ValueError, "num_layers"),
    Bad("stack_num_layers_float", lambda c: Stack(D, "SA", num_layers=2.0), ValueError, "num_layers"),
    Bad("stack_backends_string", lambda c: Stack(D, "SA", backends="sdpa"), TypeError, "backends"),
    Bad("stack_backends_unknown_op", lambda c: Stack(D, "SA", backends={"atention": "sdpa"}), ValueError, "atention"),
    Bad("lm_vocab_string", lambda c: CausalLM("32", D, partial(Stack, layout="SA")), ValueError, "vocab_size"),
    Bad("lm_dim_zero", lambda c: CausalLM(V, 0, partial(Stack, layout="SA")), ValueError, "dim"),
    Bad("lm_dim_float", lambda c: CausalLM(V, 16.0, partial(Stack, layout="SA")), ValueError, "dim"),
    Bad("lm_embed_std_negative", lambda c: CausalLM(V, D, partial(Stack, layout="SA"), embed_std=-1.0), ValueError,
        "embed_std"),
    Bad("lm_ln_eps_zero", lambda c: CausalLM(V, D, partial(Stack, layout="SA"), ln_eps=0), ValueError, "ln_eps"),
    Bad("lm_stack_other_width", lambda c: CausalLM(V, D, Stack(32, "SA")), ValueError, "dim"),
    Bad("classifier_num_classes_zero", lambda c: SequenceClassifier(V, 0, D, partial(Stack, layout="SA")), ValueError,
        "num_classes"),
    Bad("sessa_heads_not_dividing", lambda c: Sessa(D, 3), ValueError, "num_heads"),
    Bad("sessa_gamma_max_one", lambda c: Sessa(D, gamma_max=1.0), ValueError, "gamma_max"),
    Bad("reference_export_not_a_block", lambda c: to_reference_state_dict(Stack(D, "S")), TypeError, "block"),
    Bad("reference_export_rope_base", lambda c: to_reference_state_dict(GatedBlock(D, partial(Sessa, rope_base=500.0))),
        ValueError, "rope_base"),
    Bad("reference_empty", lambda c: load_reference_block({}), ValueError, "ln.weight"),
    Bad("reference_missing_key", lambda c: load_reference_block(_reference_sd(**{"W_out.bias": None})), ValueError,
        "W_out.bias"),
    Bad("reference_wrong_shape", lambda c: load_reference_block(_reference_sd(**{"W_in.bias": torch.ones(3)})), ValueError,
        "W_in.bias"),
    Bad("reference_other_rope_base",
        lambda c: load_reference_block(_reference_sd(**{"mixer.rope_inv_freq": 500.0 ** (-torch.arange(0, 8, 2) / 8)})),
        ValueError, "rope_inv_freq"),
    Bad("reference_int_rope", lambda c: load_reference_block(_reference_sd(**{"mixer.rope_inv_freq": torch.ones(4).long()})),
        ValueError, "rope_inv_freq"),
    Bad("trainconfig_steps_zero", lambda c: TrainConfig(steps=0), ValueError, "steps"),
    Bad("trainconfig_batch_size_string", lambda c: TrainConfig(batch_size="32"), ValueError, "batch_size"),
    Bad("trainconfig_precision", lambda c: TrainConfig(precision="fp16"), ValueError, "precision"),
    Bad("trainconfig_final_splits", lambda c: TrainConfig(final_splits=("dev",)), ValueError, "final_splits"),
    Bad("trainconfig_grad_clip_string", lambda c: TrainConfig(grad_clip="1"), ValueError, "grad_clip"),
]


# ----------------------------------------------------------------------------- ops

def _qkv(B=1, T=5, H=2, Hkv=2, d=4, S=None):
    S = S or T
    return torch.randn(B, T, H, d), torch.randn(B, S, Hkv, d), torch.randn(B, S, Hkv, d)


OPS = [
    Bad("attention_q_3d", lambda c: attention(torch.randn(1, 5, 8), *_qkv()[1:]), ValueError, "q"),
    Bad("attention_heads", lambda c: attention(*_qkv(H=3, Hkv=2)), ValueError, "heads"),
    Bad("attention_more_queries_than_keys", lambda c: attention(*_qkv(T=6, S=4)), ValueError, "q"),
    Bad("attention_window_zero", lambda c: attention(*_qkv(), window=0), ValueError, "window"),
    Bad("attention_window_float", lambda c: attention(*_qkv(), window=2.5), ValueError, "window"),
    Bad("attention_k_other_device", lambda c: attention(*[t if i != 1 else t.to("meta") for i, t in enumerate(_qkv())]),
        ValueError, "k"),
    Bad("attention_seq_idx_shape", lambda c: attention(*_qkv(), seq_idx=torch.zeros(1, 4, dtype=torch.long)), ValueError,
        "seq_idx"),
    Bad("attention_list_input", lambda c: attention([[1.0]], *_qkv()[1:]), TypeError, "q"),
    Bad("attention_unknown_backend", lambda c: attention(*_qkv(), backend="fastest"), BackendError, "fastest"),
    Bad("feedback_gamma_shape", lambda c: feedback_solve(torch.randn(1, 5, 8), torch.randn(1, 5, 4),
                                                         torch.randn(1, 5, 4), torch.rand(1, 4)), ValueError, "gamma"),
    Bad("feedback_past_k_alone", lambda c: feedback_solve(torch.randn(1, 5, 8), torch.randn(1, 5, 4), torch.randn(1, 5, 4),
                                                          torch.rand(1, 5), past_k=torch.randn(1, 2, 4)),
        ValueError, "past_k"),
    Bad("ssd_dt_shape", lambda c: ssd(torch.randn(1, 5, 2, 4), torch.rand(1, 5, 3), -torch.rand(2), torch.randn(1, 5, 1, 3),
                                      torch.randn(1, 5, 1, 3)), ValueError, "dt"),
    Bad("ssd_A_shape", lambda c: ssd(torch.randn(1, 5, 2, 4), torch.rand(1, 5, 2), -torch.rand(3), torch.randn(1, 5, 1, 3),
                                     torch.randn(1, 5, 1, 3)), ValueError, "A"),
    Bad("ssd_initial_state_shape",
        lambda c: ssd(torch.randn(1, 5, 2, 4), torch.rand(1, 5, 2), -torch.rand(2), torch.randn(1, 5, 1, 3),
                      torch.randn(1, 5, 1, 3), initial_state=torch.zeros(1, 2, 4, 4)), ValueError, "initial_state"),
]


# ----------------------------------------------------------------------------- gin and the command line

def _gin(ctx, text: str, name: str = "mine.gin") -> str:
    path = ctx.tmp / name
    path.write_text(text)
    return str(path)


def _included_syntax_error(ctx):
    inner = _gin(ctx, "Stack.layout 'SA'\n", "inner.gin")
    gin_config.parse([_gin(ctx, f"include '{inner}'\n")])


GIN = [
    Bad("gin_syntax_error_file", lambda c: gin_config.parse([_gin(c, "include 'default.gin'\nStack.layout = 'SA\n")]),
        GinConfigError, ("mine.gin", "line 2")),
    Bad("gin_syntax_error_missing_equals", lambda c: gin_config.parse([_gin(c, "Stack.layout 'SA'\n")]), GinConfigError,
        ("mine.gin", "line 1")),
    Bad("gin_syntax_error_full_path", lambda c: gin_config.parse([_gin(c, "x = = 3\n")]), GinConfigError,
        ("/mine.gin",)),
    Bad("gin_syntax_error_included_file", _included_syntax_error, GinConfigError, "inner.gin"),
    Bad("gin_syntax_error_param", lambda c: gin_config.parse(["default.gin"], ["DIM = = 3"]), GinConfigError,
        ("--gin_param", "DIM = = 3")),
    Bad("gin_unknown_configurable", lambda c: gin_config.parse([_gin(c, "Nope.x = 3\n")]), ValueError, ("mine.gin", "Nope")),
    Bad("gin_unknown_parameter", lambda c: gin_config.parse([_gin(c, "Stack.nope = 3\n")]), ValueError, ("mine.gin", "nope")),
    Bad("gin_missing_file", lambda c: gin_config.parse([str(c.tmp / "absent.gin")]), FileNotFoundError, "absent.gin"),
    Bad("gin_missing_include", lambda c: gin_config.parse([_gin(c, "include 'absent_too.gin'\n")]), FileNotFoundError,
        ("absent_too.gin", "mine.gin")),
    Bad("gin_import_missing_module", lambda c: gin_config.parse([_gin(c, "import no_such_module_here\n")]),
        ModuleNotFoundError, ("no_such_module_here", "mine.gin")),
]

CLI = [
    Bad("train_missing_gin_file", lambda c: cli("train", "--gin_file", c.tmp / "nope.gin", "--run_dir", c.tmp / "r"),
        SystemExit, "nope.gin"),
    Bad("train_no_gin_file", lambda c: cli("train", "--run_dir", c.tmp / "r"), SystemExit, "--gin_file"),
    Bad("train_resume_and_set_aside", lambda c: cli("train", "--run_dir", c.tmp / "r", "--resume", "--set_aside"),
        SystemExit, ("--resume", "--set_aside")),
    Bad("train_gin_syntax_error", lambda c: cli("train", "--gin_file", _gin(c, "x = = 1\n"), "--run_dir", c.tmp / "r"),
        SystemExit, "mine.gin"),
    Bad("train_unread_macro", lambda c: cli("train", "--gin_file", "train/tasks/mqar.gin", "--gin_param", "NUM_LAYER = 6",
                                            "--run_dir", c.tmp / "r"), SystemExit, "NUM_LAYER"),
    Bad("evaluate_missing_run", lambda c: cli("evaluate", c.tmp / "nothing_here"), SystemExit, "config.gin"),
    Bad("evaluate_bad_split", lambda c: cli("evaluate", c.run_folder(), "--split", "dev"), SystemExit, "--split"),
    Bad("evaluate_bad_checkpoint", lambda c: cli("evaluate", c.run_folder(), "--checkpoint", c.tmp / "none"), SystemExit,
        "no checkpoint"),
    Bad("generate_missing_checkpoint", lambda c: cli("generate", "--checkpoint", c.tmp / "absent", "--prompt", "a"),
        SystemExit, "absent"),
    Bad("generate_prompt_ids_words", lambda c: cli("generate", "--prompt_ids", "1 two"), SystemExit, "--prompt_ids"),
    Bad("generate_no_prompt", lambda c: cli("generate"), SystemExit, "--prompt"),
    Bad("generate_text_prompt_small_vocab", lambda c: cli("generate", "--gin_param", "VOCAB = 64", "--prompt", "hi"),
        SystemExit, "--prompt"),
    Bad("info_bad_gin_file", lambda c: cli("info", "--gin_file", _gin(c, "Stack.layout 'SA'\n")), SystemExit, "mine.gin"),
    Bad("info_seq_len_zero", lambda c: cli("info", "--seq_len", "0"), SystemExit, "--seq_len"),
    Bad("sweep_unknown_variant", lambda c: cli("sweep", "--variant", "a=mixers/sessa.gin", "--only", "b", "--out", c.tmp),
        SystemExit, "--only"),
    Bad("sweep_bad_variant", lambda c: cli("sweep", "--variant", "nofiles"), SystemExit, "--variant"),
    Bad("sweep_negative_seed", lambda c: cli("sweep", "--variant", "a=x.gin", "--seeds", "-1"), SystemExit, "--seeds"),
    Bad("memory_tail_nothing", lambda c: cli("memory_tail"), SystemExit, "--gin_file"),
    Bad("memory_tail_batch_zero", lambda c: cli("memory_tail", "--batch_size", "0"), SystemExit, "--batch_size"),
    Bad("reproduce_workers_zero", lambda c: cli("reproduce", "--workers", "0"), SystemExit, "--workers"),
    Bad("demo_threads_zero", lambda c: cli("demo", "--threads", "0"), SystemExit, "--threads"),
    Bad("bench_unknown", lambda c: cli("bench", "nosuchbench"), SystemExit, "nosuchbench"),
    Bad("ceilings_examples_zero", lambda c: cli("ceilings", "--examples", "0"), SystemExit, "--examples"),
    Bad("results_tables_missing_file", lambda c: cli("results_tables", "--results", c.tmp / "absent.json", "--check"),
        SystemExit, "absent.json"),
]

UNCLEAR = CHECKPOINTS + INPUTS + CONSTRUCTORS + OPS + GIN + CLI


@pytest.mark.parametrize("case", UNCLEAR, ids=[f"unclear-{c.id}" for c in UNCLEAR])
def test_bad_input(case: Bad, ctx, capsys, monkeypatch):
    monkeypatch.setenv("ZOO_BACKENDS", "")
    monkeypatch.setenv("ZOO_CHECK_VALUES", "")
    run_case(case, ctx, capsys)


# ----------------------------------------------------------------------------- what must keep working

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_format_half_precision(dtype):
    """Valid float16/bfloat16 reference checkpoints load (their RoPE buffer was cast too), and a
    block cast with .half() exports and loads back with the same weights."""
    block = GatedBlock(D, partial(Sessa, num_heads=2, num_kv_heads=1))
    sd = {k: v.to(dtype) for k, v in to_reference_state_dict(block).items()}
    loaded = load_reference_block(sd)
    assert loaded.mixer.q_proj.weight.dtype == dtype and loaded.mixer.num_kv_heads == 1
    assert loaded.mixer.rope.inv_freq.dtype == torch.float32  # never rounded to the block's dtype
    assert torch.equal(loaded.mixer.rope.inv_freq, block.mixer.rope.inv_freq)
    exported = to_reference_state_dict(block.to(dtype))
    assert exported["mixer.rope_inv_freq"].dtype == dtype
    again = load_reference_block(exported)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), block.state_dict().values()))


def test_decoding_with_autograd_on_gives_the_no_grad_result():
    model = lm().eval()
    prompt, step = tokens(T=5), tokens(T=1)
    with torch.no_grad():
        cache = StackCache.allocate(model, 1, 8)
        expected = [model(prompt, cache=cache), model(step, cache=cache)]
    cache = StackCache.allocate(model, 1, 8)
    got = [model(prompt, cache=cache), model(step, cache=cache)]  # autograd on: allowed, no history kept
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    full = model(torch.cat([prompt, step], dim=1))  # gradients come from a call without cache=
    full.sum().backward()
    assert model.embed.weight.grad is not None


def test_cli_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    import subprocess
    import sys

    from tests.bad_inputs import ROOT

    cmd = [sys.executable, str(ROOT / "tools" / "evaluate.py"), str(tmp_path / "absent")]
    plain = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines()[-1].startswith("evaluate.py: error: ") and "config.gin" in plain.stderr
    debug = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, cwd=ROOT)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "FileNotFoundError" in debug.stderr


def test_a_second_process_cannot_train_into_a_locked_folder(tmp_path):
    from zoo.train.run_dir import RunDir

    first, second = RunDir(tmp_path / "run"), RunDir(tmp_path / "run")
    first.lock()
    try:
        with pytest.raises(RuntimeError, match="is in use"):
            second.lock()
    finally:
        first.unlock()
    second.lock()  # free again once the first run is done
    second.unlock()
    assert list((tmp_path / "run").iterdir()) == []  # the lock adds no file to the run folder
