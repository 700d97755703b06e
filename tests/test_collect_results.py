"""tools/collect_results.py on fake results.json trees."""
import csv
import json
import math

import pytest

from tools.collect_results import collect, format_table, main, mean_std

EXP = "base2new_imb10"


def table_part(text):
    """Only the markdown table lines (not the footer)."""
    return "\n".join(l for l in text.splitlines() if l.startswith("|"))


def hm(a, b):
    return 2 * a * b / (a + b)


def write_run(root, dataset, split, seed, acc, f1, trainer="CoOp", config="vit_b16_lt", head=None, tail=None,
              experiment=EXP, eval_key="test"):
    phase = {"base": "train_base", "new": "test_new", "all": "train_all"}[split]
    d = root / experiment / phase / dataset.lower() / trainer / config / f"seed{seed}"
    d.mkdir(parents=True)
    metrics = {"accuracy": acc, "macro_f1": f1, "mean_class_acc": acc - 1, "head_acc": head, "tail_acc": tail,
               "num_samples": 100}
    rec = {"trainer": trainer, "dataset": dataset, "config": config, "seed": seed, "subsample_classes": split,
           "imb_factor": 10.0, "num_shots": 100, "experiment": experiment, "manifest_hash": "abc",
           "code_version": "deadbeef", "results": {eval_key: metrics}}
    (d / "results.json").write_text(json.dumps(rec))


@pytest.fixture
def tree(tmp_path):
    # Caltech101, 2 seeds x base/new.
    write_run(tmp_path, "Caltech101", "base", 1, 90.0, 80.0, head=95.0, tail=88.0)
    write_run(tmp_path, "Caltech101", "base", 2, 94.0, 84.0, head=97.0, tail=90.0)
    write_run(tmp_path, "Caltech101", "new", 1, 70.0, 60.0)
    write_run(tmp_path, "Caltech101", "new", 2, 74.0, 62.0)
    # DTD: one seed each, but different seeds for base and new.
    write_run(tmp_path, "DTD", "base", 1, 80.0, 70.0, head=85.0, tail=78.0)
    write_run(tmp_path, "DTD", "new", 2, 50.0, 40.0)
    return tmp_path


def test_mean_std_uses_sample_std():
    assert mean_std([90.0, 94.0]) == pytest.approx((92.0, math.sqrt(8.0)))
    assert mean_std([70.0]) == (70.0, 0.0)
    assert mean_std([]) == (None, None)


def test_collect_means_stds_and_hm_of_means(tree):
    warnings = []
    rows = collect(str(tree), warn=warnings.append)
    assert [(r["dataset"], r["trainer"], r["config"], r["experiment"]) for r in rows] == [
        ("Caltech101", "CoOp", "vit_b16_lt", EXP), ("DTD", "CoOp", "vit_b16_lt", EXP)]
    cal = rows[0]
    assert cal["base_acc_mean"] == pytest.approx(92.0) and cal["base_acc_std"] == pytest.approx(math.sqrt(8))
    assert cal["new_acc_mean"] == pytest.approx(72.0) and cal["new_acc_std"] == pytest.approx(math.sqrt(8))
    assert cal["base_f1_mean"] == pytest.approx(82.0) and cal["new_f1_mean"] == pytest.approx(61.0)
    assert cal["new_f1_std"] == pytest.approx(math.sqrt(2))
    assert cal["base_head_acc_mean"] == pytest.approx(96.0) and cal["base_tail_acc_mean"] == pytest.approx(89.0)
    assert cal["new_head_acc_mean"] is None
    # HM of the seed means, not the mean of per-seed HMs.
    assert cal["hm_acc"] == pytest.approx(hm(92.0, 72.0))
    assert cal["hm_f1"] == pytest.approx(hm(82.0, 61.0))
    assert cal["hm_f1"] != pytest.approx((hm(80.0, 60.0) + hm(84.0, 62.0)) / 2, abs=1e-6)
    assert cal["n_base"] == cal["n_new"] == 2 and cal["base_seeds"] == [1, 2] and cal["n_all"] == 0
    assert cal["warnings"] == []

    dtd = rows[1]
    assert dtd["base_acc_std"] == 0.0 and dtd["hm_acc"] == pytest.approx(hm(80.0, 50.0))
    assert dtd["warnings"] and "base seeds [1] != new seeds [2]" in dtd["warnings"][0]
    assert any("DTD" in w and "seeds" in w for w in warnings)


