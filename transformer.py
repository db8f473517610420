"""
Transformer parts shared by VAR (var.py) and DiGIT's GPT (gpt.py): attention with a kv cache,
the MLP, the AdaLN block, AdaLN before the head, drop-path, and sampling (temperature, top-k,
top-p, Gumbel-softmax).

Names follow the official VAR code (models/basic_var.py, models/helpers.py) so that the released
`var_d*.pth` load unchanged: `attn.mat_qkv`, `attn.q_bias`, `attn.v_bias`, `attn.zero_k_bias`,
`attn.scale_mul_1H11`, `ffn.fc1/fc2`, `ada_lin.1`, `ada_gss`. Letters: B batch, L tokens,
C width, H heads, c = C / H head width, D condition width, V vocabulary.

The AdaLN block (VAR Sec. 4, after DiT's adaLN): from the condition c (the class embedding) a
linear map gives six vectors, and with LN a LayerNorm without affine parameters
    x = x + gamma1 * Attn(LN(x) * (1 + scale1) + shift1)
    x = x + gamma2 * MLP (LN(x) * (1 + scale2) + shift2)
VAR starts the gammas near zero (init_adaln_gamma), so every block starts near the identity.
Deviation: attention runs on torch's scaled_dot_product_attention, which picks flash or
memory-efficient kernels on a GPU by itself, or on FlexAttention when the mask is a BlockMask
(VAR's --attn flex); no flash_attn or xformers imports.
Test: `python -m pytest test_all.py -k "gpt or var"`.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention


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
    """fc1 -> GELU -> fc2; GELU's tanh approximation (VAR's, GPT-2's) or exact ('none', erf:
    fairseq's)."""

    def __init__(self, dim, hidden, approximate='tanh'):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.approximate = approximate

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


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
