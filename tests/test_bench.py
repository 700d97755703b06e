"""tools.bench (issue 20): FLOP accounting against the measured GEMM peak, and every shipped config benchmarks."""
import glob
import json
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.clip_loader import load_clip
from engine.prompted_clip import PromptedCLIP
from tests.helpers_run import REPO
from tools import bench

UTILISATION = re.compile(r"^utilisation: ([\d.]+) GFLOP/step, ([\d.]+) GFLOP/s = (\d+)% of the measured "
                         r"(fp32|bf16|fp16) GEMM peak \(([\d.]+) GFLOP/s\)$", re.M)


def test_flop_count_of_a_matmul_and_cpu_flash_attention_is_the_analytic_count():
    n, k, m = 6, 5, 8
    x, w = torch.randn(n, k, requires_grad=True), torch.randn(k, m, requires_grad=True)

    def step():
        y = (x @ w).view(1, 1, n, m)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # on CPU: the flash kernel torch's registry lacks
            F.scaled_dot_product_attention(y, y, y).sum().backward()

    matmul = 2 * n * k * m + 2 * (2 * n * m * k)       # forward; backward: grad of x and of w
    attention = 2 * (2 * n * n * m) + 5 * (2 * n * n * m)  # q k^T, p v; backward recomputes q k^T, 4 products
    assert bench.count_flops(step) == matmul + attention


def test_flop_count_of_the_tiny_image_encoder():
    model = load_clip("tiny")
    b, width, tokens, patch, layers = 3, 64, 1 + (32 // 8) ** 2, 8, 12
    images = torch.randn(b, 3, 32, 32)
    conv = 2 * b * (tokens - 1) * width * 3 * patch * patch
    block = 2 * b * tokens * (width * 3 * width + width * width + 2 * width * 4 * width) + 2 * 2 * b * tokens ** 2 * width
    # the last block at the cls position only: keys and values everywhere, the rest for one token
    cls_block = 2 * b * tokens * width * 2 * width + 2 * b * (width * width + width * width + 2 * width * 4 * width) \
        + 2 * 2 * b * tokens * width
    proj = 2 * b * width * model.visual.proj.shape[1]
    with torch.no_grad():
        plain = bench.count_flops(lambda: PromptedCLIP(model, cls_only_last_block=False).encode_image(images))
        fast = bench.count_flops(lambda: PromptedCLIP(model, cls_only_last_block=True).encode_image(images))
    assert plain == conv + layers * block + proj
    assert fast == conv + (layers - 1) * block + cls_block + proj


def test_utilisation_figures():
    figures, line = bench.utilisation(2e9, 500.0, 8e9, "bf16")
    assert figures["achieved_flops_per_s"] == 4e9 and figures["peak_share"] == 0.5
    assert line == "utilisation: 2.0 GFLOP/step, 4.0 GFLOP/s = 50% of the measured bf16 GEMM peak (8.0 GFLOP/s)"


@pytest.mark.parametrize("trainer, opts", [("LAMP", []), ("MaPLe", []), ("CoOp", []),
                                           ("CoOp", ["TRAINER.COOP.PREC", "bf16"])])
def test_bench_prints_the_utilisation_line(tmp_path, capsys, trainer, opts):
    out = tmp_path / "bench.json"
    assert bench.main(["--trainer", trainer, "--backbone", "tiny", "--batch", "2", "--classes", "3", "--steps", "1",
                       "--warmup", "0", "--peak-size", "128", "--out", str(out), *opts]) == 0
    found = UTILISATION.findall(capsys.readouterr().out)
    assert len(found) == 1
    gflop, achieved, share, dtype, peak = found[0]
    fig = json.loads(out.read_text())
    assert dtype == ("bf16" if opts else "fp32") == fig["gemm_peak_dtype"]
    assert fig["flops_per_step"] > 0 and float(gflop) == pytest.approx(fig["flops_per_step"] / 1e9, abs=0.06)
    assert fig["achieved_flops_per_s"] == pytest.approx(fig["flops_per_step"] / (fig["ms_per_step"] / 1000))
    assert fig["peak_share"] == pytest.approx(fig["achieved_flops_per_s"] / fig["gemm_peak_flops_per_s"])
    assert fig["peak_share_cpu_time"] > 0


def test_the_counted_step_is_the_benchmarked_step(tmp_path):
    """More images, more FLOPs: the count follows the step, it is not a constant of the model."""
    flops = []
    for batch in ("1", "2"):
        out = tmp_path / f"{batch}.json"
        bench.main(["--trainer", "CoOp", "--backbone", "tiny", "--batch", batch, "--classes", "3", "--steps", "1",
                    "--warmup", "0", "--peak-size", "64", "--out", str(out)])
        flops.append(json.loads(out.read_text())["flops_per_step"])
    assert flops[0] < flops[1] < 2 * flops[0] + 1  # the text pass is per class, the image pass per image


CONFIGS = sorted(glob.glob(str(REPO / "configs/trainers/*/*.yaml")))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: "/".join(p.split(os.sep)[-2:]))
def test_every_trainer_benchmarks_in_every_shipped_config(tmp_path, path):
    """The whole benchmark, the estimate's second measurement included (it once skipped the trainer's benchmark
    preparation: VaMP's class prototypes)."""
    trainer = os.path.basename(os.path.dirname(path))
    out = tmp_path / "bench.json"
    assert bench.main(["--trainer", trainer, "--config-file", path, "--backbone", "tiny", "--batch", "2",
                       "--classes", "4", "--steps", "1", "--warmup", "0", "--peak-size", "64",
                       "--estimate-for", "4x10", "--out", str(out)]) == 0
    fig = json.loads(out.read_text())
    assert fig["trainer"] == trainer and fig["config"] == os.path.basename(path) and fig["flops_per_step"] > 0
    if fig["step_kind"] == "training":
        assert fig["estimated_peak_bytes"] > 0
        if trainer in ("CoOp", "MaPLe", "LAMP", "VaMP"):  # one text pass over the classes / B x C sequences
            assert fig["estimate_text_seqs_per_backward"] == (10 if trainer in ("CoOp", "MaPLe") else 4 * 10)


