"""One prompt-aware CLIP encoder that every method plugs into.

The frozen CLIP blocks are run layer by layer (batch-first, attention through
``scaled_dot_product_attention``). A method changes the computation only through ``TowerHooks``:

- ``embed(x, state)``: the embedding stage. Text: token embeddings before the positional embedding
  (replace tokens, or expand the batch; the length must stay). Vision: [cls; patches] + positional
  embedding, before ``ln_pre`` (tokens may be inserted or appended).
- ``before_block(layer, x, state)``: the sequence entering block ``layer`` (1-indexed): read the cls /
  EOT state, insert or replace prompt tokens.
- ``adapter(layer, x_ln1)``: an extra residual branch of block ``layer`` computed from ``ln_1(x)``;
  its output is added to the block output.

``TowerState.eot`` holds the text read-out positions; the token helpers below keep it in step when
tokens are inserted. Layers before ``hooks.start_layer`` see no prompt, so for text their output depends
on the tokens only and is cached; text sequences are cut after the last EOT token (exact under the
causal mask).
"""
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.compat import import_clip


class TowerState:
    """Per-forward state shared with the hooks of one tower."""

    def __init__(self, tower, eot=None):
        self.tower = tower
        self.eot = eot            # (N,) read-out positions (text only)
        self.n_inserted = 0       # tokens inserted after cls / BOT so far
        self.records = {}         # free space for hooks (e.g. retrieval indices)


class TowerHooks:
    """No-op hooks; methods subclass this. ``start_layer`` = first layer the hooks change
    (0 = the embedding stage, l = before block l); everything before it is prompt-free."""

    start_layer = 0

    def embed(self, x, state):
        return x

    def before_block(self, layer, x, state):
        return x

    def adapter(self, layer, x_ln1):
        return None


# ---- token helpers for hooks --------------------------------------------------------------------

def _broadcast_batch(tokens, n):
    return tokens.expand(n, -1, -1) if tokens.shape[0] == 1 and n != 1 else tokens


def insert_after_first(x, tokens, state):
    """Insert ``tokens`` (N or 1, n, D) right after position 0 (cls / BOT); shift the EOT read-out."""
    tokens = _broadcast_batch(tokens.to(x.dtype), x.shape[0])
    n = tokens.shape[1]
    if state.eot is not None:
        state.eot = state.eot + n
    state.n_inserted += n
    return torch.cat([x[:, :1], tokens, x[:, 1:]], dim=1)


def replace_after_first(x, tokens):
    """Replace positions 1..n with ``tokens`` (N or 1, n, D)."""
    tokens = _broadcast_batch(tokens.to(x.dtype), x.shape[0])
    n = tokens.shape[1]
    return torch.cat([x[:, :1], tokens, x[:, 1 + n:]], dim=1)


def append_tokens(x, tokens, state):
    """Append ``tokens`` at the end of the sequence (MaPLe's visual prompts)."""
    tokens = _broadcast_batch(tokens.to(x.dtype), x.shape[0])
    state.n_inserted += tokens.shape[1]
    return torch.cat([x, tokens], dim=1)


def replace_last(x, tokens):
    tokens = _broadcast_batch(tokens.to(x.dtype), x.shape[0])
    return torch.cat([x[:, : x.shape[1] - tokens.shape[1]], tokens], dim=1)


def repeat_batch(x, state, times):
    """(N, L, D) -> (times*N, L, D), image-major: row b*N + c is sequence c for image b."""
    if state.eot is not None:
        state.eot = state.eot.repeat(times)
    return x.repeat(times, 1, 1)


# ---- the encoder --------------------------------------------------------------------------------

