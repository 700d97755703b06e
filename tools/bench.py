"""Benchmark one training step of a trainer on random data: trainable parameters, ms/step, peak memory.
(A trainer with no trainable parameters, e.g. ZeroshotCLIP, gets its inference step timed instead.)

    python -m tools.bench --trainer CoOp --backbone ViT-B/16-random --batch 4 --classes 50
    python -m tools.bench --trainer LAMP --params-only
    python -m tools.bench --trainer LAMP MODEL.TEXT_PREFIX_CACHE False MODEL.TRUNCATE_TEXT False

Without --config-file the trainer's default config (its registry entry's base-to-new config)
is used. Images and labels are random tensors; class names are real object names of 1-3 words (so the
shared text prefix is the template only, as on real datasets).

Memory: "activation" is what one training step saves for backward (bytes of the tensors autograd keeps,
counted by ``saved_tensors_hooks``; device independent) and, on the process level, peak minus the memory
resident before the first step (RSS on CPU, which includes the allocator's caching; allocated memory on CUDA). Text sequences per step are counted
at the encoder. With ``--estimate-for BxC`` a second, smaller class set is measured too, which separates the
bytes per text sequence from the per-image part, and the peak for B images and C classes is estimated as
model + trainable state (grad, two optimizer moments) + B x per-image bytes + per-sequence bytes x the
sequences one backward pass holds (LAMP: its micro-batch under MAX_TEXT_SEQS_WITH_GRAD).
FLOPs: one step (forward and backward; the optimizer update is elementwise and not counted) is counted with
``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and attention; CPU flash attention counted
with torch's own SDPA formulas); a square matmul at the step's dtype (fp32, bf16, or fp16 for CUDA amp), timed
in the same process, gives the GEMM peak that the achieved GFLOP/s (FLOPs / median step time) is a share of.
A benchmark, not a test: numbers depend on the machine.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils import flop_counter

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from engine.cli import run_cli  # noqa: E402
from engine.clip_loader import RANDOM_ARCHS  # noqa: E402
from engine.config import build_cfg  # noqa: E402
from engine.checkpoint import atomic_write_json  # noqa: E402
from engine.registry import TRAINER_REGISTRY  # noqa: E402


NAMES = ("face", "leopard", "motorbike", "accordion", "airplane", "anchor", "ant", "barrel", "bass", "beaver",
         "binocular", "bonsai", "brain", "brontosaurus", "buddha", "butterfly", "camera", "cannon", "car side",
         "ceiling fan", "cellphone", "chair", "chandelier", "cougar body", "cougar face", "crab", "crayfish",
         "crocodile", "crocodile head", "cup", "dalmatian", "dollar bill", "dolphin", "dragonfly", "electric guitar",
         "elephant", "emu", "euphonium", "ewer", "ferry", "flamingo", "flamingo head", "garfield", "gerenuk",
         "gramophone", "grand piano", "hawksbill", "headphone", "hedgehog", "helicopter")  # Caltech101 names


def class_names(n, offset=0):
    """n distinct names; past the list, a number is appended ("leopard 2")."""
    out = []
    for i in range(offset, offset + n):
        name = NAMES[i % len(NAMES)]
        out.append(name if i < len(NAMES) else f"{name} {i // len(NAMES)}")
    return out


class BenchDataset:
    """In-memory stand-in with the attributes trainers read (no images on disk)."""

    def __init__(self, num_classes, num_new=None):
        from datasets.base import Datum
        num_new = num_classes if num_new is None else num_new
        self.classnames = class_names(num_classes)
        self.new_classnames = class_names(num_new, offset=num_classes)
        self.base_classnames = list(self.classnames)
        self.all_classnames = self.classnames + self.new_classnames
        self.num_classes = num_classes
        self.lab2cname = dict(enumerate(self.classnames))
        self.template = "a photo of a {}."
        self.train_counts = [max(1, int(100 * 10 ** (-i / max(1, num_classes - 1)))) for i in range(num_classes)]
        self.head_labels = list(range(max(1, num_classes // 5)))
        self.tail_labels = list(range(len(self.head_labels), num_classes))
        self.train_x = [Datum(impath=f"class{i}.png", label=i, classname=n) for i, n in enumerate(self.classnames)]
        self.val = list(self.train_x)
        self.test = list(self.train_x)
        self.manifest = {}


def default_config_file(trainer_name):
    name = TRAINER_REGISTRY.info(trainer_name).default_config
    return str(REPO_ROOT / "configs" / "trainers" / trainer_name / f"{name}.yaml") if name else ""


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def saved_activation_bytes(step_fn):
    """Bytes of the tensors autograd saves for backward during ``step_fn`` (each storage counted once)."""
    seen, total = set(), [0]

    def pack(t):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen and storage.nbytes() > 0:
            seen.add(key)
            total[0] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step_fn()
    return total[0]


def count_text_sequences(trainer, step_fn):
    """Text sequences that went through the encoder with gradient during ``step_fn``."""
    counts, original = [], trainer.clip.encode_text

    def counting(tokens, hooks=None, **kw):
        out = original(tokens, hooks, **kw)
        if torch.is_grad_enabled():
            counts.append((out[0] if isinstance(out, tuple) else out).shape[0])
        return out

    trainer.clip.encode_text = counting
    try:
        step_fn()
    finally:
        trainer.clip.encode_text = original
    return sum(counts)


# CPU flash attention is missing from torch's FLOP registry; its cost is that of the other SDPA kernels.
def _cpu_flash_flops(query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_flash_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flops,
}
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "amp": torch.float16}


def count_flops(step_fn):
    """FLOPs of one call of ``step_fn`` (forward and backward, as far as it runs them)."""
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)
    with counter:
        step_fn()
    return counter.get_total_flops()


def gemm_peak_flops(device, dtype, size=2048, repeats=10, budget_s=3.0):
    """(FLOP/s, FLOP per process-CPU-second) of the fastest of up to ``repeats`` (size x size) @ (size x size)
    matmuls at ``dtype`` after one warm-up; at least two are timed, more while ``budget_s`` lasts (one slow
    matmul, e.g. when another process takes the core, then does not set the peak)."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    best, best_cpu = float("inf"), float("inf")
    start = time.perf_counter()
    for i in range(repeats + 1):
        if i > 2 and time.perf_counter() - start > budget_s:
            break
        if device.type == "cuda":
            torch.cuda.synchronize()
        tic, cpu_tic = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            best = min(best, time.perf_counter() - tic)
            best_cpu = min(best_cpu, time.process_time() - cpu_tic)
    return 2 * size ** 3 / best, 2 * size ** 3 / max(best_cpu, 1e-9)


