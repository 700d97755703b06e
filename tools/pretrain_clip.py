"""Contrastive pretraining of a small CLIP on the generated demo world (datasets/world.py).

    python -m tools.pretrain_clip [--name tiny-world] [--out FILE] [--steps N] [--seed S] ...

Draws a pool of world images once (``--pool``), then trains the ``WORLD_MODELS[name]`` architecture with
the symmetric InfoNCE loss and a learnable temperature on (image, caption) batches, a fresh caption per
image and step. Logs loss, temperature and zero-shot accuracy (plain "a photo of a <colour> <shape>." over
all 48 colour x shape classes, and "<colour> <pattern>" textures) on held-out images. Writes an OpenAI-format
state-dict checkpoint (the layout of ``ViT-B-16.pt``: ``clip.model.build_model`` rebuilds it, fp16 where
OpenAI's are) to ``--out`` (default: ``<weights folder>/<name>.pt``, found there by ``engine/clip_loader``),
plus ``<out>.json`` with the parameters, the sha256 and the zero-shot figures. Idempotent: when both exist
with the same parameters nothing is done (``--force`` retrains). Deterministic for a seed on one machine
and thread count (``--threads``: with two the image and text towers run side by side, each op on one thread,
which gives the same checkpoint as one thread; with more, each tower's ops use threads // 2, and the float
results, hence the hash, may depend on that count).
"""
import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets import world  # noqa: E402
from engine.checkpoint import atomic_torch_save, atomic_write_json  # noqa: E402
from engine.cli import UserError, require_at_least, run_cli  # noqa: E402
from engine.clip_loader import WORLD_MODELS, default_weight_dirs, load_clip, sha256_file  # noqa: E402
from engine.compat import import_clip  # noqa: E402

