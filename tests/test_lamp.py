"""LAMP (docs/methods/lamp.md): parameter counts, retrieval, load balancing, text exactness, checkpoints, ablations."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests import cli
from engine.trainer import TrainerX
from tests.helpers_run import run_interrupted, REPO, assert_metrics, run_eval, run_train, train_args
from tools import bench

CONFIG = "vit_b16_lt_b2n.yaml"
FAST = ("OPTIM.MAX_EPOCH", "2", "DATALOADER.TRAIN_X.BATCH_SIZE", "8")


def build(root, tmp_path, *opts, subsample="base"):
    args = train_args(root, tmp_path / "run", "LAMP", CONFIG, *opts, subsample=subsample)
    return cli.build_trainer(cli.build_cfg(cli.parse_args(args)))


def fixed_batch(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return {"img": torch.randn(n, 3, 32, 32, generator=g), "label": torch.randint(0, 10, (n,), generator=g)}


@pytest.mark.parametrize("opts, expected", [
    ([], 469_760),
    (["TRAINER.LAMP.PROMPT_DIM", "64"], 516_480),
    (["TRAINER.LAMP.LAYERS", "[6, 7, 8, 9, 10, 11, 12]"], 328_832),
    (["TRAINER.LAMP.SHARED_TOKENS", "4"], 470_400),
    (["TRAINER.LAMP.POOL_TOKENS", "1"], 456_960),
])
def test_parameter_counts_on_full_size_vit_b16(opts, expected, capsys):
    config_file = os.path.join(bench.REPO_ROOT, "configs", "trainers", "LAMP", CONFIG)
    assert bench.main(["--trainer", "LAMP", "--params-only", "--config-file", config_file, *opts]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(expected)


def test_retrieval_fractions_sum_to_k_and_prompts_enter_the_sequences(root, tmp_path):
    t = build(root, tmp_path)
    images = fixed_batch()["img"]
    with torch.no_grad():
        _, state = t.clip.encode_image(images, t.lamp.vision_hooks, return_state=True)
    n_p = 6 * 2 + 2
    assert state.n_inserted == n_p  # 17 -> 31 tokens on the tiny ViT (inserted once, replaced later)
    assert sorted(t.lamp.indices) == list(range(3, 13))
    for idx in t.lamp.indices.values():
        assert idx.shape == (4, 6)
        assert all(len(set(row.tolist())) == 6 for row in idx)  # K distinct entries per image
        frac = torch.nn.functional.one_hot(idx, 20).sum(1).float().mean(0)
        assert torch.isclose(frac.sum(), torch.tensor(6.0))
    t.lamp.reset_load()
    for _ in range(3):
        with torch.no_grad():
            t.encode_images(images)
        t.lamp.lbo_update(1e-3)
        for layer in t.lamp.layers.values():
            assert torch.isclose(layer.load.sum(), torch.tensor(6.0))  # running mean of fractions


def test_eot_readout_shifts_by_the_inserted_prompts(root, tmp_path):
    t = build(root, tmp_path)
    images = fixed_batch()["img"]
    with torch.no_grad():
        t.encode_images(images)
        tokens = t.eval_tokens
        _, state = t.clip.encode_text(tokens, t.lamp.text_hooks, return_state=True)
    eot = tokens.argmax(-1).repeat(4)  # image-major B*C sequences
    assert torch.equal(state.eot, eot + 14)


def test_text_chunking_truncation_and_cache_are_exact(root, tmp_path):
    t = build(root, tmp_path)
    images = fixed_batch()["img"]
    with torch.no_grad():
        t.clip.truncate_text, t.clip.cache_text_prefix = False, False
        t.lamp.cfg.defrost()
        t.lamp.cfg.TEXT_CHUNK = 100000
        plain = t.model_inference(images)
        t.clip.truncate_text, t.clip.cache_text_prefix = True, True
        t.lamp.cfg.TEXT_CHUNK = 4 * 3  # 3 classes per call
        fast = t.model_inference(images)
        again = t.model_inference(images)
    assert plain.shape == (4, 10)
    assert torch.allclose(plain, fast, atol=1e-5) and torch.allclose(plain, again, atol=1e-5)


def test_with_m_equal_k_every_prompt_is_always_selected(root, tmp_path):
    t = build(root, tmp_path, "TRAINER.LAMP.POOL_SIZE", "6", "TRAINER.LAMP.USE_LBO", "False",
              "TRAINER.LAMP.BETA", "0.0")
    for seed in range(3):
        with torch.no_grad():
            t.encode_images(fixed_batch(seed)["img"])
        for idx in t.lamp.indices.values():
            assert all(sorted(row.tolist()) == list(range(6)) for row in idx)


def _selection_frequency_after_lbo(root, tmp_path, sign, steps=40):
    """Expert 0 is the nearest key for 6 of 8 queries; run the real retrieval + LBO updates."""
    t = build(root, tmp_path, "TRAINER.LAMP.POOL_SIZE", "4", "TRAINER.LAMP.TOP_K", "1",
              "TRAINER.LAMP.LBO_SIGN", sign)
    lamp = t.lamp
    layer_id = lamp.layer_ids[0]
    layer = lamp.layer(layer_id)
    keys = torch.eye(4, 64)
    g = torch.Generator().manual_seed(0)
    queries = torch.stack([keys[0]] * 6 + [keys[1], keys[2]]) + 0.3 * torch.rand(8, 64, generator=g)
    freqs = []
    lamp.reset_load()
    for _ in range(steps):
        idx, _ = lamp.retrieve(layer, queries, keys)
        freqs.append((idx[:, 0] == 0).float().mean().item())
        lamp.indices = {layer_id: idx}
        lamp.lbo_update(0.05)
    return freqs, layer.bias.clone()


def test_corrected_lbo_lowers_the_load_of_an_over_selected_expert(root, tmp_path):
    freqs, bias = _selection_frequency_after_lbo(root, tmp_path, "corrected")
    assert freqs[0] == 0.75
    # the running-mean load lags, so selection oscillates around the target K/M = 0.25; on average it drops
    later = freqs[5:]
    assert sum(later) / len(later) < 0.4 and bias[0] < 0


def test_literal_lbo_sign_raises_the_load_of_an_over_selected_expert(root, tmp_path):
    freqs, bias = _selection_frequency_after_lbo(root, tmp_path, "literal")
    assert freqs[0] == 0.75
    assert freqs[-1] == 1.0 and bias[0] > 0


def test_gamma_follows_a_cosine_decay(root, tmp_path):
    lamp = build(root, tmp_path).lamp
    assert lamp.gamma(100) == pytest.approx(5e-4)
    lamp.global_step.fill_(50)
    assert lamp.gamma(100) == pytest.approx(2.5e-4)
    lamp.global_step.fill_(100)
    assert lamp.gamma(100) == pytest.approx(0.0, abs=1e-12)


def test_end_to_end_base_then_new_with_bias_adaptation(root, tmp_path):
    train_dir = tmp_path / "train_base"
    res = run_train(root, train_dir, "LAMP", CONFIG, *FAST)
    assert res["trainable_parameters"] == 10 * (2 * 20 * 2 * 32 + 2 * 32 + 2 * (32 * 32 + 32) + 2 * (32 * 64 + 64))
    assert res["epoch_losses"][-1] < res["epoch_losses"][0]
    assert_metrics(res["results"]["test"], 10, 200)
    diag = res["load_diagnostics"]
    assert sorted(diag, key=int) == [str(l) for l in range(3, 13)]
    for d in diag.values():
        assert 0.0 <= d["min"] <= 0.05 <= d["max"] <= 1.0 and 0.0 < d["entropy"] <= d["max_entropy"]
    assert "load per layer" in (train_dir / "log.txt").read_text()

    ckpt = torch.load(train_dir / "lamp" / "model.pth.tar-1", weights_only=False)
    assert ckpt["state_dict"]["layers.3.bias"].abs().sum() > 0  # LBO moved the bias and it is saved

    new = run_eval(root, tmp_path / "test_new", train_dir, "LAMP", CONFIG, *FAST)
    assert set(new["results"]) == {"test", "test_inductive"}
    for key in ("test", "test_inductive"):
        assert_metrics(new["results"][key], 10, 200, with_head_tail=False)
    assert "new-class bias adapted" in (tmp_path / "test_new" / "log.txt").read_text()


def test_without_lbo_the_selections_are_still_recorded_and_the_bias_stays_zero(root, tmp_path):
    """USE_LBO False (Table 6's "w/o LBO"): the per-layer selection frequencies are measured as with LBO (so the
    load balance of both can be compared), while b is never updated."""
    train_dir = tmp_path / "no_lbo"
    res = run_train(root, train_dir, "LAMP", CONFIG, "TRAINER.LAMP.USE_LBO", "False", "OPTIM.MAX_EPOCH", "1",
                    "OPTIM.WARMUP_EPOCH", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "8")
    diag = res["load_diagnostics"]
    assert sorted(diag, key=int) == [str(l) for l in range(3, 13)]
    for d in diag.values():
        freq = d["freq"]
        assert len(freq) == 20 and sum(freq) == pytest.approx(1.0, abs=1e-4)
        assert max(freq) > 0 and d["bias_min"] == d["bias_max"] == 0.0
        mean = sum(freq) / len(freq)
        cv = (sum((f - mean) ** 2 for f in freq) / len(freq)) ** 0.5 / mean
        assert d["cv"] == pytest.approx(cv, rel=1e-3) and d["cv"] > 0
    state = torch.load(train_dir / "lamp" / "model.pth.tar-0", weights_only=False)["state_dict"]
    for l in range(3, 13):
        assert not state[f"layers.{l}.bias"].any() and state[f"layers.{l}.load"].sum() > 0


def test_new_test_scores_new_names_and_adapts_a_separate_bias(root, tmp_path):
    train_dir = tmp_path / "train_base"
    run_train(root, train_dir, "LAMP", CONFIG, "OPTIM.MAX_EPOCH", "1", "OPTIM.WARMUP_EPOCH", "0")
    t = build(root, tmp_path, subsample="new")
    t.load_model(str(train_dir))
    names = t.dataset.new_classnames
    assert torch.equal(t.eval_tokens, t.clip.tokenize([f"a photo of a {n}." for n in names]))
    trained_bias = {l: t.lamp.layer(l).bias.clone() for l in t.lamp.layer_ids}
    t.adapt_new_bias()
    for l in t.lamp.layer_ids:
        assert torch.equal(t.lamp.layer(l).bias, trained_bias[l])  # b itself untouched
        assert not torch.equal(t.lamp.layer(l).bias_new, trained_bias[l])


def test_resume_continues_with_the_same_bias(root, tmp_path, monkeypatch):
    opts = ("OPTIM.MAX_EPOCH", "3", "DATALOADER.TRAIN_X.BATCH_SIZE", "8")
    full = run_train(root, tmp_path / "full", "LAMP", CONFIG, *opts)
    run_interrupted(monkeypatch, TrainerX, 2, root, tmp_path / "cut", "LAMP", CONFIG, *opts)
    resumed = run_train(root, tmp_path / "cut", "LAMP", CONFIG, *opts)
    a = torch.load(tmp_path / "full" / "lamp" / "model.pth.tar-2", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "cut" / "lamp" / "model.pth.tar-2", weights_only=False)["state_dict"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["results"]["test"] == full["results"]["test"]
    assert resumed["load_diagnostics"] == full["load_diagnostics"]


def one_step(trainer, seed=0):
    torch.manual_seed(seed)
    batch = fixed_batch()
    trainer.set_model_mode("train")
    out = trainer.forward_backward(batch)
    bias = torch.stack([trainer.lamp.layer(l).bias for l in trainer.lamp.layer_ids])
    return out, bias


@pytest.fixture(scope="module")
def reference_step(root, tmp_path_factory):
    return one_step(build(root, tmp_path_factory.mktemp("ref")))


@pytest.mark.parametrize("opts, what_changes", [
    (["TRAINER.LAMP.USE_POOL", "False"], "loss"),
    (["TRAINER.LAMP.USE_MSP", "False"], "loss"),
    (["TRAINER.LAMP.USE_LBO", "False"], "bias"),
    (["TRAINER.LAMP.LBO_SIGN", "literal"], "bias"),
    (["TRAINER.LAMP.BETA", "0.0"], "loss"),
    (["TRAINER.LAMP.TOP_K", "4"], "loss"),
    (["TRAINER.LAMP.POOL_SIZE", "10"], "loss"),
    (["TRAINER.LAMP.POOL_TOKENS", "1"], "loss"),
    (["TRAINER.LAMP.SHARED_TOKENS", "4"], "loss"),
    (["TRAINER.LAMP.PROMPT_DIM", "16"], "loss"),
    (["TRAINER.LAMP.LAYERS", "[6, 7, 8, 9, 10, 11, 12]"], "loss"),
    (["TRAINER.LAMP.QUERY_SOURCE", "frozen_cls"], "loss"),
    (["TRAINER.LAMP.KEY_TYPE", "learned"], "loss"),
    (["TRAINER.LAMP.TEXT_SELECTION", "eot_classwise"], "loss"),
    (["TRAINER.LAMP.TRAIN_CLASSNAMES", "all"], "loss"),
    (["TRAINER.LOSS", "la"], "loss"),
])
def test_every_ablation_switch_runs_and_changes_the_computation(root, tmp_path, reference_step, opts, what_changes):
    ref_out, ref_bias = reference_step
    out, bias = one_step(build(root, tmp_path / "abl", *opts))
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values())
    if what_changes == "loss":
        assert out["loss"] != pytest.approx(ref_out["loss"], abs=1e-6)
    else:
        assert out["loss"] == pytest.approx(ref_out["loss"], abs=1e-6)  # same forward, different bias update
        assert not torch.equal(bias, ref_bias)


def test_new_bias_adaptation_switch(root, tmp_path):
    train_dir = tmp_path / "train_base"
    run_train(root, train_dir, "LAMP", CONFIG, "OPTIM.MAX_EPOCH", "1", "OPTIM.WARMUP_EPOCH", "0")
    res = run_eval(root, tmp_path / "new", train_dir, "LAMP", CONFIG, "TRAINER.LAMP.NEW_BIAS_ADAPT", "False")
    assert set(res["results"]) == {"test"}


@pytest.mark.parametrize("opts, message", [
    (["TRAINER.LAMP.LAYERS", "[0, 3]"], "TRAINER.LAMP.LAYERS"),
    (["TRAINER.LAMP.TOP_K", "30"], "TOP_K"),
    (["TRAINER.LAMP.KEY_TYPE", "nope"], "KEY_TYPE"),
    (["TRAINER.LAMP.USE_POOL", "False", "TRAINER.LAMP.USE_MSP", "False"], "nothing to learn"),
])
def test_impossible_settings_are_rejected(root, tmp_path, capsys, opts, message):
    assert cli.main(train_args(root, tmp_path / "run", "LAMP", CONFIG, *opts)) == 2
    assert message in capsys.readouterr().err


def test_scripts_run_skip_finished_seeds_and_cover_xd_dg(root, tmp_path):
    env = dict(os.environ, DATA=str(root), OUTPUT=str(tmp_path / "out"), PYTHON=sys.executable, TAG="tiny",
               EXTRA="MODEL.BACKBONE.NAME tiny INPUT.SIZE (32,32) DATALOADER.NUM_WORKERS 0 OPTIM.MAX_EPOCH 1 OPTIM.WARMUP_EPOCH 0 "
                     "DATALOADER.TRAIN_X.BATCH_SIZE 16",
               XD_SOURCE="synthetic_shapes", XD_TARGETS="synthetic_shapes", DG_TARGETS="synthetic_shapes")
    cmd = ["bash", str(REPO / "scripts/lamp/base2new.sh"), "synthetic_shapes", "10", "1"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    exp = tmp_path / "out" / "base2new_imb10"
    for split in ("train_base", "test_new"):
        res = json.loads((exp / split / "synthetic_shapes/LAMP/vit_b16_lt_b2n_tiny/seed1/results.json").read_text())
        assert res["experiment"] == "base2new_imb10"
    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.count("[skip]") == 2
    for script in ("xd.sh", "dg.sh"):
        r = subprocess.run(["bash", str(REPO / "scripts/lamp" / script), "1"], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "out/xd_imb100/test_all/synthetic_shapes/LAMP/vit_b16_xd_tiny/seed1/results.json").is_file()
    assert (tmp_path / "out/dg_imb100/test_all/synthetic_shapes/LAMP/vit_b16_xd_tiny/seed1/results.json").is_file()
    bad = subprocess.run(["bash", str(REPO / "scripts/lamp/base2new.sh"), "synthetic_shapes"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr
