"""The bad-input matrix: inputs that used to give a silently wrong result, and hostile files.

Each case asserts the exception type and that the message names the argument or file at fault
(tests/bad_inputs.py). The other groups: test_bad_inputs_unclear.py (errors that did not say what
was wrong), test_bad_inputs_runs.py (data loss, with the bytes on disk checked),
test_bad_inputs_nan.py (NaN and inf inputs: NaN out at the positions each op's contract names).
"""

from __future__ import annotations

import io
import os
import pickle
from functools import partial

import pytest
import torch

from blocks.attention import Attention
from blocks.rope import RotaryEmbedding
from blocks.sessa import Sessa
from kernels import value_checks
from kernels.attention import attention
from kernels.feedback_solve import feedback_solve
from kernels.ssd import ssd
from tests import test_bad_inputs_nan, test_bad_inputs_runs, test_bad_inputs_unclear
from tests.bad_inputs import ROOT, Bad, cli, ctx, finished_run, run_case  # noqa: F401  (fixtures)
from zoo import gin_config
from zoo.generate import generate
from zoo.gin_config import GinConfigError
from zoo.models import CausalLM, SequenceClassifier
from zoo.stack import Stack
from zoo.train import checkpoint
from zoo.train.checkpoint import CheckpointCorruptError
from zoo.train.loop import TrainConfig

V, D = 32, 16
NAN, INF = float("nan"), float("inf")


def lm(layout: str = "SA", dim: int = D) -> CausalLM:
    return CausalLM(V, dim, partial(Stack, layout=layout))


def tokens(B: int = 1, T: int = 6) -> torch.Tensor:
    return torch.randint(V, (B, T))


def qkv(dtype=torch.float32, B=1, T=5, H=2, d=4):
    return [torch.randn(B, T, H, d).to(dtype) for _ in range(3)]


def fb_inputs(gamma_value: float | None = None, T: int = 5, D_: int = 8):
    f, q, k = torch.randn(1, T, D_), torch.randn(1, T, 4), torch.randn(1, T, 4)
    gamma = torch.full((1, T), gamma_value) if gamma_value is not None else torch.rand(1, T) * 0.9
    return f, q, k, gamma


def ssd_inputs(A=None, dt=None, T=5, H=2, P=4, N=3):
    x = torch.randn(1, T, H, P)
    dt = torch.rand(1, T, H) if dt is None else dt
    A = -torch.rand(H) if A is None else A
    return x, dt, A, torch.randn(1, T, 1, N), torch.randn(1, T, 1, N)


def checked(fn):
    """Call fn() with the op-level value checks on (kernels.value_checks)."""
    with value_checks.enabled():
        return fn()


def _replace(tensors: list, i: int, value) -> list:
    out = list(tensors)
    out[i] = value
    return out


def gin_file(ctx, text: str, name: str = "mine.gin") -> str:
    path = ctx.tmp / name
    path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------------- silent wrong results

NONCONTIGUOUS = torch.tensor([[0, 0, 1, 1, 0, 0]])

