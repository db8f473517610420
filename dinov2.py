"""
DINOv2 (Oquab et al., arXiv 2304.07193; registers: Darcet et al., arXiv 2309.16588): the frozen
self-supervised ViT whose patch features DiGIT (Zhu et al., NeurIPS 2024) clusters with K-Means
into its tokens (tokenizer.py). DiGIT takes block depth-3 (0-based; block 9 of 12 for
ViT-B), after the final LayerNorm, with the cls and register tokens removed:

    feats = DINOv2.get_intermediate_layers(x, n=[depth - 3], norm=True)[0]   # (B, L, C)

The ViT (pre-LN blocks with LayerScale):
    x_0 = [cls, reg_1..reg_R, patch_embed(img) ] (+ pos_embed on cls and patches only)
    x   = x + ls1 * attn(norm1(x));   x = x + ls2 * ffn(norm2(x))     per block
ffn is GELU MLP, or SwiGLU for ViT-g: w3(silu(x W1) * (x W2)) with W1, W2 fused as `w12`.
Module names follow the official dinov2 code, so the released `dinov2_vit{s,b,l,g}14[_reg4]
_pretrain.pth` load with every tensor used: `DINOv2.from_checkpoint(path)`.
Letters: B batch, L patch tokens, T = 1 + R + L all tokens, C width, H heads, c = C / H.

Deviations from the official code: inference only (no drop-path, no xformers, no nested-tensor
lists, no FSDP block chunks; chunked `blocks.{chunk}.{i}` keys are renamed on load);
get_intermediate_layers stops after the last requested block (same outputs, less compute).
Test: `python -m pytest test_all.py -k dinov2`.
Load: `DINOv2.from_checkpoint('dinov2_vitb14_reg4_pretrain.pth')`.
"""
import math
import re
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint

# ImageNet statistics: DINOv2 and DiGIT normalise [0, 1] images with these before the ViT
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DINOv2Config:
    embed_dim: int = 768                 # C
    depth: int = 12                      # number of blocks
    num_heads: int = 12                  # H (head width 64 in every released model)
    mlp_ratio: float = 4.0               # MLP hidden = C * mlp_ratio (SwiGLU shrinks it by 2/3)
    num_register_tokens: int = 0         # R, extra learned tokens after cls (the `_reg4` models)
    ffn: str = 'mlp'                     # 'mlp' (GELU) or 'swiglu' (ViT-g)
    img_size: int = 518                  # pos_embed is stored for a (518/14)^2 = 37x37 grid
    patch_size: int = 14
    init_values: float = 1e-5            # LayerScale init (checkpoints overwrite it)
    interpolate_antialias: bool = False  # pos_embed resize: antialiased bicubic (reg models)
    interpolate_offset: float = 0.1      # pos_embed resize: scale (n + offset)/M; 0 -> size=n
    layerscale: bool = True              # ls1/ls2 exist (official init_values=None -> False)


_REG4 = dict(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)
# the hub constructors (dinov2/hub/backbones.py): plain models offset 0.1, `_reg4` antialias
DINOV2_CONFIGS = {
    'vits14': dict(embed_dim=384, depth=12, num_heads=6),
    'vitb14': dict(embed_dim=768, depth=12, num_heads=12),
    'vitl14': dict(embed_dim=1024, depth=24, num_heads=16),
    'vitg14': dict(embed_dim=1536, depth=40, num_heads=24, ffn='swiglu'),
}
DINOV2_CONFIGS.update({k + '_reg4': {**v, **_REG4} for k, v in list(DINOV2_CONFIGS.items())})


# ----------------------------------------------------------------------------------------------
# Blocks

class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> C channels: (B, 3, H, W) -> (B, H/p * W/p, C)."""

    def __init__(self, patch_size, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)

    def forward(self, x):
        p = self.proj.kernel_size[0]
        if x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f'image size {tuple(x.shape[2:])} is not a multiple of patch {p}')
        return self.proj(x).flatten(2).transpose(1, 2)   # (B, L, C), row-major over the grid


class Attention(nn.Module):
    """Multi-head self-attention, softmax(q k^T / sqrt(c)) v, no mask."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, C // self.num_heads)  # (B, T, 3, H, c)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                                  # each (B, H, T, c)
        y = F.scaled_dot_product_attention(q, k, v)                           # (B, H, T, c)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))                  # (B, T, C)