FORMAT_VERSION = 1
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_tensor(images):
    """uint8 (N, H, W, 3) -> CLIP-normalised float (N, 3, H, W), as the harness's test transform gives."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def encode_text(model, tokens):
    """``model.encode_text`` on sequences cut after the last EOT (exact under the causal mask)."""
    eot = tokens.argmax(dim=-1)
    n = int(eot.max()) + 1
    x = model.token_embedding(tokens[:, :n]) + model.positional_embedding[:n]
    mask = torch.full((n, n), float("-inf"), device=x.device).triu_(1)
    x = x.permute(1, 0, 2)
    for block in model.transformer.resblocks:
        h = block.ln_1(x)
        x = x + block.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        x = x + block.mlp(block.ln_2(x))
    x = model.ln_final(x.permute(1, 0, 2))
    return x[torch.arange(x.shape[0]), eot] @ model.text_projection


def eval_sets(seed, per_class):
    """Held-out zero-shot tasks: {task: (images tensor, labels, prompts)}."""
    rng = np.random.default_rng([seed, 7919])
    tasks = {}
    objects = [(f"{c} {s}", {"kind": "object", "colour": c, "shape": s, "pattern": "plain", "background": "plain"})
               for c in world.COLOURS for s in world.SHAPES]
    textures = [(f"{c} {p}", {"kind": "texture", "colour": c, "pattern": p})
                for c in world.COLOURS for p in world.PATTERNS[1:]]
    for task, classes, template in (("objects", objects, "a photo of a {}."),
                                    ("textures", textures, "a photo of a {} texture.")):
        specs, labels = [], []
        for label, (_, spec) in enumerate(classes):
            specs += [dict(spec, size=world.SIZES[rng.integers(2)]) for _ in range(per_class)]
            labels += [label] * per_class
        tasks[task] = (to_tensor(world.render(specs, rng)), torch.tensor(labels),
                       [template.format(name) for name, _ in classes])
    return tasks


# Read-outs of the 48-way object task: a prediction has the right shape (colour) when the predicted class
# shares the true class's shape (colour). Object classes are listed colour-major (see eval_sets).
N_SHAPES, N_COLOURS = len(world.SHAPES), len(world.COLOURS)


def chance_levels():
    """{read-out: chance accuracy in %} of every figure zero_shot returns."""
    return {"objects": 100.0 / (N_SHAPES * N_COLOURS), "shape": 100.0 / N_SHAPES, "colour": 100.0 / N_COLOURS,
            "textures": 100.0 / (N_COLOURS * (len(world.PATTERNS) - 1))}


def object_readouts(pred, labels):
    """Accuracy (%) of 48-way object predictions, and how often the predicted class has the true shape and
    the true colour (class index = colour * N_SHAPES + shape, as eval_sets lists them)."""
    pct = lambda hit: 100.0 * hit.float().mean().item()  # noqa: E731
    return {"objects": pct(pred == labels), "shape": pct(pred % N_SHAPES == labels % N_SHAPES),
            "colour": pct(pred // N_SHAPES == labels // N_SHAPES)}


@torch.no_grad()
def zero_shot(model, tasks, tokenize, text_encoder):
    """{read-out: top-1 accuracy in %}: each task's zero-shot accuracy with its prompts, plus, on the object
    task, how often the predicted class has the right shape and the right colour."""
    model.eval()
    out = {}
    for task, (images, labels, prompts) in tasks.items():
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(text_encoder(model, tokenize(prompts)), dim=-1)
        pred = (img @ txt.t()).argmax(-1)
        out.update(object_readouts(pred, labels) if task == "objects"
                   else {task: 100.0 * (pred == labels).float().mean().item()})
    model.train()
    return {k: out[k] for k in ("objects", "shape", "colour", "textures") if k in out}


# Attribute prompts (UniCL-style image-text-label contrast): every image also meets one short prompt per value
# of an attribute it has, and the prompts of the same attribute's other values are its negatives. All images
# of a batch that share a shape share its positive prompt, so shape gets a direct signal that the pair loss
# alone gives only through the few batch neighbours that differ in shape.
ATTRIBUTE_PROMPTS = {"shape": ("a photo of a {}.", world.SHAPES),
                     "colour": ("a photo of something {}.", tuple(world.COLOURS)),
                     "pattern": ("a photo of a {} texture.", world.PATTERNS[1:])}


def attribute_labels(specs):
    """{attribute: LongTensor of value indices (-1 where the image lacks the attribute)} for ``specs``."""
    labels = {}
    for attr, (_, values) in ATTRIBUTE_PROMPTS.items():
        keep = (lambda s: s["kind"] == "object") if attr == "shape" else (
            (lambda s: s["kind"] == "texture") if attr == "pattern" else (lambda s: True))
        labels[attr] = torch.tensor([values.index(s[attr]) if keep(s) else -1 for s in specs])
    return labels


def attribute_prompts():
    """{attribute: its prompts, one per value}, in ATTRIBUTE_PROMPTS's order."""
    return {attr: [template.format(v) for v in values] for attr, (template, values) in ATTRIBUTE_PROMPTS.items()}


def attribute_loss(model, img, labels, prompt_features):
    """Mean over the attributes present in the batch of the cross-entropy of each image against its
    attribute's prompts (``prompt_features``: {attribute: normalised text features of its prompts})."""
    losses = [F.cross_entropy(model.logit_scale.exp() * img @ prompt_features[attr].t(), labels[attr], ignore_index=-1)
              for attr in ATTRIBUTE_PROMPTS if (labels[attr] >= 0).any()]
    return sum(losses) / len(losses)


class CachedTokenizer:
    """``clip.tokenize`` with a cache per string: the world's captions come from a few templates and words,
    so after the first steps every caption is a lookup."""

    def __init__(self, tokenize):
        self.tokenize, self.rows = tokenize, {}

    def __call__(self, texts):
        missing = [t for t in dict.fromkeys(texts) if t not in self.rows]
        if missing:
            self.rows.update(zip(missing, self.tokenize(missing)))
        return torch.stack([self.rows[t] for t in texts])


