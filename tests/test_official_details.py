"""Issue 8 section 4: details that follow the official baselines (configs, templates, CoOp's init phrase)."""
import argparse
from pathlib import Path

import pytest
import torch

from engine.config import ConfigError, build_cfg, get_cfg_default
from trainers.common import frozen_text_features, init_context
from trainers.coop import CoOpPromptLearner
from trainers.tcp import TCPPromptLearner

OFFICIAL = Path(__file__).resolve().parent / "fixtures" / "official_yamls"
REPO = Path(__file__).resolve().parents[1]
NAMES = ["red circle", "blue square", "green star"]


def _cfg(trainer, config_file, *opts):
    return build_cfg(argparse.Namespace(trainer=trainer, config_file=str(config_file), dataset_config_file="",
                                        opts=list(opts), root="", output_dir="", seed=1))


def test_official_yamls_load_unchanged(capsys):
    coop = _cfg("CoOp", OFFICIAL / "CoOp_vit_b16_ep50.yaml")
    assert coop.OPTIM.NAME == "sgd" and coop.OPTIM.MAX_EPOCH == 50
    cocoop = _cfg("CoCoOp", OFFICIAL / "CoCoOp_vit_b16_c4_ep10_batch1_ctxv1.yaml")
    assert cocoop.TRAINER.COCOOP.N_CTX == 4 and cocoop.TRAINER.COCOOP.CTX_INIT == "a photo of a"
    maple = _cfg("MaPLe", OFFICIAL / "MaPLe_vit_b16_c2_ep5_batch4_2ctx.yaml")
    assert maple.TRAINER.MAPLE.PROMPT_DEPTH == 9 and maple.OPTIM.LR == 0.0035
    capsys.readouterr()
    # MMA: the official section name TRAINER.MMADAPTER is read as ours, one notice per key.
    mma = _cfg("MMA", OFFICIAL / "MMA_vit_b16_ep5.yaml")
    assert (mma.TRAINER.MMA.ADAPTER_DIM, mma.TRAINER.MMA.ADAPTER_SCALE, mma.TRAINER.MMA.ADAPTER_START) == (32, 0.001, 5)
    err = capsys.readouterr().err
    assert "TRAINER.MMADAPTER.ADAPTER_DIM" in err and "read as TRAINER.MMA.ADAPTER_DIM" in err
    assert len(err.strip().splitlines()) == 6
    # TCP: CTX_INIT False, and the official script's TRAINER.COOP opts (W is its consistency weight).
    tcp = _cfg("TCP", OFFICIAL / "TCP_vit_b16_ep100_ctxv1.yaml", "TRAINER.COOP.N_CTX", "4", "TRAINER.COOP.CSC",
               "False", "TRAINER.COOP.W", "8.0", "TRAINER.COOP.CLASS_TOKEN_POSITION", "end")
    assert tcp.TRAINER.TCP.CTX_INIT == "" and tcp.TRAINER.TCP.N_CTX == 4 and tcp.TRAINER.TCP.KG_WEIGHT == 8.0
    assert tcp.OPTIM.ADAM_EPS == 1e-8 and tcp.OPTIM.NAME == "adam"
    err = capsys.readouterr().err
    assert "TRAINER.COOP.W (from command line opts) is read as TRAINER.TCP.KG_WEIGHT" in err
    assert "TRAINER.COOP.CTX_INIT" in err
    # The same TRAINER.COOP keys stay CoOp's own for a CoOp run.
    coop = _cfg("CoOp", OFFICIAL / "CoOp_vit_b16_ep50.yaml", "TRAINER.COOP.N_CTX", "8")
    assert coop.TRAINER.COOP.N_CTX == 8 and "note:" not in capsys.readouterr().err


def test_tcp_config_uses_the_official_adam_eps():
    cfg = _cfg("TCP", REPO / "configs/trainers/TCP/vit_b16_ep50_ctx4.yaml")
    assert cfg.OPTIM.ADAM_EPS == 1e-8


def _tcp(tiny, dataset_name, dataset_template):
    c = get_cfg_default().TRAINER.TCP
    return TCPPromptLearner(tiny, NAMES, dataset_template, c, dataset_name=dataset_name)


@pytest.mark.parametrize("dataset, coop_template, prompt, zs", [
    ("StanfordCars", "a photo of a {}.", "X X X X {}, a type of car", "a photo of a {}."),
    ("UCF101", "a photo of a person doing {}.", "X X X X person doing {}.", "a photo of a person doing {}."),
    ("FGVCAircraft", "a photo of a {}, a type of aircraft.", "X X X X {}, a type of aircraft.",
     "a photo of an aircraft {}."),
    ("DescribableTextures", "{} texture.", "X X X X {} texture.", "a photo of a {}, a type of texture."),
    ("Food101", "a photo of {}, a type of food.", "X X X X {}, a type of food.", "a photo of a {}, a type of food."),
    ("SyntheticShapes", "a photo of a {}.", "X X X X {}.", "a photo of a {}."),  # not in TCP's tables
])
def test_tcp_templates_per_dataset(tiny, dataset, coop_template, prompt, zs):
    tcp = _tcp(tiny, dataset, coop_template)
    expected = tiny.tokenize([prompt.format(n) for n in NAMES])
    assert torch.equal(tcp.tokens, expected)
    assert torch.allclose(tcp.zs_features, frozen_text_features(tiny, zs, NAMES), atol=1e-6)
    if zs != coop_template:
        assert not torch.allclose(tcp.zs_features, frozen_text_features(tiny, coop_template, NAMES), atol=1e-3)


def test_coop_csc_with_init_phrase_is_refused_and_length_counts_words(tiny):
    with pytest.raises(ConfigError, match="TRAINER.COOP.CSC True with TRAINER.COOP.CTX_INIT"):
        CoOpPromptLearner(tiny, NAMES, 16, "a photo of a", True, "end")
    phrase = "a photo of zxqvjk"  # the last word is several BPE tokens
    n_tokens = int(tiny.tokenize([phrase]).argmax(dim=-1)) - 1
    assert n_tokens > 4
    assert init_context(tiny, 16, phrase)[0].shape[0] == n_tokens
    learner = CoOpPromptLearner(tiny, NAMES, 16, phrase, False, "end")
    assert learner.ctx.shape[0] == 4  # the official code: n_ctx = number of words
    assert torch.equal(learner.ctx.detach(), tiny.token_embedding(tiny.tokenize([phrase]))[0, 1:5].float())
    # the phrase's remaining tokens stay as fixed text after the context
    assert torch.equal(learner.tokens, tiny.tokenize([f"{phrase} {n}." for n in NAMES]))


@pytest.mark.parametrize("dataset", ["ImageNet", "ImageNetSketch", "ImageNetV2", "ImageNetA", "ImageNetR"])
def test_lfa_imagenet_uses_the_official_8_template_ensemble(tiny, dataset):
    from trainers.lfa import IMAGENET_TEMPLATES, lfa_text_features
    assert len(IMAGENET_TEMPLATES) == 8 and "itap of a {}." in IMAGENET_TEMPLATES
    per_template = [frozen_text_features(tiny, t, NAMES) for t in IMAGENET_TEMPLATES]
    expected = torch.nn.functional.normalize(torch.stack(per_template).mean(0), dim=-1)
    got = lfa_text_features(tiny, dataset, "a photo of a {}.", NAMES)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, per_template[0], atol=1e-3)  # not the single template
    single = lfa_text_features(tiny, "Caltech101", "a photo of a {}.", NAMES)
    assert torch.allclose(single, per_template[0], atol=1e-6)