class MLP(nn.Module):
    """fc2(GELU(fc1(x))) with the exact (erf) GELU."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """SwiGLU FFN (Shazeer 2020) of ViT-g: w3(silu(x W1) * x W2), W1 and W2 fused in `w12`.
    Hidden width as official SwiGLUFFNFused: round_up(int(hidden * 2/3), 8) (4096 for ViT-g)."""

    def __init__(self, dim, hidden):
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)                                 # (B, T, hidden) x2
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    """Per-channel residual scale (CaiT): x * gamma, gamma (C,)."""

    def __init__(self, dim, init_values):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-LN ViT block: x + ls1(attn(norm1(x))), then x + ls2(ffn(norm2(x)))."""

    def __init__(self, cfg):
        super().__init__()
        C = cfg.embed_dim
        self.norm1 = nn.LayerNorm(C, eps=1e-6)
        self.attn = Attention(C, cfg.num_heads)
        self.norm2 = nn.LayerNorm(C, eps=1e-6)
        ffn = {'mlp': MLP, 'swiglu': SwiGLU}[cfg.ffn]
        self.mlp = ffn(C, int(C * cfg.mlp_ratio))
        ls = (lambda: LayerScale(C, cfg.init_values)) if cfg.layerscale else nn.Identity
        self.ls1, self.ls2 = ls(), ls()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


# ----------------------------------------------------------------------------------------------
# The ViT

