"""Issue 18 §7: tests that fail when a knob is ignored, a key is misclassified or a cache serves a stale entry."""
import io
import math
import tarfile

import pytest
import torch

from tests import cli
from engine.config import get_cfg_default
from engine.run_identity import config_diff, flatten_config, run_neutral_keys
from tests.helpers_run import train_args
from tests.test_losses import hand_la_ce

# Pinned: a key added to the run-neutral keys (engine or a method's registry entry; a run folder then accepts another value for it) must be added here
# on purpose, with the reason it cannot change a result.
PINNED_RUN_NEUTRAL = {
    "OUTPUT_DIR", "RESUME", "VERBOSE", "USE_CUDA", "DATASET.ROOT", "DATASET.CACHE_DIR", "DATALOADER.NUM_WORKERS",
    "DATALOADER.TEST.BATCH_SIZE", "TRAIN.PRINT_FREQ", "TRAIN.CHECKPOINT_FREQ", "MODEL.TRUNCATE_TEXT",
    "MODEL.TEXT_PREFIX_CACHE", "MODEL.SHARED_TEXT_PREFIX", "MODEL.CLS_ONLY_LAST_VISION_BLOCK",
    "MODEL.SKIP_REPLACED_PROMPT_OUTPUTS", "MODEL.COMPILE_MLP",
    "TRAINER.LAMP.TEXT_CHUNK", "TRAINER.LAMP.MAX_TEXT_SEQS_WITH_GRAD", "TRAINER.VAMP.MAX_TEXT_SEQS_WITH_GRAD",
    "TRAINER.COCOOP.MAX_TEXT_BATCH",
    # exact in arithmetic (classes encoded in groups of similar length; tests/test_exact_speedups.py)
    "TRAINER.LAMP.TEXT_LENGTH_BUCKETS",
    # where the weights file lies: the weights themselves are identified by their sha256 (backbone.json,
    # engine.run_identity.check_backbone; tests/test_backbone_identity.py)
    "MODEL.BACKBONE.PATH",
}


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, (list, tuple)):
        return list(value) + ["x"]
    raise AssertionError(value)


def test_run_neutral_keys_are_pinned():
    assert run_neutral_keys() == PINNED_RUN_NEUTRAL


@pytest.mark.parametrize("key", sorted(flatten_config(get_cfg_default())))
def test_every_other_key_makes_a_different_run(key):
    """config_diff (what refuses resuming or re-evaluating into a folder of another config) reports every key
    outside the pinned run-neutral list, and none inside it."""
    stored = flatten_config(get_cfg_default())
    requested = dict(stored)
    requested[key] = _changed(stored[key])
    diff = config_diff(stored, requested)
    if key in PINNED_RUN_NEUTRAL:
        assert diff == []
    else:
        assert [d[0] for d in diff] == [key]


def test_hard_links_in_archives_are_refused(tmp_path):
    from tools import prepare_data as pd

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        data = b"x"
        info = tarfile.TarInfo("d/a.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("d/b.txt")
        link.type, link.linkname = tarfile.LNKTYPE, "/etc/passwd"
        tf.addfile(link)
    path = tmp_path / "a.tar.gz"
    path.write_bytes(buf.getvalue())
    with pytest.raises(pd.PrepareError, match="'d/b.txt' is a link"):
        pd.list_members(str(path))


@pytest.mark.parametrize("tau", [0.0, 0.5, 2.0])
def test_la_tau_reaches_the_trainers_loss(root, tmp_path, tau):
    """TRAINER.LA_TAU is the tau of the loss the trainer computes (hand-computed), not a default."""
    args = train_args(root, tmp_path / "run", "CoOp", "vit_b16_ep50_ctxv1.yaml", "TRAINER.LOSS", "la",
                      "TRAINER.LA_TAU", str(tau))
    t = cli.build_trainer(cli.build_cfg(cli.parse_args(args)))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, t.num_classes, generator=g)
    labels = torch.randint(0, t.num_classes, (6,), generator=g)
    expected = hand_la_ce(logits.tolist(), labels.tolist(), t.dataset.train_counts, tau)
    assert t.compute_loss(logits, labels).item() == pytest.approx(expected, rel=1e-5)


def _prefix(enc, tokens, n_blocks, shared=False):
    out = enc._text_prefix(tokens, n_blocks, shared)
    return out.materialize() if hasattr(out, "materialize") else out


@pytest.mark.parametrize("change", ["tokens", "n_blocks", "batch"])
def test_the_text_prefix_cache_never_serves_another_entry(tiny, change):
    """Each part of the cache key matters: a cached prefix equals a fresh computation for the new request."""
    a = tiny.tokenize(["a photo of a red circle.", "a photo of a blue square."])
    b = {"tokens": tiny.tokenize(["a photo of a green star.", "a photo of a pink ring."]), "n_blocks": a,
         "batch": tiny.tokenize(["a photo of a red circle."])}[change]
    blocks = 4 if change == "n_blocks" else 3
    with torch.no_grad():
        tiny.clear_text_cache()
        _prefix(tiny, a, 3)
        served = _prefix(tiny, b, blocks)
        tiny.clear_text_cache()
        fresh = _prefix(tiny, b, blocks)
        tiny.clear_text_cache()
    assert served.shape == fresh.shape and torch.equal(served, fresh)


