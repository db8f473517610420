"""
Transformer parts shared by VAR (var.py) and DiGIT's GPT: attention with a kv cache, the MLP,
the AdaLN block, AdaLN before the head, drop-path, and sampling (temperature, top-k, top-p,
Gumbel-softmax); and DiGIT's raster-order GPT (`GPT`, at the end of the file).

Names follow the official VAR code (models/basic_var.py, models/helpers.py) so that the released
`var_d*.pth` load unchanged: `attn.mat_qkv`, `attn.q_bias`, `attn.v_bias`, `attn.zero_k_bias`,
`attn.scale_mul_1H11`, `ffn.fc1/fc2`, `ada_lin.1`, `ada_gss`. Letters: B batch, L tokens,
C width, H heads, c = C / H head width, D condition width, V vocabulary.

The AdaLN block (VAR Sec. 4, after DiT's adaLN): from the condition c (the class embedding) a
linear map gives six vectors, and with LN a LayerNorm without affine parameters
    x = x + gamma1 * Attn(LN(x) * (1 + scale1) + shift1)
    x = x + gamma2 * MLP (LN(x) * (1 + scale2) + shift2)
VAR starts the gammas near zero (init_adaln_gamma), so every block starts near the identity.
Deviation: attention always runs on torch's fused scaled_dot_product_attention (no flash_attn or
xformers imports); it picks flash / memory-efficient kernels on GPU by itself.
Test: `python -m pytest test_all.py -k "gpt or var"`.
"""
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

import checkpoint


