"""Tasks: generators follow docs/tasks.md, splits are deterministic and disjoint, metrics are exact
(SymbolSoup's generator: tests/test_symbol_soup.py)."""

from __future__ import annotations

import pytest
import torch

from zoo.tasks import IGNORE_INDEX, MQAR, TASKS, DiffuseMQAR, SymbolSoup, TextLM, get_task

# ----------------------------------------------------------------------------- registry


def test_registry_names_and_errors():
    assert set(TASKS) == {"symbol_soup", "diffuse_mqar", "mqar", "text_lm"}
    assert isinstance(get_task("mqar", seq_len=64, num_pairs=4), MQAR)
    with pytest.raises(KeyError, match="diffuse_mqar, mqar, symbol_soup, text_lm"):
        get_task("nope")
    with pytest.raises(ValueError, match="split must be one of"):
        get_task("mqar").split("dev")


@pytest.mark.parametrize("name", ["symbol_soup", "diffuse_mqar", "mqar"])
def test_generated_tasks_validate_split_sizes_and_seed(name):
    """One check in Task.set_splits for every generated task: sizes >= 1, seed >= 0, named in the error."""
    task = get_task(name, num_train=3, num_validation=2, num_test=1, seed=5)
    assert [task.num_examples(s) for s in ("train", "validation", "test")] == [3, 2, 1] and task.seed == 5
    for arg, bad in (("num_train", 0), ("num_validation", -1), ("num_test", 1.5), ("seed", -1), ("seed", True)):
        with pytest.raises(ValueError, match=f"^{arg} must be an integer"):
            get_task(name, **{arg: bad})
    with pytest.raises(IndexError, match="out of range for the test split of 1 examples"):
        task.split("test")[1]


# ----------------------------------------------------------------------------- Diffuse MQAR


def split_rows(task: DiffuseMQAR, ex):
    rows = ex["tokens"].view(-1, task.w).tolist()
    return rows[: task.P], rows[task.P : len(rows) - task.Q], rows[len(rows) - task.Q :]


