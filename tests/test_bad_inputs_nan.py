"""The bad-input matrix, group "nan": NaN and inf inputs, which used to give backend-dependent results
(sdpa returned zeros for a NaN query row on CPU, so a model with a NaN weight produced finite
logits; chunked and sequential SSD disagreed; a NaN spread to earlier steps and other documents).
Each op now follows one policy whatever the backend (kernels.nan_policy): a case passes valid but
non-finite inputs (raises=None) and checks that exactly the positions the op's contract names are
NaN; the model cases check what a user sees (tests/bad_inputs.py)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from blocks.mamba2 import Mamba2
from kernels import nan_policy, value_checks
from kernels.attention import attention
from kernels.delta_rule import delta_rule
from kernels.feedback_solve import feedback_solve
from kernels.linear_attention import linear_attention
from kernels.ssd import ssd
from tests.bad_inputs import ROOT, Bad, ctx, finished_run, run_case  # noqa: F401  (fixtures)
from zoo.generate import generate
from zoo.models import CausalLM
from zoo.stack import Stack

NAN, INF = float("nan"), float("inf")
T = 8
PACKED = torch.tensor([[0] * 3 + [1] * 5])  # two documents: steps 0-2 and 3-7


def nan_exactly_at(*steps: int, row: int = 0, final: bool | None = None):
    """expect(): the result (B, T, ...) (or (o, final state)) is NaN at every element of `steps` of
    `row` and nowhere else; with `final`, the final state of `row` is NaN iff final."""
    def expect(result):
        out, state = result if isinstance(result, tuple) else (result, None)
        nan = torch.isnan(out).reshape(*out.shape[:2], -1)
        want = torch.zeros(out.shape[:2], dtype=torch.bool)
        want[row, list(steps)] = True
        assert torch.equal(nan.any(-1), want) and bool(nan.any(-1).eq(nan.all(-1)).all()), \
            f"NaN at {nan.any(-1).nonzero().tolist()}, expected (row {row}) steps {list(steps)}"
        if final is not None:
            assert bool(torch.isnan(state[row]).all()) == final and not torch.isnan(state[1 - row]).any(), \
                f"final state: NaN in rows {torch.isnan(state).flatten(1).any(1).nonzero().tolist()}"
    return expect


def _set(t: torch.Tensor, index: tuple, value: float) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


def qkv(B=1, H=2, d=4):
    torch.manual_seed(0)
    return [torch.randn(B, T, H, d) for _ in range(3)]


def fb(B=1, D=6):
    torch.manual_seed(0)
    return [torch.randn(B, T, D), torch.randn(B, T, 4), torch.randn(B, T, 4), torch.rand(B, T) * 0.9]


def ssd_in(B=2, H=2, P=4, N=3):
    torch.manual_seed(0)
    return [torch.randn(B, T, H, P), torch.rand(B, T, H), -torch.rand(H), torch.randn(B, T, 1, N),
            torch.randn(B, T, 1, N)]


def la_in(B=2, H=2, dk=4, dv=3):
    torch.manual_seed(0)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, dk) + 2)
    return [torch.randn(B, T, H, dk), torch.randn(B, T, H, dk), torch.randn(B, T, H, dv), g]


def dr_in(B=2, H=2, dk=4, dv=3):
    torch.manual_seed(0)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, dk), dim=-1)
    return [torch.randn(B, T, H, dk), k, torch.randn(B, T, H, dv), torch.rand(B, T, H),
            torch.nn.functional.logsigmoid(torch.randn(B, T, H) + 2)]


def poison(inputs: list, i: int, index: tuple, value: float = NAN) -> list:
    return [_set(t, index, value) if j == i else t for j, t in enumerate(inputs)]


def op_cases(name: str, backends: tuple[str, ...], call, expect) -> list[Bad]:
    """One case per backend: `call(backend)` with `expect` checking the result."""
    return [Bad(f"{name}_{b}", lambda c, b=b: call(b), None, expect=expect) for b in backends]


ATT, FB, SCAN = ("reference", "sdpa"), ("reference", "chunked"), ("reference", "chunked")

OPS = [
    # sdpa returned zeros for a NaN query row on CPU: every backend now gives that row NaN, and only it
    *op_cases("attention_nan_query_row", ATT,
              lambda b: attention(*poison(qkv(), 0, (0, 3, 1, 2)), backend=b), nan_exactly_at(3)),
    *op_cases("attention_inf_query_row", ATT,
              lambda b: attention(*poison(qkv(), 0, (0, 5, 0, 0), INF), backend=b), nan_exactly_at(5)),
    # a NaN value multiplied by the zero weight of a query that cannot see it gave NaN at earlier steps
    *op_cases("attention_nan_value_reaches_later_queries_only", ATT,
              lambda b: attention(*poison(qkv(), 2, (0, 4, 1, 0)), backend=b), nan_exactly_at(4, 5, 6, 7)),
    *op_cases("attention_inf_key_inside_window", ATT,
              lambda b: attention(*poison(qkv(), 1, (0, 2, 0, 3), -INF), window=3, backend=b),
              nan_exactly_at(2, 3, 4)),
    *op_cases("attention_nan_key_stays_in_document", ATT,
              lambda b: attention(*poison(qkv(), 1, (0, 1, 0, 0)), seq_idx=PACKED, backend=b), nan_exactly_at(1, 2)),
    *op_cases("feedback_nan_gamma_reaches_later_rows", FB,
              lambda b: feedback_solve(*poison(fb(), 3, (0, 5)), backend=b), nan_exactly_at(5, 6, 7)),
    *op_cases("feedback_nan_f_stays_in_document", FB,
              lambda b: feedback_solve(*poison(fb(), 0, (0, 1, 2)), seq_idx=PACKED, backend=b), nan_exactly_at(1, 2)),
    *op_cases("feedback_inf_past_key", FB,
              lambda b: feedback_solve(*fb(), past_k=_set(torch.randn(1, 2, 4), (0, 1, 0), INF),
                                       past_s=torch.randn(1, 2, 6), backend=b), nan_exactly_at(*range(T))),
    # chunked and sequential SSD disagreed: within a chunk, a NaN reached earlier steps
    *op_cases("ssd_nan_x_reaches_later_steps_only", SCAN,
              lambda b: ssd(*poison(ssd_in(), 0, (1, 2, 0, 0)), chunk_size=4, backend=b), nan_exactly_at(2, 3, 4, 5, 6, 7, row=1)),
    *op_cases("ssd_nan_C_reaches_its_step_only", SCAN,
              lambda b: ssd(*poison(ssd_in(), 4, (0, 5, 0, 1)), chunk_size=4, backend=b), nan_exactly_at(5)),
    *op_cases("ssd_inf_dt_stays_in_document", SCAN,
              lambda b: ssd(*poison(ssd_in(), 1, (0, 1, 1), INF), seq_idx=PACKED.expand(2, T), chunk_size=4,
                            backend=b), nan_exactly_at(1, 2)),
    *op_cases("ssd_nan_initial_state", SCAN,
              lambda b: ssd(*ssd_in(), initial_state=_set(torch.randn(2, 2, 4, 3), (0, 1, 2, 0), NAN),
                            seq_idx=PACKED.expand(2, T), chunk_size=4, return_final_state=True, backend=b),
              nan_exactly_at(0, 1, 2, final=False)),
    *op_cases("linear_attention_nan_key", SCAN,
              lambda b: linear_attention(*poison(la_in(), 1, (0, 6, 1, 0)), chunk_size=4, return_final_state=True,
                                         backend=b), nan_exactly_at(6, 7, final=True)),
    *op_cases("linear_attention_nan_query", SCAN,
              lambda b: linear_attention(*poison(la_in(), 0, (1, 0, 0, 0)), chunk_size=4, return_final_state=True,
                                         backend=b), nan_exactly_at(0, row=1, final=False)),
    *op_cases("delta_rule_nan_beta_stays_in_document", SCAN,
              lambda b: delta_rule(*poison(dr_in(), 3, (0, 0, 1)), seq_idx=PACKED.expand(2, T), chunk_size=4,
                                   backend=b), nan_exactly_at(0, 1, 2)),
    # NaN is not a value-check violation: with the checks on, NaN follows the policy (no error)
    Bad("ssd_nan_dt_with_value_checks", lambda c: _checked(lambda: ssd(*poison(ssd_in(), 1, (0, 6, 0)), chunk_size=4)),
        None, expect=nan_exactly_at(6, 7)),
    Bad("feedback_nan_gamma_with_value_checks",
        lambda c: _checked(lambda: feedback_solve(*poison(fb(), 3, (0, 7)))), None, expect=nan_exactly_at(7)),
]


def _checked(fn):
    with value_checks.enabled():
        return fn()


# ----------------------------------------------------------------------------- models

V, D = 32, 32


def lm(layout: str, **weights: tuple[tuple, float]) -> CausalLM:
    """A small CausalLM with the named parameters' elements set, e.g. lm("SA", embed__weight=((5, 0), NAN)).
    Its head is untied: with the embedding as head, a NaN embedding row is every step's logit of that token."""
    torch.manual_seed(0)
    model = CausalLM(V, D, partial(Stack, layout=layout), tie_embeddings=False).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, (index, value) in weights.items():
            params[name.replace("__", ".")][index] = value
    return model