def test_table_has_rows_average_and_footer(tree):
    table = format_table(collect(str(tree), warn=lambda m: None))
    assert f"## {EXP}" in table
    assert "92.00 ± 2.83" in table and "72.00 ± 2.83" in table
    assert f"{hm(92.0, 72.0):.2f}" in table
    lines = [l for l in table.splitlines() if l.startswith("| Average")]
    assert len(lines) == 1
    avg_hm_a = (hm(92.0, 72.0) + hm(80.0, 50.0)) / 2
    avg_hm_m = (hm(82.0, 61.0) + hm(70.0, 40.0)) / 2
    assert f"{avg_hm_a:.2f}" in lines[0] and f"{avg_hm_m:.2f}" in lines[0] and "2 datasets" in lines[0]
    assert "2/2" in table and "1/1 !" in table
    assert "ddof=1" in table


def test_cli_writes_csv(tree, tmp_path, capsys):
    out = tmp_path / "summary.csv"
    assert main([str(tree), "--csv", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Caltech101" in printed and "HM-A" in printed
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["dataset"] for r in rows] == ["Caltech101", "DTD", "Average"]
    assert float(rows[0]["base_acc_mean"]) == pytest.approx(92.0)
    assert float(rows[0]["hm_acc"]) == pytest.approx(hm(92.0, 72.0), abs=1e-4)
    assert rows[0]["base_seeds"] == "1 2"
    assert float(rows[2]["hm_f1"]) == pytest.approx((hm(82.0, 61.0) + hm(70.0, 40.0)) / 2, abs=1e-4)


def test_groups_by_trainer_and_config(tmp_path):
    write_run(tmp_path, "EuroSAT", "base", 1, 90.0, 90.0, trainer="CoOp")
    write_run(tmp_path, "EuroSAT", "base", 1, 80.0, 80.0, trainer="MaPLe")
    write_run(tmp_path, "EuroSAT", "base", 1, 70.0, 70.0, trainer="MaPLe", config="other")
    rows = collect(str(tmp_path), warn=lambda m: None)
    assert [(r["trainer"], r["config"], r["base_acc_mean"]) for r in rows] == [
        ("CoOp", "vit_b16_lt", 90.0), ("MaPLe", "other", 70.0), ("MaPLe", "vit_b16_lt", 80.0)]
    assert rows[0]["hm_acc"] is None  # no new split
    assert "Average" not in table_part(format_table(rows))  # single dataset


def test_eval_key_and_all_split(tmp_path):
    write_run(tmp_path, "ImageNet", "all", 1, 60.0, 55.0, experiment="xd_imb100", eval_key="val")
    write_run(tmp_path, "ImageNet", "all", 2, 62.0, 57.0, experiment="xd_imb100", eval_key="val")
    notes = []
    assert collect(str(tmp_path), warn=notes.append) == [] and len(notes) == 2  # no results["test"]
    rows = collect(str(tmp_path), eval_key="val")
    assert rows[0]["all_acc_mean"] == pytest.approx(61.0) and rows[0]["n_all"] == 2
    table = table_part(format_table(rows))
    assert "All acc" in table and "61.00 ± 1.41" in table and "HM-A" not in table


def test_bad_and_duplicate_files_are_skipped_with_warnings(tree):
    bad = tree / "broken" / "results.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    dup = tree / "copy" / "seed1"
    dup.mkdir(parents=True)
    (dup / "results.json").write_text(
        (tree / EXP / "train_base" / "caltech101" / "CoOp" / "vit_b16_lt" / "seed1" / "results.json").read_text())
    notes = []
    rows = collect(str(tree), warn=notes.append)
    assert rows[0]["n_base"] == 2
    assert any("broken" in n and "JSON" in n for n in notes)
    assert any("duplicate seed 1" in n for n in notes)


def test_no_results_is_a_clear_message(tmp_path, capsys):
    assert main([str(tmp_path)]) == 1
    assert "no results.json found" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_duplicate_results_that_differ_are_named_and_never_averaged_in(tree):
    """Not a byte copy: the same seed twice with other numbers (a rerun into another folder). The first path
    (sorted) is kept, the other is ignored, and the warning says the numbers differ."""
    write_run(tree / "zz_rerun", "Caltech101", "base", 1, 10.0, 5.0, head=95.0, tail=88.0)
    notes = []
    rows = collect(str(tree), warn=notes.append)
    row = next(r for r in rows if r["dataset"] == "Caltech101")
    assert row["n_base"] == 2 and row["base_acc_mean"] == pytest.approx(92.0)  # (90 + 94) / 2: 10 ignored
    assert row["base_f1_mean"] == pytest.approx(82.0)
    note = next(n for n in notes if "duplicate seed 1" in n)
    assert "DIFFER" in note and "accuracy 90.0 vs 10.0" in note and "zz_rerun" in note.split("ignoring")[1]
    same = tree / "copy" / "seed1"
    same.mkdir(parents=True)
    (same / "results.json").write_text(
        (tree / EXP / "train_base" / "caltech101" / "CoOp" / "vit_b16_lt" / "seed1" / "results.json").read_text())
    notes = []
    collect(str(tree), warn=notes.append)
    assert any("duplicate seed 1" in n and "(same results)" in n for n in notes)
