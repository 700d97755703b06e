"""TensorBoard scalars of a run, in ``<run>/tensorboard/`` (Dassl's place for them).

The writer opens on the first scalar (``torch.utils.tensorboard`` needs the ``tensorboard`` package, pinned in
requirements.txt), so a trainer that never runs the loop (tools.bench, tests of one step) writes nothing."""
import math
import os

TENSORBOARD_DIR = "tensorboard"


class ScalarLog:
    def __init__(self, output_dir):
        self.folder = os.path.join(output_dir, TENSORBOARD_DIR) if output_dir else None
        self.writer = None

    def scalars(self, values, step):
        """Write ``{tag: number}`` at ``step``; None and non-finite values are skipped."""
        if self.folder is None:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=self.folder)
        for tag, value in values.items():
            if value is not None and math.isfinite(float(value)):
                self.writer.add_scalar(tag, float(value), step)

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
