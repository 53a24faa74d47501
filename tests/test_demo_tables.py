"""The results tables in README.md and docs/demo/RESULTS.md are what the demo printed for the
committed JSON: checked block by block (nvrm_ext.demo.doc_tables), and the check itself is
shown to catch a changed result, a hand-edited table and a missing file."""
import json
import re
import shutil
from pathlib import Path

import pytest

from nvrm_ext.demo import doc_tables
from nvrm_ext.demo.reporting import table

REPO = Path(__file__).resolve().parents[1]
README, RESULTS, RESULTS_DIR = REPO / "README.md", REPO / "docs/demo/RESULTS.md", REPO / "docs/demo"
if not (README.exists() and RESULTS.exists()):
    pytest.skip("the checkout's README.md and docs/demo/ are not here (tests run against an installed wheel)",
                allow_module_level=True)


@pytest.mark.parametrize("path", [README, RESULTS], ids=["README", "RESULTS"])
def test_committed_tables_match_the_committed_results(path):
    assert doc_tables.check(path) == []


def _lines_in_blocks(path: Path) -> set[int]:
    lines = path.read_text().split("\n")
    return {n for block in doc_tables.find_blocks(path, lines) for n in range(block.start, block.end)}


def test_every_results_table_is_inside_a_checked_block():
    lines = RESULTS.read_text().split("\n")
    table_lines = {n for n, line in enumerate(lines) if line.startswith("|")}
    assert table_lines and table_lines <= _lines_in_blocks(RESULTS)
    blocks = doc_tables.find_blocks(RESULTS, lines)
    sources = {block.source.resolve() for block in blocks}
    assert sources == {p.resolve() for p in RESULTS_DIR.rglob("*.json") if not p.name.startswith("tune_")}
    readme = README.read_text().split("\n")
    assert readme.index("| claim | command | result |") in _lines_in_blocks(README)


def test_every_number_in_the_claims_is_one_the_demo_printed():
    """Independent of the claims' renderer: each 'mean±std' of the README's claims table appears
    as 'mean ± std' in a table reporting.table prints for one of the committed results."""
    printed = "\n".join(table(json.loads(p.read_text())) for p in RESULTS_DIR.rglob("*.json")
                        if not p.name.startswith("tune_"))
    block = next(b for b in doc_tables.find_blocks(README, README.read_text().split("\n")) if b.kind == "claims")
    claims = "\n".join(README.read_text().split("\n")[block.start:block.end])
    numbers = re.findall(r"(\d+\.\d)±(\d+\.\d)", claims)
    assert len(numbers) >= 30
    for mean, std in numbers:
        assert f"{mean} ± {std}" in printed


@pytest.fixture
def docs_copy(tmp_path):
    """README.md, RESULTS.md and the committed results, laid out as in the repository."""
    shutil.copy(README, tmp_path / "README.md")
    shutil.copytree(RESULTS_DIR, tmp_path / "docs/demo", ignore=shutil.ignore_patterns("*.png"))
    return tmp_path


def test_a_changed_result_is_caught_and_rewritten(docs_copy):
    results = docs_copy / "docs/demo/regularizers.json"
    result = json.loads(results.read_text())
    result["summary"]["sgd"]["test"]["mean"] += 0.123
    for run in result["runs"]["sgd"]:
        run["test"][-1] = 0.99  # SGD now ahead of every method in every seed
    results.write_text(json.dumps(result))
    files = [str(docs_copy / "README.md"), str(docs_copy / "docs/demo/RESULTS.md")]
    assert doc_tables.main(files) == 1
    assert doc_tables.main(files + ["--write"]) == 0
    assert doc_tables.main(files) == 0
    new_mean = f"{100 * result['summary']['sgd']['test']['mean']:.1f}"
    assert f"{new_mean} ± " in (docs_copy / "docs/demo/RESULTS.md").read_text()
    assert f"SGD {new_mean}±" in (docs_copy / "README.md").read_text()


def test_a_hand_edited_table_is_caught(docs_copy, capsys):
    results_md = docs_copy / "docs/demo/RESULTS.md"
    text = results_md.read_text()
    results_md.write_text(text.replace("| NVRM-Adam | ", "| NVRM-Adam | 1", 1))  # 88.7 -> 188.7
    assert doc_tables.main([str(results_md)]) == 1
    assert "forgetting.json" in capsys.readouterr().err


def test_a_missing_result_or_a_broken_block_is_a_one_line_error(docs_copy, capsys):
    (docs_copy / "docs/demo/perturbation.json").unlink()
    assert doc_tables.main([str(docs_copy / "docs/demo/RESULTS.md")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    broken = docs_copy / "broken.md"
    broken.write_text("<!-- nvrm-demo table docs/demo/regularizers.json -->\n| a |\n")
    assert doc_tables.main([str(broken)]) == 2
    assert "never closed" in capsys.readouterr().err


def test_paired_cells_name_the_difference_its_interval_and_the_wins():
    """Differences NVRM − SGD in the final epoch: +0.2, +0.3, +0.1 (the interval [−0.05, +0.45]
    includes 0: sd 0.1, t quantile of 2 degrees of freedom 4.30) and −0.2, −0.3, −0.25 on the fit."""
    curves = lambda finals: [{"noisy_train": [0.0, f], "test": [0.9, f]} for f in finals]  # noqa: E731
    result = {"experiment": "label-noise", "config": {},
              "runs": {"sgd": curves([0.5, 0.5, 0.6]), "nvrm-sgd": curves([0.7, 0.8, 0.7])}}
    assert doc_tables.paired(result, "nvrm-sgd", "clean test") == (
        "NVRM-SGD − SGD not shown: +20.0 [−4.8, +44.8], wins 3 of 3")
    result["runs"]["nvrm-sgd"] = curves([0.3, 0.2, 0.35])
    assert doc_tables.paired(result, "nvrm-sgd", "fits", "NVRM − SGD") == (
        "NVRM − SGD −25.0 [−37.4, −12.6], wins 3 of 3")
