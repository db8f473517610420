"""
MAGE's VQGAN (Li et al., CVPR 2023, arXiv 2211.09117): the tokenizer of MaskGIT (Chang et al.,
CVPR 2022, arXiv 2202.04200), trained in JAX and converted to PyTorch by MAGE as
`vqgan_jax_strongaug.ckpt`. DiGIT's stage 2 predicts its tokens from DiGIT's and renders the
pixels with it. One scale: a 256 x 256 image is 16 x 16 tokens of a 1024-code book,

    z = Encoder(x)                 (B, 256, 16, 16)    x in [0, 1], as MAGE feeds it
    r = argmin_v ||z_ij - E_v||^2  (B, 16, 16)         nearest code, ids in [0, 1024)
    x_hat = Decoder(E[r])          (B, 3, 256, 256)    nominally in [0, 1]

The interface takes and returns images in [-1, 1], like the rest of the repo; the [0, 1] range
is converted inside (encode, decode). img_to_idx / idx_to_img mirror vqvae.VQVAE with one scale.

Relation to vqvae.py: the same taming/LDM layout (GroupNorm(32, eps 1e-6), swish, 3x3 convs,
nearest 2x upsampling + conv), and vqvae's Normalize, Upsample and level containers are reused.
MaskGIT's residual block differs, so it is written here (ResBlock), as are the encoder/decoder:
  - the 3x3 convs of a block have no bias, and when the width changes the 1x1 shortcut (no
    bias) is applied to the branch output h, not to the input x: out = h + W h, where vqvae's
    block computes W x + h (MaskGIT's JAX ResBlock reassigns x before its shortcut);
  - the encoder downsamples by 2x2 average pooling (no weights), not a strided conv;
  - no attention anywhere, no quant_conv / post_quant_conv, num_res_blocks blocks per decoder
    level (not +1), the encoder's conv_in has no bias and its conv_out is 1x1; dropout (0 in
    the release, no weights) is left out;
  - swish is x * sigmoid(x), not F.silu: that is the official formula, and tokens of real images
    then equal the official ones bit for bit (F.silu differs in the last bit).
Module names are the official ones (no renaming): the released file loads with strict=True.

    vq = VQGAN.from_checkpoint('vqgan_jax_strongaug.ckpt')
    idx = vq.img_to_idx(img)[0]        # img (B, 3, 256, 256) in [-1, 1] -> (B, 256) ids
    img = vq.idx_to_img([idx])         # -> (B, 3, 256, 256) in [-1, 1]
Test: `python -m pytest test_all.py -k vqgan`.
"""
import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn

import checkpoint
from vqvae import Normalize, Upsample, _level, _run_level
from cli import UserError


