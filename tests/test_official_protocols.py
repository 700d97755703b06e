"""Issue 17, §5: the settings each paper's numbers came from, and the official names that must load.

MMRL's cross-dataset protocol as yunncheng/MMRL's scripts run it (cross_datasets_{train,test}.sh pass
TRAINER.MMRL.REG_WEIGHT 0.2, the test script also TRAINER.MMRL.REP_DIM 512, both after the per-dataset table);
MMA's balanced few-shot numbers from its official config (batch 16, ImageNet 128); official key / trainer
names (TRAINER.MMRL.ALPHA, MultiModalAdapter, the scripts' TASK opt)."""
import argparse
from pathlib import Path

import pytest
import yaml

import trainers  # noqa: F401  (registers the trainers, their config sections and aliases)
from engine.config import ConfigError, build_cfg
from engine.registry import TRAINER_REGISTRY
from tools.tables import build_plan, load_spec
from trainers.mmrl import resolve_settings

REPO = Path(__file__).resolve().parents[1]
OFFICIAL = Path(__file__).resolve().parent / "fixtures" / "official_yamls"
XD_TARGETS = ["caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft", "sun397",
              "dtd", "eurosat", "ucf101"]
DG_TARGETS = ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]


def _cfg(trainer, config, dataset=None, *opts):
    config = Path(config)
    if not config.is_file():
        config = REPO / "configs" / "trainers" / trainer / f"{config}.yaml"
    ds = str(REPO / "configs" / "datasets" / f"{dataset}.yaml") if dataset else ""
    return build_cfg(argparse.Namespace(trainer=trainer, config_file=str(config), dataset_config_file=ds,
                                        opts=list(opts), root="", output_dir="", seed=1))


@pytest.mark.parametrize("trainer", ["MMRL", "VaMP"])
def test_cross_dataset_runs_as_the_official_scripts(trainer):
    """lambda 0.2 on the ImageNet source (the table says 0.5); d_r 512 for the source and every target,
    EuroSAT included (the table says 2048), so every target loads the source checkpoint."""
    src = _cfg(trainer, "vit_b16_xd", "imagenet")
    rep_dim, reg_weight, branch = resolve_settings(src.TRAINER.MMRL, src.DATASET.NAME)
    assert (rep_dim, reg_weight, branch) == (512, 0.2, "auto")
    for target in XD_TARGETS + DG_TARGETS:
        cfg = _cfg(trainer, "vit_b16_xd", target)
        assert resolve_settings(cfg.TRAINER.MMRL, cfg.DATASET.NAME)[0] == rep_dim, target
    # the base-to-new configs keep the official per-dataset table (unchanged logits and gradients there)
    b2n = _cfg(trainer, "vit_b16_b2n", "eurosat")
    assert resolve_settings(b2n.TRAINER.MMRL, "EuroSAT")[:2] == (2048, 0.01)
    assert resolve_settings(_cfg(trainer, "vit_b16_b2n_imagenet", "imagenet").TRAINER.MMRL, "ImageNet")[:2] == (512, 0.5)


@pytest.mark.parametrize("value", [-2.5, 0.0, 3.0])
def test_an_explicit_reg_weight_is_used_as_given(value):
    """Only the sentinel -1 means "by dataset"; -2.5 used to be recorded in config.yaml while lambda 1.0 was used."""
    cfg = _cfg("MMRL", "vit_b16_b2n", "dtd", "TRAINER.MMRL.REG_WEIGHT", str(value))
    assert cfg.TRAINER.MMRL.REG_WEIGHT == value
    assert resolve_settings(cfg.TRAINER.MMRL, cfg.DATASET.NAME)[1] == value
    table = _cfg("MMRL", "vit_b16_b2n", "dtd")
    assert table.TRAINER.MMRL.REG_WEIGHT == -1.0 and resolve_settings(table.TRAINER.MMRL, "DescribableTextures")[1] == 6.0


