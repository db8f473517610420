"""
DiGIT's image tokenizer (Zhu et al., NeurIPS 2024), part 1: the frozen DINOv2
ViT (Oquab et al., arXiv 2304.07193; registers: Darcet et al., arXiv 2309.16588) whose patch
features DiGIT clusters with K-Means. DiGIT takes block depth-3 (0-based; block 9 of 12 for
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
"""
import argparse
import math
import os
import re
from dataclasses import dataclass, asdict

import numpy as np
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import kmeans
import vqvae

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
        scale_factor = ((w//p + offset)/M, (h//p + offset)/M) (older DINO trick; torch uses the
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
        state = torch.load(path, map_location='cpu', weights_only=True)
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


# ----------------------------------------------------------------------------------------------
# The discriminative tokenizer: ViT features -> nearest K-Means centroid

class Tokenizer(nn.Module):
    """DiGIT's tokenizer (Sec. 3): token = argmin_k ||f - c_k||^2, f the block-`layer` feature of
    a patch (after the final norm), c the K-Means centroids (K, C). img (B, 3, H, W) in [-1, 1]
    is resized to `resolution` (bicubic, DiGIT's 256 -> 224), normalised with the ImageNet
    mean/std, and gives (B, L) token ids in raster order of the (resolution / patch)^2 grid.
    Distances are fp32 with TF32 off (DiGIT's fp16 run computed them in fp16)."""

    def __init__(self, encoder, layer, resolution, centroids=None):
        super().__init__()
        cfg = encoder.config
        if not 0 <= layer < cfg.depth:
            raise ValueError(f'layer {layer} is not a block of this {cfg.depth}-block ViT')
        if resolution % cfg.patch_size:
            raise ValueError(f'resolution {resolution} is not a multiple of patch {cfg.patch_size}')
        self.encoder = encoder.eval().requires_grad_(False)
        self.layer, self.resolution = layer, resolution
        self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('centroids', None)   # (K, C) float32, set by fit() or given
        if centroids is not None:
            self.set_centroids(centroids)

    def set_centroids(self, centroids):
        c = torch.as_tensor(centroids, dtype=torch.float32)
        if c.ndim != 2 or c.shape[1] != self.encoder.config.embed_dim:
            raise ValueError(f'centroids of shape {tuple(c.shape)} do not fit this encoder: '
                             f'expected [K, {self.encoder.config.embed_dim}]')
        self.centroids = c.to(self.mean.device)

    @property
    def vocab_size(self):
        return self.centroids.shape[0]

    @property
    def grid(self):
        return self.resolution // self.encoder.config.patch_size   # tokens per side

    def train(self, mode=True):   # frozen: the encoder stays in eval mode
        return super().train(False)

    @torch.no_grad()
    def features(self, img):
        """img (B, 3, H, W) in [-1, 1] -> block-`layer` patch features (B, L, C), fp32."""
        x = (img.float() + 1) / 2                                             # [0, 1]
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution,) * 2, mode='bicubic', align_corners=False)
        x = (x - self.mean) / self.std
        return self.encoder.get_intermediate_layers(x, n=[self.layer], norm=True)[0].float()

    @torch.no_grad()
    def nearest(self, f):
        """Features (..., C) -> id of the nearest centroid (...), chunked fp32 (kmeans.py)."""
        if self.centroids is None:
            raise RuntimeError('tokenizer has no centroids: fit() it or load a saved one')
        km = kmeans.KMeans(self.vocab_size)
        km.centroids = self.centroids
        return km.predict(f.reshape(-1, f.shape[-1])).view(f.shape[:-1])

    def encode(self, img):
        """img (B, 3, H, W) in [-1, 1] -> token ids (B, L) int64, L = grid^2."""
        return self.nearest(self.features(img))

    def fit(self, batches, k, n_iter=20, seed=0, max_points_per_centroid=256, verbose=False):
        """K-Means (kmeans.py, k-means++ init) on the patch features of an iterable of image
        batches (B, 3, H, W); under torch.distributed each rank passes its own batches and
        every rank ends with the same centroids. At most k * max_points_per_centroid features
        are kept (a uniform sample, as faiss), so memory stays bounded. Returns self."""
        chunks = (self.features(img.to(self.mean.device)).flatten(0, 1) for img in batches)
        km = kmeans.KMeans(k, n_iter=n_iter, seed=seed, verbose=verbose,
                           max_points_per_centroid=max_points_per_centroid).fit(chunks)
        self.set_centroids(km.centroids)
        self.inertia_ = km.inertia_
        return self

    def save(self, path):
        """One file, loadable with weights_only=True: encoder config and weights, layer,
        resolution and centroids. Written atomically."""
        state = dict(kind='tokenizer', encoder_config=asdict(self.encoder.config),
                     encoder=self.encoder.state_dict(), layer=self.layer,
                     resolution=self.resolution, centroids=self.centroids.cpu())
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save(state, f'{path}.tmp')
        os.replace(f'{path}.tmp', path)

    @classmethod
    def load(cls, path):
        state = torch.load(path, map_location='cpu', weights_only=True)
        if not isinstance(state, dict) or state.get('kind') != 'tokenizer':
            raise ValueError(f'{path} is not a tokenizer saved by tokenizer.py (a DINOv2 .pth or '
                             'a train.py --model ssl checkpoint goes to `tokenizer.py fit --encoder`)')
        encoder = DINOv2(**state['encoder_config'])
        encoder.load_state_dict(state['encoder'])
        return cls(encoder, state['layer'], state['resolution'], state['centroids'])