def test_results_json_metrics_match_an_independent_recomputation(root, tmp_path):
    """A trained CoOp run's results.json against metrics recomputed here from the saved model: predictions from
    model_inference over the test images, then accuracy, per-class recall, head / tail accuracy by hand and
    macro-F1 by sklearn (not through engine.metrics)."""
    import json

    import numpy as np
    from sklearn.metrics import f1_score

    from tests.helpers_run import run_train

    opts = ("OPTIM.MAX_EPOCH", "2", "OPTIM.WARMUP_EPOCH", "0", "OPTIM.LR", "0.05")
    res = run_train(root, tmp_path / "run", "CoOp", "vit_b16_ep50_ctxv1.yaml", *opts)["results"]["test"]
    args = train_args(root, tmp_path / "again", "CoOp", "vit_b16_ep50_ctxv1.yaml", *opts)
    t = cli.build_trainer(cli.build_cfg(cli.parse_args(args)))
    t.load_model(str(tmp_path / "run"))
    t.set_model_mode("eval")
    t.before_test()
    y_true, y_pred = [], []
    with torch.no_grad():
        for b in t.dm.test_loader:
            y_pred += t.model_inference(b["img"]).argmax(1).tolist()
            y_true += b["label"].tolist()
    y_true, y_pred = np.array(y_true), np.array(y_pred)
    head = set(json.loads((tmp_path / "run" / "manifest.json").read_text())["head_labels"])
    in_head = np.array([y in head for y in y_true])
    recalls = [(y_pred[y_true == c] == c).mean() for c in sorted(set(y_true))]
    assert res["num_samples"] == len(y_true)
    assert res["accuracy"] == pytest.approx(100 * (y_true == y_pred).mean())
    assert res["mean_class_acc"] == pytest.approx(100 * np.mean(recalls))
    assert res["macro_f1"] == pytest.approx(100 * f1_score(y_true, y_pred, average="macro", labels=sorted(set(y_true)),
                                                            zero_division=0))
    assert res["head_acc"] == pytest.approx(100 * (y_true == y_pred)[in_head].mean())
    assert res["tail_acc"] == pytest.approx(100 * (y_true == y_pred)[~in_head].mean())
    assert 0 < res["accuracy"] < 100  # not a degenerate case where every formula agrees


# ---- switches that no other test turned (each test fails when its switch is ignored)

def _build(root, out, trainer, config, *opts, subsample="base"):
    args = train_args(root, out, trainer, config, *opts, subsample=subsample)
    return cli.build_trainer(cli.build_cfg(cli.parse_args(args)))


def test_lfa_new_test_map_chooses_the_map_on_new_classes(root, tmp_path):
    config = "vit_b16_b2n_beta0.9.yaml"
    ema = _build(root, tmp_path / "a", "LFA", config, subsample="new")
    refined = _build(root, tmp_path / "b", "LFA", config, "TRAINER.LFA.NEW_TEST_MAP", "refined", subsample="new")
    assert ema.eval_map() is ema.map.weight_ema and refined.eval_map() is refined.map.weight
    base = _build(root, tmp_path / "c", "LFA", config)  # base classes: always the refined map
    assert base.eval_map() is base.map.weight


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_lamp_gamma_schedule(root, tmp_path, schedule):
    t = _build(root, tmp_path, "LAMP", "vit_b16_lt_b2n.yaml", "TRAINER.LAMP.GAMMA0", "0.004",
               "TRAINER.LAMP.GAMMA_SCHEDULE", schedule)
    t.lamp.global_step.fill_(25)
    expected = {"cosine": 0.004 * 0.5 * (1 + math.cos(math.pi * 25 / 100)), "constant": 0.004}[schedule]
    assert t.lamp.gamma(100) == pytest.approx(expected)


def test_candle_virtual_prototype_init(root, tmp_path):
    config = "vit_b16_bs128_lr0.0003_ep50.yaml"
    text = _build(root, tmp_path / "t", "Candle", config)
    text.before_train(resumed=False)
    assert torch.equal(text.head.virtual_prototypes.detach(), text.head.text_features[10:])
    torch.manual_seed(0)
    visual = _build(root, tmp_path / "v", "Candle", config, "TRAINER.CANDLE.VIR_INIT", "visual",
                    "TRAINER.CANDLE.VIR_INIT_STD", "0.0")
    visual.before_train(resumed=False)
    mean_base = visual.head.visual_prototypes.mean(dim=0)
    virtual = visual.head.virtual_prototypes.detach()
    assert virtual.shape[0] == 10 and torch.allclose(virtual, mean_base.expand_as(virtual), atol=1e-6)


def test_candle_use_new_names_adds_the_new_classes_to_training(root, tmp_path):
    config = "vit_b16_bs128_lr0.0003_ep50.yaml"
    on = _build(root, tmp_path / "on", "Candle", config)
    off = _build(root, tmp_path / "off", "Candle", config, "TRAINER.CANDLE.USE_NEW_NAMES", "False")
    assert on.trained_names == list(on.dataset.all_classnames) and len(on.class_counts) == 20
    assert off.trained_names == list(off.classnames) and len(off.class_counts) == 10
    assert off.head.virtual_prototypes.numel() == 0