SILENT = [
    # RoPE with a base that is not a positive number (the mixer then output zeros or NaN)
    *[Bad(f"rope_base_{label}", lambda c, b=b: RotaryEmbedding(8, base=b), ValueError, "rope_base")
      for label, b in [("zero", 0.0), ("negative", -1.0), ("minus_10000", -10000.0), ("nan", NAN), ("inf", INF),
                       ("string", "10000")]],
    *[Bad(f"sessa_rope_base_{label}", lambda c, b=b: Sessa(D, 2, rope_base=b), ValueError, "rope_base")
      for label, b in [("zero", 0), ("negative", -2.0), ("nan", NAN), ("inf", INF)]],
    *[Bad(f"attention_rope_base_{label}", lambda c, b=b: Attention(D, 2, rope_base=b), ValueError, "rope_base")
      for label, b in [("zero", 0), ("negative", -5.0), ("nan", NAN), ("inf", INF)]],
    Bad("rope_odd_head_dim", lambda c: RotaryEmbedding(7), ValueError, "head_dim"),
    Bad("rope_zero_head_dim", lambda c: RotaryEmbedding(0), ValueError, "head_dim"),
    # op inputs outside the contract, with the value checks on
    *[Bad(f"feedback_gamma_{label}", lambda c, g=g: checked(lambda: feedback_solve(*fb_inputs(g))), ValueError,
          "gamma") for label, g in [("one", 1.0), ("minus_one", -1.0), ("1.5", 1.5), ("large", 40.0)]],
    Bad("feedback_gamma_one_pinned_chunked",
        lambda c: checked(lambda: feedback_solve(*fb_inputs(1.0), backend="chunked")), ValueError, "gamma"),
    Bad("feedback_gamma_one_by_environment",
        lambda c: set_env("ZOO_CHECK_VALUES", "1") and feedback_solve(*fb_inputs(1.0)), ValueError, "gamma"),
    Bad("ssd_positive_A", lambda c: checked(lambda: ssd(*ssd_inputs(A=torch.tensor([0.5, -0.5])))), ValueError, "A"),
    Bad("ssd_all_positive_A", lambda c: checked(lambda: ssd(*ssd_inputs(A=torch.tensor([1.0, 2.0])))), ValueError, "A"),
    Bad("ssd_positive_A_pinned_chunked",
        lambda c: checked(lambda: ssd(*ssd_inputs(A=torch.tensor([0.5, -0.5])), backend="chunked")), ValueError, "A"),
    Bad("ssd_negative_dt", lambda c: checked(lambda: ssd(*ssd_inputs(dt=-torch.rand(1, 5, 2)))), ValueError, "dt"),
    Bad("ssd_one_negative_dt",
        lambda c: checked(lambda: ssd(*ssd_inputs(dt=torch.rand(1, 5, 2).index_fill_(1, torch.tensor([3]), -0.1)))),
        ValueError, "dt"),
    # integer tensors where the ops compute in floating point (the reference returned rounded integers)
    *[Bad(f"attention_int_{name}", lambda c, i=i: attention(*_replace(qkv(), i, torch.ones(1, 5, 2, 4, dtype=torch.long))),
          TypeError, name) for i, name in enumerate("qkv")],
    Bad("attention_all_int", lambda c: attention(*qkv(torch.long)), TypeError, "q"),
    Bad("attention_bool_q", lambda c: attention(*_replace(qkv(), 0, torch.ones(1, 5, 2, 4, dtype=torch.bool))),
        TypeError, "q"),
    Bad("attention_int_pinned_sdpa", lambda c: attention(*qkv(torch.int32), backend="sdpa"), TypeError, "q"),
    Bad("attention_int_pinned_reference", lambda c: attention(*qkv(torch.int32), backend="reference"), TypeError, "q"),
    Bad("attention_float_seq_idx", lambda c: attention(*qkv(), seq_idx=torch.zeros(1, 5)), TypeError, "seq_idx"),
    *[Bad(f"feedback_int_{name}",
          lambda c, i=i: feedback_solve(*_replace(list(fb_inputs()), i, fb_inputs()[i].long())), TypeError, name)
      for i, name in enumerate(["f", "q", "k", "gamma"])],
    Bad("feedback_float_seq_idx", lambda c: feedback_solve(*fb_inputs(), seq_idx=torch.zeros(1, 5)), TypeError, "seq_idx"),
    *[Bad(f"ssd_int_{name}", lambda c, i=i: ssd(*_replace(list(ssd_inputs()), i, ssd_inputs()[i].long())), TypeError, name)
      for i, name in enumerate(["x", "dt", "A", "B", "C"])],
    Bad("ssd_float_seq_idx", lambda c: ssd(*ssd_inputs(), seq_idx=torch.zeros(1, 5)), TypeError, "seq_idx"),
    # segment ids that reappear after another segment (documented as contiguous; mixers disagreed)
    Bad("lm_noncontiguous_seq_idx", lambda c: lm()(tokens(), seq_idx=NONCONTIGUOUS), ValueError, "seq_idx"),
    Bad("lm_noncontiguous_pads", lambda c: lm()(tokens(), seq_idx=torch.tensor([[-1, -1, 0, 0, -1, 0]])), ValueError,
        "seq_idx"),
    Bad("lm_noncontiguous_second_row",
        lambda c: lm()(tokens(2), seq_idx=torch.cat([torch.zeros(1, 6, dtype=torch.long), NONCONTIGUOUS])),
        ValueError, "row 1"),
    Bad("classifier_noncontiguous_seq_idx",
        lambda c: SequenceClassifier(V, 4, D, partial(Stack, layout="SA"))(tokens(), torch.tensor([5]), seq_idx=NONCONTIGUOUS),
        ValueError, "seq_idx"),
    Bad("stack_noncontiguous_seq_idx", lambda c: Stack(D, "SA")(torch.randn(1, 6, D), seq_idx=NONCONTIGUOUS), ValueError,
        "seq_idx"),
    Bad("stack_mamba_noncontiguous_seq_idx", lambda c: Stack(32, "M")(torch.randn(1, 6, 32), seq_idx=NONCONTIGUOUS),
        ValueError, "seq_idx"),
    Bad("attention_noncontiguous_seq_idx", lambda c: checked(lambda: attention(*qkv(T=6), seq_idx=NONCONTIGUOUS)),
        ValueError, "seq_idx"),
    Bad("feedback_noncontiguous_seq_idx", lambda c: checked(lambda: feedback_solve(*fb_inputs(T=6), seq_idx=NONCONTIGUOUS)),
        ValueError, "seq_idx"),
    Bad("ssd_noncontiguous_seq_idx", lambda c: checked(lambda: ssd(*ssd_inputs(T=6), seq_idx=NONCONTIGUOUS)), ValueError,
        "seq_idx"),
    # a misspelt ZOO_BACKENDS entry (was ignored)
    *[Bad(f"zoo_backends_{label}", lambda c, spec=spec: set_env("ZOO_BACKENDS", spec) and attention(*qkv()),
          ValueError, ("ZOO_BACKENDS", culprit))
      for label, spec, culprit in [("misspelt_op", "atention=sdpa", "atention"),
                                   ("misspelt_backend", "attention=spda", "spda"),
                                   ("no_equals", "attention", "op=backend"),
                                   ("second_entry", "attention=sdpa,ssd", "'ssd'")]],
    # gin macros that nothing reads (were ignored)
    Bad("gin_macro_unread_param", lambda c: gin_config.parse(["default.gin"], ["NUM_LAYER = 6"]), GinConfigError,
        ("NUM_LAYER", "NUM_LAYERS", "--gin_param")),
    Bad("gin_macro_unread_file",
        lambda c: gin_config.parse([gin_file(c, "include 'default.gin'\nNUM_LAYER = 6\n")]), GinConfigError,
        ("NUM_LAYER", "mine.gin")),
    Bad("gin_macro_misspelt_vocab", lambda c: gin_config.parse(["default.gin"], ["VOCABB = 300"]), GinConfigError,
        ("VOCABB", "VOCAB")),
    Bad("gin_macro_read_never_set", lambda c: gin_config.parse(["default.gin"], ["CausalLM.dim = %WIDTH"]),
        GinConfigError, ("%WIDTH", "--gin_param")),
    # command-line values that were replaced by defaults or accepted
    *[Bad(f"evaluate_{flag.strip('-')}_{value}", lambda c, f=flag, v=value: cli("evaluate", c.run_folder(), f, v),
          SystemExit, flag) for flag, value in [("--batch_size", "0"), ("--batch_size", "-1"), ("--max_examples", "0"),
                                                ("--batch_size", "two")]],
    *[Bad(f"generate_{flag.strip('-')}_{value}", lambda c, f=flag, v=value: cli("generate", "--prompt_ids", "1 2", f, v),
          SystemExit, flag) for flag, value in [("--max_new_tokens", "0"), ("--top_p", "1.5"), ("--temperature", "0"),
                                                ("--top_k", "0"), ("--prefill_chunk", "0"), ("--stop_token", "-1")]],
    Bad("generate_cli_stop_token_outside_vocab",
        lambda c: cli("generate", "--gin_param", "VOCAB = 64", "--prompt_ids", "1 2", "--stop_token", "300",
                      "--max_new_tokens", "2"), SystemExit, "stop_tokens"),
    # generate(stop_tokens=...) read strings as characters and accepted ids the model cannot produce
    *[Bad(f"stop_tokens_{label}", lambda c, s=s: generate(lm().eval(), [[1, 2]], max_new_tokens=2, stop_tokens=s),
          error, "stop_tokens")
      for label, s, error in [("string", "10", TypeError), ("bytes", b"\n", TypeError), ("float", [10.0], TypeError),
                              ("float_scalar", 3.5, TypeError), ("bool", [True], TypeError),
                              ("outside_vocab", [V], ValueError), ("negative", [-1], ValueError),
                              ("tensor_outside_vocab", torch.tensor([V + 5]), ValueError)]],
    # training settings that were accepted and did something else
    Bad("trainconfig_on_nonfinite", lambda c: TrainConfig(on_nonfinite="ignore"), ValueError, "on_nonfinite"),
    Bad("trainconfig_grad_clip_inf", lambda c: TrainConfig(grad_clip=INF), ValueError, "grad_clip"),
    Bad("trainconfig_eval_examples_zero", lambda c: TrainConfig(eval_examples=0), ValueError, "eval_examples"),
    Bad("trainconfig_steps_bool", lambda c: TrainConfig(steps=True), ValueError, "steps"),
]