def load_encoder(path):
    """A frozen ViT and its tokenizer defaults {layer, resolution, k}, from an official DINOv2
    .pth (DiGIT's recipe: block depth-3, 224 px, K 8192, the pos_embed resized with offset 0.1
    and no antialias as DiGIT's copy of DINOv2 does, also for `_reg4`), or from a `train.py
    --model ssl` checkpoint (the offline stand-in: its EMA weights if any, block depth-3, its
    training resolution, K 512)."""
    state = torch.load(path, map_location='cpu', weights_only=True)
    if isinstance(state, dict) and state.get('kind') == 'ssl':
        model = ContrastiveViT(**state['config'])
        model.load_state_dict(state['ema'] or state['model'])
        vit = model.vit.eval().requires_grad_(False)
        return vit, dict(layer=vit.config.depth - 3, resolution=vit.config.img_size, k=512)
    if isinstance(state, dict) and 'kind' in state:
        raise ValueError(f"{path} holds a train.py {state['kind']} run, not an encoder: pass a "
                         'DINOv2 .pth or a train.py --model ssl checkpoint')
    vit = DINOv2.from_checkpoint(path, interpolate_offset=0.1, interpolate_antialias=False)
    return vit, dict(layer=vit.config.depth - 3, resolution=224, k=8192)


# ----------------------------------------------------------------------------------------------
# The offline stand-in encoder: a small ViT trained with InfoNCE on the data itself

@dataclass
class StandInConfig:
    img_size: int = 32         # training resolution (the tokenizer's resolution)
    patch_size: int = 4        # 32 px / 4 = 8x8 tokens
    embed_dim: int = 192
    depth: int = 6             # the tokenizer reads block depth - 3 = 3, as DiGIT
    num_heads: int = 3
    proj_dim: int = 128        # width of the projection heads the loss sees
    temperature: float = 0.2   # InfoNCE tau
    min_scale: float = 0.5     # smallest crop side, as a fraction of the image side


def random_views(img, min_scale, generator=None):
    """Two augmented views of every image, and where their pixels come from. Geometry: a square
    crop of side s ~ U(min_scale, 1) (fraction of the image side) at a random place, a random
    horizontal flip, resized back (bilinear); photometry: brightness, contrast and saturation
    jitter, grayscale with p = 0.2. img (B, 3, H, W) in [-1, 1] -> views (2B, 3, H, W) (all
    first views, then all second views), scale and shift (2, B, 2) (see crop_views). Random
    numbers come from `generator` on the CPU (None: torch's global generator)."""
    B, dev = img.shape[0], img.device
    rand = lambda *shape: torch.rand(*shape, generator=generator).to(dev)
    s = min_scale + (1 - min_scale) * rand(2, B)                              # (2, B)
    flip = torch.where(rand(2, B) < 0.5, -1.0, 1.0)
    scale = torch.stack([s * flip, s], dim=-1)                                # (2, B, 2)
    shift = (1 - s).unsqueeze(-1) * (2 * rand(2, B, 2) - 1)                   # crop stays inside
    x = crop_views(img.repeat(2, 1, 1, 1), scale.flatten(0, 1), shift.flatten(0, 1))
    jitter = lambda lo, hi: lo + (hi - lo) * rand(2 * B, 1, 1, 1)
    x = x + jitter(-0.3, 0.3)                                                 # brightness
    mu = x.mean((1, 2, 3), keepdim=True)
    x = mu + (x - mu) * jitter(0.6, 1.4)                                      # contrast
    gray = (x * torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)).sum(1, True)
    sat = jitter(0.4, 1.6) * (rand(2 * B, 1, 1, 1) >= 0.2)                    # 0: grayscale
    return (gray + (x - gray) * sat).clamp(-1, 1), scale, shift