def drop_path(x, p, training):
    """Stochastic depth: zero a sample's whole residual branch with probability p, rescale."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - p)   # (B, 1, 1)
    return x * keep.div_(1 - p)


class Attention(nn.Module):
    """Multi-head self-attention; q and v have biases, k a fixed zero bias (VAR's choice).

    attn_l2_norm: cosine attention, q and k unit-normalised and q multiplied by a learnt
    per-head temperature exp(s) with s <= log(100) (init log 4); otherwise the scale is
    0.25 / sqrt(c), as in the official code."""

    def __init__(self, dim, n_head, attn_l2_norm=True):
        super().__init__()
        self.n_head, self.head_dim, self.attn_l2_norm = n_head, dim // n_head, attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, n_head, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        self.register_buffer('zero_k_bias', torch.zeros(dim))   # in the official checkpoints
        self.proj = nn.Linear(dim, dim)
        self.kv_cache = None   # None: off; a list [k, v] (possibly empty) while generating

    def forward(self, x, attn_mask=None):
        """x (B, L, C), attn_mask (1, 1, L, L_kv) or (L, L_kv), additive or boolean (True =
        attend), a FlexAttention BlockMask, or None -> (B, L, C). With the cache on, keys and
        values of earlier calls are prepended (generation scale by scale, or token by token)."""
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.n_head, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                           # (B, H, L, c)
        if self.attn_l2_norm:
            temperature = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()  # (1, H, 1, 1)
            q, k = F.normalize(q, dim=-1).mul(temperature), F.normalize(k, dim=-1)
        if self.kv_cache is not None:
            if self.kv_cache:
                k = torch.cat((self.kv_cache[0], k), dim=2)                       # (B, H, L_kv, c)
                v = torch.cat((self.kv_cache[1], v), dim=2)
            self.kv_cache[:] = [k, v]
        if isinstance(attn_mask, BlockMask):   # FlexAttention: only the blocks the mask keeps
            y = flex_attention(q, k, v, block_mask=attn_mask, scale=self.scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        return self.proj(y.transpose(1, 2).reshape(B, L, C))


class MLP(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate='tanh'))


class AdaLNBlock(nn.Module):
    """Pre-LN transformer block whose LN scale/shift and residual gates come from the condition.

    shared_aln (VAR-d36): the six vectors are a block-specific table `ada_gss` plus one
    projection of the condition shared by all blocks (computed once, passed in as `cond`)."""

    def __init__(self, dim, n_head, cond_dim, mlp_ratio=4.0, attn_l2_norm=True,
                 drop_path=0.0, norm_eps=1e-6, shared_aln=False):
        super().__init__()
        self.dim, self.drop_path, self.shared_aln = dim, drop_path, shared_aln
        self.attn = Attention(dim, n_head, attn_l2_norm)
        self.ffn = MLP(dim, round(dim * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, dim) / dim ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))

    def forward(self, x, cond, attn_mask=None):
        """x (B, L, C); cond (B, D), or the shared projection (B, 6C) -> (B, L, C)."""
        if self.shared_aln:
            mods = self.ada_gss + cond.view(-1, 1, 6, self.dim)                  # (B, 1, 6, C)
        else:
            mods = self.ada_lin(cond).view(-1, 1, 6, self.dim)                    # (B, 1, 6, C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mods.unbind(2)          # 6 x (B, 1, C)
        h = self.attn(self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1), attn_mask)
        x = x + drop_path(h.mul_(gamma1), self.drop_path, self.training)
        h = self.ffn(self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2))
        return x + drop_path(h.mul(gamma2), self.drop_path, self.training)


class AdaLNBeforeHead(nn.Module):
    """The final LN, modulated by the condition: LN(x) * (1 + scale) + shift."""

    def __init__(self, dim, cond_dim, norm_eps=1e-6):
        super().__init__()
        self.dim = dim
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x, cond):
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.dim).unbind(2)   # 2 x (B, 1, C)
        return self.ln_wo_grad(x).mul(scale.add(1)).add_(shift)


# ----------------------------------------------------------------------------------------------
# Sampling filters

def top_k_top_p_filter_(logits, top_k=0, top_p=0.0):
    """In place on logits (..., V): keep the top_k largest (ties at the k-th kept), then the
    smallest set whose probability reaches top_p (the most likely token always stays);
    everything else becomes -inf. 0 disables a filter."""
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = logits.topk(top_k, dim=-1, largest=True, sorted=False).values.amin(-1, keepdim=True)
        logits.masked_fill_(logits < kth, -torch.inf)
    if 0.0 < top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        drop = sorted_logits.softmax(-1).cumsum_(-1) <= (1 - top_p)   # ascending: tail first
        drop[..., -1:] = False                                          # never the best token
        logits.masked_fill_(drop.scatter(-1, order, drop), -torch.inf)
    return logits


def sample(logits, top_k=0, top_p=0.0, rng=None, temperature=1.0):
    """logits (B, l, V) -> token ids (B, l), one multinomial draw per position from
    softmax(logits / temperature) after the filters (the official call: one torch.multinomial
    over a (B*l, V) matrix). Filters and temperature act on logits in place."""
    B, l, V = logits.shape
    if temperature != 1.0:
        logits.div_(temperature)
    probs = top_k_top_p_filter_(logits, top_k, top_p).softmax(-1).view(-1, V)
    return torch.multinomial(probs, 1, replacement=True, generator=rng).view(B, l)


def gumbel_softmax(logits, tau, rng=None):
    """Soft Gumbel-softmax sample: softmax((logits + g) / tau), g ~ Gumbel(0, 1) from rng.
    VAR's `more_smooth` option mixes code vectors with these weights (visualisation only)."""
    u = torch.empty_like(logits).exponential_(generator=rng)
    return ((logits - u.log()) / tau).softmax(-1)


# ----------------------------------------------------------------------------------------------
# DiGIT's GPT (Zhu et al., NeurIPS 2024, Sec. 3): raster-order next-token prediction over the
# K-Means tokens of an image, p(x_1..x_L | y) = prod_t p(x_t | y, x_<t). Input = [start, x_1..
# x_{L-1}], start = the class embedding of y (DiGIT's class id in place of BOS), so position t
# predicts x_{t+1} (0-based: logits[:, t] -> idx[:, t]). Class num_classes is the CFG null class;
# with num_classes = 0 it is the only one, a learnt BOS. cond='adaln' also feeds the class to
# every block through VAR's AdaLNBlock (dropout then on the embeddings only). Deviations from
# fairseq's stage 1 (reference/digit_official.md 2.1): pre-LN with a final LN (GPT-2, as the
# paper says) not post-LN, no x sqrt(C) embedding scale, positions from 0, ids 0..V-1 without
# special symbols, labels dropped to the null class in training (CFG; DiGIT has none).
#
# DiGIT's stage 2 (Sec. 4.3; reference/digit_official.md 2.4) is the same GPT with a source
# prefix (source_vocab_size > 0): it renders pixels by predicting the VQ tokens x of a
# single-scale VQVAE from the DiGIT token map s, p(x | s) = prod_t p(x_t | s, x_<t), over the
# sequence [s_1..s_S, start, x_1..x_{L-1}] under ONE causal mask: as in the official code the
# prefix is causal too (s_j sees s_<=j only, never a target). s has its own embedding table and
# its own learnt positions (DiGIT's two position tables, both starting at 0); logits come only
# from the L target positions. Official stage 2 is unconditional (num_classes = 0: start = BOS).

@dataclass
class GPTConfig:
    vocab_size: int = 8192           # tokenizer ids 0..V-1 (DiGIT base: 8192 clusters)
    block_size: int = 256            # tokens per image, h * w in raster order
    depth: int = 16                  # the one dial: n_embd 64 * depth, n_head = depth
    n_embd: int = 0                  # width; 0: 64 * depth
    n_head: int = 0                  # heads; 0: depth
    num_classes: int = 1000          # 0: unconditional; id num_classes is the null class
    cond: str = 'token'              # 'token': class token at position 0; 'adaln': and AdaLN
    cond_drop_rate: float = 0.1      # label -> null class probability in training (CFG)
    dropout: float = 0.1             # fairseq's: on embeddings and both residual branches
    mlp_ratio: float = 4.0           # MLP hidden width / width
    norm_eps: float = 1e-5           # LayerNorm epsilon (fairseq's)
    source_vocab_size: int = 0       # stage 2: DiGIT ids 0..V_s-1 of the prefix; 0: no prefix
    source_len: int = 0              # stage 2: prefix tokens S (DiGIT: 16 x 16 = 256)


class Block(nn.Module):
    """Pre-LN GPT-2 block: x = x + Drop(Attn(LN(x))); x = x + Drop(MLP(LN(x)))."""

    def __init__(self, dim, n_head, mlp_ratio=4.0, dropout=0.0, norm_eps=1e-5):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(dim, eps=norm_eps), nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, n_head, attn_l2_norm=False)
        self.ffn = MLP(dim, round(dim * mlp_ratio))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, cond=None, attn_mask=None):
        """x (B, L, C) -> (B, L, C); cond is unused (the AdaLNBlock signature)."""
        x = x + self.drop(self.attn(self.ln_1(x), attn_mask))
        return x + self.drop(self.ffn(self.ln_2(x)))