def test_official_mmrl_key_alpha_and_script_opts_load_unchanged(capsys):
    """The current official key ALPHA is our SCALE; the cross-dataset scripts' opts (TASK CD included) load."""
    train_opts = ["DATASET.NUM_SHOTS", "16", "TRAINER.MMRL.REG_WEIGHT", "0.2", "TASK", "CD"]
    test_opts = train_opts[:4] + ["TRAINER.MMRL.REP_DIM", "512", "TASK", "CD"]
    src = _cfg("MMRL", "vit_b16_xd", "imagenet", *train_opts, "TRAINER.MMRL.ALPHA", "0.6")
    assert src.TRAINER.MMRL.SCALE == 0.6 and src.TRAINER.MMRL.TASK == "CD" and src.DATASET.NUM_SHOTS == 16
    assert resolve_settings(src.TRAINER.MMRL, "ImageNet") == (512, 0.2, "auto")
    tgt = _cfg("MMRL", "vit_b16_b2n", "eurosat", *test_opts)
    assert resolve_settings(tgt.TRAINER.MMRL, "EuroSAT") == (512, 0.2, "auto")
    err = capsys.readouterr().err
    assert "TRAINER.MMRL.ALPHA (from command line opts) is read as TRAINER.MMRL.SCALE" in err
    assert "TASK (from command line opts) is read as TRAINER.MMRL.TASK" in err
    # the few-shot script's TASK FS: the official test uses the fusion branch
    fs = _cfg("VaMP", "vit_b16_b2n", "dtd", "TASK", "FS")
    assert resolve_settings(fs.TRAINER.MMRL, "DescribableTextures")[2] == "fusion"
    with pytest.raises(ConfigError, match="TRAINER.MMRL.TASK"):
        resolve_settings(_cfg("MMRL", "vit_b16_b2n", "dtd", "TASK", "XD").TRAINER.MMRL, "DescribableTextures")


def test_alpha_in_a_config_file(tmp_path):
    text = (REPO / "configs/trainers/MMRL/vit_b16_b2n.yaml").read_text().replace("SCALE: 0.7", "ALPHA: 0.55")
    assert "ALPHA: 0.55" in text
    (tmp_path / "official.yaml").write_text(text.replace("../../base/", f"{REPO}/configs/base/"))  # its _BASE_ from here
    assert _cfg("MMRL", tmp_path / "official.yaml", "dtd").TRAINER.MMRL.SCALE == 0.55


def test_mma_official_trainer_name_is_accepted(capsys):
    cfg = _cfg("MultiModalAdapter", OFFICIAL / "MMA_vit_b16_ep5.yaml", "dtd", "DATASET.NUM_SHOTS", "16",
               "DATASET.SUBSAMPLE_CLASSES", "base")
    assert cfg.TRAINER.NAME == "MMA" and cfg.TRAINER.MMA.ADAPTER_DIM == 32 and cfg.DATALOADER.TRAIN_X.BATCH_SIZE == 16
    assert "note: trainer MultiModalAdapter is read as MMA" in capsys.readouterr().err
    assert TRAINER_REGISTRY.get("MultiModalAdapter") is TRAINER_REGISTRY.get("MMA")
    assert "MultiModalAdapter" in TRAINER_REGISTRY


def _batch(unit):
    path = REPO / "configs" / "trainers" / unit.row.trainer / f"{unit.config}.yaml"
    return yaml.safe_load(path.read_text())["DATALOADER"]["TRAIN_X"]["BATCH_SIZE"]


@pytest.mark.parametrize("name", ["table2", "table12_15", "table12", "table15"])
def test_mma_in_the_balanced_tables_uses_its_official_batch(name):
    units = [u for u in build_plan(load_spec(name), "o").units if u.row.trainer == "MMA"]
    assert units
    for u in units:
        assert _batch(u) == (128 if u.steps[0].dataset == "imagenet" else 16), (u.key, _batch(u))


@pytest.mark.parametrize("name", ["table1", "table3", "table9", "table10"])
def test_mma_in_the_lt_tables_keeps_batch_4_and_says_so(name):
    spec = load_spec(name)
    units = [u for u in build_plan(spec, "o").units if u.row.trainer == "MMA"]
    assert units and all(_batch(u) == 4 for u in units)
    assert any("MMA" in n and "batch 4" in n for n in spec.notes), spec.notes
