"""VaMP on MMRL: sample-specific variational text tokens, class-aware prior, KL, S-sample inference."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from tests import cli
from tests.helpers_run import assert_metrics, assert_step_uses_la_loss, run_eval, run_train, train_args
from tools import bench
from trainers.vamp import gaussian_kl

CONFIG = "vit_b16_b2n.yaml"
MMRL_TINY = 5 * 512 + 7 * (512 * 64 + 64) * 2 + 64 * 64  # MMRL on the tiny backbone (E = widths = 64, d_r 512)


def build(root, tmp_path, *opts, trainer="VaMP", subsample="base"):
    args = train_args(root, tmp_path / "run", trainer, CONFIG, *opts, subsample=subsample)
    return cli.build_trainer(cli.build_cfg(cli.parse_args(args)))


def perturb(trainer, std=0.05):
    """Move the zero-initialised output layers so posterior and prior depend on their inputs."""
    with torch.no_grad():
        for p in trainer.nets.parameters():
            if p is not trainer.rep.compound_rep_tokens and p.dim() == 2 and p.abs().sum() == 0:
                p.normal_(0, std)


def test_parameter_count_on_full_size_vit_b16(capsys):
    config_file = os.path.join(bench.REPO_ROOT, "configs", "trainers", "VaMP", CONFIG)
    assert bench.main(["--trainer", "VaMP", "--params-only", "--config-file", config_file]) == 0
    count = int(capsys.readouterr().out.strip().splitlines()[-1])
    per_layer = (512 * 5 + 5 + 5 * 1024 + 1024) + (1024 * 5 + 5 + 5 * 1024 + 1024)  # posterior + class-aware prior
    assert count == 4_992_256 + 7 * per_layer == 5_132_102
    assert abs(count - 5_132_000) <= 50_000


@pytest.mark.parametrize("opts, extra", [
    ([], 7 * ((64 * 5 + 5 + 5 * 1024 + 1024) + (128 * 5 + 5 + 5 * 1024 + 1024))),
    (["TRAINER.VAMP.PRIOR", "prototype"], 7 * ((64 * 5 + 5 + 5 * 1024 + 1024) + (64 * 5 + 5 + 5 * 1024 + 1024))),
    (["TRAINER.VAMP.PRIOR", "standard"], 7 * (64 * 5 + 5 + 5 * 1024 + 1024)),
    (["TRAINER.VAMP.VARIATIONAL", "False"], 7 * (64 * 5 + 5 + 5 * 512 + 512)),
    (["TRAINER.VAMP.SAMPLE_SPECIFIC", "False"], 0),
    (["TRAINER.VAMP.LAYERS", "[11, 12]", "TRAINER.VAMP.HIDDEN", "8"],
     2 * ((64 * 8 + 8 + 8 * 1024 + 1024) + (128 * 8 + 8 + 8 * 1024 + 1024))),
])
def test_parameter_counts_follow_the_switches(root, tmp_path, opts, extra):
    assert build(root, tmp_path, *opts).count_trainable_parameters() == MMRL_TINY + extra


def test_without_sample_specific_prompts_it_is_mmrl(root, tmp_path):
    torch.manual_seed(0)
    mmrl = build(root, tmp_path / "m", trainer="MMRL")
    vamp = build(root, tmp_path / "v", "TRAINER.VAMP.SAMPLE_SPECIFIC", "False")
    vamp.rep.load_state_dict(mmrl.rep.state_dict())
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([1, 2, 3])
    with torch.no_grad():
        assert torch.allclose(vamp.logits(images), mmrl.logits(images))
    assert vamp.forward_backward({"img": images, "label": labels})["loss"] == pytest.approx(
        mmrl.forward_backward({"img": images, "label": labels})["loss"], rel=1e-6)


def test_gaussian_kl():
    mu, logvar = torch.randn(4, 6), torch.randn(4, 6)
    assert torch.allclose(gaussian_kl(mu, logvar, mu, logvar), torch.zeros(4))
    # N(1, 1) || N(0, 1): 1/2 per dim; N(0, e^2) || N(0, 1): (e^2 - 1 - 2) / 2
    assert gaussian_kl(torch.ones(1, 3), torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 3)).item() == pytest.approx(1.5)
    two = torch.full((1, 1), 2.0)
    assert gaussian_kl(torch.zeros(1, 1), two, torch.zeros(1, 1), torch.zeros(1, 1)).item() == pytest.approx(
        0.5 * (torch.e ** 2 - 1 - 2), rel=1e-5)


def test_kl_is_zero_when_posterior_equals_prior_and_weighted_in_the_loss(root, tmp_path):
    torch.manual_seed(0)
    trainer = build(root, tmp_path, "TRAINER.VAMP.KL_WEIGHT", "0.5")
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 5, 9])
    trainer.prepare_benchmark({"img": images, "label": labels})
    out = trainer.forward_backward({"img": images, "label": labels})  # at init q and p are both N(0, 0.02^2)
    assert out["kl"] == 0.0
    perturb(trainer)
    with torch.no_grad():
        f_x = trainer.image_zero_shot(images)
        post = trainer.nets.posterior_params(f_x)
        prior = trainer.nets.prior_params(f_x, trainer.prototypes[labels])
        expected = sum(gaussian_kl(*post[l], *prior[l]) for l in range(6, 13)).mean()
    torch.manual_seed(5)
    out = trainer.forward_backward({"img": images, "label": labels})
    assert out["kl"] == pytest.approx(expected.item(), rel=1e-4) and out["kl"] > 0
    parts = out["ce_cls"] * 0.7 + out["ce_rep"] * 0.3 + 1.0 * (out["reg_img"] + out["reg_txt"])
    assert out["loss"] == pytest.approx(parts + 0.5 * out["kl"], rel=1e-5)


@pytest.mark.parametrize("prior", ["class_aware", "prototype", "standard"])
def test_prior_choice_changes_the_kl(root, tmp_path, prior):
    torch.manual_seed(0)
    trainer = build(root, tmp_path, "TRAINER.VAMP.PRIOR", prior)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    trainer.prepare_benchmark({"img": images, "label": labels})
    perturb(trainer)
    with torch.no_grad():
        f_x = trainer.image_zero_shot(images)
        post = trainer.nets.posterior_params(f_x)
        if prior == "standard":
            expected = sum(gaussian_kl(mu, lv, torch.zeros_like(mu), torch.zeros_like(lv)) for mu, lv in post.values())
        else:
            cond = trainer.prototypes[labels]
            if prior == "class_aware":
                cond = torch.cat([f_x, cond], dim=-1)
            expected = sum(gaussian_kl(*post[l], *trainer.nets.prior[str(l)](cond).chunk(2, -1)) for l in post)
        kl = trainer.kl_term(post, f_x, labels)
    assert kl.item() == pytest.approx(expected.mean().item(), rel=1e-5)


def test_deterministic_variant_has_no_kl_and_no_noise(root, tmp_path):
    torch.manual_seed(0)
    trainer = build(root, tmp_path, "TRAINER.VAMP.VARIATIONAL", "False")
    perturb(trainer)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    with torch.no_grad():
        assert torch.equal(trainer.logits(images), trainer.logits(images))
    assert "kl" not in trainer.forward_backward({"img": images, "label": labels})


def test_text_tokens_are_per_image_and_batched_image_major(root, tmp_path):
    torch.manual_seed(0)
    trainer = build(root, tmp_path)
    perturb(trainer, std=0.5)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        post = trainer.nets.posterior_params(trainer.image_zero_shot(images))
        shift = {l: mu for l, (mu, _) in post.items()}
        batched = trainer.text_features(shift)                               # (3, C, D)
        single = [trainer.text_features({l: z[b:b + 1] for l, z in shift.items()})[0] for b in range(3)]
    assert batched.shape == (3, len(trainer.classnames), trainer.clip.embed_dim)
    for b in range(3):
        assert torch.allclose(batched[b], single[b], atol=1e-5)
    assert not torch.allclose(batched[0], batched[1], atol=1e-4)


def test_test_time_sampling_is_deterministic_and_never_uses_the_prior(root, tmp_path, monkeypatch):
    torch.manual_seed(0)
    trainer = build(root, tmp_path, "TRAINER.VAMP.N_SAMPLES", "4")
    perturb(trainer, std=0.5)
    trainer.prototypes = None
    monkeypatch.setattr(trainer.nets, "prior_params", lambda *a: pytest.fail("prior used at test time"))
    images = torch.randn(3, 3, 32, 32)

    def infer(**changes):
        for k, v in changes.items():
            trainer.vc[k] = v
        trainer.before_test()
        with torch.no_grad():
            return trainer.model_inference(images)

    trainer.vc.defrost()
    first = infer()
    torch.manual_seed(123)  # the global RNG does not matter
    assert torch.equal(infer(), first)
    assert torch.allclose(first.exp().sum(1), torch.ones(3))  # log of averaged probabilities
    assert not torch.allclose(infer(TEST_SEED=1), first)
    assert not torch.allclose(infer(TEST_SEED=0, N_SAMPLES=1), first)
    mean = infer(N_SAMPLES=4, TEST_MODE="mean")
    with torch.no_grad():
        post = trainer.nets.posterior_params(trainer.image_zero_shot(images))
        w = trainer.text_features({l: mu for l, (mu, _) in post.items()})
        f_cls, f_rep = trainer.rep.image_features(trainer.clip, images)
        z = 100 * torch.einsum("bd,bcd->bc", F.normalize(f_cls, dim=-1), F.normalize(w, dim=-1))
        z_rep = 100 * torch.einsum("bd,bcd->bc", F.normalize(f_rep, dim=-1), F.normalize(w, dim=-1))
    assert torch.allclose(mean, 0.7 * z + 0.3 * z_rep, atol=1e-4)  # base classes: MMRL's fusion
    logits_mode = infer(TEST_MODE="logits")
    assert not torch.allclose(logits_mode, first)
    calls = []
    encode_text = trainer.clip.encode_text
    monkeypatch.setattr(trainer.clip, "encode_text", lambda *a, **k: calls.append(1) or encode_text(*a, **k))
    one_image = infer(TEST_MODE="probs", N_SAMPLES=4, MAX_TEXT_BATCH=4 * len(trainer.classnames))
    assert len(calls) == 3 and torch.allclose(one_image, first, atol=1e-5)  # one image per call, same result


def test_initial_sigma(root, tmp_path):
    trainer = build(root, tmp_path, "TRAINER.VAMP.INIT_STD", "0.1")
    with torch.no_grad():
        post = trainer.nets.posterior_params(torch.randn(2, 64))
    for mu, logvar in post.values():
        assert torch.equal(mu, torch.zeros_like(mu))
        assert torch.allclose(logvar, torch.full_like(logvar, 2 * math.log(0.1)))


def test_la_loss_is_used_for_training(root, tmp_path):
    trainer = build(root, tmp_path, "TRAINER.LOSS", "la", "TRAINER.VAMP.VARIATIONAL", "False",
                    "TRAINER.MMRL.REG_WEIGHT", "0", "TRAINER.MMRL.SCALE", "1.0")
    assert_step_uses_la_loss(trainer)


def test_trains_with_prototypes_and_tests_on_new(root, tmp_path):
    out = tmp_path / "train_base"
    res = run_train(root, out, "VaMP", CONFIG, "OPTIM.MAX_EPOCH", "2", "OPTIM.LR", "0.003",
                    "DATALOADER.TRAIN_X.BATCH_SIZE", "8", "OPTIM.WARMUP_EPOCH", "0", "TRAINER.VAMP.N_SAMPLES", "1")
    assert res["epoch_losses"][-1] < res["epoch_losses"][0]
    assert_metrics(res["results"]["test"], 10, 200)
    ckpt = torch.load(out / "representation_learner" / "model.pth.tar-1", weights_only=False)
    protos = ckpt["extra"]["prototypes"]
    assert protos.shape == (10, 64) and torch.allclose(protos.norm(dim=-1), torch.ones(10), atol=1e-5)
    new = run_eval(root, tmp_path / "test_new", out, "VaMP", CONFIG, "TRAINER.VAMP.N_SAMPLES", "1")
    assert_metrics(new["results"]["test"], 10, 200, with_head_tail=False)


def test_prototypes_travel_with_the_checkpoint_and_are_not_recomputed_on_resume(root, tmp_path, monkeypatch):
    trainer = build(root, tmp_path / "a")
    trainer.before_train(resumed=False)
    labels = torch.tensor([d.label for d in trainer.dataset.train_x])
    assert trainer.prototypes.shape == (10, 64) and all((labels == c).any() for c in range(10))
    loader = trainer.dm.build_loader(trainer.dataset.train_x, 100, is_train=False)
    feats, ys = [], []
    with torch.no_grad():
        for batch in loader:
            feats.append(F.normalize(trainer.clip.encode_image(batch["img"]), dim=-1))
            ys.append(batch["label"])
    feats, ys = torch.cat(feats), torch.cat(ys)
    expected = F.normalize(torch.stack([feats[ys == c].mean(0) for c in range(10)]), dim=-1)
    assert torch.allclose(trainer.prototypes, expected, atol=1e-5)
    state = trainer.extra_checkpoint_state()
    resumed = build(root, tmp_path / "b")
    resumed.load_extra_checkpoint_state(state)
    monkeypatch.setattr(resumed, "class_prototypes", lambda *a: pytest.fail("prototypes recomputed"))
    resumed.before_train(resumed=True)
    assert torch.equal(resumed.prototypes, trainer.prototypes)
    new = build(root, tmp_path / "c", subsample="new")  # another class set never takes them
    new.load_extra_checkpoint_state(state)
    assert new.prototypes is None


@pytest.mark.parametrize("opts, message", [
    (["TRAINER.VAMP.PRIOR", "gaussian"], "TRAINER.VAMP.PRIOR must be one of"),
    (["TRAINER.VAMP.TEST_MODE", "median"], "TRAINER.VAMP.TEST_MODE must be one of"),
    (["TRAINER.VAMP.N_SAMPLES", "0"], "TRAINER.VAMP.N_SAMPLES must be >= 1"),
    (["TRAINER.VAMP.LAYERS", "[3]"], "TRAINER.VAMP.LAYERS \\[3\\] must be among TRAINER.MMRL.REP_LAYERS"),
    (["TRAINER.MMRL.REP_LAYERS", "[6, 13]"], "TRAINER.MMRL.REP_LAYERS must be distinct block indices in 1..12 .*got \\[6, 13\\]"),
    (["TRAINER.MMRL.TEST_BRANCH", "both"], "TRAINER.MMRL.TEST_BRANCH must be one of"),
    (["TRAINER.MMRL.REG_WEIGHT_BY_DATASET", "['0.5']"], "entries must look like 'DatasetName:value'"),
])
def test_bad_settings_give_clear_errors(root, tmp_path, opts, message):
    from engine.config import ConfigError
    with pytest.raises(ConfigError, match=message):
        build(root, tmp_path, *opts)


def test_test_time_sampling_follows_the_run_seed_as_well(root, tmp_path):
    """Both sources of test-time randomness matter: TEST_SEED (above) and the run's SEED."""
    torch.manual_seed(0)
    trainer = build(root, tmp_path, "TRAINER.VAMP.N_SAMPLES", "4")
    perturb(trainer, std=0.5)
    trainer.prototypes = None
    images = torch.randn(3, 3, 32, 32)

    def infer():
        trainer.before_test()
        with torch.no_grad():
            return trainer.model_inference(images)

    first = infer()
    assert torch.equal(infer(), first)
    trainer.cfg.defrost()
    trainer.cfg.SEED = trainer.cfg.SEED + 1
    assert not torch.allclose(infer(), first)