def set_env(name: str, value: str) -> bool:
    """Set an environment variable for the rest of the case (test_bad_input's monkeypatch restores it)."""
    os.environ[name] = value
    return True


# ----------------------------------------------------------------------------- security

class _Payload:
    """Unpickling this creates a file: proof that loading ran code from the file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _checkpoint(ctx) -> object:
    """A small real checkpoint folder."""
    model = lm()
    weights, _ = checkpoint.gather(model)
    return checkpoint.write(ctx.tmp / "ckpt", 1, weights, {"step": 1, "note": torch.ones(2)})


def _evil_state(ctx, how: str, keep_manifest: bool = False):
    folder = _checkpoint(ctx)
    marker = ctx.tmp / "pwned"
    buf = io.BytesIO()
    if how == "torch":
        torch.save({"step": 1, "x": _Payload(marker)}, buf)
    elif how == "pickle":
        pickle.dump({"step": 1, "x": _Payload(marker)}, buf, protocol=2)
    elif how == "nested":
        torch.save({"step": 1, "optimizer": {"state": [_Payload(marker)]}}, buf)
    (folder / checkpoint.STATE).write_bytes(buf.getvalue())
    if not keep_manifest:
        (folder / checkpoint.MANIFEST).unlink()
    try:
        checkpoint.read_state(folder)
    finally:
        assert not marker.exists(), "loading a checkpoint ran code from it"


def _evil_weights_aliases(ctx):
    folder = _checkpoint(ctx)
    from safetensors.torch import save

    data = save({"a": torch.ones(2)}, metadata={"aliases": '{"b": "missing"}'})
    (folder / checkpoint.WEIGHTS).write_bytes(data)
    (folder / checkpoint.MANIFEST).unlink()
    checkpoint.load_weights(folder / checkpoint.WEIGHTS)


def _huge_header(ctx):
    folder = _checkpoint(ctx)
    (folder / checkpoint.WEIGHTS).write_bytes((2 ** 62).to_bytes(8, "little") + b"{}")
    (folder / checkpoint.MANIFEST).unlink()
    checkpoint.load_weights(folder / checkpoint.WEIGHTS)


def _gin_import(ctx):
    """A run folder's config.gin may import modules: a missing one is reported with the file."""
    run = ctx.tmp / "run"
    run.mkdir()
    (run / "config.gin").write_text("import not_a_module_anywhere\n")
    cli("evaluate", run)