def crop_views(img, scale, shift):
    """Resample: view coordinate u in [-1, 1]^2 ((x, y), pixel edges at +-1, align_corners=False)
    shows image point scale * u + shift (bilinear, reflected at the border). img (N, 3, H, W),
    scale and shift (N, 2) -> (N, 3, H, W)."""
    theta = torch.cat([torch.diag_embed(scale), shift.unsqueeze(-1)], -1)     # (N, 2, 3)
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)         # (N, H, W, 2)
    return F.grid_sample(img, grid, align_corners=False, padding_mode='reflection')


def matching_points(scale, shift, n):
    """Where the patch centres of view 2 lie in view 1: p = (s2 * u + t2 - t1) / s1 for the
    centres u of an n x n grid (raster order). scale, shift (2, B, 2) -> p (B, n*n, 2) in view
    1's coordinates, inside (B, n*n) bool (the point is in view 1's crop)."""
    c = (2 * torch.arange(n, device=scale.device) + 1) / n - 1                # centres, (n,)
    ys, xs = torch.meshgrid(c, c, indexing='ij')
    u = torch.stack([xs, ys], -1).view(1, n * n, 2)                           # (1, L, 2)
    p = (scale[1, :, None] * u + shift[1, :, None] - shift[0, :, None]) / scale[0, :, None]
    return p, (p.abs() <= 1).all(-1)                                          # (B, L, 2), (B, L)


def info_nce(a, b, temperature, mask=None):
    """Symmetric InfoNCE (CLIP's form): rows of a and b (N, P), unit norm, are positives when
    they share an index; every other row of the other side is a negative, except pairs where
    mask (N, N) is True. Returns the loss and the top-1 retrieval accuracy (a -> b)."""
    logits = a @ b.T / temperature                                            # (N, N)
    if mask is not None:
        logits = logits.masked_fill(mask, float('-inf'))
    target = torch.arange(len(a), device=a.device)
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    return loss, (logits.argmax(1) == target).float().mean()


class ContrastiveViT(nn.Module):
    """The offline stand-in for DINOv2 (DESIGN: every DiGIT stage runs without downloads): a small
    ViT of this file's DINOv2 class trained on the data with a discriminative objective at the
    two levels DiGIT Table 4(a) finds to matter, global and patch:
        L = (InfoNCE(g1, g2) + InfoNCE(z1(p), z2)) / 2
    g = head_global(cls token), z = head_patch(patch features), both unit-normalised; z1(p) is
    view 1's projected feature map sampled (bilinear) where view 2's patch centres lie, and only
    patches seen by both views count. Patch negatives are the patches of the other images
    (other patches of the same image are not negatives: they may look alike). A stand-in, not
    DINOv2: nothing is pretrained, no teacher, no masking."""

    def __init__(self, **kwargs):
        super().__init__()
        self.config = cfg = StandInConfig(**kwargs)
        self.vit = DINOv2(img_size=cfg.img_size, patch_size=cfg.patch_size,
                          embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                          layerscale=False)
        head = lambda: nn.Sequential(nn.Linear(cfg.embed_dim, cfg.embed_dim), nn.GELU(),
                                     nn.Linear(cfg.embed_dim, cfg.proj_dim))
        self.head_global, self.head_patch = head(), head()

    def forward(self, img, generator=None):
        """img (B, 3, H, W) in [-1, 1] -> loss, {'global', 'patch', 'acc_g', 'acc_p'}."""
        cfg, B = self.config, img.shape[0]
        n = img.shape[-1] // cfg.patch_size
        views, scale, shift = random_views(img, cfg.min_scale, generator)
        out = self.vit.forward_features(views)
        g = F.normalize(self.head_global(out['x_norm_clstoken']), dim=-1)     # (2B, P)
        z = self.head_patch(out['x_norm_patchtokens'])                        # (2B, L, P)
        where, inside = matching_points(scale, shift, n)                      # (B, L, 2), (B, L)
        z1_map = z[:B].transpose(1, 2).reshape(B, -1, n, n)                   # (B, P, n, n)
        z1 = F.grid_sample(z1_map, where.unsqueeze(2), align_corners=False,
                           padding_mode='border')                          # (B, P, L, 1)
        z1 = F.normalize(z1.squeeze(-1).transpose(1, 2)[inside], dim=-1)      # (M, P)
        z2 = F.normalize(z[B:][inside], dim=-1)                               # (M, P)
        image = torch.arange(B, device=img.device).view(B, 1).expand(B, n * n)[inside]  # (M,)
        same_image = (image[:, None] == image[None]) & ~torch.eye(len(image), dtype=torch.bool,
                                                                   device=img.device)
        l_global, acc_g = info_nce(g[:B], g[B:], cfg.temperature)
        l_patch, acc_p = info_nce(z1, z2, cfg.temperature, same_image)
        parts = dict(glob=l_global.detach(), patch=l_patch.detach(), acc_g=acc_g, acc_p=acc_p)
        return (l_global + l_patch) / 2, parts