@pytest.mark.parametrize("key_len", [1, 2, 3])
def test_diffuse_mqar_recall_structure(key_len):
    task = DiffuseMQAR(key_len=key_len, key_vocab_size=20, num_pairs=16, num_queries=8, lag_range=(80, 400))
    K = task.K
    for i in range(100):
        ex = task.split("train")[i]
        memory, distractors, queries = split_rows(task, ex)
        assert len(ex["tokens"]) <= task.seq_len
        mem = {tuple(r[:-1]): r[-1] for r in memory}
        assert len(mem) == task.P  # distinct keys
        assert all(1 <= t <= K for r in memory + distractors + queries for t in r[:-1])
        assert all(K < r[-1] <= K + task.V for r in memory + distractors + queries)
        prefixes = {key[:-1] for key in mem}
        for r in distractors:
            assert tuple(r[:-1]) not in mem and tuple(r[:-2]) in prefixes
        scored = (ex["targets"] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert len(scored) == task.Q
        for j, pos in enumerate(scored):
            row = len(memory) + len(distractors) + j
            assert pos == row * task.w + key_len - 1
            key = tuple(queries[j][:-1])
            assert ex["targets"][pos] == mem[key] == queries[j][-1]
            assert ex["lag"][pos] == (row - [tuple(r[:-1]) for r in memory].index(key)) * task.w


def test_diffuse_mqar_lag_ranges():
    task = DiffuseMQAR()
    lo, hi = task.lag_ranges["train"]
    assert task.lag_ranges["test"] == (lo, 4 * hi)
    lags = {}
    for split in ("train", "test"):
        lag = torch.cat([task.split(split)[i]["lag"] for i in range(300)])
        lags[split] = lag[lag >= 0]
        assert len(task.collate([task.split(split)[i] for i in range(8)])["tokens"][0]) <= task.seq_len
    assert lags["train"].min() >= lo and lags["train"].max() <= hi
    assert lags["test"].min() >= lo and lags["test"].max() <= 4 * hi and lags["test"].max() > 3 * hi
    with pytest.raises(ValueError, match="lag_range"):
        DiffuseMQAR(lag_range=(64, 100))


def test_diffuse_mqar_deterministic_and_disjoint():
    a, b = DiffuseMQAR(), DiffuseMQAR()
    seen = set()
    for split in ("train", "validation", "test"):
        for i in range(30):
            x = a.split(split)[i]["tokens"]
            assert torch.equal(x, b.split(split)[i]["tokens"])
            seen.add(tuple(x.tolist()))
    assert len(seen) == 90


# ----------------------------------------------------------------------------- MQAR


def test_mqar_structure():
    task = MQAR()
    assert (task.vocab_size, task.seq_len, task.P) == (8192, 256, 16)
    half = task.vocab_size // 2
    positions = []
    for i in range(50):
        ex = task.split("validation")[i]
        tokens, targets = ex["tokens"], ex["targets"]
        assert len(tokens) == 256 and torch.equal(tokens, MQAR().split("validation")[i]["tokens"])
        keys, values = tokens[0:32:2], tokens[1:32:2]
        assert ((keys >= 1) & (keys < half)).all() and ((values >= half) & (values < 8192)).all()
        assert len(set(keys.tolist())) == 16 and len(set(values.tolist())) == 16
        scored = (targets != IGNORE_INDEX).nonzero().flatten()
        assert len(scored) == 16 and ((scored - 32) % 2 == 0).all()
        memory = dict(zip(keys.tolist(), values.tolist()))
        for pos in scored.tolist():
            assert memory[int(tokens[pos])] == targets[pos]
        positions.append(scored - 32)
    # power law (a = 0.01): the first slots are picked much more often than the last ones
    slots = torch.cat(positions) // 2
    assert (slots < task.num_slots // 4).float().mean() > 0.5
    assert not torch.equal(task.split("train")[0]["tokens"], task.split("test")[0]["tokens"])
    with pytest.raises(ValueError, match="num_pairs"):
        MQAR(seq_len=64, num_pairs=17)


# ----------------------------------------------------------------------------- text LM


def test_text_lm_segments(tmp_path):
    task = TextLM(seq_len=128)
    assert task.vocab_size == 256 and task.kind == "lm"
    starts = set()
    for split in ("train", "validation", "test"):
        start, end = task.ranges[split]
        n = task.num_examples(split)
        assert n == (end - start - 1) // 128 > 0
        for i in (0, n - 1):
            ex = task.split(split)[i]
            s = start + i * 128
            assert torch.equal(ex["tokens"], task.data[s : s + 128]) and torch.equal(ex["targets"], task.data[s + 1 : s + 129])
            assert s + 129 <= end
        starts.add(start)
    assert task.ranges["train"][1] == task.ranges["validation"][0] and task.ranges["validation"][1] == task.ranges["test"][0]
    (tmp_path / "a.txt").write_text("hello world " * 50)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("é" * 100)
    folder = TextLM(path=str(tmp_path), seq_len=8, split_fractions=(0.8, 0.1, 0.1))
    assert bytes(folder.data.tolist()) == ("hello world " * 50 + "\n" + "é" * 100).encode()
    with pytest.raises(ValueError, match="seq_len"):
        TextLM(path=str(tmp_path / "a.txt"), seq_len=100)
    with pytest.raises(FileNotFoundError):
        TextLM(path=str(tmp_path / "missing"))


def test_text_lm_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tok.json"))
    (tmp_path / "t.txt").write_text("a b " * 200)
    task = TextLM(path=str(tmp_path / "t.txt"), tokenizer=str(tmp_path / "tok.json"), seq_len=16)
    assert task.vocab_size == 3 and task.data[:4].tolist() == [1, 2, 1, 2]


# ----------------------------------------------------------------------------- collate and metrics


def test_collate_pads_right():
    task = DiffuseMQAR()
    exs = [task.split("train")[i] for i in range(4)]
    batch = task.collate(exs)
    lengths = [len(e["tokens"]) for e in exs]
    assert batch["tokens"].shape == (4, max(lengths)) and batch["lengths"].tolist() == lengths
    for b, n in enumerate(lengths):
        assert torch.equal(batch["tokens"][b, :n], exs[b]["tokens"]) and (batch["tokens"][b, n:] == task.pad_id).all()
        assert (batch["targets"][b, n:] == IGNORE_INDEX).all() and (batch["lag"][b, n:] == -1).all()
        assert batch["mask"][b].sum() == n and batch["mask"][b, :n].all()


def one_hot_logits(ids: torch.Tensor, num: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(ids.clamp(min=0), num).float() * 10


def test_classification_metric_known_values():
    task = SymbolSoup(num_validation=4)
    batch = task.collate([task.split("validation")[i] for i in range(4)])
    pred = batch["label"].clone()
    pred[0] = (pred[0] + 1) % 20  # 3 of 4 right
    m = task.metrics("validation")
    m.update(one_hot_logits(pred, 20), batch)
    assert m.compute()["accuracy"] == pytest.approx(0.75)
    m.reset()
    per_step = torch.zeros(*batch["tokens"].shape, 20)
    per_step[torch.arange(4), batch["position"]] = one_hot_logits(pred, 20)  # (B, T, C) read out at position
    m.update(per_step, batch)
    assert m.compute()["accuracy"] == pytest.approx(0.75)


def test_recall_metrics_known_values():
    task = DiffuseMQAR()
    batch = task.collate([task.split("test")[i] for i in range(16)])
    targets, lag = batch["targets"], batch["lag"]
    pred = targets.clone()
    long = lag > 256
    pred[long] = task.pad_id  # wrong on every lag beyond the training range
    m = task.metrics("test")
    m.update(one_hot_logits(pred, task.vocab_size), batch)
    out = m.compute()
    scored = targets != IGNORE_INDEX
    assert out["accuracy"] == pytest.approx(1 - long.sum().item() / scored.sum().item())
    assert out["accuracy_lag_64_256"] == 1.0
    for lo, hi in ((256, 512), (512, 768), (768, 1024)):
        if ((lag > lo) & (lag <= hi)).any():
            assert out[f"accuracy_lag_{lo}_{hi}"] == 0.0
    assert set(task.metrics("validation").collection.keys()) == {"accuracy", "accuracy_by_lag"}


def test_lm_metrics_known_values():
    task = TextLM(seq_len=32)
    batch = task.collate([task.split("test")[i] for i in range(3)])
    m = task.metrics("test")
    m.update(torch.zeros(3, 32, 256), batch)  # uniform: perplexity = vocabulary size
    out = m.compute()
    assert out["perplexity"] == pytest.approx(256.0, rel=1e-5)
    m.reset()
    logits = torch.zeros(3, 32, 256)
    target = batch["targets"]
    for b, rank in enumerate((0, 1, 3)):  # row b ranks the target 1st, 2nd, 4th
        for r in range(rank + 1):
            logits[b].scatter_(-1, ((target[b] + r) % 256)[:, None], float(1 + r))
    m.update(logits, batch)
    out = m.compute()
    assert out["top1"] == pytest.approx(1 / 3) and out["top5"] == pytest.approx(1.0)
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
    assert out["perplexity"] == pytest.approx(nll.exp().item(), rel=1e-5)