def utilisation(flops, ms_per_step, peak, dtype_name):
    """The figures and the one-line summary of a step's FLOPs against the measured GEMM peak."""
    achieved = flops / (ms_per_step / 1000)
    line = (f"utilisation: {flops / 1e9:.1f} GFLOP/step, {achieved / 1e9:.1f} GFLOP/s = {100 * achieved / peak:.0f}% "
            f"of the measured {dtype_name} GEMM peak ({peak / 1e9:.1f} GFLOP/s)")
    return {"flops_per_step": flops, "achieved_flops_per_s": achieved, "gemm_peak_flops_per_s": peak,
            "gemm_peak_dtype": dtype_name, "peak_share": achieved / peak}, line


# torch.profiler's aten ops by class (self time, so a composite op is not counted twice with its kernels).
OP_CLASSES = (
    ("GEMM", ("mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "convolution", "_convolution",
              "mkldnn_convolution", "convolution_backward", "conv2d", "einsum", "_mkldnn_matmul")),
    ("attention", ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
                   "_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_flash_attention",
                   "_scaled_dot_product_flash_attention_backward", "_scaled_dot_product_efficient_attention",
                   "_scaled_dot_product_efficient_attention_backward", "_scaled_dot_product_cudnn_attention",
                   "_scaled_dot_product_cudnn_attention_backward", "_flash_attention_forward",
                   "_flash_attention_backward", "_efficient_attention_forward", "_efficient_attention_backward")),
    ("copies", ("copy_", "_to_copy", "to", "clone", "contiguous", "cat", "stack", "index", "index_select",
                "index_put_", "_index_put_impl_", "index_add_", "repeat", "repeat_interleave", "gather", "scatter",
                "scatter_add_", "fill_", "zero_", "zeros", "zeros_like", "empty", "empty_like", "new_zeros",
                "ones_like", "new_empty_strided", "empty_strided", "slice_backward", "select_backward")),
)
VIEWS = ("view", "_unsafe_view", "reshape", "_reshape_alias", "transpose", "permute", "expand", "slice", "select",
         "unsqueeze", "squeeze", "t", "as_strided", "split", "split_with_sizes", "chunk", "narrow", "unbind",
         "detach", "alias", "flatten", "unflatten", "lift_fresh", "numpy_T", "expand_as", "view_as", "result_type")
