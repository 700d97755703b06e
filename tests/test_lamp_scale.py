"""LAMP at paper scale (issue 9): protocol fixes, memory-bounded training, bf16, the text-prefix cache."""
import glob
import os

import pytest
import torch

from tests import cli
from engine.config import ConfigError
from tests.helpers_run import REPO, run_eval, run_train, train_args

CONFIG = "vit_b16_lt_b2n.yaml"


def build(root, tmp_path, *opts, subsample="base", config=CONFIG):
    args = train_args(root, tmp_path / "run", "LAMP", config, *opts, subsample=subsample)
    return cli.build_trainer(cli.build_cfg(cli.parse_args(args)))


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"img": torch.randn(n, 3, 32, 32, generator=g), "label": torch.randint(0, 10, (n,), generator=g)}


# ---- configs -------------------------------------------------------------------------------------

def trainer_of(path):
    return os.path.basename(os.path.dirname(path))


@pytest.mark.parametrize("path", sorted(glob.glob(str(REPO / "configs/trainers/*/*.yaml"))), ids=os.path.basename)
def test_every_shipped_config_trains_after_its_warm_up(path):
    from engine.config import build_cfg
    import argparse
    ns = argparse.Namespace(root="", seed=1, trainer=trainer_of(path), config_file=path, dataset_config_file="",
                            output_dir="", opts=[])
    cfg = build_cfg(ns)  # validate_cfg rejects a warm-up that covers every epoch
    assert cfg.OPTIM.WARMUP_EPOCH < cfg.OPTIM.MAX_EPOCH


def test_xd_config_has_no_warm_up_and_a_warm_up_covering_all_epochs_is_refused(root, tmp_path):
    t = build(root, tmp_path, config="vit_b16_xd.yaml")
    assert t.cfg.OPTIM.MAX_EPOCH == 1 and t.cfg.OPTIM.WARMUP_EPOCH <= 0
    t.set_model_mode("train")
    assert t.get_current_lr() == pytest.approx(1e-3)  # epoch 1 runs at the base lr, not the 1e-5 warm-up
    with pytest.raises(ConfigError, match="OPTIM.WARMUP_EPOCH.*OPTIM.MAX_EPOCH"):
        build(root, tmp_path, "OPTIM.WARMUP_EPOCH", "1", config="vit_b16_xd.yaml")


# ---- new-class bias adaptation -------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("lamp") / "train_base"
    run_train(root, out, "LAMP", CONFIG, "OPTIM.MAX_EPOCH", "1", "OPTIM.WARMUP_EPOCH", "0")
    return out


def test_adaptation_images_are_in_a_seeded_random_order(root, tmp_path, trained):
    t = build(root, tmp_path, subsample="new")
    order = [item.impath for item in t.adaptation_images()]
    labels = [item.label for item in t.adaptation_images()]
    assert order == [item.impath for item in t.adaptation_images()]  # same seed, same order
    assert sorted(order) == sorted(item.impath for item in t.dataset.train_x)  # the §2.5 set itself
    assert labels != sorted(labels)  # not class by class
    other = build(root, tmp_path / "s2", "SEED", "2", subsample="new")
    assert [i.impath for i in other.adaptation_images()] != order or len(order) < 3


def test_adaptation_set_switch_and_record(root, tmp_path, trained):
    res = run_eval(root, tmp_path / "lt", trained, "LAMP", CONFIG, "OPTIM.MAX_EPOCH", "1", "OPTIM.WARMUP_EPOCH", "0")
    full = run_eval(root, tmp_path / "capped", trained, "LAMP", CONFIG, "OPTIM.MAX_EPOCH", "1",
                    "OPTIM.WARMUP_EPOCH", "0", "TRAINER.LAMP.NEW_BIAS_LONG_TAILED", "False")
    info, info_full = res["new_bias_adaptation"], full["new_bias_adaptation"]
    assert info["long_tailed"] and not info_full["long_tailed"]
    assert sum(info["images_per_class"].values()) == info["images"]
    assert info_full["images"] > info["images"]  # imb 10 down-sampling vs the capped split
    assert len(set(info_full["images_per_class"].values())) == 1  # capped only: every class full
    # diagnostics describe each number's own bias
    diag = res["load_diagnostics_by_eval"]
    assert set(diag) == {"test", "test_inductive"}
    assert any(diag["test"][l]["bias_max"] != diag["test_inductive"][l]["bias_max"] for l in diag["test"])
    for d in diag.values():
        assert all(abs(sum([v["min"], v["max"]])) > 0 for v in d.values())


