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
import functools
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
        self.groups = 1           # text: class sequences repeated per group (image) by ``repeat_batch``
        self.records = {}         # free space for hooks (e.g. retrieval indices)


class TowerHooks:
    """No-op hooks; methods subclass this. ``start_layer`` = first layer the hooks change
    (0 = the embedding stage, l = before block l); everything before it is prompt-free.

    Text hooks touch the sequence only through the token helpers below (``insert_after_first``,
    ``replace_after_first``, ``write_tokens``, ``repeat_batch``, ``as_tensor``): then the encoder may hand
    them a ``SharedPrefixText`` and compute the class-independent prefix once. Hooks that index the
    tensor themselves set ``shared_prefix_ok = False`` and always get a plain tensor."""

    start_layer = 0
    shared_prefix_ok = True

    def embed(self, x, state):
        return x

    def before_block(self, layer, x, state):
        return x

    def adapter(self, layer, x_ln1):
        """A residual branch of block ``layer``; must act on each token on its own (it is called on the
        shared prefix and on the class positions separately)."""
        return None

    def replaced_after(self, layer):
        """n: the outputs of vision block ``layer`` at positions 1..n are never read (the hooks replace them
        before the next block and the read-out is elsewhere). The encoder may then compute only their keys and
        values in that block (``skip_replaced_outputs``); a hook that returns n > 0 must replace them."""
        return 0


class SharedPrefixText:
    """A text batch of N = groups x C sequences (image-major: row g*C + c) stored as a shared prefix and
    the class positions. Under CLIP's causal mask the prefix positions (BOT, prompts inserted after it and
    the template words every class shares) never see a class token, so they are computed once per group
    (``prefix``: (1 or groups, P, D)) instead of once per sequence; ``suffix`` holds the rest of every
    sequence ((C or N, S, D); C while nothing group-specific has reached it)."""

    def __init__(self, prefix, suffix, n_classes, groups=1):
        self.prefix, self.suffix = prefix, suffix
        self.n_classes, self.groups = n_classes, groups

    @property
    def prefix_len(self):
        return self.prefix.shape[1]

    @property
    def n_rows(self):
        return self.groups * self.n_classes

    @property
    def dtype(self):
        return self.suffix.dtype

    def prefix_rows(self):
        """The prefix for every row, (N, P, D)."""
        if self.prefix.shape[0] == 1:
            return self.prefix.expand(self.n_rows, -1, -1)
        return self.prefix.repeat_interleave(self.n_classes, dim=0)

    def suffix_rows(self):
        """The class positions for every row, (N, S, D)."""
        if self.suffix.shape[0] == self.n_rows:
            return self.suffix
        return self.suffix.repeat(self.groups, 1, 1)

    def materialize(self):
        return torch.cat([self.prefix_rows(), self.suffix_rows()], dim=1)

    def with_prefix(self, prefix):
        return SharedPrefixText(prefix, self.suffix, self.n_classes, self.groups)

    def __getattr__(self, name):
        raise AttributeError(f"SharedPrefixText has no '{name}': text hooks must use the token helpers of "
                             f"engine.prompted_clip (or as_tensor(x)), or set shared_prefix_ok = False")

    def __getitem__(self, item):
        raise TypeError("SharedPrefixText cannot be indexed: use as_tensor(x) or the token helpers of "
                        "engine.prompted_clip, or set shared_prefix_ok = False on the hooks")


# ---- token helpers for hooks --------------------------------------------------------------------

def as_tensor(x):
    """The plain (N, L, D) tensor (leaves the shared-prefix path from here on)."""
    return x.materialize() if isinstance(x, SharedPrefixText) else x