NO_UNSAFE_ADVICE = ("weights_only=False", "weights_only` set to `False")

SECURITY = [
    Bad("state_with_code_torch_zip", lambda c: _evil_state(c, "torch"), CheckpointCorruptError, "state.pt",
        absent=NO_UNSAFE_ADVICE),
    Bad("state_with_code_plain_pickle", lambda c: _evil_state(c, "pickle"), CheckpointCorruptError, "state.pt",
        absent=NO_UNSAFE_ADVICE),
    Bad("state_with_code_nested", lambda c: _evil_state(c, "nested"), CheckpointCorruptError, "state.pt",
        absent=NO_UNSAFE_ADVICE),
    Bad("state_with_code_caught_by_hash", lambda c: _evil_state(c, "torch", keep_manifest=True), CheckpointCorruptError,
        ("state.pt", "manifest.json")),
    Bad("state_with_code_via_resume", lambda c: _resume_evil(c), SystemExit, "state.pt", absent=NO_UNSAFE_ADVICE),
    Bad("weights_alias_to_missing_tensor", _evil_weights_aliases, CheckpointCorruptError, "model.safetensors"),
    Bad("weights_huge_header", _huge_header, CheckpointCorruptError, "model.safetensors"),
    Bad("run_config_imports_missing_module", _gin_import, SystemExit, ("config.gin", "not_a_module_anywhere")),
]


