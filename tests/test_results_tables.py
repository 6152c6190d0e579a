"""The published results tables (README.md, docs/reproduction.md, docs/recall.md) are the rendering
of docs/results/reproduction.json and recall.json, and the reference scores in the reproduction
file are what zoo.tasks.reference computes today on the same test examples (the recall file's:
tests/test_recall.py)."""

from __future__ import annotations

import json
import runpy

import pytest

from zoo import gin_config
from zoo.tasks.reference import References, references
from zoo.train import configurables

ROOT = gin_config.CONFIGS_DIR.parent
RESULTS = json.loads((ROOT / "docs" / "results" / "reproduction.json").read_text())
RECALL = json.loads((ROOT / "docs" / "results" / "recall.json").read_text())


def test_docs_tables_are_rendered_from_the_results_file():
    tool = runpy.run_path(str(ROOT / "tools" / "results_tables.py"))
    assert tool["main"](["--check"]) == []
    names = set(tool["renderers"](RESULTS, RECALL))
    for path in tool["DOCS"]:
        found = {m["name"] for m in tool["BLOCK"].finditer(path.read_text())}
        assert found and found <= names, path


def assert_same(stored: dict, fresh: References) -> None:
    stored = References.from_dict(stored)
    assert (stored.task, stored.split, stored.num_examples, stored.chance, stored.ceiling_name) == \
        (fresh.task, fresh.split, fresh.num_examples, fresh.chance, fresh.ceiling_name)
    pairs = [(stored.ceiling, fresh.ceiling)] + [(stored.baselines[k], fresh.baselines[k]) for k in fresh.baselines]
    assert set(stored.baselines) == set(fresh.baselines)
    for a, b in pairs:
        assert a.keys() == b.keys()
        for metric in a:
            assert a[metric].value == pytest.approx(b[metric].value, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("task", ["symbol_soup", "diffuse_mqar"])
def test_stored_references_are_recomputed(task):
    spec = configurables.read_sweep(f"experiments/paper_comparison/{task}_sweep.gin")
    gin_config.parse([*spec.gin_files, *spec.variants["sessa"]], spec.gin_params)
    fresh = references(configurables.configured_task(), "test", configurables.configured_train_config().final_eval_examples)
    for entry in RESULTS["reproduction"]:
        if task in entry["tasks"]:
            assert_same(entry["tasks"][task]["references"], fresh)


def test_stored_demo_references_are_recomputed():
    gin_config.parse(["experiments/demo.gin"])
    assert_same(RESULTS["demo"]["references"], references(configurables.configured_task(), "test", None))
