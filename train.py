"""Train or evaluate one method on one dataset split (CoOp / Dassl command line).

    python train.py --root DATA --seed 1 --trainer CoOp \
        --dataset-config-file configs/datasets/caltech101.yaml \
        --config-file configs/trainers/CoOp/vit_b16_ep50_ctxv1.yaml \
        --output-dir output/base2new_imb10/train_base/caltech101/CoOp/vit_b16_ep50_ctxv1/seed1 \
        DATASET.NUM_SHOTS 100 DATASET.SUBSAMPLE_CLASSES base DATASET.IMB_FACTOR 10

The command is one step of the run API (engine/runs.py: folder layout, skip / resume / refuse rules, the steps
of each regime); the scripts and the table launcher build the same steps there and pass --experiment and
--config-name, which results.json records (nothing is read back from the folder's name).
"""
import datasets  # noqa: F401  (registers every dataset)
import trainers  # noqa: F401  (registers every trainer and its config section)
from engine.cli import run_cli
from engine.runs import run

if __name__ == "__main__":
    run_cli(run)