def test_new_bias_gamma_follows_gamma0_unless_set(root, tmp_path):
    t = build(root, tmp_path, "TRAINER.LAMP.GAMMA0", "0.01", subsample="new")
    assert t.new_bias_gamma() == 0.01
    t = build(root, tmp_path, "TRAINER.LAMP.GAMMA0", "0.01", "TRAINER.LAMP.NEW_BIAS_GAMMA", "0.002", subsample="new")
    assert t.new_bias_gamma() == 0.002


def test_eot_classwise_selection_has_its_own_balanced_bias_and_loss_term(root, tmp_path):
    t = build(root, tmp_path, "TRAINER.LAMP.TEXT_SELECTION", "eot_classwise")
    t.set_model_mode("train")
    t.forward_backward(batch(4))
    layer = t.lamp.layer(t.lamp.layer_ids[0])
    assert layer.text_bias.abs().sum() > 0 and torch.isclose(layer.text_load.sum(), torch.tensor(6.0))
    assert len(t.lamp.sim_losses) == 2 * len(t.lamp.layer_ids)  # a vision and a text term per layer
    assert layer.pool_t.grad is not None and layer.pool_t.grad.abs().sum() > 0


# ---- memory-bounded training ---------------------------------------------------------------------

@pytest.mark.parametrize("budget", ["10", "25"])  # 10 classes per image: 1 image (8 parts) or 2 per part
def test_micro_batched_step_equals_the_whole_batch_step(root, tmp_path, budget):
    results = []
    for opts in ([], ["TRAINER.LAMP.MAX_TEXT_SEQS_WITH_GRAD", budget]):
        torch.manual_seed(0)
        t = build(root, tmp_path / budget / str(len(opts)), *opts)
        t.set_model_mode("train")
        calls = []
        original = t.clip.encode_text
        t.clip.encode_text = lambda tokens, hooks=None, **kw: (calls.append(1), original(tokens, hooks, **kw))[1]
        out = t.forward_backward(batch(8))
        results.append((out, {k: v.clone() for k, v in t.lamp.state_dict().items()}, len(calls)))
    (whole, state_whole, calls_whole), (micro, state_micro, calls_micro) = results
    assert calls_whole == 1 and calls_micro == 8 // (int(budget) // 10)
    assert micro["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    for key, value in state_whole.items():
        scale = max(1.0, float(value.abs().max())) if value.is_floating_point() else 1
        assert float((value - state_micro[key]).abs().max()) <= 1e-5 * scale, key  # params, bias, load


# ---- bf16 -----------------------------------------------------------------------------------------

def test_bf16_step_on_cpu_matches_fp32_within_tolerance(root, tmp_path):
    losses = {}
    for prec in ("fp32", "bf16"):
        torch.manual_seed(0)
        t = build(root, tmp_path / prec, "TRAINER.LAMP.PREC", prec)
        assert t.precision == prec
        t.set_model_mode("train")
        losses[prec] = t.forward_backward(batch(4))["loss"]
        assert all(p.dtype == torch.float32 for p in t.lamp.parameters())  # fp32 master weights
        assert t.lamp.layer(3).bias.dtype == t.lamp.layer(3).load.dtype == torch.float32
    assert losses["bf16"] != losses["fp32"]  # autocast really ran in bfloat16
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)


# ---- text-prefix cache ---------------------------------------------------------------------------

def test_one_test_pass_computes_each_text_prefix_once(root, tmp_path, monkeypatch):
    """10 chunks of 1 class (more than the 8 entries the old cache held) over several test batches."""
    t = build(root, tmp_path, "TRAINER.LAMP.TEXT_CHUNK", "4")
    t.clip.clear_text_cache()
    computed = []
    original = t.clip._text_input
    monkeypatch.setattr(t.clip, "_text_input", lambda *a, **k: (computed.append(1), original(*a, **k))[1])
    with torch.no_grad():
        for seed in range(3):
            t.model_inference(batch(4, seed)["img"])
    assert len(computed) == t.num_classes  # once per chunk, never again for later batches


# ---- benchmark ------------------------------------------------------------------------------------