@dataclass
class VQGANConfig:
    vocab_size: int = 1024          # V, codebook size (MAGE's n_embed)
    z_channels: int = 256           # C, latent and code width (MAGE's z_channels = embed_dim)
    ch: int = 128                   # base width of the encoder/decoder (multiple of 32)
    ch_mult: tuple = (1, 1, 2, 2, 4)  # width multipliers; downsampling = 2**(len-1)
    num_res_blocks: int = 2         # residual blocks per resolution, encoder and decoder
    resolution: int = 256           # image side it was trained on (any multiple of 16 runs)

    @property
    def patch_nums(self):
        """vqvae.VQVAEConfig's name for the token grid side: one scale, resolution / 2**levels."""
        return (self.resolution // 2 ** (len(self.ch_mult) - 1),)


def swish(x):
    return x * torch.sigmoid(x)   # the official formula; F.silu rounds differently


class ResBlock(nn.Module):
    """MaskGIT's residual block: GN-swish-conv twice, no conv bias; out = h + W h on a width
    change (1x1 conv W of the branch output h), else out = x + h."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.widens = in_channels != out_channels
        if self.widens:
            self.nin_shortcut = nn.Conv2d(out_channels, out_channels, 1, bias=False)

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))                                  # (B, out, H, W)
        h = self.conv2(swish(self.norm2(h)))                                  # (B, out, H, W)
        return (self.nin_shortcut(h) if self.widens else x) + h


def _blocks(c_in, c_out, n):
    """n residual blocks, the first one changing the width c_in -> c_out."""
    return [ResBlock(c_in if i == 0 else c_out, c_out) for i in range(n)]


def _mid(c):
    mid = nn.Module()
    mid.block_1, mid.block_2 = ResBlock(c, c), ResBlock(c, c)
    return mid


class Encoder(nn.Module):
    """Image (B, 3, 16h, 16w) in [0, 1] -> latent (B, z_channels, h, w) for the default ch_mult."""

    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1, bias=False)
        self.down, c = nn.ModuleList(), cfg.ch
        for i, w in enumerate(widths):
            pool = nn.AvgPool2d(2) if i < len(widths) - 1 else None  # weightless `downsample`
            self.down.append(_level(_blocks(c, w, cfg.num_res_blocks), [], 'downsample', pool))
            c = w
        self.mid = _mid(c)
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 1)

    def forward(self, x):
        h = self.conv_in(x)                                                   # (B, ch, H, W)
        for level in self.down:
            h = _run_level(level, h, 'downsample')   # blocks, then halve H, W (not at the last)
        h = self.mid.block_2(self.mid.block_1(h))                             # (B, c, h, w)
        return self.conv_out(swish(self.norm_out(h)))                         # (B, C, h, w)


class Decoder(nn.Module):
    """Codes (B, z_channels, h, w) -> image (B, 3, 16h, 16w), ~[0, 1]; `up.0` is the finest."""

    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        c = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _mid(c)
        levels = []
        for i in reversed(range(len(widths))):    # coarse to fine, stored fine-first below
            blocks = _blocks(c, widths[i], cfg.num_res_blocks)
            c = widths[i]
            levels.insert(0, _level(blocks, [], 'upsample', Upsample(c) if i > 0 else None))
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.block_1(self.conv_in(z)))              # (B, c, h, w)
        for level in reversed(self.up):
            h = _run_level(level, h, 'upsample')     # blocks, then double H, W (not at up.0)
        return self.conv_out(swish(self.norm_out(h)))                         # (B, 3, H, W)


class Quantizer(nn.Module):
    """The codebook E (V, C) and its nearest-code lookup (taming's VectorQuantizer2)."""

    def __init__(self, cfg):
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)

    def nearest_code(self, z):
        """argmin_v ||z - E_v||^2 = ||z||^2 + ||E_v||^2 - 2 z.E_v, z (B, C, h, w) -> (B, h, w).
        The sum is formed in the official order so that tokens are bit-identical to it."""
        B, C, h, w = z.shape
        z = z.permute(0, 2, 3, 1).reshape(-1, C)                              # (N, C)
        E = self.embedding.weight                                             # (V, C)
        d = z.square().sum(1, keepdim=True) + E.square().sum(1) - 2 * (z @ E.T)  # (N, V)
        return d.argmin(1).view(B, h, w)

    def embed_tokens(self, idx, pn):
        """Code vectors of a token map: idx (B, pn*pn) -> E[idx] as (B, C, pn, pn). Contiguous,
        as the official get_codebook_entry: convs on a channels-last view round differently."""
        return self.embedding(idx.reshape(-1, pn, pn)).permute(0, 3, 1, 2).contiguous()


class VQGAN(nn.Module):
    """Encoder -> nearest code -> decoder, one scale; images in [-1, 1] at the interface."""

    def __init__(self, **kwargs):
        super().__init__()
        self.config = cfg = VQGANConfig(**kwargs)
        if cfg.ch % 32:
            raise ValueError(f'ch={cfg.ch}: GroupNorm(32) needs a multiple of 32')
        self.vocab_size, self.resolution = cfg.vocab_size, cfg.resolution
        self.downsample = 2 ** (len(cfg.ch_mult) - 1)
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quantize = Quantizer(cfg)

    def encode(self, img):
        """img (B, 3, H, W) in [-1, 1] -> latent z (B, C, H/16, W/16) before quantisation.
        MAGE's VQGAN was trained on [0, 1] images (ToTensor, no normalisation)."""
        return self.encoder((img + 1) / 2)

    def decode(self, z_q):
        """Code vectors (B, C, h, w) -> image (B, 3, 16h, 16w) in [-1, 1], not clamped."""
        return self.decoder(z_q) * 2 - 1

    @torch.no_grad()
    def img_to_idx(self, img):
        """Tokenise: img (B, 3, H, W) in [-1, 1] -> [ids (B, h*w)], a one-scale list as VQVAE's,
        raster order (MAGE's token order)."""
        return [self.quantize.nearest_code(self.encode(img).float()).flatten(1)]

    @torch.no_grad()
    def idx_to_img(self, idx_list):
        """Detokenise: [ids (B, pn*pn)] of a square grid -> image (B, 3, 16pn, 16pn) in [-1, 1]."""
        (idx,) = idx_list
        pn = math.isqrt(idx.shape[1])
        if pn * pn != idx.shape[1]:
            raise ValueError(f'{idx.shape[1]} tokens are not a square grid')
        return self.decode(self.quantize.embed_tokens(idx, pn)).clamp(-1, 1)

    @classmethod
    def from_checkpoint(cls, path, **kwargs):
        """MAGE's `vqgan_jax_strongaug.ckpt`: {'state_dict': sd} (what taming's loader reads) or
        a bare sd. kwargs change the config from the released model's."""
        ckpt = checkpoint.load(path, 'VQGAN checkpoint')
        if not isinstance(ckpt, dict):
            raise UserError(f'VQGAN checkpoint {path} holds a {type(ckpt).__name__}, not a dict')
        return cls.from_state_dict(ckpt.get('state_dict', ckpt), source=path, **kwargs)

    @classmethod
    def from_state_dict(cls, sd, prefix='', source='state dict', **kwargs):
        """The VQGAN made of sd's entries under `prefix` (e.g. 'vqgan.' in a DiGIT stage-2
        checkpoint). Every tensor must be used and none be missing, else one line naming it."""
        model = cls(**kwargs)
        state = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        where = f'{source} (under {prefix!r})' if prefix else source
        return checkpoint.fill(model, state, where, f'VQGAN({asdict(model.config)})')
