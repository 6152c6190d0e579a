"""Render the results tables of README.md, docs/reproduction.md and docs/recall.md from
docs/results/reproduction.json and docs/results/recall.json.

    python tools/results_tables.py            # rewrite the tables in place
    python tools/results_tables.py --check    # exit 1 if a table differs from its rendering

Each table sits between `<!-- table: NAME -->` and `<!-- end table -->` in a markdown file; NAME
picks its renderer below (zoo.train.reproduction, zoo.train.recall, zoo.train.evaluate.metrics_table).
To publish a new reproduction, add the <out>/reproduction.json that tools/reproduce.py writes to the
"reproduction" list of the results file and run this tool; a new recall comparison replaces
docs/results/recall.json with the <out>/recall.json of tools/recall.py.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zoo import cli  # noqa: E402
from zoo.tasks.reference import References  # noqa: E402
from zoo.train import recall  # noqa: E402
from zoo.train.evaluate import metrics_table  # noqa: E402
from zoo.train.reproduction import budgets_table, lag_table, summary_table, task_table  # noqa: E402

RESULTS = ROOT / "docs" / "results" / "reproduction.json"
RECALL = ROOT / "docs" / "results" / "recall.json"
DOCS = [ROOT / "README.md", ROOT / "docs" / "reproduction.md", ROOT / "docs" / "recall.md"]
BLOCK = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end table -->)", re.S)


def renderers(results: dict, recall_results: dict | None = None) -> dict[str, str]:
    """Table name -> markdown (the recall table only when `recall_results` is given)."""
    budgets = {e["label"]: e for e in results["reproduction"]}
    r400, r1200, r3600 = budgets["400 steps"], budgets["1200 steps"], budgets["3600 steps"]
    demo = results["demo"]
    return {
        "demo": metrics_table(demo["results"], References.from_dict(demo["references"])),
        "reproduction-400-symbol_soup": task_table(r400, "symbol_soup"),
        "reproduction-400-diffuse_mqar": task_table(r400, "diffuse_mqar"),
        "reproduction-400-lags": lag_table(r400, "diffuse_mqar"),
        "reproduction-budgets-symbol_soup": budgets_table([r1200, r3600], "symbol_soup", wall=True),
        "reproduction-1200-diffuse_mqar": budgets_table([r1200], "diffuse_mqar", lags=True),
        "summary": summary_table([("SymbolSoup 400 steps (1.6M tokens)", r400, "symbol_soup"),
                                  ("1200 (4.8M)", r1200, "symbol_soup"), ("3600 (14.4M)", r3600, "symbol_soup"),
                                  ("Diffuse MQAR 400 steps (0.93M)", r400, "diffuse_mqar"),
                                  ("1200 (2.8M)", r1200, "diffuse_mqar")]),
    } | ({"recall": recall.table(recall_results)} if recall_results else {})


def render(text: str, tables: dict[str, str], path: Path) -> str:
    def replace(m: re.Match) -> str:
        if m["name"] not in tables:
            raise SystemExit(f"{path}: unknown table {m['name']!r}; known: {', '.join(sorted(tables))}")
        return f"{m[1]}{tables[m['name']]}\n{m[4]}"

    return BLOCK.sub(replace, text)


def main(argv: list[str] | None = None) -> list[Path]:
    parser = cli.parser(__doc__)
    parser.add_argument("--results", type=Path, default=RESULTS, help="the reproduction results file")
    parser.add_argument("--recall", type=Path, default=RECALL, help="the recall comparison's results file")
    parser.add_argument("--check", action="store_true", help="only check that every table is up to date")
    args = parser.parse_args(argv)
    recall_results = json.loads(args.recall.read_text())
    recall.check_entry(recall_results)
    tables = renderers(json.loads(args.results.read_text()), recall_results)
    stale = []
    for path in DOCS:
        text = path.read_text()
        new = render(text, tables, path)
        if new != text:
            stale.append(path)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        raise SystemExit(f"stale tables in {', '.join(map(str, stale))}: run python tools/results_tables.py")
    print(("stale: " if args.check else "rewrote: ") + (", ".join(str(p.relative_to(ROOT)) for p in stale) or "nothing"))
    return stale


if __name__ == "__main__":
    cli.run(main)