# ----------------------------------------------------------------------------------------------
# Latent-space stability (DiGIT Table 1)

SNRS_DB = (30, 25, 20, 15, 10, 5, 1, 0.01)   # the columns of DiGIT Table 1


def add_noise(img, snr_db, generator=None):
    """Gaussian pixel noise at a signal-to-noise ratio in dB: sigma^2 = mean(x^2) / 10^(snr/10)
    per image, x the pixels in [0, 1]; not clipped. img (B, 3, H, W) in [-1, 1] -> same shape."""
    x = (img.float() + 1) / 2
    power = x.pow(2).mean((1, 2, 3), keepdim=True)                            # (B, 1, 1, 1)
    noise = torch.randn(x.shape, generator=generator).to(x.device)
    return (x + noise * (power / 10 ** (snr_db / 10)).sqrt()) * 2 - 1


@torch.no_grad()
def stability(encoders, batches, snrs=SNRS_DB, seed=0):
    """DiGIT Table 1: add noise at each SNR and measure how much the tokens and the features of
    each encoder move. encoders: {name: fn(img) -> (features (B, N, C), tokens (B, M))}; the
    token change rate is the fraction of tokens that differ from the clean image's, the cosine
    is between clean and noisy feature vectors, both averaged over all positions and images.
    Returns {name: {'change': [per snr], 'cos': [per snr]}}."""
    gen = torch.Generator().manual_seed(seed)
    sums = {name: torch.zeros(2, len(snrs), dtype=torch.float64) for name in encoders}
    count = {name: torch.zeros(2, dtype=torch.float64) for name in encoders}
    for img in batches:
        noisy = [add_noise(img, snr, gen) for snr in snrs]
        for name, fn in encoders.items():
            f0, t0 = fn(img)
            for i, x in enumerate(noisy):
                f, t = fn(x)
                sums[name][0, i] += (t != t0).sum().item()
                sums[name][1, i] += F.cosine_similarity(f, f0, dim=-1).sum().item()
            count[name] += torch.tensor([t0.numel(), f0[..., 0].numel()], dtype=torch.float64)
    return {name: {'change': (s[0] / count[name][0]).tolist(), 'cos': (s[1] / count[name][1]).tolist()}
            for name, s in sums.items()}


def vq_encoder(vae):
    """(features, tokens) of a vqvae.VQVAE for stability(): the encoder output f per latent
    position (B, h*w, C) and the tokens of all scales concatenated (B, sum pn^2)."""
    def fn(img):
        f = vae.encode(img).float()                                           # (B, C, h, w)
        tokens = torch.cat([idx.flatten(1) for _, idx, _ in vae.quantize.residual_steps(f)], 1)
        return f.flatten(2).transpose(1, 2), tokens
    return fn


def disc_encoder(tok):
    """(features, tokens) of a Tokenizer for stability(): (B, L, C) and (B, L)."""
    def fn(img):
        f = tok.features(img)
        return f, tok.nearest(f)
    return fn


# ----------------------------------------------------------------------------------------------
# Command line: fit a tokenizer (sharded over torchrun ranks), and the stability table