def draw_batch(rng, pool, batch_size, groups, group_size):
    """Indices of one batch: ``batch_size`` distinct pool images at random, or (``groups``) whole contrast
    groups' members, ``group_size`` at random from each of randomly chosen groups (hard negatives: images
    that differ only in shape, or pattern, share the batch)."""
    if groups is None:
        return rng.choice(pool, batch_size, replace=False)
    idx = []
    for g in rng.permutation(len(groups)):
        members = groups[g]
        take = rng.choice(len(members), min(group_size, len(members)), replace=False)
        idx += [members[i] for i in take]
        if len(idx) >= batch_size:
            break
    return np.array(idx[:batch_size])


class Towers:
    """The image and the text tower of a step, each on its own thread when ``parallel``. The loss is built on
    detached tower outputs; its gradients are then pushed back through each tower separately. The towers
    share no parameter and every op runs single-threaded on its tower's thread, so the gradients, hence the
    checkpoint, are the same bit for bit whether the towers run one after the other or side by side."""

    def __init__(self, model, parallel):
        self.model = model
        self.pool = ThreadPoolExecutor(1) if parallel else None

    def _both(self, image_job, text_job):
        if self.pool is None:
            return image_job(), text_job()
        image = self.pool.submit(image_job)
        text = text_job()
        return image.result(), text

    def forward(self, images, tokens):
        return self._both(lambda: self.model.encode_image(images), lambda: encode_text(self.model, tokens))

    def backward(self, image, text):
        self._both(lambda: image[0].backward(image[1]), lambda: text[0].backward(text[1]))

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()


def param_groups(model, weight_decay):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim < 2 or "embedding" in name or name in ("logit_scale", "visual.class_embedding")
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def openai_state_dict(model):
    """The state dict in OpenAI's layout and dtypes (``clip.model.convert_weights``: fp16 linear, conv,
    attention and projection weights), so ``build_model`` reproduces it exactly."""
    clip = import_clip()
    copy = clip.model.CLIP(**model.arch)
    copy.load_state_dict(model.state_dict())
    clip.model.convert_weights(copy)
    return {k: v.detach().clone() for k, v in copy.state_dict().items()}


# The recipe (tools.pretrain_clip's defaults; the tests pass a fast setting). Measured in the README and in
# docs/world_benchmark.md: plain objects and hard-negative groups with attribute prompts teach shape, which
# independent draws of every attribute with the pair loss alone did not (20.8% shape after 240 steps).
RECIPE = dict(steps=800, batch_size=128, pool=8000, lr=1e-3, weight_decay=0.1, warmup=20, seed=0, eval_every=200,
              eval_per_class=10, threads=2, group_size=3, texture_fraction=0.2, plain_fraction=1.0,
              clutter_fraction=0.25, attribute_weight=3.0)