def test_bench_reports_sequences_activation_bytes_and_an_estimate(tmp_path, capsys):
    from tools import bench
    out = tmp_path / "bench.json"
    assert bench.main(["--trainer", "LAMP", "--backbone", "tiny", "--batch", "2", "--classes", "6", "--steps", "1",
                       "--warmup", "0", "--estimate-for", "32x1000", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    import json
    fig = json.loads(out.read_text())
    assert fig["text_seqs_per_step"] == 2 * 6  # per-image text: B x C sequences
    assert fig["activation_bytes_per_seq"] > 0 and fig["activation_bytes_per_image"] > 0
    assert fig["estimate_images_per_backward"] == 8  # MAX_TEXT_SEQS_WITH_GRAD 8192 // 1000 classes
    assert "estimated peak for B=32, C=1000" in text
    seqs_part = 8 * 1000 * fig["activation_bytes_per_seq"]
    assert fig["estimated_peak_bytes"] > seqs_part  # plus the model, trainable state and per-image part


def test_micro_batched_gradients_equal_the_whole_batch_with_unequal_parts(root, tmp_path):
    """7 images, 2 per part (2 + 2 + 2 + 1): each part's loss must be weighted by its own share; compared on the
    gradients themselves (Adam's normalised step would hide a wrong weighting)."""
    grads = []
    for opts in ([], ["TRAINER.LAMP.MAX_TEXT_SEQS_WITH_GRAD", "20"]):
        torch.manual_seed(0)
        t = build(root, tmp_path / str(len(opts)), *opts)
        t.set_model_mode("train")
        assert t.images_per_micro_batch(7) == (7 if not opts else 2)
        t.forward_backward(batch(7))
        grads.append({n: p.grad.clone() for n, p in t.lamp.named_parameters() if p.grad is not None})
    whole, micro = grads
    assert whole and set(whole) == set(micro)
    for name, g in whole.items():
        assert torch.allclose(g, micro[name], rtol=1e-4, atol=1e-7 * max(1.0, float(g.abs().max()))), name


def test_selection_load_restarts_every_epoch(root, tmp_path):
    """The running load (and its step count G) is per epoch: after one batch of a new epoch it is exactly that
    batch's selection fractions, whatever the previous epoch selected."""
    torch.manual_seed(0)
    t = build(root, tmp_path)
    t.set_model_mode("train")
    t.epoch = 0
    t.before_epoch()
    for seed in (1, 2):
        t.forward_backward(batch(4, seed=seed))
    assert int(t.lamp.epoch_steps) == 2
    t.epoch = 1
    t.before_epoch()
    t.forward_backward(batch(4, seed=3))
    assert int(t.lamp.epoch_steps) == 1
    for l, idx in t.lamp.indices.items():
        frac = torch.nn.functional.one_hot(idx, t.lamp.cfg.POOL_SIZE).sum(1).float().mean(0)
        assert torch.allclose(t.lamp.layer(l).load, frac), l


def test_new_bias_adaptation_starts_from_the_trained_bias(root, tmp_path, monkeypatch):
    """b_new starts as a copy of the training bias b (not from zero, not from a previous adaptation), moves
    only by its own updates, and leaves b untouched."""
    torch.manual_seed(0)
    t = build(root, tmp_path, subsample="new")
    with torch.no_grad():
        for i, layer in enumerate(t.lamp.layers.values()):
            layer.bias.copy_(torch.linspace(-1, 1, layer.bias.numel()) * (i + 1))
            layer.bias_new.fill_(7.0)  # stale value of an earlier adaptation
    trained = {l: layer.bias.clone() for l, layer in t.lamp.layers.items()}
    updates = []
    monkeypatch.setattr(t.lamp, "lbo_update", lambda gamma, use_new_bias=False: updates.append(use_new_bias))
    t.adapt_new_bias()
    assert updates and all(updates)  # every update of the pass went to b_new
    for l, layer in t.lamp.layers.items():
        assert torch.equal(layer.bias_new, trained[l]) and torch.equal(layer.bias, trained[l]), l


def test_retrieval_under_bf16_autocast_keeps_the_fp32_order_on_near_tied_scores(root, tmp_path):
    """Keys whose cosine scores differ by ~1e-4 (far below bf16's resolution near 1): the top-K chosen under
    bf16 autocast is the fp32 one, and differs from what bf16 scores would choose."""
    torch.manual_seed(0)
    t = build(root, tmp_path)
    lamp = t.lamp
    l = lamp.layer_ids[0]
    d = 64
    query = torch.zeros(1, d)
    query[0, 0] = 1.0
    m = lamp.cfg.POOL_SIZE
    keys = torch.zeros(m, d)
    keys[:, 0] = 1.0
    keys[:, 1] = torch.linspace(0.0, 0.03, m).flip(0)  # cos = 1 / sqrt(1 + s^2): strictly decreasing in s
    with torch.no_grad():
        lamp.layer(l).bias.zero_()
        expected, _ = lamp.retrieve(lamp.layer(l), query, keys)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, _ = lamp.retrieve(lamp.layer(l), query.bfloat16(), keys.bfloat16())
        sim_bf16 = (torch.nn.functional.normalize(query, dim=-1) @ torch.nn.functional.normalize(keys, dim=-1).t()
                    ).bfloat16()
    assert torch.equal(got, expected)
    assert expected[0].tolist() == list(range(m - 1, m - 1 - lamp.k, -1))  # the smallest s first
    assert len(set(sim_bf16[0].tolist())) < m  # bf16 itself would tie (so the test is about near ties)