ELEMENTWISE = "softmax / LayerNorm / elementwise"
PROFILE_ORDER = ("GEMM", "attention", ELEMENTWISE, "copies", "other")


def op_class(name):
    """The class of a profiler event: an aten op by name (any other aten op counts as elementwise: softmax,
    LayerNorm, activations, reductions, and their backward); views (no data moved: dispatch cost), autograd and
    Python frames are 'other'."""
    op = name[len("aten::"):]
    if not name.startswith("aten::") or op in VIEWS:
        return "other"
    for cls, ops in OP_CLASSES:
        if op in ops:
            return cls
    return ELEMENTWISE


def profile_step(step_fn, device):
    """Self time (ms) of one ``step_fn`` by op class, and the ten costliest ops."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step_fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    by_class, ops = dict.fromkeys(PROFILE_ORDER, 0.0), []
    for event in prof.key_averages():
        us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        by_class[op_class(event.key)] += us / 1000
        ops.append((us / 1000, event.key))
    top = [{"op": name, "ms": ms} for ms, name in sorted(ops, reverse=True)[:10] if ms > 0]
    return by_class, top


def build_trainer(args, config_file, num_classes, out):
    size_opts = []
    if args.backbone in RANDOM_ARCHS:  # random archs have their own input resolution (tiny: 32 px)
        res = RANDOM_ARCHS[args.backbone]["image_resolution"]
        size_opts = ["INPUT.SIZE", f"({res}, {res})"]
    ns = argparse.Namespace(root="", seed=1, trainer=args.trainer, config_file=config_file,
                            dataset_config_file="", output_dir=out,
                            opts=["MODEL.BACKBONE.NAME", args.backbone, "DATALOADER.TRAIN_X.BATCH_SIZE",
                                  str(args.batch), "DATALOADER.NUM_WORKERS", "0"] + size_opts
                            + list(args.opts or []))
    cfg = build_cfg(ns)
    return TRAINER_REGISTRY.get(args.trainer)(cfg, dataset=BenchDataset(num_classes))


def random_batch(trainer, batch, classes, seed=0):
    res = trainer.clip.clip.visual.input_resolution
    gen = torch.Generator().manual_seed(seed)
    return {"img": torch.randn(batch, 3, res, res, generator=gen),
            "label": torch.randint(0, classes, (batch,), generator=gen), "index": torch.arange(batch)}


def parse_size(text):
    try:
        b, c = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--estimate-for takes BxC (images x classes), e.g. 32x1000; got '{text}'")
    return b, c


def estimate_peak(trainer, per_seq, per_image, batch, classes, text_per_image=True):
    """Bytes: the model, the trainable state, and one backward pass's activations for (batch, classes);
    ``text_per_image``: every image has its own class sequences (else one text pass over the classes)."""
    model = sum(p.numel() * p.element_size() for p in trainer.clip.parameters())
    trainable = sum(p.numel() * p.element_size() for m in trainer._models.values() for p in m.parameters()
                    if p.requires_grad)
    images = batch
    hook = TRAINER_REGISTRY.info(trainer.cfg.TRAINER.NAME).bench_images_per_backward
    if hook is not None:
        images = hook(trainer, batch, classes)
    seqs = (images * classes if text_per_image else classes) if per_seq else 0
    return model + 4 * trainable + images * per_image + seqs * per_seq, images, seqs


def benchmark_step(trainer, args):
    """(step kind, step function) of a trainer built by ``build_trainer``: a training step on a random batch,
    prepared as the method's registry entry says; a method with nothing to train (zero-shot CLIP) has no
    training step, so its inference is timed instead."""
    batch = random_batch(trainer, args.batch, args.classes)
    trainer.set_model_mode("train")
    prepare = TRAINER_REGISTRY.info(args.trainer).bench_prepare
    if prepare is not None:
        prepare(trainer, batch)
    if trainer.count_trainable_parameters():
        return "training", lambda: trainer.forward_backward(batch)
    trainer.set_model_mode("eval")
    trainer.before_test()
    return "inference", torch.no_grad()(lambda: trainer.model_inference(batch["img"].to(trainer.device)))


def timed_step(step_fn, device):
    """(wall ms, process CPU ms) of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    tic, cpu_tic = time.perf_counter(), time.process_time()
    step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - tic) * 1000, (time.process_time() - cpu_tic) * 1000