class PromptedCLIP(nn.Module):
    """Frozen CLIP with hook points. ``clip_model`` is a ``clip.model.CLIP``."""

    def __init__(self, clip_model, truncate_text=True, cache_text_prefix=True, cache_size=8):
        super().__init__()
        self.clip = clip_model
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self.truncate_text = truncate_text
        self.cache_text_prefix = cache_text_prefix
        self._cache_size = cache_size
        self._text_cache = OrderedDict()
        visual = clip_model.visual
        self.is_vit = hasattr(visual, "transformer")
        self.text_width = clip_model.ln_final.weight.shape[0]
        self.embed_dim = clip_model.text_projection.shape[1]
        self.n_text_layers = len(clip_model.transformer.resblocks)
        self.vision_width = visual.conv1.out_channels if self.is_vit else None
        self.n_vision_layers = len(visual.transformer.resblocks) if self.is_vit else None
        self.context_length = clip_model.context_length

    # -- properties used by methods
    @property
    def dtype(self):
        return self.clip.dtype

    @property
    def logit_scale(self):
        return self.clip.logit_scale.exp()

    def tokenize(self, texts):
        return import_clip().tokenize(texts, context_length=self.context_length)

    def token_embedding(self, tokens):
        return self.clip.token_embedding(tokens).type(self.dtype)

    def train(self, mode=True):
        # CLIP has no dropout / batch-norm in the ViT path; keep it in eval mode regardless.
        super().train(mode)
        self.clip.eval()
        return self

    def clear_text_cache(self):
        self._text_cache.clear()

    # -- blocks
    @staticmethod
    def _attention(mha, h, causal):
        n, length, width = h.shape
        heads = mha.num_heads
        q, k, v = F.linear(h, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(n, length, heads, width // heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out = out.transpose(1, 2).reshape(n, length, width)
        return F.linear(out, mha.out_proj.weight, mha.out_proj.bias)

    def _run_block(self, block, x, causal, hooks, layer):
        h = block.ln_1(x)
        y = x + self._attention(block.attn, h, causal)
        y = y + block.mlp(block.ln_2(y))
        if hooks is not None:
            extra = hooks.adapter(layer, h)
            if extra is not None:
                y = y + extra
        return y

    def _run_blocks(self, blocks, x, causal, hooks, state, first, last):
        """Run blocks ``first..last`` (1-indexed, inclusive)."""
        for layer in range(first, last + 1):
            if hooks is not None:
                x = hooks.before_block(layer, x, state)
            x = self._run_block(blocks[layer - 1], x, causal, hooks, layer)
        return x

    # -- vision
    def encode_image(self, images, hooks=None, return_state=False):
        """Image features (B, embed_dim), not normalized."""
        visual = self.clip.visual
        images = images.type(self.dtype)
        if not self.is_vit:
            if hooks is not None:
                raise ValueError("vision hooks need a ViT backbone; ResNet CLIP supports text-only methods")
            out = visual(images)
            return (out, TowerState("vision")) if return_state else out
        state = TowerState("vision")
        x = visual.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        if hooks is not None:
            x = hooks.embed(x, state)
        x = visual.ln_pre(x)
        x = self._run_blocks(visual.transformer.resblocks, x, False, hooks, state, 1, self.n_vision_layers)
        state.last_hidden = x  # the final sequence, for read-outs besides cls (MMRL's representation tokens)
        out = visual.ln_post(x[:, 0, :])
        if visual.proj is not None:
            out = out @ visual.proj
        return (out, state) if return_state else out

    # -- text
    def _text_prefix(self, tokens, n_blocks):
        """Output of the first ``n_blocks`` prompt-free text blocks (batch-first), cached by tokens."""
        key = None
        if self.cache_text_prefix:
            key = (n_blocks, tuple(tokens.shape), str(tokens.device), self.dtype,
                   torch.is_autocast_enabled(tokens.device.type),
                   hash(tokens.cpu().numpy().tobytes()))
            hit = self._text_cache.get(key)
            if hit is not None:
                self._text_cache.move_to_end(key)
                return hit
        with torch.no_grad():
            x = self.token_embedding(tokens) + self.clip.positional_embedding[: tokens.shape[1]].type(self.dtype)
            x = self._run_blocks(self.clip.transformer.resblocks, x, True, None, None, 1, n_blocks)
        if key is not None:
            self._text_cache[key] = x
            while len(self._text_cache) > self._cache_size:
                self._text_cache.popitem(last=False)
        return x

    def encode_text(self, tokens, hooks=None, return_state=False):
        """Text features (N, embed_dim), not normalized. ``tokens``: (C, context_length) from ``tokenize``.
        Hooks may expand the batch (N = times * C) and insert tokens; read-out follows ``state.eot``."""
        eot = tokens.argmax(dim=-1)
        if self.truncate_text:
            tokens = tokens[:, : int(eot.max()) + 1]
        state = TowerState("text", eot=eot)
        blocks = self.clip.transformer.resblocks
        start = self.n_text_layers + 1 if hooks is None else hooks.start_layer
        if start >= 2:
            n_prefix = min(start - 1, self.n_text_layers)
            x = self._text_prefix(tokens, n_prefix)
            first = n_prefix + 1
        else:
            x = self.token_embedding(tokens)
            if hooks is not None:
                x = hooks.embed(x, state)
            x = x + self.clip.positional_embedding[: x.shape[1]].type(self.dtype)
            first = 1
        x = self._run_blocks(blocks, x, True, hooks, state, first, self.n_text_layers)
        x = self.clip.ln_final(x[torch.arange(x.shape[0], device=x.device), state.eot])
        out = x @ self.clip.text_projection
        return (out, state) if return_state else out