def _resume_evil(ctx):
    """--resume into a run whose state.pt was replaced by a pickle that runs code."""
    import shutil

    run = ctx.tmp / "resumed"
    shutil.copytree(ctx.run_folder(), run)
    state = checkpoint.latest(run / "checkpoints") / checkpoint.STATE
    buf = io.BytesIO()
    torch.save({"step": 2, "x": _Payload(ctx.tmp / "pwned")}, buf)
    state.write_bytes(buf.getvalue())
    (state.parent / checkpoint.MANIFEST).unlink()
    try:
        cli("train", "--run_dir", run, "--resume")
    finally:
        assert not (ctx.tmp / "pwned").exists()


GROUPS = {"silent": SILENT, "security": SECURITY}


@pytest.mark.parametrize("case", [c for cases in GROUPS.values() for c in cases],
                         ids=[f"{g}-{c.id}" for g, cases in GROUPS.items() for c in cases])
def test_bad_input(case: Bad, ctx, capsys, monkeypatch):
    monkeypatch.setenv("ZOO_BACKENDS", "")  # cases may set these: monkeypatch restores them afterwards
    monkeypatch.setenv("ZOO_CHECK_VALUES", "")
    run_case(case, ctx, capsys)


def test_matrix_covers_every_group():
    counts = {"data_loss": len(test_bad_inputs_runs.CASES), "silent": len(SILENT),
              "unclear": len(test_bad_inputs_unclear.UNCLEAR), "security": len(SECURITY),
              "nan": len(test_bad_inputs_nan.NAN_CASES)}
    print("bad-input matrix cases per group:", counts, "total", sum(counts.values()))
    assert sum(counts.values()) >= 150 and min(counts.values()) >= 8, counts
    ids = [c.id for cases in (SILENT, SECURITY, test_bad_inputs_unclear.UNCLEAR, test_bad_inputs_runs.CASES,
                              test_bad_inputs_nan.NAN_CASES) for c in cases]
    assert len(ids) == len(set(ids)), "case ids must be unique"


def test_value_checks_are_off_by_default_and_documented():
    """The op-level value checks cost a device sync, so they only run when asked for."""
    feedback_solve(*fb_inputs(1.0))  # |gamma| = 1: accepted without the switch (documented in the contract)
    assert "ZOO_CHECK_VALUES" in (ROOT / "docs" / "training.md").read_text()
    for op in (attention, feedback_solve, ssd):
        assert "value checks" in op.__doc__


def test_docs_load_checkpoints_with_weights_only():
    """Every torch.load example in the docs and docstrings loads tensors only."""
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "blocks").glob("*.py"),
             *(ROOT / "zoo").rglob("*.py"), *(ROOT / "tools").glob("*.py")]
    unsafe = [f"{f.relative_to(ROOT)}: {line.strip()}" for f in files for line in f.read_text().splitlines()
              if "torch.load(" in line and "weights_only=True" not in line]
    assert not unsafe, unsafe
    assert "import" in (ROOT / "docs" / "training.md").read_text().split("## What is never lost")[1]