def _logits(model: CausalLM, tokens: list[list[int]], seq_idx=None) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(tokens), seq_idx=seq_idx)


def all_nan(result):
    assert torch.isnan(result).all(), f"finite logits from a model with a NaN weight: {result.flatten()[:4]}"


TOKENS = [[1, 2, 3, 5, 6, 7, 8, 9]]  # token 5 sits at step 3, the first of the second document

MODELS = [
    # the original symptom: a NaN weight gave finite logits on CPU (sdpa's zeros for NaN query rows)
    *[Bad(f"lm_{layout}_nan_query_weight_gives_nan_logits",
          lambda c, layout=layout: _logits(lm(layout, stack__layers__0__mixer__q_proj__weight=((0, 0), NAN)), TOKENS),
          None, expect=all_nan) for layout in ("A", "SA", "W")],
    Bad("lm_mamba2_nan_A_log_gives_nan_logits",
        lambda c: _logits(lm("M", stack__layers__0__mixer__A_log=((0,), NAN)), TOKENS), None, expect=all_nan),
    # a NaN embedding row: only the steps that read that token, and only in its document
    *[Bad(f"lm_{layout}_nan_token_stays_in_document",
          lambda c, layout=layout: _logits(lm(layout, embed__weight=((5, 0), NAN)), TOKENS, PACKED), None,
          expect=nan_exactly_at(*range(3, 8)))
      for layout in ("SAM", "NGDLR", "W")],
    Bad("lm_nan_token_in_other_row", lambda c: _logits(lm("SAM", embed__weight=((5, 0), NAN)), [[5, 1, 2, 3, 4, 6, 7, 8],
                                                                                                  [1, 2, 3, 4, 6, 7, 8, 9]]),
        None, expect=nan_exactly_at(*range(T))),
    Bad("mamba2_nan_input_stays_in_document",
        lambda c: Mamba2(32, head_dim=16, state_dim=8, chunk_size=4)(_set(torch.randn(1, T, 32), (0, 1, 4), NAN),
                                                                     seq_idx=PACKED),
        None, expect=nan_exactly_at(1, 2)),
]