def test_run_seed_and_test_seed_pairs_never_share_samples(root, tmp_path):
    """(run 1, test 1) and (run 2, test 0) draw different test samples; test seed 0 keeps the run seed's."""
    torch.manual_seed(0)
    trainer = build(root, tmp_path, "TRAINER.VAMP.N_SAMPLES", "4")
    perturb(trainer, std=0.5)
    trainer.prototypes = None
    images = torch.randn(3, 3, 32, 32)
    trainer.cfg.defrost()
    trainer.vc.defrost()

    def infer(seed, test_seed):
        trainer.cfg.SEED, trainer.vc.TEST_SEED = seed, test_seed
        trainer.before_test()
        assert trainer.test_generator.initial_seed() == seed + test_seed * 1_000_003
        with torch.no_grad():
            return trainer.model_inference(images)

    assert not torch.allclose(infer(1, 1), infer(2, 0))
    assert torch.equal(infer(2, 0), infer(2, 0))


def test_micro_batched_step_equals_the_whole_batch(root, tmp_path):
    """5 images, 2 per part (2 + 2 + 1): loss, KL, gradients and updated parameters equal the unsplit step's."""
    images, labels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 3, 5, 9, 3])
    runs = []
    for split in (False, True):
        torch.manual_seed(0)
        t = build(root, tmp_path / str(split))
        if split:
            t = build(root, tmp_path / str(split), "TRAINER.VAMP.MAX_TEXT_SEQS_WITH_GRAD", str(2 * len(t.classnames)))
        perturb(t)
        t.prepare_benchmark({"img": images, "label": labels})
        t.set_model_mode("train")
        assert t.images_per_micro_batch(5) == (2 if split else 5)
        calls, original = [], t.clip.encode_text
        t.clip.encode_text = lambda tokens, hooks=None, **kw: (calls.append(torch.is_grad_enabled()),
                                                                  original(tokens, hooks, **kw))[1]
        torch.manual_seed(7)
        out = t.forward_backward({"img": images, "label": labels})
        assert sum(calls) == (3 if split else 1)  # text passes with gradient
        runs.append((out, {n: p.grad.clone() for n, p in t.nets.named_parameters() if p.grad is not None},
                     {n: p.detach().clone() for n, p in t.nets.named_parameters()}))
    (whole, g_whole, p_whole), (micro, g_micro, p_micro) = runs
    assert whole["kl"] > 0
    for key in ("loss", "kl", "ce_cls", "ce_rep", "reg_img", "reg_txt", "acc"):
        assert micro[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7), key
    assert g_whole and set(g_whole) == set(g_micro)
    for name, g in g_whole.items():
        assert torch.allclose(g, g_micro[name], rtol=1e-4, atol=1e-5 * float(g.abs().max())), name  # summation order
    for name, p in p_whole.items():  # round-off: up to 2.5e-7 on two threads (measured), 0 on one
        assert torch.allclose(p, p_micro[name], rtol=1e-5, atol=1e-6), name