def _row_tokens(tokens, n_rows, groups):
    """(1 | groups | n_rows, n, D) -> (n_rows, n, D): shared, one per group (repeated over its classes), per row."""
    b = tokens.shape[0]
    if b == n_rows:
        return tokens
    if b == 1:
        return tokens.expand(n_rows, -1, -1)
    if b == groups and n_rows % groups == 0:
        return tokens.repeat_interleave(n_rows // groups, dim=0)
    raise ValueError(f"prompt tokens for {b} rows do not fit {n_rows} sequences in {groups} groups")


def _group_tokens(tokens, x):
    """The same tokens as (1 | groups, n, D) when they do not depend on the class, else None."""
    b = tokens.shape[0]
    if b == 1 or (b == x.groups and x.groups > 1):
        return tokens
    if b != x.n_rows:
        raise ValueError(f"prompt tokens for {b} rows do not fit {x.n_rows} sequences in {x.groups} groups")
    per_group = tokens.view(x.groups, x.n_classes, *tokens.shape[1:])
    if torch.equal(per_group, per_group[:, :1].expand_as(per_group)):
        return per_group[:, 0]
    return None  # class-dependent: these positions cannot be shared


def _prefix_for(x, tokens):
    """x.prefix with as many rows as ``tokens`` needs (one per group if the tokens are per group)."""
    prefix = x.prefix
    if tokens.shape[0] > prefix.shape[0]:
        prefix = prefix.expand(tokens.shape[0], -1, -1)
    return prefix, tokens.expand(prefix.shape[0], -1, -1)


def insert_after_first(x, tokens, state):
    """Insert ``tokens`` (1, groups or N, n, D) right after position 0 (cls / BOT); shift the EOT read-out."""
    n = tokens.shape[1]
    if state.eot is not None:
        state.eot = state.eot + n
    state.n_inserted += n
    if isinstance(x, SharedPrefixText):
        shared = _group_tokens(tokens, x)
        if shared is not None:
            prefix, shared = _prefix_for(x, shared.to(x.dtype))
            return x.with_prefix(torch.cat([prefix[:, :1], shared, prefix[:, 1:]], dim=1))
        x = x.materialize()
    tokens = _row_tokens(tokens.to(x.dtype), x.shape[0], state.groups)
    return torch.cat([x[:, :1], tokens, x[:, 1:]], dim=1)


def replace_after_first(x, tokens, state=None):
    """Replace positions 1..n with ``tokens`` (1, groups or N, n, D)."""
    n = tokens.shape[1]
    if isinstance(x, SharedPrefixText):
        shared = _group_tokens(tokens, x) if n < x.prefix_len else None
        if shared is not None:
            prefix, shared = _prefix_for(x, shared.to(x.dtype))
            return x.with_prefix(torch.cat([prefix[:, :1], shared, prefix[:, 1 + n:]], dim=1))
        x = x.materialize()
    groups = state.groups if state is not None else 1
    tokens = _row_tokens(tokens.to(x.dtype), x.shape[0], groups)
    return torch.cat([x[:, :1], tokens, x[:, 1 + n:]], dim=1)


def write_tokens(x, positions, tokens, state, weight=1.0):
    """Set the tokens at ``positions`` ((C, n) per class) to ``tokens`` (1, groups, C or N, n, D), or to
    ``weight * tokens + (1 - weight) * current`` (TCP's mixing)."""
    if isinstance(x, SharedPrefixText):
        positions = positions.to(x.suffix.device)
        same_everywhere = bool((positions == positions[:1]).all())
        if same_everywhere and int(positions.max()) < x.prefix_len:
            per_class = tokens.shape[0] == x.n_classes != x.n_rows and tokens.shape[0] != x.groups
            t = tokens.repeat(x.groups, 1, 1) if per_class else tokens
            shared = _group_tokens(t, x) if t.shape[0] in (1, x.groups, x.n_rows) else None
            if shared is not None:
                prefix, shared = _prefix_for(x, shared.to(x.dtype))
                cols = positions[0]
                if weight != 1:
                    shared = weight * shared + (1 - weight) * prefix[:, cols]
                return x.with_prefix(_put_columns(prefix, cols, shared))
        x = x.materialize()
    n_rows = x.shape[0]
    positions = positions.to(x.device)
    b = tokens.shape[0]
    if b == positions.shape[0] != n_rows and not (state.groups > 1 and b == state.groups):
        tokens = tokens.repeat(n_rows // b, 1, 1)  # per class, classes repeated in every group
    tokens = _row_tokens(tokens.to(x.dtype), n_rows, state.groups)
    positions = positions.repeat(n_rows // positions.shape[0], 1)
    rows = torch.arange(n_rows, device=x.device).unsqueeze(1).expand_as(positions)
    if weight != 1:
        tokens = weight * tokens + (1 - weight) * x[rows, positions]
    return x.index_put((rows, positions), tokens)


def _put_columns(x, cols, values):
    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1).expand(-1, cols.shape[0])
    return x.index_put((rows, cols.unsqueeze(0).expand_as(rows)), values)


def _nbytes(x):
    parts = (x.prefix, x.suffix) if isinstance(x, SharedPrefixText) else (x,)
    return sum(t.numel() * t.element_size() for t in parts)


def append_tokens(x, tokens, state):
    """Append ``tokens`` at the end of the sequence (MaPLe's visual prompts; vision only)."""
    tokens = _row_tokens(tokens.to(x.dtype), x.shape[0], 1)
    state.n_inserted += tokens.shape[1]
    return torch.cat([x, tokens], dim=1)


def replace_last(x, tokens):
    tokens = _row_tokens(tokens.to(x.dtype), x.shape[0], 1)
    return torch.cat([x[:, : x.shape[1] - tokens.shape[1]], tokens], dim=1)


def repeat_batch(x, state, times):
    """(N, L, D) -> (times*N, L, D), image-major: row b*N + c is sequence c for image b. Afterwards prompt
    tokens may be given one per group, (times, n, D). On the shared-prefix path nothing is copied."""
    if state.eot is not None:
        state.eot = state.eot.repeat(times)
    state.groups *= times
    if isinstance(x, SharedPrefixText):
        if x.groups != 1 or x.prefix.shape[0] != 1:
            x = x.materialize()
        else:
            return SharedPrefixText(x.prefix, x.suffix, x.n_classes, times)
    return x.repeat(times, 1, 1)


def text_positions(tokens, calls, inserted_tokens=0):
    """Token positions per text block of encoding ``tokens`` in these calls (index tensors of classes, one per
    ``encode_text`` call): per call its shared prefix (plus ``inserted_tokens`` prompts) once and every class's
    positions after it up to the call's longest EOT (the call is truncated there)."""
    total = 0
    for idx in calls:
        part = tokens[idx]
        shared = PromptedCLIP._shared_prefix_len(part)
        total += shared + inserted_tokens + len(idx) * (int(part.argmax(dim=-1).max()) + 1 - shared)
    return total


def length_buckets(tokens, inserted_tokens=0, max_per_call=None):
    """The classes (rows of ``tokens``) split into ``encode_text`` calls of at most ``max_per_call`` so that
    shorter names stop at their own EOT: each call is truncated at its longest EOT, and the positions after a
    sequence's EOT never reach its read-out under the causal mask (exact). Of three splits the one with the
    fewest ``text_positions`` is returned: the classes in their order (the plain path), in EOT order, and in
    groups of whole EOT lengths chosen by dynamic programming over that count."""
    max_per_call = max_per_call or len(tokens)
    eot = tokens.argmax(dim=-1)
    shared = PromptedCLIP._shared_prefix_len(tokens)
    lengths, counts = torch.unique(eot, return_counts=True)   # sorted by EOT position
    lengths, before = lengths.tolist(), [0] + counts.cumsum(0).tolist()
    best, cut = [0] + [float("inf")] * len(lengths), [0] * (len(lengths) + 1)
    for k in range(1, len(lengths) + 1):          # best split of the k shortest EOT lengths
        for j in range(k):                        # last group: EOT lengths j..k-1
            n = before[k] - before[j]
            calls = -(-n // max_per_call)
            cost = best[j] + calls * (shared + inserted_tokens) + n * (lengths[k - 1] + 1 - shared)
            if cost < best[k]:
                best[k], cut[k] = cost, j
    groups, k = [], len(lengths)
    while k:
        groups.append(((eot >= lengths[cut[k]]) & (eot <= lengths[k - 1])).nonzero().squeeze(1))
        k = cut[k]
    candidates = [list(torch.arange(len(tokens), device=tokens.device).split(max_per_call)),
                  list(torch.sort(eot, stable=True).indices.split(max_per_call)),
                  [idx for g in groups[::-1] for idx in g.split(max_per_call)]]
    return min(candidates, key=lambda calls: text_positions(tokens, calls, inserted_tokens))


def _mlp_residual(y, ln_w, ln_b, fc_w, fc_b, proj_w, proj_b, eps):
    """y + c_proj(QuickGELU(c_fc(ln_2(y)))), CLIP's MLP branch with its residual (LayerNorm in fp32 as CLIP's
    LayerNorm does), as one function of tensors: compiled once, it serves every block of both towers."""
    h = F.layer_norm(y.float(), (y.shape[-1],), ln_w, ln_b, eps).to(y.dtype)
    h = F.linear(h, fc_w, fc_b)
    return y + F.linear(h * torch.sigmoid(1.702 * h), proj_w, proj_b)


@functools.cache
def compiled_mlp_residual():
    """``torch.compile`` of ``_mlp_residual`` (dynamic shapes: sequence lengths and batch sizes vary), built on
    first use."""
    return torch.compile(_mlp_residual, dynamic=True)


# ---- the encoder --------------------------------------------------------------------------------

class PromptedCLIP(nn.Module):
    """Frozen CLIP with hook points. ``clip_model`` is a ``clip.model.CLIP``.

    ``shared_text_prefix``: run text batches as ``SharedPrefixText`` (prefix once per group, only the class
    positions per sequence) and compute the last text block at the EOT positions only; off = every
    position of every sequence (the plain path, kept for comparison). Both are exact (tested).
    ``cache_bytes``: memory budget of the prompt-free text layer cache (least recently used entries go).
    ``cls_only_last_block``: when only the image feature is read (``encode_image`` without ``return_state``),
    the last vision block is computed at the cls position only (its keys and values still at every
    position); exact, the outputs at the other positions are never read.
    ``skip_replaced_outputs``: a vision block whose prompt outputs the hooks replace before the next block
    (``TowerHooks.replaced_after``) computes only keys and values there; exact likewise.
    ``compile_mlp``: every block's MLP branch (LayerNorm, c_fc, QuickGELU, c_proj, residual) runs as one
    ``torch.compile``d function of its tensors (elementwise work fused; round-off differs slightly)."""

    def __init__(self, clip_model, truncate_text=True, cache_text_prefix=True, shared_text_prefix=True,
                 cache_bytes=1 << 30, cls_only_last_block=True, skip_replaced_outputs=True, compile_mlp=False):
        super().__init__()
        self.clip = clip_model
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self.truncate_text = truncate_text
        self.cache_text_prefix = cache_text_prefix
        self.shared_text_prefix = shared_text_prefix
        self.cls_only_last_block = cls_only_last_block
        self.skip_replaced_outputs = skip_replaced_outputs
        self.compile_mlp = compile_mlp
        if compile_mlp:
            blocks = list(clip_model.transformer.resblocks)
            if hasattr(clip_model.visual, "transformer"):
                blocks += list(clip_model.visual.transformer.resblocks)
            activations = {type(b.mlp.gelu).__name__ for b in blocks}
            if activations != {"QuickGELU"}:
                raise ValueError(f"compile_mlp computes CLIP's QuickGELU MLP; this backbone's blocks use {activations}")
        self.cache_bytes = cache_bytes
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
    def _heads(t, heads):
        n, length, width = t.shape
        return t.reshape(n, length, heads, width // heads).transpose(1, 2)

    @staticmethod
    def _merge_heads(t):
        n, heads, length, d = t.shape
        return t.transpose(1, 2).reshape(n, length, heads * d)

    def _attention(self, mha, h, causal):
        q, k, v = (self._heads(t, mha.num_heads) for t in F.linear(h, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return F.linear(self._merge_heads(out), mha.out_proj.weight, mha.out_proj.bias)

    def _finish_block(self, block, x, attn, h, hooks, layer):
        y = x + attn
        if self.compile_mlp:
            ln, fc, proj = block.ln_2, block.mlp.c_fc, block.mlp.c_proj
            y = compiled_mlp_residual()(y, ln.weight, ln.bias, fc.weight, fc.bias, proj.weight, proj.bias, ln.eps)
        else:
            y = y + block.mlp(block.ln_2(y))
        if hooks is not None:
            extra = hooks.adapter(layer, h)
            if extra is not None:
                y = y + extra
        return y

    def _run_block(self, block, x, causal, hooks, layer):
        h = block.ln_1(x)
        return self._finish_block(block, x, self._attention(block.attn, h, causal), h, hooks, layer)

    def _run_block_skipping(self, block, x, n, hooks, layer):
        """A vision block whose outputs at positions 1..n are replaced next: there it computes keys and values
        only (every other position attends to them) and passes the input through as a placeholder."""
        mha = block.attn
        h = block.ln_1(x)
        h_q, x_q = torch.cat([h[:, :1], h[:, 1 + n:]], dim=1), torch.cat([x[:, :1], x[:, 1 + n:]], dim=1)
        q, k, v = (self._heads(t, mha.num_heads) for t in self._split_qkv(mha, h_q, h))
        attn = F.linear(self._merge_heads(F.scaled_dot_product_attention(q, k, v)), mha.out_proj.weight,
                        mha.out_proj.bias)
        y = self._finish_block(block, x_q, attn, h_q, hooks, layer)
        return torch.cat([y[:, :1], x[:, 1:1 + n], y[:, 1:]], dim=1)

    @staticmethod
    def _split_qkv(mha, h_query, h_keys):
        """q from ``h_query``, k and v from ``h_keys`` (CLIP's packed in-projection)."""
        width = h_keys.shape[-1]
        w, b = mha.in_proj_weight, mha.in_proj_bias
        q = F.linear(h_query, w[:width], b[:width])
        k, v = F.linear(h_keys, w[width:], b[width:]).chunk(2, -1)
        return q, k, v

    def _run_block_at(self, block, x, pos, hooks, layer):
        """A causal text block evaluated at one position per row (the EOT read-out): (N, L, D) -> (N, 1, D)."""
        mha = block.attn
        rows = torch.arange(x.shape[0], device=x.device)
        h = block.ln_1(x)
        h_q, x_q = h[rows, pos].unsqueeze(1), x[rows, pos].unsqueeze(1)
        q, k, v = (self._heads(t, mha.num_heads) for t in self._split_qkv(mha, h_q, h))
        visible = (torch.arange(x.shape[1], device=x.device) <= pos[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        attn = F.linear(self._merge_heads(out), mha.out_proj.weight, mha.out_proj.bias)
        return self._finish_block(block, x_q, attn, h_q, hooks, layer)

    def _run_block_cls(self, block, x, hooks, layer):
        """A vision block evaluated at position 0 only (the cls read-out): (B, L, D) -> (B, 1, D)."""
        mha = block.attn
        h = block.ln_1(x)
        h_q = h[:, :1]
        q, k, v = (self._heads(t, mha.num_heads) for t in self._split_qkv(mha, h_q, h))
        attn = F.linear(self._merge_heads(F.scaled_dot_product_attention(q, k, v)), mha.out_proj.weight,
                        mha.out_proj.bias)
        return self._finish_block(block, x[:, :1], attn, h_q, hooks, layer)

    def _run_block_shared(self, block, x, hooks, layer, pos=None):
        """A causal text block on a ``SharedPrefixText``. The prefix runs as an ordinary block (it attends to
        itself only); class positions attend to their group's prefix keys (scores computed once per group)
        and causally to their own positions, one softmax over both. ``pos``: (rows,) suffix positions when
        only those outputs are needed (last block); returns (rows, 1, D) then."""
        mha, heads = block.attn, block.attn.num_heads
        prefix = x.prefix
        suffix = x.suffix_rows() if prefix.shape[0] > 1 else x.suffix
        n_groups, n_rows, plen, slen = prefix.shape[0], suffix.shape[0], prefix.shape[1], suffix.shape[1]
        h_p = block.ln_1(prefix)
        q_p, k_p, v_p = (self._heads(t, heads) for t in self._split_qkv(mha, h_p, h_p))
        h_s = block.ln_1(suffix)
        if pos is None:
            h_q, x_q = h_s, suffix
            visible = torch.ones(slen, slen, dtype=torch.bool, device=suffix.device).tril()
        else:
            rows = torch.arange(n_rows, device=suffix.device)
            h_q, x_q = h_s[rows, pos].unsqueeze(1), suffix[rows, pos].unsqueeze(1)
            visible = (torch.arange(slen, device=suffix.device) <= pos[:, None])[:, None, None, :]
        q_s, k_s, v_s = (self._heads(t, heads) for t in self._split_qkv(mha, h_q, h_s))
        n_q, d = q_s.shape[2], q_s.shape[3]
        per_group = n_rows // n_groups

        def by_group(t):   # (rows, heads, n_q, e) -> (groups, heads, per_group * n_q, e)
            return t.reshape(n_groups, per_group, heads, n_q, -1).transpose(1, 2).reshape(n_groups, heads, -1, t.shape[-1])

        def by_row(t):     # inverse of by_group
            return t.reshape(n_groups, heads, per_group, n_q, -1).transpose(1, 2).reshape(n_rows, heads, n_q, t.shape[-1])

        scale = d ** -0.5
        scores_p = by_row(by_group(q_s) @ k_p.transpose(-1, -2)) * scale            # (rows, heads, n_q, P)
        scores_s = (q_s @ k_s.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
        probs = torch.softmax(torch.cat([scores_p, scores_s], dim=-1), dim=-1)
        p_p, p_s = probs.split([plen, slen], dim=-1)
        out = by_row(by_group(p_p.to(v_p.dtype)) @ v_p) + p_s.to(v_s.dtype) @ v_s
        attn = F.linear(self._merge_heads(out), mha.out_proj.weight, mha.out_proj.bias)
        y_s = self._finish_block(block, x_q, attn, h_q, hooks, layer)
        if pos is not None:
            return y_s
        out_p = F.scaled_dot_product_attention(q_p, k_p, v_p, is_causal=True)
        attn_p = F.linear(self._merge_heads(out_p), mha.out_proj.weight, mha.out_proj.bias)
        y_p = self._finish_block(block, prefix, attn_p, h_p, hooks, layer)
        return SharedPrefixText(y_p, y_s, x.n_classes, x.groups)

    def _run_blocks(self, blocks, x, causal, hooks, state, first, last, cls_last=False):
        """Run blocks ``first..last`` (1-indexed, inclusive); ``cls_last``: the last one at position 0 only."""
        for layer in range(first, last + 1):
            if hooks is not None:
                x = hooks.before_block(layer, x, state)
            skip = hooks.replaced_after(layer) if self.skip_replaced_outputs and hooks is not None else 0
            if cls_last and layer == last:
                x = self._run_block_cls(blocks[layer - 1], x, hooks, layer)
            elif skip and not causal:
                x = self._run_block_skipping(blocks[layer - 1], x, skip, hooks, layer)
            else:
                x = self._run_block(blocks[layer - 1], x, causal, hooks, layer)
        return x

    # -- vision
    def encode_image(self, images, hooks=None, return_state=False, upto=None, start=None):
        """Image features (B, embed_dim), not normalized. ``upto``: run blocks 1..upto only and return the
        sequence leaving block ``upto`` (no read-out; for passes that only read states entering blocks).
        ``start``: (x, l), continue from ``x``, the sequence entering block l that an earlier ``upto=l - 1``
        pass of the same images returned (``images`` is then unused; the hooks must not act before block l)."""
        visual = self.clip.visual
        state = TowerState("vision")
        if start is not None:
            x, first = start
            if hooks is not None and hooks.start_layer < first:
                raise ValueError(f"these hooks act from block {hooks.start_layer}: they cannot start at block {first}")
        else:
            images = images.type(self.dtype)
            if not self.is_vit:
                if hooks is not None:
                    raise ValueError("vision hooks need a ViT backbone; ResNet CLIP supports text-only methods")
                out = visual(images)
                return (out, state) if return_state else out
            x = visual.conv1(images)
            x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
            cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
            if hooks is not None:
                x = hooks.embed(x, state)
            x, first = visual.ln_pre(x), 1
        blocks = visual.transformer.resblocks
        if upto is not None:
            if not first - 1 <= upto <= self.n_vision_layers:
                raise ValueError(f"upto must be a block index in {first - 1}..{self.n_vision_layers}, got {upto}")
            return self._run_blocks(blocks, x, False, hooks, state, first, upto)
        cls_last = self.cls_only_last_block and not return_state
        x = self._run_blocks(blocks, x, False, hooks, state, first, self.n_vision_layers, cls_last)
        state.last_hidden = x  # the final sequence, for read-outs besides cls (MMRL's representation tokens)
        out = visual.ln_post(x[:, 0, :])
        if visual.proj is not None:
            out = out @ visual.proj
        return (out, state) if return_state else out

    # -- text
    @staticmethod
    def _shared_prefix_len(tokens):
        """Leading positions whose token is the same in every sequence (BOT included), every EOT left out."""
        same = (tokens == tokens[:1]).all(dim=0)
        return max(1, min(int(same.long().cumprod(0).sum()), int(tokens.argmax(dim=-1).min())))

    def _text_input(self, tokens, shared, hooks, state):
        """Token + positional embeddings (after ``hooks.embed``), plain or as a ``SharedPrefixText``."""
        x = self.token_embedding(tokens)
        if shared:
            plen = self._shared_prefix_len(tokens)
            x = SharedPrefixText(x[:1, :plen], x[:, plen:], tokens.shape[0])
        if hooks is not None:
            x = hooks.embed(x, state)
        pos = self.clip.positional_embedding.type(self.dtype)
        if isinstance(x, SharedPrefixText):
            plen = x.prefix_len
            return SharedPrefixText(x.prefix + pos[:plen], x.suffix + pos[plen: plen + x.suffix.shape[1]],
                                    x.n_classes, x.groups)
        return x + pos[: x.shape[1]]

    def _text_prefix(self, tokens, n_blocks, shared):
        """Output of the first ``n_blocks`` prompt-free text blocks, cached by tokens (LRU, ``cache_bytes``)."""
        key = None
        if self.cache_text_prefix:
            device_type = tokens.device.type
            autocast = torch.is_autocast_enabled(device_type)  # and its dtype: an fp16 prefix never serves bf16
            key = (n_blocks, shared, tuple(tokens.shape), str(tokens.device), self.dtype, autocast,
                   torch.get_autocast_dtype(device_type) if autocast else None, hash(tokens.cpu().numpy().tobytes()))
            hit = self._text_cache.get(key)
            if hit is not None:
                self._text_cache.move_to_end(key)
                return hit
        with torch.no_grad():
            x = self._text_input(tokens, shared, None, None)
            x = self._run_text_blocks(x, None, None, 1, n_blocks, eot_last=False)
        if key is not None:
            self._text_cache[key] = x
            while len(self._text_cache) > 1 and sum(map(_nbytes, self._text_cache.values())) > self.cache_bytes:
                self._text_cache.popitem(last=False)
        return x

    def _run_text_blocks(self, x, hooks, state, first, last, eot_last):
        """Text blocks ``first..last``; with ``eot_last`` the last block is evaluated at the EOT positions
        only and (N, 1, D) is returned."""
        blocks = self.clip.transformer.resblocks
        for layer in range(first, last + 1):
            if hooks is not None:
                x = hooks.before_block(layer, x, state)
            block = blocks[layer - 1]
            at_eot = eot_last and layer == last
            if isinstance(x, SharedPrefixText):
                pos = None
                if at_eot:
                    n_rows = x.suffix.shape[0] if x.prefix.shape[0] == 1 else x.n_rows
                    pos = state.eot[:n_rows] - x.prefix_len
                x = self._run_block_shared(block, x, hooks, layer, pos)
            elif at_eot:
                x = self._run_block_at(block, x, state.eot, hooks, layer)
            else:
                x = self._run_block(block, x, True, hooks, layer)
        return x

    def encode_text(self, tokens, hooks=None, return_state=False):
        """Text features (N, embed_dim), not normalized. ``tokens``: (C, context_length) from ``tokenize``.
        Hooks may expand the batch (N = times * C) and insert tokens; read-out follows ``state.eot``."""
        eot = tokens.argmax(dim=-1)
        if self.truncate_text:
            tokens = tokens[:, : int(eot.max()) + 1]
        state = TowerState("text", eot=eot)
        shared = self.shared_text_prefix and (hooks is None or hooks.shared_prefix_ok)
        start = self.n_text_layers + 1 if hooks is None else hooks.start_layer
        n_cached = min(start - 1, self.n_text_layers) if start >= 2 else 0
        if n_cached:
            x = self._text_prefix(tokens, n_cached, shared)
        else:
            x = self._text_input(tokens, shared, hooks, state)
        eot_last = self.shared_text_prefix and n_cached < self.n_text_layers
        x = self._run_text_blocks(x, hooks, state, n_cached + 1, self.n_text_layers, eot_last)
        if eot_last:
            x = x[:, 0]
        else:
            x = as_tensor(x)
            x = x[torch.arange(x.shape[0], device=x.device), state.eot]
        if x.shape[0] != state.eot.shape[0]:  # every group shared every position: one row per class so far
            x = x.repeat(state.eot.shape[0] // x.shape[0], 1)
        x = self.clip.ln_final(x)
        out = x @ self.clip.text_projection
        return (out, state) if return_state else out
