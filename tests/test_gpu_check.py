"""scripts/gpu_check.sh (issue 20): without CUDA one line and exit 2; --cpu-smoke runs every section on CPU."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers_run import REPO
from tools.tables.plan import load_step_times


def run_script(*args, timeout):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the check itself")
def test_without_cuda_it_exits_2_with_one_line(tmp_path):
    res = run_script("--out", str(tmp_path / "g"), timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "no CUDA device" in res.stderr and "--cpu-smoke" in res.stderr
    assert not (tmp_path / "g").exists()


def test_cpu_smoke_runs_every_section_within_five_minutes(tmp_path):
    out = tmp_path / "smoke"
    tic = time.monotonic()
    res = run_script("--cpu-smoke", "--out", str(out), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert time.monotonic() - tic < 300
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    trainers = {p.name for p in (REPO / "configs" / "trainers").iterdir()}
    checked = {r["trainer"] for r in report["precision"]}
    assert checked == trainers
    assert all(r["precision"] == "bf16" and r["loss_rel_diff"] >= 0 and "ok" in r
               for r in report["precision"] if "skipped" not in r)
    assert {r["trainer"] for r in report["utilisation"]} == trainers
    assert all(r["flops_per_step"] > 0 and r["peak_share"] > 0 for r in report["utilisation"])
    assert [r["trainer"] for r in report["memory"]] == ["LAMP", "VaMP"]
    assert all(r["precision"] == "bf16" and r["real_peak_mib"] > 0 and r["estimate_mib"] > 0 for r in report["memory"])
    assert [r["method"] for r in report["table5"]] == ["MaPLe", "MaPLe (exact switches on)", "MMA", "LAMP",
                                                        "LAMP (exact switches on)",
                                                        "LAMP (exact switches and compiled MLP)"]
    assert report["table5"][5]["opts"][-2:] == ["MODEL.COMPILE_MLP", "True"]
    assert all(r["classes"] == 5 and r["batch"] == 4 for r in report["table5"])
    assert report["table5"][4]["opts"][-2:] == ["TRAINER.LAMP.TEXT_LENGTH_BUCKETS", "True"]
    ratio = report["table5"][3]["ms_per_step"] / report["table5"][0]["ms_per_step"]
    assert report["lamp_over_maple"] == pytest.approx(ratio)
    ratio = report["table5"][4]["ms_per_step"] / report["table5"][1]["ms_per_step"]
    assert report["lamp_over_maple_switches"] == pytest.approx(ratio)
    for heading in ("## 1. bf16 / amp against fp32", "## 2. Utilisation in bf16", "## 3. Cross-dataset memory",
                    "## 4. Table 5's setting", "## 5. Step-time files", "LAMP / MaPLe step time"):
        assert heading in md
    assert "CPU smoke run" in md
    # the step-time files are what `tools.tables --dry-run --step-times` reads, one per shipped config
    times = load_step_times(out / "step_times")
    configs = sorted(REPO.glob("configs/trainers/*/*.yaml"))
    assert len(times["entries"]) == len(configs) == len(report["step_times"])
    assert {(e["trainer"], e["config"]) for e in times["entries"]} == {(p.parent.name, p.stem) for p in configs}


def test_the_clip_built_once_is_the_clip_each_build_would_give():
    import engine.trainer as trainer_module
    from engine.clip_loader import load_clip
    from tools.gpu_check import clip_built_once
    with clip_built_once():
        first, second = trainer_module.load_clip("tiny"), trainer_module.load_clip("tiny")
    assert trainer_module.load_clip is load_clip   # restored
    fresh = load_clip("tiny").state_dict()
    assert first is not second
    for name, value in fresh.items():
        assert torch.equal(first.state_dict()[name], value) and torch.equal(second.state_dict()[name], value)
    assert first.visual.conv1.weight.data_ptr() != second.visual.conv1.weight.data_ptr()