def pretrain(name="tiny-world", out="", steps=RECIPE["steps"], batch_size=RECIPE["batch_size"], pool=RECIPE["pool"],
             lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"], warmup=RECIPE["warmup"], seed=RECIPE["seed"],
             eval_every=RECIPE["eval_every"], eval_per_class=RECIPE["eval_per_class"], threads=RECIPE["threads"],
             group_size=RECIPE["group_size"], texture_fraction=RECIPE["texture_fraction"],
             plain_fraction=RECIPE["plain_fraction"], clutter_fraction=RECIPE["clutter_fraction"],
             attribute_weight=RECIPE["attribute_weight"], force=False, log=print):
    """Pretrain (or reuse) and return the sidecar record (dict) of the checkpoint."""
    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    previous = torch.get_num_threads()
    # Two or more threads: the two towers side by side, each op single-threaded (threads // 2 per tower);
    # one thread: the towers one after the other.
    torch.set_num_threads(max(1, threads // 2))
    try:
        return _pretrain(name, out, steps, batch_size, pool, lr, weight_decay, warmup, seed, threads, eval_every,
                         eval_per_class, group_size, texture_fraction, plain_fraction,
                         clutter_fraction, attribute_weight, force, log)
    finally:
        torch.set_num_threads(previous)


def _pretrain(name, out, steps, batch_size, pool, lr, weight_decay, warmup, seed, threads, eval_every, eval_per_class,
              group_size, texture_fraction, plain_fraction, clutter_fraction, attribute_weight, force,
              log):
    if name not in WORLD_MODELS:
        raise UserError(f"unknown world model '{name}'; known: {', '.join(WORLD_MODELS)}")
    if steps < 1 or batch_size < 2 or pool < batch_size:
        raise UserError(f"need steps >= 1, batch size >= 2 and pool >= batch size "
                        f"(got steps={steps}, batch size={batch_size}, pool={pool})")
    for flag, value in (("--eval-every", eval_every), ("--group-size", group_size)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--texture-fraction", texture_fraction), ("--plain-fraction", plain_fraction),
                        ("--clutter-fraction", clutter_fraction)):
        if not 0.0 <= value <= 1.0:
            raise UserError(f"{flag} must lie in [0, 1], got {value}")
    if attribute_weight < 0:
        raise UserError(f"--attribute-weight must be >= 0, got {attribute_weight}")
    out = Path(out).expanduser() if out else default_weight_dirs()[0] / WORLD_MODELS[name]["file"]
    meta_path = Path(str(out) + ".json")
    params = {"version": FORMAT_VERSION, "world_version": world.WORLD_VERSION, "name": name,
              "arch": WORLD_MODELS[name]["arch"], "steps": steps, "batch_size": batch_size, "pool": pool,
              "lr": lr, "weight_decay": weight_decay, "warmup": warmup, "seed": seed,
              "eval_per_class": eval_per_class, "group_size": group_size,
              "texture_fraction": texture_fraction, "plain_fraction": plain_fraction,
              "clutter_fraction": clutter_fraction, "attribute_weight": attribute_weight}
    if not force and out.is_file() and meta_path.is_file():
        record = json.loads(meta_path.read_text())
        if record.get("params") == params and record.get("sha256") == sha256_file(out):
            log(f"[pretrain] reusing {out} (same parameters; --force retrains)")
            return record

    clip = import_clip()
    t0 = time.time()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    arch = WORLD_MODELS[name]["arch"]
    model = clip.model.CLIP(**arch).float()
    model.arch = arch
    log(f"[pretrain] {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
        f"{threads} thread(s){' (one per tower)' if threads > 1 else ''}; drawing {pool} world images")
    mix = dict(texture_fraction=texture_fraction, plain_fraction=plain_fraction, clutter_fraction=clutter_fraction)
    if group_size > 1:
        specs, groups = world.sample_contrast_groups(rng, pool, **mix)
    else:
        specs, groups = world.sample_specs(rng, pool, **mix), None
    images = torch.cat([to_tensor(world.render(specs[i:i + 1000], rng)) for i in range(0, pool, 1000)])
    tasks = eval_sets(seed, eval_per_class)
    log(f"[pretrain] data ready in {time.time() - t0:.1f} s")

    # fused: one kernel for all parameters (the per-tensor loop cost more than the forward pass of the text tower)
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    tokenize = CachedTokenizer(clip.tokenize)
    prompts = attribute_prompts() if attribute_weight > 0 else {}
    prompt_texts = [t for texts in prompts.values() for t in texts]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    history = []
    towers = Towers(model, parallel=threads > 1)
    model.train()
    bar = tqdm(range(steps), desc=f"pretrain {name}", disable=not sys.stderr.isatty())
    for step in bar:
        idx = draw_batch(rng, pool, batch_size, groups, group_size)
        # One text pass for the batch's captions and every attribute prompt (one call instead of four).
        tokens = tokenize([world.caption(specs[i], rng) for i in idx] + prompt_texts)
        img, txt = towers.forward(images[torch.from_numpy(idx)], tokens)
        opt.zero_grad(set_to_none=True)
        img_out, txt_out = img.detach().requires_grad_(), txt.detach().requires_grad_()
        img_n, txt_n = F.normalize(img_out, dim=-1), F.normalize(txt_out, dim=-1)
        logits = model.logit_scale.exp() * img_n @ txt_n[:batch_size].t()
        target = torch.arange(batch_size)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
        if attribute_weight > 0:
            features = dict(zip(prompts, txt_n[batch_size:].split([len(v) for v in prompts.values()])))
            loss = loss + attribute_weight * attribute_loss(model, img_n, attribute_labels([specs[i] for i in idx]),
                                                            features)
        loss.backward()
        towers.backward((img, img_out.grad), (txt, txt_out.grad))
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            acc = zero_shot(model, tasks, clip.tokenize, encode_text)
            history.append({"step": step + 1, "loss": round(loss.item(), 4), "temperature":
                            round(1 / model.logit_scale.exp().item(), 4), **{f"zs_{k}": round(v, 2) for k, v in acc.items()},
                            "elapsed_s": round(time.time() - t0, 1)})
            line = "  ".join(f"{k} {v}" for k, v in history[-1].items())
            (bar.write if not bar.disable else log)(f"[pretrain] {line}")

    towers.close()
    atomic_torch_save(openai_state_dict(model), out)
    # Final figures come from the checkpoint as the harness loads it (engine/clip_loader, real-weights path).
    loaded = load_clip(name, str(out))
    final = zero_shot(loaded, tasks, clip.tokenize, encode_text)
    record = {"params": params, "sha256": sha256_file(out), "threads": threads,
              "seconds": round(time.time() - t0, 1), "zero_shot": {k: round(v, 2) for k, v in final.items()},
              "chance": {k: round(v, 2) for k, v in chance_levels().items()}, "history": history}
    atomic_write_json(record, meta_path)
    log(f"[pretrain] wrote {out} in {record['seconds']} s (sha256 {record['sha256'][:12]}); zero-shot "
        + ", ".join(f"{k} {v:.1f}% (chance {record['chance'][k]:.1f}%)" for k, v in record["zero_shot"].items()))
    return record


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default="tiny-world", help=f"world model ({', '.join(WORLD_MODELS)})")
    p.add_argument("--out", default="", help="checkpoint file (default: <first weights folder>/<name>.pt)")
    r = RECIPE
    p.add_argument("--steps", type=int, default=r["steps"])
    p.add_argument("--batch-size", type=int, default=r["batch_size"])
    p.add_argument("--pool", type=int, default=r["pool"], help="world images drawn once and reused")
    p.add_argument("--lr", type=float, default=r["lr"])
    p.add_argument("--weight-decay", type=float, default=r["weight_decay"])
    p.add_argument("--warmup", type=int, default=r["warmup"])
    p.add_argument("--seed", type=int, default=r["seed"])
    p.add_argument("--eval-every", type=int, default=r["eval_every"], help="steps between held-out zero-shot logs")
    p.add_argument("--group-size", type=int, default=r["group_size"],
                   help="hard negatives: batch members drawn per contrast group (one draw of every attribute, "
                        "the object in every shape, a texture in every pattern); 1 draws images independently")
    p.add_argument("--texture-fraction", type=float, default=r["texture_fraction"], help="share of textures in the pool")
    p.add_argument("--plain-fraction", type=float, default=r["plain_fraction"],
                   help="share of plain objects (the rest striped, dotted or checkered); the demo datasets' "
                        "objects are all plain")
    p.add_argument("--clutter-fraction", type=float, default=r["clutter_fraction"],
                   help="share of objects on a cluttered background")
    p.add_argument("--attribute-weight", type=float, default=r["attribute_weight"],
                   help="weight of the attribute-prompt loss (0: the image-caption pair loss alone)")
    p.add_argument("--threads", type=int, default=r["threads"], help="threads: 1 runs the towers in turn, 2 side by side (same checkpoint); more give each tower's "
                   "ops threads // 2 (the hash may depend on it)")
    p.add_argument("--force", action="store_true", help="retrain even when a matching checkpoint exists")
    a = require_at_least(p.parse_args(argv), eval_every=1, threads=1, warmup=0, seed=0)
    pretrain(a.name, a.out, a.steps, a.batch_size, a.pool, a.lr, a.weight_decay, a.warmup, a.seed, a.eval_every,
             threads=a.threads, group_size=a.group_size, texture_fraction=a.texture_fraction,
             plain_fraction=a.plain_fraction, clutter_fraction=a.clutter_fraction,
             attribute_weight=a.attribute_weight, force=a.force)
    return 0


if __name__ == "__main__":
    run_cli(main)
