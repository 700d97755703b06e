"""What a run writes besides checkpoints: the resolved config, the backbone weights' hash, the data manifest and
``results.json`` (all atomically), and the refusal to overwrite a finished run."""
import datetime
import os
import subprocess
from pathlib import Path

from engine.checkpoint import atomic_write_json
from engine.checkpointing import RunError
from engine.clip_loader import backbone_identity
from engine.config import dump_cfg
from engine.run_identity import write_backbone

REPO_ROOT = Path(__file__).resolve().parents[1]


def code_version():
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


class RunFiles:
    def __init__(self, cfg, run_info=None):
        self.cfg = cfg
        self.output_dir = cfg.OUTPUT_DIR
        self.run_info = dict(run_info or {})

    @property
    def backbone(self):
        """The backbone weights this run loads (``backbone_identity``; the file is hashed once per process)."""
        return backbone_identity(self.cfg.MODEL.BACKBONE.NAME, self.cfg.MODEL.BACKBONE.PATH)

    @property
    def results_path(self):
        return os.path.join(self.output_dir, "results.json")

    def refuse_finished(self, advice):
        if os.path.isfile(self.results_path):
            raise RunError(f"{self.output_dir} already holds {advice}")

    def write_run_files(self, manifest):
        os.makedirs(self.output_dir, exist_ok=True)
        write_backbone(self.output_dir, self.backbone)   # before config.yaml, which marks the folder as a run
        dump_cfg(self.cfg, os.path.join(self.output_dir, "config.yaml"))
        if manifest:
            atomic_write_json(manifest, os.path.join(self.output_dir, "manifest.json"))

    def write_results(self, results, manifest, fields, extras):
        """``results.json``: the run's identity (config, data, loss, backbone), the trainer's ``fields``
        (counts, losses, time), the manifest hash and code version, ``results`` by split, then the
        method's ``extras``."""
        cfg = self.cfg
        payload = {
            "trainer": cfg.TRAINER.NAME,
            "dataset": cfg.DATASET.NAME,
            "config": self.run_info.get("config", ""),
            "experiment": self.run_info.get("experiment", ""),
            "seed": cfg.SEED,
            "subsample_classes": cfg.DATASET.SUBSAMPLE_CLASSES,
            "imb_factor": float(cfg.DATASET.IMB_FACTOR),
            "num_shots": cfg.DATASET.NUM_SHOTS,
            "loss": cfg.TRAINER.LOSS,
            "backbone": cfg.MODEL.BACKBONE.NAME,
            "backbone_sha256": self.backbone["sha256"],
        }
        payload.update(fields)
        payload.update({"manifest_hash": (manifest or {}).get("hash", ""), "code_version": code_version(),
                        "finished": datetime.datetime.now().isoformat(timespec="seconds"), "results": results})
        payload.update(extras)
        atomic_write_json(payload, self.results_path)
        return payload