def loss(logits, targets, label_smoothing=0.1):
    """Token cross-entropy with label smoothing eps (DiGIT's recipe: 0.1), the mean over tokens
    of (1 - eps) * (-log p_target) + eps * mean_v(-log p_v). logits (B, L, V), targets (B, L)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                           label_smoothing=label_smoothing)


class GPT(nn.Module):
    """Raster-order, class-conditional (or unconditional) GPT over discrete image tokens;
    with source_vocab_size > 0, conditioned on a causal prefix of source tokens (stage 2)."""

    def __init__(self, **kwargs):
        super().__init__()
        self.config = cfg = GPTConfig(**kwargs)
        cfg.n_embd, cfg.n_head = cfg.n_embd or 64 * cfg.depth, cfg.n_head or cfg.depth
        if (cfg.cond not in ('token', 'adaln') or cfg.n_embd % cfg.n_head
                or (cfg.source_vocab_size > 0) != (cfg.source_len > 0)):
            raise ValueError(f'bad GPT config: cond {cfg.cond!r} (token|adaln), '
                             f'n_embd {cfg.n_embd} must be a multiple of n_head {cfg.n_head}, '
                             f'source_vocab_size and source_len both > 0 or both 0')
        C, self.num_classes, self.adaln = cfg.n_embd, cfg.num_classes, cfg.cond == 'adaln'
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)   # last row: null class / BOS
        self.wte = nn.Embedding(cfg.vocab_size, C)
        self.wpe = nn.Embedding(cfg.block_size, C)
        if cfg.source_vocab_size:   # stage 2: the source's own tokens and positions
            self.src_wte = nn.Embedding(cfg.source_vocab_size, C)
            self.src_wpe = nn.Embedding(cfg.source_len, C)
        self.drop = nn.Dropout(cfg.dropout)
        if self.adaln:
            self.blocks = nn.ModuleList([
                AdaLNBlock(C, cfg.n_head, C, cfg.mlp_ratio, False, 0.0, cfg.norm_eps)
                for _ in range(cfg.depth)])
            self.ln_f = AdaLNBeforeHead(C, C, cfg.norm_eps)
        else:
            self.blocks = nn.ModuleList([
                Block(C, cfg.n_head, cfg.mlp_ratio, cfg.dropout, cfg.norm_eps)
                for _ in range(cfg.depth)])
            self.ln_f = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size, bias=False)   # untied from wte
        T = cfg.source_len + cfg.block_size
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        self.register_buffer('causal', causal, persistent=False)                 # (S+L, S+L)
        self.init_weights()

    def init_weights(self):
        """GPT-2's init: N(0, 0.02) linears and embeddings, zero biases, residual projections
        divided by sqrt(2 depth); the standard 1/sqrt(c) attention scale (Attention's default
        0.25/sqrt(c) is VAR's); AdaLN gates start at 1, scales and shifts near 0."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, 'bias', None) is not None:
                    nn.init.zeros_(m.bias)
        with torch.no_grad():
            for block in self.blocks:
                block.attn.scale = block.attn.head_dim ** -0.5
                block.attn.proj.weight.div_(math.sqrt(2 * self.config.depth))
                block.ffn.fc2.weight.div_(math.sqrt(2 * self.config.depth))
                if self.adaln:   # rows: gamma1, gamma2 | scale1, scale2, shift1, shift2
                    block.ada_lin[-1].bias[:2 * self.config.n_embd].fill_(1.0)

    def trunk(self, h, cond, attn_mask=None, states=None):
        """Input embeddings h (B, l, C), class embedding cond (B, C) -> final hidden (B, l, C),
        after ln_f. states: a list that receives the embeddings after dropout and the output of
        every block, depth + 1 tensors (B, l, C) (hidden_states)."""
        states = [] if states is None else states
        states.append(self.drop(h))
        for block in self.blocks:
            states.append(block(states[-1], cond, attn_mask))
        return self.ln_f(states[-1], cond) if self.adaln else self.ln_f(states[-1])

    def source_prefix(self, source, B):
        """Stage 2's prefix: source ids (B, S) -> their embeddings plus the source positions
        (B, S, C); an empty (B, 0, C) when the model has no source (source_vocab_size 0)."""
        cfg = self.config
        if not cfg.source_vocab_size:
            if source is not None:
                raise ValueError('source given, but this GPT has source_vocab_size 0')
            return self.wpe.weight.new_empty(B, 0, cfg.n_embd)                    # (B, 0, C)
        if source is None or tuple(source.shape) != (B, cfg.source_len):
            got = None if source is None else tuple(source.shape)
            raise ValueError(f'need source ids (B, source_len) = {(B, cfg.source_len)}, '
                             f'got {got}')
        if ((source < 0) | (source >= cfg.source_vocab_size)).any():   # a sync; clear errors
            raise ValueError(f'source ids must lie in [0, {cfg.source_vocab_size})')
        return self.src_wte(source) + self.src_wpe.weight                         # (B, S, C)

    def inputs(self, idx, labels=None, source=None):
        """Teacher-forcing inputs: idx (B, L), labels (B,) or None, source (B, S) or None ->
        the embeddings of [source; start, idx_1..idx_{L-1}] (B, S+L, C), the class embedding
        cond (B, C) and the causal mask (S+L, S+L). Labels dropped as in forward."""
        B, L = idx.shape
        src = self.source_prefix(source, B)                                        # (B, S, C)
        if labels is None:
            labels = torch.full((B,), self.num_classes, device=idx.device)
        if self.training and self.config.cond_drop_rate > 0:   # CFG: learn p(x) too
            drop = torch.rand(B, device=idx.device) < self.config.cond_drop_rate
            labels = torch.where(drop, self.num_classes, labels)
        cond = self.class_emb(labels)                                              # (B, C)
        h = torch.cat((cond[:, None], self.wte(idx[:, :-1])), dim=1)              # (B, L, C)
        h = torch.cat((src, h + self.wpe.weight[:L]), dim=1)                      # (B, S+L, C)
        return h, cond, self.causal[:h.shape[1], :h.shape[1]]

    def forward(self, idx, labels=None, source=None):
        """Teacher forcing. idx (B, L) token ids, labels (B,) class ids or None (null class),
        source (B, S) ids (stage 2 only) -> logits (B, L, V) in fp32; position t predicts
        idx[:, t] from the source, the class and idx[:, :t].
        important! In training mode labels become the null class with prob. cond_drop_rate."""
        h = self.trunk(*self.inputs(idx, labels, source))[:, -idx.shape[1]:]     # (B, L, C)
        return self.head(h).float()                                                # (B, L, V)

    def hidden_states(self, idx, labels=None, source=None):
        """The residual stream at the L target positions (inputs start, idx_1..idx_{L-1}; the
        source prefix is cut off): depth + 1 tensors (B, L, C), the input embeddings and every
        block's output, before ln_f: head(ln_f(states[-1])) = forward (AdaLN: ln_f(., cond))."""
        states = []
        self.trunk(*self.inputs(idx, labels, source), states=states)
        return [h[:, -idx.shape[1]:] for h in states]

    @torch.no_grad()
    def generate(self, labels, num_tokens=None, cfg=0.0, temperature=1.0, top_k=0, top_p=0.0,
                 seed=None, prefix=None, source=None):
        """labels (B,) class ids (num_classes: p(x); 0 if unconditional), source (B, S) ids
        (stage 2 only) -> ids (B, num_tokens or block_size). The prompt, source + start token +
        prefix (B, P) (kept; DiGIT Fig. 4b completes the lower rows of an image), runs as one
        causal pass, then one token per step with the kv cache. CFG as VAR's with a constant
        t = cfg: logits = (1 + cfg) c - cfg u, u from the null class in a doubled batch (same
        source). gpt.sample draws (top_k=1: greedy) from a Generator seeded with seed (None:
        the global RNG). important! .eval() first (dropout)."""
        B, L = len(labels), num_tokens or self.config.block_size
        out = labels.new_zeros(B, 0) if prefix is None else prefix                 # (B, P)
        src = self.source_prefix(source, B)                                        # (B, S, C)
        if not out.shape[1] <= L <= self.config.block_size:
            raise ValueError(f'need prefix {out.shape[1]} <= num_tokens {L} <= block_size')
        if out.shape[1] == L:   # nothing left to generate
            return out
        rng = None if seed is None else torch.Generator(labels.device).manual_seed(seed)
        guided = cfg != 0 and self.num_classes > 0      # without classes, cond = uncond
        n = 2 if guided else 1                          # CFG: a second half, null class
        labels = torch.cat((labels, torch.full_like(labels, self.num_classes)))[:n * B]
        cond = self.class_emb(labels)                                             # (nB, C)
        h = torch.cat((cond[:, None], self.wte(out.repeat(n, 1))), dim=1)         # (nB, P+1, C)
        h = torch.cat((src.repeat(n, 1, 1), h + self.wpe.weight[:h.shape[1]]), 1)  # (nB, S+P+1, C)
        mask = self.causal[:h.shape[1], :h.shape[1]]                              # (S+P+1, S+P+1)
        for block in self.blocks:
            block.attn.kv_cache = []
        try:
            for t in range(out.shape[1], L):
                logits = self.head(self.trunk(h, cond, mask)[:, -1:]).float()     # (nB, 1, V)
                if guided:
                    logits = (1 + cfg) * logits[:B] - cfg * logits[B:]            # (B, 1, V)
                nxt = sample(logits, top_k, top_p, rng, temperature)              # (B, 1)
                out = torch.cat((out, nxt), dim=1)                                 # (B, t+1)
                if t + 1 < L:   # the next input: the new token at position t + 1
                    h, mask = self.wte(nxt.repeat(n, 1)) + self.wpe.weight[t + 1:t + 2], None
        finally:
            for block in self.blocks:
                block.attn.kv_cache = None
        return out

    @classmethod
    def from_checkpoint(cls, ckpt, kinds=('gpt', 'stage2'), use_ema=True):
        """A GPT from a train.py checkpoint (a path or its loaded dict) of one of `kinds`, with
        its EMA weights if it has them and use_ema, in eval mode."""
        state = checkpoint.load(ckpt, 'GPT checkpoint') if isinstance(
            ckpt, (str, os.PathLike)) else ckpt
        if not isinstance(state, dict) or state.get('kind') not in kinds:
            kind = state.get('kind') if isinstance(state, dict) else type(state).__name__
            raise ValueError(f'expected a train.py {" or ".join(kinds)} checkpoint, got {kind}')
        model = cls(**state['config'])
        model.load_state_dict(state['ema'] if use_ema and state.get('ema') else state['model'])
        return model.eval()


class LinearProbe(nn.Module):
    """DiGIT's linear probe (Table 2, Fig. 3b; iGPT's protocol): a frozen GPT, and one linear
    classifier per hidden state on its mean over positions. idx (B, L), labels (B,) ->
    sum over layers of the cross-entropies, and parts {'ce_i', 'acc_i' (top-1 %)}, i = 0 (the
    embeddings) .. depth. important! The GPT sees the null class, never the labels (they are
    only the targets); it stays in eval mode and gets no gradient. What we average: the L
    target positions [start, x_1..x_{L-1}], before ln_f. Official (reference 2.5): fairseq's
    inner_states (post-LN blocks) over all 257 positions [BOS, x_1..x_256], layers 0..depth-1.
    DiGIT trains with SGD lr 0.4, momentum 0.9, RandomResizedCrop + flip; we train on cached
    tokens. Optimise only the heads (probe.heads.parameters(), or requires_grad ones)."""

    def __init__(self, model, num_classes):
        super().__init__()
        self.gpt = model.eval().requires_grad_(False)
        C, n = model.config.n_embd, model.config.depth + 1
        self.heads = nn.ModuleList([nn.Linear(C, num_classes) for _ in range(n)])
        for head in self.heads:   # DiGIT's init
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)

    def train(self, mode=True):
        super().train(mode)
        self.gpt.eval()   # important! frozen: no dropout, no label dropping
        return self

    @torch.no_grad()
    def features(self, idx):
        """idx (B, L) -> depth + 1 position-averaged hidden states (B, C), null class."""
        return [h.mean(1) for h in self.gpt.hidden_states(idx)]

    def forward(self, idx, labels):
        loss, parts = 0.0, {}
        for i, (head, f) in enumerate(zip(self.heads, self.features(idx))):
            logits = head(f).float()                                              # (B, classes)
            ce = F.cross_entropy(logits, labels)
            loss = loss + ce
            parts[f'ce_{i}'] = ce.detach()
            parts[f'acc_{i}'] = (logits.argmax(-1) == labels).float().mean().detach() * 100
        return loss, parts
