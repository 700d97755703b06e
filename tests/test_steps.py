"""Issue 19 §4: the loop's step strategies (engine/steps.py): micro-batched steps and schedules."""
import pytest
import torch

from tests import cli
from engine.steps import Schedule, micro_batches
from tests.helpers_run import train_args


def test_micro_batches_cover_the_batch_with_shares_summing_to_one():
    parts = list(micro_batches(7, 3))
    assert [(p.start, p.stop) for p, _ in parts] == [(0, 3), (3, 6), (6, 7)]
    assert [s for _, s in parts] == pytest.approx([3 / 7, 3 / 7, 1 / 7])
    assert [(p.start, p.stop) for p, _ in micro_batches(4, 10)] == [(0, 4)]


def test_a_schedule_rejects_impossible_layouts():
    with pytest.raises(ValueError, match="steps_per_epoch"):
        Schedule(1, steps_per_epoch=0)
    with pytest.raises(ValueError, match="lr_step"):
        Schedule(3, lr_step="batch")
    steps = Schedule.full_batch_steps(5)
    assert (steps.epochs, steps.lr_step, steps.seed_each_step) == (1, "step", True)
    assert steps.batches(["a", "b"]) == [None] * 5 and Schedule(2).batches(["a", "b"]) == ["a", "b"]


def _cocoop(root, out, *opts):
    args = train_args(root, out, "CoCoOp", "vit_b16_c4_ep10_batch1_ctxv1.yaml", *opts)
    torch.manual_seed(0)
    return cli.build_trainer(cli.build_cfg(cli.parse_args(args)))


def _text_calls_with_grad(trainer):
    calls, original = [], trainer.clip.encode_text

    def counting(tokens, hooks=None, **kw):
        if torch.is_grad_enabled():
            calls.append(hooks.ctx.shape[0])  # images in this call (their C class sequences each)
        return original(tokens, hooks, **kw)

    trainer.clip.encode_text = counting
    return calls


def test_cocoop_training_step_in_micro_batches_equals_the_whole_batch(root, tmp_path):
    """MAX_TEXT_BATCH bounds the B*C text sequences of a training step too: the image batch is taken in parts
    whose gradients accumulate into one optimizer step, equal to the whole batch's."""
    whole = _cocoop(root, tmp_path / "a")
    split = _cocoop(root, tmp_path / "b", "TRAINER.COCOOP.MAX_TEXT_BATCH", "20")  # 10 classes: 2 images a call
    split.prompt_learner.load_state_dict(whole.prompt_learner.state_dict())
    batch = {"img": torch.randn(6, 3, 32, 32), "label": torch.tensor([0, 3, 5, 9, 2, 2])}
    grads, outs = [], []
    for trainer in (whole, split):
        calls = _text_calls_with_grad(trainer)
        trainer.set_model_mode("train")
        outs.append(trainer.forward_backward(batch))
        grads.append([p.grad.clone() for p in trainer.prompt_learner.parameters()])
        trainer.calls = calls
    assert whole.calls == [6] and split.calls == [2, 2, 2]
    assert outs[1]["loss"] == pytest.approx(outs[0]["loss"], rel=1e-5)
    assert outs[1]["acc"] == pytest.approx(outs[0]["acc"], abs=1e-9)
    for g_whole, g_split in zip(*grads):
        assert torch.allclose(g_whole, g_split, rtol=1e-4, atol=1e-7)
    for a, b in zip(whole.prompt_learner.parameters(), split.prompt_learner.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)  # one optimizer step each, to the same weights