def _generate_nan(greedy: bool):
    return generate(lm("SA", stack__layers__0__mixer__q_proj__weight=((0, 0), NAN)), [[1, 2]], max_new_tokens=3,
                    greedy=greedy)


GENERATE = [  # sampling failed inside torch.multinomial; greedy decoding silently took a NaN's index
    Bad("generate_nan_logits_sampled", lambda c: _generate_nan(False), ValueError, ("logits", "not finite", "row 0")),
    Bad("generate_nan_logits_greedy", lambda c: _generate_nan(True), ValueError, ("logits", "not finite", "row 0")),
]

NAN_CASES = OPS + MODELS + GENERATE


@pytest.mark.parametrize("case", NAN_CASES, ids=[f"nan-{c.id}" for c in NAN_CASES])
def test_bad_input(case: Bad, ctx, capsys, monkeypatch):
    monkeypatch.setenv("ZOO_BACKENDS", "")
    monkeypatch.setenv("ZOO_CHECK_VALUES", "")
    monkeypatch.setenv("ZOO_NAN_POLICY", "")
    run_case(case, ctx, capsys)


@pytest.mark.parametrize("value,on", [("", True), ("1", True), ("on", True), ("0", False), ("off", False),
                                      ("FALSE", False), ("no", False)])
def test_nan_policy_switch(monkeypatch, value, on):
    """On by default; ZOO_NAN_POLICY=0 turns it off for a process, `enabled()` for a block."""
    monkeypatch.setenv("ZOO_NAN_POLICY", value)
    assert nan_policy.active() is on
    with nan_policy.enabled(not on):
        assert nan_policy.active() is (not on)
    assert nan_policy.active() is on


def test_nan_policy_is_stated_in_every_contract_and_documented():
    for op in (attention, feedback_solve, ssd, linear_attention, delta_rule):
        assert "NaN policy" in op.__doc__ and op.nan_guard is not None, op.name
    assert "ZOO_NAN_POLICY" in (ROOT / "docs" / "training.md").read_text()


def test_nan_policy_benchmark_table(capsys):
    """`tools/bench.py nan-policy` times every mixer it is given, on and off, and prints on / off - 1."""
    import argparse

    from zoo.bench import nan_policy as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    threads = torch.get_num_threads()
    try:
        bench.run(parser.parse_args(f"--mixers attention mamba2 --T 8 --batch 1 --dim 32 --heads 2 --steps 2 "
                                    f"--repeats 1 --threads {threads}".split()))
    finally:
        torch.set_num_threads(threads)
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] in (["attention"], ["mamba2"])]
    assert [(r[0], r[2]) for r in rows] == [(m, c) for m in ("attention", "mamba2") for c in ("fwd", "fwd+bwd", "decode")]
    for _, _, _, on, off, overhead in rows:
        on, off = float(on), float(off)
        rounding = 100 * 0.005 * (1 / off + on / off ** 2)  # the printed times have two decimals
        assert float(overhead.rstrip("%")) == pytest.approx(100 * (on / off - 1), abs=0.1 + rounding)
