"""How a run's training steps are laid out (``Schedule``) and the micro-batched step strategy."""


class Schedule:
    """The training steps of a run.

    ``epochs`` engine epochs; in each, one step per batch of the training loader, or, with
    ``steps_per_epoch``, that many full-batch steps that read their own data (the step gets no batch).
    ``lr_step``: the LR schedulers step once per ``"epoch"`` (Dassl) or once per ``"step"``.
    ``seed_each_step``: re-seed torch before every step from (seed, step), as the loop re-seeds every epoch,
    so a step's random draws do not depend on how many steps ran before it in this process."""

    def __init__(self, epochs, steps_per_epoch=None, lr_step="epoch", seed_each_step=False):
        if epochs < 0 or (steps_per_epoch is not None and steps_per_epoch < 1):
            raise ValueError(f"a schedule needs epochs >= 0 and steps_per_epoch >= 1, got {epochs}, {steps_per_epoch}")
        if lr_step not in ("epoch", "step"):
            raise ValueError(f"lr_step must be 'epoch' or 'step', got {lr_step!r}")
        self.epochs, self.steps_per_epoch = int(epochs), steps_per_epoch
        self.lr_step, self.seed_each_step = lr_step, seed_each_step

    @classmethod
    def full_batch_steps(cls, steps):
        """One epoch of ``steps`` full-batch steps, the LR stepped and torch re-seeded before each (LFA)."""
        return cls(1, steps_per_epoch=steps, lr_step="step", seed_each_step=True)

    def batches(self, loader):
        """What the loop iterates in one epoch: the loader, or ``steps_per_epoch`` empty batches."""
        return loader if self.steps_per_epoch is None else [None] * self.steps_per_epoch


def micro_batches(n, per_part):
    """(slice, share of the batch) for parts of at most ``per_part`` of ``n`` items."""
    for start in range(0, n, per_part):
        part = slice(start, min(start + per_part, n))
        yield part, (part.stop - part.start) / n


def micro_batched_step(trainer, n, per_part, part_loss):
    """One optimizer step over a batch of ``n`` items taken in parts of at most ``per_part``.

    ``part_loss(part)`` returns (loss, scalars) for the items ``part`` (a slice) under autocast; each part's
    loss is weighted by its share of the batch before backward, so the accumulated gradient equals that of
    the whole batch (exact up to float summation order). Returns the scalars (floats), each weighted by the
    parts' shares: the batch's mean when they are means over the part."""
    trainer.model_zero_grad()
    totals = {}
    for part, share in micro_batches(n, per_part):
        with trainer.autocast():
            loss, scalars = part_loss(part)
        trainer.model_backward(loss * share)
        for key, value in scalars.items():
            totals[key] = totals.get(key, 0.0) + (value.item() if hasattr(value, "item") else value) * share
    trainer.model_update()
    return totals