class DINOv2(nn.Module):
    """DINOv2 ViT with the official parameter names; frozen feature extractor for DiGIT."""

    def __init__(self, **kwargs):
        super().__init__()
        self.config = cfg = DINOv2Config(**kwargs)
        if cfg.ffn not in ('mlp', 'swiglu'):
            raise ValueError(f"ffn={cfg.ffn!r}: expected 'mlp' or 'swiglu'")
        C, R, grid = cfg.embed_dim, cfg.num_register_tokens, cfg.img_size // cfg.patch_size
        self.patch_size = cfg.patch_size
        self.num_register_tokens = R
        self.patch_embed = PatchEmbed(cfg.patch_size, C)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, C))   # cls + M*M patches
        self.register_tokens = nn.Parameter(torch.zeros(1, R, C)) if R else None
        self.mask_token = nn.Parameter(torch.zeros(1, C))   # replaces masked patches (iBOT)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(C, eps=1e-6)
        # init as the official code (weights are normally loaded from a checkpoint)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if R:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, x, w, h):
        """Resize the stored M x M patch position grid to the input's grid, as the official code.
        x: tokens (B, 1 + L, C) (cls + patches); w, h: x_img.shape[2], x_img.shape[3] (the
        official names; i.e. image height, width). Returns (1, 1 + L, C).
        Rule: unchanged if L == M*M and w == h; else bicubic with, if offset > 0,
        scale_factor = ((w//p + offset)/M, (h//p + offset)/M) (DINO v1's trick; torch uses the
        scale, not the size, for the sample positions), or size = (w//p, h//p) if offset == 0;
        antialias per config. Computed in fp32, cast to x.dtype. The cls position is kept."""
        L, N = x.shape[1] - 1, self.pos_embed.shape[1] - 1
        if L == N and w == h:
            return self.pos_embed
        pos = self.pos_embed.float()
        dim, M = x.shape[-1], int(math.sqrt(N))
        assert M * M == N, f'pos_embed holds {N} patch positions, not a square grid'
        w0, h0 = w // self.patch_size, h // self.patch_size
        off = self.config.interpolate_offset
        scale = ((w0 + off) / M, (h0 + off) / M)
        resize = dict(scale_factor=scale) if off else dict(size=(w0, h0))
        grid = pos[:, 1:].reshape(1, M, M, dim).permute(0, 3, 1, 2)          # (1, C, M, M)
        grid = F.interpolate(grid, mode='bicubic', antialias=self.config.interpolate_antialias,
                             **resize)                                        # (1, C, w0, h0)
        assert grid.shape[-2:] == (w0, h0), f'resized pos grid {tuple(grid.shape[-2:])}'
        grid = grid.permute(0, 2, 3, 1).reshape(1, w0 * h0, dim)             # (1, L, C)
        return torch.cat([pos[:, :1], grid], dim=1).to(x.dtype)             # (1, 1 + L, C)

    def prepare_tokens(self, x, masks=None):
        """Image (B, 3, H, W) -> tokens (B, T, C) = [cls, registers, patches]. masks (B, L) bool
        replaces those patch embeddings by mask_token. Registers get no position embedding."""
        B, _, w, h = x.shape
        x = self.patch_embed(x)                                               # (B, L, C)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)           # (B, 1 + L, C)
        x = x + self.interpolate_pos_encoding(x, w, h)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]], dim=1)
        return x                                                              # (B, T, C)

    def forward_features(self, x, masks=None):
        """All blocks then the final norm. Returns the official dict: x_norm_clstoken (B, C),
        x_norm_regtokens (B, R, C), x_norm_patchtokens (B, L, C), x_prenorm (B, T, C), masks."""
        x = self.prepare_tokens(x, masks)
        for blk in self.blocks:
            x = blk(x)
        x_norm, R = self.norm(x), self.num_register_tokens
        return {'x_norm_clstoken': x_norm[:, 0], 'x_norm_regtokens': x_norm[:, 1:R + 1],
                'x_norm_patchtokens': x_norm[:, R + 1:], 'x_prenorm': x, 'masks': masks}

    def forward(self, x):
        """The official forward in eval: the normalised cls token (B, C) (head is Identity)."""
        return self.forward_features(x)['x_norm_clstoken']

    def get_intermediate_layers(self, x, n=1, reshape=False, return_class_token=False,
                                norm=True):
        """Outputs of chosen blocks, official meaning. n int: the last n blocks; n a list: those
        0-based block indices. Outputs come in block order, each optionally through the final
        norm, with cls and registers removed: (B, L, C), or (B, C, H/p, W/p) if reshape.
        Returns a tuple of tensors, or of (patches, cls (B, C)) pairs if return_class_token.
        DiGIT: get_intermediate_layers(x, n=[depth - 3])[0]."""
        depth = len(self.blocks)
        take = set(range(depth - n, depth)) if isinstance(n, int) else set(n)
        distinct = isinstance(n, int) or len(n) == len(take)
        if not take or not take <= set(range(depth)) or not distinct:
            raise ValueError(f'n={n}: need 1..{depth} or distinct block indices in [0, {depth})')
        t = self.prepare_tokens(x)                                            # (B, T, C)
        outputs = []
        for i, blk in enumerate(self.blocks[:max(take) + 1]):   # later blocks are not needed
            t = blk(t)
            if i in take:
                outputs.append(self.norm(t) if norm else t)                  # (B, T, C)
        cls = [o[:, 0] for o in outputs]                                      # (B, C)
        outputs = [o[:, 1 + self.num_register_tokens:] for o in outputs]      # (B, L, C)
        if reshape:
            B, _, w, h = x.shape
            p = self.patch_size
            outputs = [o.reshape(B, w // p, h // p, -1).permute(0, 3, 1, 2).contiguous()
                       for o in outputs]                                      # (B, C, H/p, W/p)
        return tuple(zip(outputs, cls)) if return_class_token else tuple(outputs)

    @classmethod
    def from_checkpoint(cls, path, name=None, **overrides):
        """Load an official `dinov2_*_pretrain.pth` (a bare state dict) with strict=True.
        The variant comes from `name` (a DINOV2_CONFIGS key) or is inferred from the shapes:
        C from cls_token, depth from the block count, R from register_tokens, SwiGLU from
        `w12` keys, heads = C / 64. The pos_embed interpolation is not in the weights: it follows
        the hub (offset 0.1 without registers, antialias with); pass overrides to change it,
        e.g. DiGIT ran vitb14_reg4 with interpolate_offset=0.1, interpolate_antialias=False."""
        state = checkpoint.load(path, 'DINOv2 weights')
        if not isinstance(state, dict) or 'cls_token' not in state:
            keys = list(state)[:5] if isinstance(state, dict) else type(state).__name__
            raise ValueError(f'{path} is not a DINOv2 state dict (no cls_token; starts {keys})')
        # FSDP-chunked checkpoints name block i `blocks.{chunk}.{i}`: rename to `blocks.{i}`
        state = {re.sub(r'^blocks\.\d+\.(\d+)\.', r'blocks.\1.', k)
                 if re.match(r'^blocks\.\d+\.\d+\.', k) else k: v for k, v in state.items()}
        if name is not None:
            if name not in DINOV2_CONFIGS:
                raise ValueError(f'unknown DINOv2 name {name!r}; known: {list(DINOV2_CONFIGS)}')
            kw = dict(DINOV2_CONFIGS[name])
        else:
            C = state['cls_token'].shape[-1]
            blocks = {int(k.split('.')[1]) for k in state if k.startswith('blocks.')}
            R = state['register_tokens'].shape[1] if 'register_tokens' in state else 0
            swiglu = any(k.endswith('mlp.w12.weight') for k in state)
            p = state['patch_embed.proj.weight'].shape[-1]
            M = int(math.sqrt(state['pos_embed'].shape[1] - 1))
            kw = dict(embed_dim=C, depth=len(blocks), num_heads=max(C // 64, 1),
                      num_register_tokens=R, ffn='swiglu' if swiglu else 'mlp',
                      img_size=M * p, patch_size=p,
                      layerscale=any(k.endswith('ls1.gamma') for k in state))
            if 'blocks.0.mlp.fc1.weight' in state:
                kw['mlp_ratio'] = state['blocks.0.mlp.fc1.weight'].shape[0] / C
            if R:
                kw.update(interpolate_antialias=True, interpolate_offset=0.0)
        with torch.device('meta'):                  # no init work: every tensor comes from file
            model = cls(**{**kw, **overrides})
        own = model.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shapes = [f'{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}'
                  for k, v in own.items() if k in state and state[k].shape != v.shape]
        if missing or unexpected or shapes:
            raise ValueError(f'{path} does not fit DINOv2({asdict(model.config)}):\n'
                             f'missing {missing[:8]}\nunexpected {unexpected[:8]}\n'
                             f'shape mismatch {shapes[:8]}')
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval().requires_grad_(False)