def image_batches(dataset, indices, batch_size, num_workers, desc, show):
    """Images (B, 3, H, W) of dataset[indices], in order, with a progress bar if show."""
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size,
                                         num_workers=num_workers)
    for img, *_ in tqdm(loader, desc=desc, disable=not show, dynamic_ncols=True):
        yield img


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    f = sub.add_parser('fit', help='K-Means on encoder features -> a saved tokenizer')
    f.add_argument('--encoder', default='out/ssl/ckpt.pt', help='an official dinov2_*_pretrain'
                   '.pth, or a train.py --model ssl checkpoint (the offline stand-in)')
    f.add_argument('--centroids', default='', help="a [K, C] .npy (DiGIT's km_8k.npy): no fit")
    f.add_argument('--layer', type=int, help='0-based block (default: depth - 3, as DiGIT)')
    f.add_argument('--resolution', type=int,
                   help='encoder input side (default: 224 for DINOv2, the stand-in\'s own)')
    f.add_argument('--k', type=int, help='centroids (default: 8192 for DINOv2 as DiGIT-base, '
                   '512 for the stand-in)')
    f.add_argument('--images', type=int, default=0, help='random training images whose patches '
                   'are clustered (default: 4x what K-Means samples, 256 points per centroid)')
    f.add_argument('--n_iter', type=int, default=20, help='Lloyd iterations (DiGIT: 20)')
    f.add_argument('--out', default='out/tokenizer/tokenizer.pt')
    s = sub.add_parser('stability', help='DiGIT Table 1: token change and feature cosine '
                       'under pixel noise, VQVAE tokens vs discriminative tokens')
    s.add_argument('--tokenizer', default='out/tokenizer/tokenizer.pt')
    s.add_argument('--vae', default='out/vqvae/ckpt.pt', help='train.py vqvae checkpoint or '
                   'the released vae_ch160v4096z32.pth')
    s.add_argument('--images', type=int, default=1000, help='held-out images to average over')
    for q in (f, s):
        q.add_argument('--data', default='builtin', help="'builtin' or an image folder")
        q.add_argument('--batch_size', type=int, default=64)
        q.add_argument('--num_workers', type=int, default=0, help='data loader processes')
        q.add_argument('--device', default='', help="'' = cuda if available, else cpu")
        q.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    rank, world = 0, 1
    if 'RANK' in os.environ:   # torchrun: every rank extracts its share, K-Means all-reduces
        if device == 'cuda':
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
        rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)
    if args.command == 'fit':
        result = fit_command(args, device, rank, world)
    else:
        result = stability_command(args, device)
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


def fit_command(args, device, rank, world):
    encoder, default = load_encoder(args.encoder)
    tok = Tokenizer(encoder, default['layer'] if args.layer is None else args.layer,
                    args.resolution or default['resolution']).to(device)
    if args.centroids:
        tok.set_centroids(np.load(args.centroids))
    else:
        k = args.k or default['k']
        dataset = data.build_dataset(args.data, tok.resolution, train=True, seed=args.seed)
        n = args.images or math.ceil(4 * 256 * k / tok.grid ** 2)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))
        mine = order[:n][rank::world].tolist()   # this rank's share of a common random subset
        if rank == 0:
            print(f'K-Means: {k} centroids on block {tok.layer} features of {min(n, len(order))}'
                  f' images x {tok.grid ** 2} patches, {world} process(es), device {device}')
        batches = image_batches(dataset, mine, args.batch_size, args.num_workers,
                                'features', rank == 0)
        tok.fit(batches, k, n_iter=args.n_iter, seed=args.seed, verbose=rank == 0)
    if rank == 0:
        tok.save(args.out)
        print(f'tokenizer: {tok.vocab_size} tokens per patch, {tok.grid}x{tok.grid} patches of '
              f'{tok.resolution} px images, block {tok.layer}'
              + (f', K-Means inertia {tok.inertia_:.6g}' if hasattr(tok, 'inertia_') else '')
              + f'\nsaved {args.out}')
    return tok


def stability_command(args, device):
    tok = Tokenizer.load(args.tokenizer).to(device)
    vae = vqvae.VQVAE.from_checkpoint(args.vae).to(device).eval()
    resolution = vae.config.patch_nums[-1] * vae.downsample
    dataset = data.build_dataset(args.data, resolution, train=False, seed=args.seed)
    batches = image_batches(dataset, range(min(args.images, len(dataset))), args.batch_size,
                            args.num_workers, 'stability', True)
    table = stability({'VQ': vq_encoder(vae), 'Disc': disc_encoder(tok)},
                      (b.to(device) for b in batches), seed=args.seed)
    print(f"\nlatent stability on {min(args.images, len(dataset))} held-out images of "
          f"{args.data} (DiGIT Table 1; SNR in dB, Gaussian pixel noise)")
    print(f"{'SNR':24s}" + ''.join(f'{s:>7g}' for s in SNRS_DB))
    for metric, label, arrow in (('change', 'token change', 'lower'), ('cos', 'cos-sim', 'higher')):
        for name, r in table.items():
            print(f'{name + " " + label:24s}' + ''.join(f'{v:7.3f}' for v in r[metric]))
    return table


if __name__ == '__main__':
    main()