def compare_steps(args, config_file, out):
    """--versus: the step with the given opts against the step with ``opts + versus``, two trainers in one
    process with their steps alternated (A B B A ...), so that both see the same machine state."""
    versus = args.versus.split()
    if not versus or len(versus) % 2:
        raise ValueError(f"--versus takes KEY VALUE pairs in one string, got '{args.versus}'")
    sides = []
    for i, extra in enumerate(([], versus)):
        side_args = argparse.Namespace(**{**vars(args), "opts": list(args.opts or []) + extra})
        trainer = build_trainer(side_args, config_file, args.classes, os.path.join(out, str(i)))
        sides.append((trainer, *benchmark_step(trainer, side_args)))
    for _ in range(args.warmup):
        for trainer, _, step_fn in sides:
            step_fn()
    times = [[], []]
    for r in range(args.steps):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            times[i].append(timed_step(sides[i][2], sides[i][0].device))
    wall = [statistics.median(t[0] for t in side) for side in times]
    cpu = [statistics.median(t[1] for t in side) for side in times]
    figures = {"trainer": args.trainer, "config": os.path.basename(config_file), "backbone": args.backbone,
               "device": str(sides[0][0].device), "precision": sides[0][0].precision, "batch": args.batch,
               "classes": args.classes, "opts": list(args.opts or []), "versus": versus, "step_kind": sides[0][1],
               "steps_each": args.steps, "ms_per_step": wall[0], "versus_ms_per_step": wall[1],
               "speedup": wall[0] / wall[1], "cpu_ms_per_step": cpu[0], "versus_cpu_ms_per_step": cpu[1],
               "threads": torch.get_num_threads()}
    print(f"trainer            {args.trainer} ({os.path.basename(config_file)}), {args.backbone} on "
          f"{sides[0][0].device} ({sides[0][0].precision}), batch {args.batch}, {args.classes} classes")
    print(f"same run           {args.steps} {sides[0][1]} steps of each, alternated (A B B A ...), "
          f"{args.warmup} warm-up each, {torch.get_num_threads()} threads")
    print(f"ms / step          {wall[0]:.1f} as given; {wall[1]:.1f} with {' '.join(versus)}")
    print(f"speed-up           {wall[0] / wall[1]:.3f}x (process CPU time: {cpu[0] / cpu[1]:.3f}x)")
    if not args.timing_only:
        flops = [count_flops(step_fn) for _, _, step_fn in sides]
        figures.update(flops_per_step=flops[0], versus_flops_per_step=flops[1])
        print(f"GFLOP / step       {flops[0] / 1e9:.1f} as given; {flops[1] / 1e9:.1f} with the versus opts "
              f"({flops[0] / flops[1]:.3f}x)")
    if args.out:
        atomic_write_json(figures, args.out)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trainer", required=True)
    p.add_argument("--backbone", default="ViT-B/16-random")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--classes", type=int, default=50)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--config-file", default="")
    p.add_argument("--params-only", action="store_true", help="print only the trainable parameter count")
    p.add_argument("--estimate-for", type=parse_size, default=None, metavar="BxC",
                   help="also estimate the peak memory of a training step with B images and C classes")
    p.add_argument("--profile", action="store_true",
                   help="profile one step (torch.profiler) by op class: GEMM, attention, softmax / LayerNorm / "
                        "elementwise, copies")
    p.add_argument("--timing-only", action="store_true",
                   help="time the step and read the peak memory only: no FLOP count, sequence count or activation "
                        "bytes (each of those runs the step again)")
    p.add_argument("--peak-size", type=int, default=2048, help="matrix size of the GEMM peak micro-benchmark")
    p.add_argument("--out", default="", help="also write the figures as JSON to this file")
    p.add_argument("--versus", default="", metavar="'KEY VALUE ...'",
                   help="compare the step with these config opts added against the step without them: both trainers "
                        "in one process, steps alternated; prints both step times, the speed-up and the FLOP ratio")
    p.add_argument("opts", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)

    import trainers  # noqa: F401
    TRAINER_REGISTRY.get(args.trainer)  # an unknown trainer: one line naming the registered ones
    if args.timing_only and (args.profile or args.estimate_for):
        raise ValueError("--timing-only measures the step time and peak memory only: it takes neither --profile "
                         "nor --estimate-for")
    if args.batch < 1 or args.classes < 1 or args.steps < 1 or args.warmup < 0 or args.peak_size < 1:
        raise ValueError(f"--batch, --classes, --steps and --peak-size must be >= 1 and --warmup >= 0, got "
                         f"{args.batch}, {args.classes}, {args.steps}, {args.peak_size}, {args.warmup}")
    if args.versus and (args.profile or args.estimate_for or args.params_only):
        raise ValueError("--versus compares step times and FLOPs only: it takes neither --profile, --estimate-for "
                         "nor --params-only")
    config_file = args.config_file or default_config_file(args.trainer)
    with tempfile.TemporaryDirectory() as out:
        if args.versus:
            return compare_steps(args, config_file, out)
        trainer = build_trainer(args, config_file, args.classes, out)
        n_params = trainer.count_trainable_parameters()
        if args.params_only:
            print(n_params)
            return 0
        step_kind, step_fn = benchmark_step(trainer, args)
        times, cpu_times = [], []
        resident = current_memory_mb(trainer.device)  # model, data and optimizer, before any step
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for step in range(args.warmup + args.steps):
            wall_ms, cpu_ms = timed_step(step_fn, trainer.device)
            if step >= args.warmup:
                times.append(wall_ms)
                cpu_times.append(cpu_ms)
        peak = peak_memory_mb(trainer.device)
        figures = {"trainer": args.trainer, "config": os.path.basename(config_file), "backbone": args.backbone,
                   "device": str(trainer.device), "precision": trainer.precision, "batch": args.batch,
                   "classes": args.classes, "opts": list(args.opts or []), "trainable_params": n_params,
                   "step_kind": step_kind, "ms_per_step": statistics.median(times), "ms_min": min(times),
                   "ms_max": max(times), "cpu_ms_per_step": statistics.median(cpu_times), "peak_mb": peak,
                   "resident_mb": resident, "threads": torch.get_num_threads()}
        print(f"trainer            {args.trainer} ({os.path.basename(config_file) or 'registered defaults'})")
        print(f"backbone           {args.backbone} on {trainer.device} ({trainer.precision})")
        print(f"batch / classes    {args.batch} / {args.classes}")
        print(f"trainable params   {n_params:,}")
        print(f"ms / {step_kind} step {statistics.median(times):.1f} (median of {len(times)}, "
              f"min {min(times):.1f}, max {max(times):.1f}; {args.warmup} warm-up)")
        print(f"CPU ms / step      {statistics.median(cpu_times):.1f} (process CPU time over {torch.get_num_threads()} "
              f"threads; steadier than wall time on a shared machine)")
        kind = "CUDA allocated" if trainer.device.type == "cuda" else "process RSS"
        print(f"peak memory        {peak:.0f} MiB ({kind}); resident before the first step {resident:.0f} MiB; "
              f"activation (peak - resident) {peak - resident:.0f} MiB")
        if args.timing_only:
            if args.out:
                atomic_write_json(figures, args.out)
            return 0
        dtype_name = "fp16" if trainer.precision == "amp" else trainer.precision
        gemm_peak, gemm_per_cpu_s = gemm_peak_flops(trainer.device, PRECISION_DTYPES[trainer.precision], args.peak_size)
        flops = count_flops(step_fn)
        util, line = utilisation(flops, statistics.median(times), gemm_peak, dtype_name)
        figures.update(util)
        print(line)
        if trainer.device.type == "cpu":  # CPU seconds the process got: what other processes take is left out
            share = (flops / (statistics.median(cpu_times) / 1000)) / gemm_per_cpu_s
            figures["peak_share_cpu_time"] = share
            print(f"utilisation by process CPU time: {100 * share:.0f}% of the {dtype_name} GEMM's FLOP per CPU-second "
                  f"(steadier than wall time on a shared machine)")
        if args.profile:
            by_class, top = profile_step(step_fn, trainer.device)
            total = sum(by_class.values()) or 1.0
            figures.update(profile_ms_by_class=by_class, profile_top_ops=top)
            print("profile (self time of one step by op class): " + "; ".join(
                f"{cls} {ms:.1f} ms ({100 * ms / total:.0f}%)" for cls, ms in by_class.items()))
            print("costliest ops: " + "; ".join(f"{t['op']} {t['ms']:.1f} ms" for t in top[:6]))
        if n_params:
            seqs = count_text_sequences(trainer, step_fn)
            saved = saved_activation_bytes(step_fn)
            figures.update(text_seqs_per_step=seqs, saved_activation_bytes=saved)
            print(f"text seqs / step   {seqs:,} (with gradient)")
            print(f"saved activations  {saved / 2**20:.1f} MiB per step (tensors kept for backward)")
            if args.estimate_for:
                small = max(1, args.classes // 2)
                other = build_trainer(args, config_file, small, out)
                other.set_model_mode("train")
                other_batch = random_batch(other, args.batch, small)
                if hasattr(other, "prepare_benchmark"):
                    other.prepare_benchmark(other_batch)
                other_step = lambda: other.forward_backward(other_batch)  # noqa: E731
                seqs_small, saved_small = count_text_sequences(other, other_step), saved_activation_bytes(other_step)
                per_seq = (saved - saved_small) / (seqs - seqs_small) if seqs != seqs_small else 0.0
                per_image = (saved - per_seq * seqs) / args.batch
                b, c = args.estimate_for
                text_per_image = seqs != args.classes or args.batch == 1  # CoOp-like: C sequences per step
                total, images, held = estimate_peak(trainer, per_seq, per_image, b, c, text_per_image)
                figures.update(activation_bytes_per_seq=per_seq, activation_bytes_per_image=per_image,
                               estimate_for=[b, c], estimated_peak_bytes=total, estimate_images_per_backward=images,
                               estimate_text_seqs_per_backward=held)
                print(f"activation / seq   {per_seq / 2**20:.3f} MiB per text sequence; {per_image / 2**20:.1f} MiB "
                      f"per image (measured at {args.classes} and {small} classes)")
                held_text = f"{images} images x {c} classes = " if text_per_image else ""
                print(f"estimated peak for B={b}, C={c}: {total / 2**30:.1f} GiB ({held_text}{held:,} text sequences "
                      f"per backward pass; {trainer.precision})")
        if args.out:
            atomic_write_json(figures, args.out)
    return 0


if __name__ == "__main__":
    run_cli(main)