def test_op_classes():
    assert [bench.op_class(n) for n in ("aten::addmm", "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
                                        "aten::native_layer_norm", "aten::_softmax", "aten::gelu", "aten::cat",
                                        "aten::copy_", "aten::view", "Optimizer.step#AdamW.step")] == [
        "GEMM", "attention", bench.ELEMENTWISE, bench.ELEMENTWISE, bench.ELEMENTWISE, "copies", "copies", "other",
        "other"]


def test_profile_breaks_one_step_down_by_op_class(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--trainer", "LAMP", "--backbone", "tiny", "--batch", "2", "--classes", "3", "--steps", "1",
                       "--warmup", "0", "--peak-size", "64", "--profile", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    fig = json.loads(out.read_text())
    by_class = fig["profile_ms_by_class"]
    assert list(by_class) == list(bench.PROFILE_ORDER)
    assert by_class["GEMM"] > 0 and by_class["attention"] > 0 and by_class[bench.ELEMENTWISE] > 0
    assert fig["profile_top_ops"] and all(op["ms"] > 0 for op in fig["profile_top_ops"])
    assert re.search(r"^profile \(self time of one step by op class\): GEMM [\d.]+ ms \(\d+%\); attention", text, re.M)
    fig_plain = tmp_path / "plain.json"
    bench.main(["--trainer", "LAMP", "--backbone", "tiny", "--batch", "2", "--classes", "3", "--steps", "1",
                "--warmup", "0", "--peak-size", "64", "--out", str(fig_plain)])
    assert "profile_ms_by_class" not in json.loads(fig_plain.read_text())


def test_timing_only_skips_the_counts(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--trainer", "CoOp", "--backbone", "tiny", "--batch", "2", "--classes", "3", "--steps", "1",
                       "--warmup", "0", "--timing-only", "--out", str(out)]) == 0
    fig = json.loads(out.read_text())
    assert fig["ms_per_step"] > 0 and fig["peak_mb"] > 0
    assert not {"flops_per_step", "text_seqs_per_step", "saved_activation_bytes"} & set(fig)
    assert "utilisation:" not in capsys.readouterr().out
    with pytest.raises(ValueError, match="--timing-only"):
        bench.main(["--trainer", "CoOp", "--backbone", "tiny", "--timing-only", "--profile"])


def test_versus_compares_two_settings_in_one_run(tmp_path, capsys):
    """--versus: both settings' steps alternated in one process; the JSON has both times, the speed-up and the
    FLOPs, and the knob under test shows (the cls-only last vision block does fewer FLOPs)."""
    out = tmp_path / "versus.json"
    assert bench.main(["--trainer", "CoOp", "--backbone", "tiny", "--batch", "2", "--classes", "3", "--steps", "2",
                       "--warmup", "0", "--out", str(out), "--versus", "MODEL.CLS_ONLY_LAST_VISION_BLOCK True"]) == 0
    fig = json.loads(out.read_text())
    assert fig["versus"] == ["MODEL.CLS_ONLY_LAST_VISION_BLOCK", "True"] and fig["steps_each"] == 2
    assert fig["speedup"] == pytest.approx(fig["ms_per_step"] / fig["versus_ms_per_step"])
    assert fig["versus_flops_per_step"] < fig["flops_per_step"]
    text = capsys.readouterr().out
    assert "speed-up" in text and "alternated" in text
    with pytest.raises(ValueError, match="KEY VALUE pairs"):
        bench.main(["--trainer", "CoOp", "--backbone", "tiny", "--versus", "MODEL.CLS_ONLY_LAST_VISION_BLOCK"])
    with pytest.raises(ValueError, match="takes neither"):
        bench.main(["--trainer", "CoOp", "--backbone", "tiny", "--versus", "A 1", "--profile"])
