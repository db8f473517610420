"""
The multi-scale residual VQVAE of VAR (Tian et al., NeurIPS 2024, arXiv 2404.02905).

An image x is encoded to a feature map f (B, C, H, W). Instead of one token per position, VAR
quantises f into K token maps r_1..r_K of growing size pn_k x pn_k (paper Alg. 1):

    f_rest = f
    for k in 1..K:   r_k   = nearest code of area_down(f_rest, pn_k)        # (B, pn_k, pn_k)
                     h_k   = phi_k(bicubic_up(E[r_k], H))                   # (B, C, H, W)
                     f_rest = f_rest - h_k
    f_hat = sum_k h_k            and the decoder renders x_hat from f_hat (Alg. 2).

phi_k is a 3x3 conv blended with its input, phi(h) = (1 - q) h + q conv(h) with q = quant_resi;
a few phi convs are shared over the K scales (partially shared, official default 4). Training
uses the VQ loss of VAR Eq. 5 averaged over scales with a straight-through estimator.

Module names match the official code: the released `vae_ch160v4096z32.pth` loads with every
tensor used (`VQVAE.from_checkpoint`). Letters: B batch, C channels, H x W latent, V codes, K
scales.

Deviations from the official code: `ch_mult`, `num_res_blocks` and the attention layers are
configurable (the official code hard-codes the LDM vq-f16 layout, our default); the phi convs
are always stored as `quant_resi.qresi_ls.{i}` (share_quant_resi=0 means one per scale);
a single scale (K=1) is a plain VQVAE. Training it (never released by VAR): vqvae_train.py.
"""
import os
from dataclasses import dataclass, asdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
from cli import UserError


@dataclass
class VQVAEConfig:
    vocab_size: int = 4096          # V, codebook size (one codebook shared by all scales)
    z_channels: int = 32            # C, channels of the quantised latent
    ch: int = 160                   # base width of the conv encoder/decoder (multiple of 32)
    ch_mult: tuple = (1, 1, 2, 2, 4)  # width multipliers; downsampling = 2**(len-1)
    num_res_blocks: int = 2         # residual blocks per resolution (decoder uses one more)
    using_sa: bool = True           # self-attention at the lowest resolution
    using_mid_sa: bool = True       # self-attention in the middle block
    dropout: float = 0.0            # dropout inside residual blocks
    patch_nums: tuple = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # pn_k, side of token map k
    quant_resi: float = 0.5         # q in phi(h) = (1-q) h + q conv(h); 0 disables phi
    share_quant_resi: int = 4       # number of phi convs shared over scales; 0 = one per scale
    beta: float = 0.25              # commitment weight of Eq. 5


# ----------------------------------------------------------------------------------------------
# Conv encoder / decoder (the VQGAN / LDM layout, as in VAR's basic_vae.py)

def Normalize(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """GN-SiLU-conv twice, with a 1x1 conv shortcut when the width changes."""

    def __init__(self, in_channels, out_channels, dropout):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, 1)
                             if in_channels != out_channels else nn.Identity())

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, fused qkv 1x1 conv."""

    def __init__(self, channels):
        super().__init__()
        self.norm = Normalize(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)  # 3 x (B, C, HW)
        # w[i, j] = softmax_j(q_i . k_j / sqrt(C)), h_i = sum_j w[i, j] v_j. Written out rather
        # than with SDPA: at <= 32x32 latents it costs nothing and matches the official bit for bit
        w = F.softmax(torch.bmm(q.transpose(1, 2), k) * C ** -0.5, dim=2)     # (B, HW, HW)
        h = torch.bmm(v, w.transpose(1, 2))                                   # (B, C, HW)
        return x + self.proj_out(h.reshape(B, C, H, W))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right/bottom by one (VQGAN's asymmetric padding)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode='nearest'))


def _level(blocks, attns, resample_name=None, resample=None):
    """One resolution level as a container with the official attribute names."""
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
    if resample is not None:
        setattr(level, resample_name, resample)  # `downsample` or `upsample`
    return level


def _run_level(level, h, resample_name):
    """Residual blocks, each followed by its attention if the level has any, then resampling."""
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return getattr(level, resample_name)(h) if hasattr(level, resample_name) else h


def _mid(channels, cfg):
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, cfg.dropout)
    mid.attn_1 = AttnBlock(channels) if cfg.using_mid_sa else nn.Identity()
    mid.block_2 = ResnetBlock(channels, channels, cfg.dropout)
    return mid


class Encoder(nn.Module):
    """Image (B, 3, 16h, 16w) -> features (B, z_channels, h, w) for the default ch_mult."""

    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.down, c = nn.ModuleList(), cfg.ch
        for i, w in enumerate(widths):
            last = i == len(widths) - 1
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(c, w, cfg.dropout))
                c = w
                if last and cfg.using_sa:
                    attns.append(AttnBlock(c))
            self.down.append(_level(blocks, attns, 'downsample', None if last else Downsample(c)))
        self.mid = _mid(c, cfg)
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h, 'downsample')
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Features (B, z_channels, h, w) -> image (B, 3, 16h, 16w); `up.0` is the finest level."""

    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        c = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _mid(c, cfg)
        levels = []
        for i in reversed(range(len(widths))):    # coarse to fine, stored fine-first below
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(c, widths[i], cfg.dropout))
                c = widths[i]
                if i == len(widths) - 1 and cfg.using_sa:
                    attns.append(AttnBlock(c))
            levels.insert(0, _level(blocks, attns, 'upsample', Upsample(c) if i > 0 else None))
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(c)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            h = _run_level(level, h, 'upsample')
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------
# Multi-scale residual quantiser (VAR Alg. 1 and 2)

class Phi(nn.Conv2d):
    """phi(h) = (1 - q) * h + q * conv3x3(h): the residual conv applied after upsampling."""

    def __init__(self, channels, quant_resi):
        super().__init__(channels, channels, 3, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h):
        return h * (1 - self.resi_ratio) + super().forward(h) * self.resi_ratio


class PhiPartiallyShared(nn.Module):
    """n phi convs shared over K scales: scale k uses the phi whose tick is nearest k/(K-1)."""

    def __init__(self, phis):
        super().__init__()
        self.qresi_ls = nn.ModuleList(phis)
        n = len(phis)
        margin = 1 / 3 / n if n == 4 else 1 / 2 / n  # the official tick placement
        self.ticks = np.linspace(margin, 1 - margin, n)

    def index(self, k, K):
        """Index of the phi used at scale k of K (K=10, n=4: 0,0,1,1,1,2,2,3,3,3)."""
        return int(np.argmin(np.abs(self.ticks - (k / (K - 1) if K > 1 else 0.0))))


class MultiScaleQuantizer(nn.Module):
    """One codebook E (V, C), K residual scales, phi convs; the VQ part of VAR's tokenizer."""

    def __init__(self, cfg):
        super().__init__()
        self.patch_nums, self.beta = tuple(cfg.patch_nums), cfg.beta
        self.vocab_size = cfg.vocab_size
        K = len(self.patch_nums)
        n = cfg.share_quant_resi or K
        phis = [Phi(cfg.z_channels, cfg.quant_resi) if abs(cfg.quant_resi) > 1e-6
                else nn.Identity() for _ in range(n)]
        self.quant_resi = PhiPartiallyShared(phis)
        self.phi_index = [self.quant_resi.index(k, K) for k in range(K)]
        # EMA of how often each code is picked at each scale (the official buffer name):
        # drives the usage figures and the re-seeding of dead codes.
        self.register_buffer('ema_vocab_hit_SV', torch.zeros(K, cfg.vocab_size))
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)

    def nearest_code(self, z):
        """argmin_v ||z - E_v||^2 = ||z||^2 + ||E_v||^2 - 2 z.E_v, z (B, C, h, w) -> (B, h, w).

        The sum is formed in the official order so that tokens are bit-identical to it."""
        B, C, h, w = z.shape
        z = z.permute(0, 2, 3, 1).reshape(-1, C)                                  # (N, C)
        E = self.embedding.weight.detach()                                        # (V, C)
        d = z.square().sum(1, keepdim=True) + E.square().sum(1)                   # (N, V)
        d = torch.addmm(d, z, E.T, beta=1, alpha=-2)
        return d.argmin(1).view(B, h, w)

    def upsample_phi(self, k, h, H, contiguous=False):
        """phi_k(bicubic_up(h)), h (B, C, pn, pn) -> (B, C, H, H). No upsampling at pn == H.
        The official code makes h contiguous on the encode path only, and feeds the conv a
        channels-last view elsewhere; we follow it, so that results are bit-identical."""
        if h.shape[-1] != H:
            h = F.interpolate(h, size=(H, H), mode='bicubic')                    # (B, C, H, H)
        return self.quant_resi.qresi_ls[self.phi_index[k]](h.contiguous() if contiguous else h)

    def embed_tokens(self, idx, pn):
        """Code vectors of a token map: idx (B, pn*pn) -> E[idx] as (B, C, pn, pn)."""
        return self.embedding(idx).transpose(1, 2).view(len(idx), -1, pn, pn)

    def residual_steps(self, f):
        """Alg. 1: yields (z_k, r_k, h_k) scale by scale: the downsampled residual z_k
        (B, C, pn, pn), its tokens r_k (B, pn, pn) and the contribution h_k (B, C, H, W)."""
        B, C, H, W = f.shape
        if self.patch_nums[-1] != H or H != W:
            raise ValueError(f'latent is {H}x{W} but the last patch_num is {self.patch_nums[-1]}: '
                             'patch_nums must end at the latent size (image size / downsampling)')
        f_rest = f.detach().clone()
        for k, pn in enumerate(self.patch_nums):
            z = F.interpolate(f_rest, size=(pn, pn), mode='area') if pn != H else f_rest
            idx = self.nearest_code(z)                                            # (B, pn, pn)
            h = self.upsample_phi(k, self.embedding(idx).permute(0, 3, 1, 2), H, True)  # (B,C,H,W)
            f_rest = f_rest - h.detach()
            yield z, idx, h

    def forward(self, f):
        """Training path. f (B, C, H, W) -> (f_hat with straight-through grads, vq_loss, idx list).

        vq_loss = 1/K sum_k [ beta ||sg(f_hat_k) - f||^2 + ||f_hat_k - sg(f)||^2 ]  (Eq. 5 over
        the cumulative reconstructions f_hat_k), computed in fp32 even under autocast."""
        with torch.autocast(f.device.type, enabled=False):
            f = f.float()
            f_hat, vq_loss, idx_list = torch.zeros_like(f), 0.0, []
            for _, idx, h in self.residual_steps(f):
                f_hat = f_hat + h
                vq_loss = vq_loss + self.beta * F.mse_loss(f_hat.detach(), f) \
                    + F.mse_loss(f_hat, f.detach())
                idx_list.append(idx.flatten(1))                                   # (B, pn*pn)
            if self.training:
                self._record_hits(idx_list)
            f_hat = (f_hat.detach() - f.detach()) + f   # straight-through: d f_hat / d f = 1
        return f_hat, vq_loss * (1.0 / len(self.patch_nums)), idx_list

    @torch.no_grad()
    def _record_hits(self, idx_list):
        # index_add_, not bincount: its output shape is static, so torch.compile does not break
        hits = torch.stack([torch.zeros(self.vocab_size, device=i.device).index_add_(
            0, i.flatten(), torch.ones(i.numel(), device=i.device)) for i in idx_list])  # (K, V)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(hits)   # count the global batch, so every rank keeps the same EMA
        ema = self.ema_vocab_hit_SV
        fresh = ema.sum(1, keepdim=True) == 0                                     # first record
        ema.copy_(torch.where(fresh, hits, 0.99 * ema + 0.01 * hits))

    def used(self):
        """(K, V) bool: codes picked at least 8% as often as they would be under uniform use at
        each scale, by the hit EMA (roughly the last few hundred steps)."""
        ema = self.ema_vocab_hit_SV
        return (ema >= 0.08 * ema.mean(1, keepdim=True)) & (ema > 0)

    def usage(self):
        """Percent of the codebook in use at each scale (K,)."""
        return self.used().float().mean(1) * 100

    def idx_to_fhat(self, idx_list, H):
        """Alg. 2: f_hat = sum_k phi_k(up(E[r_k])) over the given scales (a prefix of K scales
        gives the coarse reconstruction). idx_list: k x (B, pn*pn) -> (B, C, H, H), fp32."""
        B, C = idx_list[0].shape[0], self.embedding.embedding_dim
        f_hat = self.embedding.weight.new_zeros(B, C, H, H)
        for k, idx in enumerate(idx_list):
            f_hat.add_(self.upsample_phi(k, self.embed_tokens(idx, self.patch_nums[k]), H))
        return f_hat

    def idx_to_var_input(self, idx_list):
        """Teacher-forcing input of VAR: for k = 1..K-1, area_down(f_hat_{k-1}, pn_{k+1}), where
        f_hat_{k-1} sums the first k scales. K x (B, pn_k^2) -> (B, L - pn_1^2, C)."""
        B, C = idx_list[0].shape[0], self.embedding.embedding_dim
        H, out = self.patch_nums[-1], []
        f_hat = self.embedding.weight.new_zeros(B, C, H, H)
        for k, pn_next in enumerate(self.patch_nums[1:]):
            f_hat.add_(self.upsample_phi(k, self.embed_tokens(idx_list[k], self.patch_nums[k]), H))
            nxt = F.interpolate(f_hat, size=(pn_next, pn_next), mode='area')     # (B, C, pn', pn')
            out.append(nxt.flatten(2).transpose(1, 2))                             # (B, pn'^2, C)
        if not out:   # a single scale: VAR has nothing to teacher-force after the start token
            return f_hat.new_zeros(B, 0, C)
        return torch.cat(out, 1)

    def next_var_input(self, k, f_hat, h):
        """VAR inference step: add scale k's code vectors h (B, C, pn, pn), i.e. E[r_k] or a
        soft mix of codes, to f_hat (B, C, H, H); returns the new f_hat and the next scale's
        input area_down(f_hat, pn_{k+1})."""
        H = self.patch_nums[-1]
        f_hat = f_hat + self.upsample_phi(k, h, H)
        if k == len(self.patch_nums) - 1:
            return f_hat, f_hat
        pn_next = self.patch_nums[k + 1]
        return f_hat, F.interpolate(f_hat, size=(pn_next, pn_next), mode='area')


# ----------------------------------------------------------------------------------------------
# The tokenizer

class VQVAE(nn.Module):
    """Encoder -> quant_conv -> multi-scale quantiser -> post_quant_conv -> decoder."""

    def __init__(self, **kwargs):
        super().__init__()
        self.config = cfg = VQVAEConfig(**kwargs)
        if cfg.ch % 32:
            raise ValueError(f'ch={cfg.ch}: GroupNorm(32) needs a multiple of 32')
        self.downsample = 2 ** (len(cfg.ch_mult) - 1)
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quantize = MultiScaleQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1)

    @property
    def resolution(self):   # the image side its finest token map covers
        return self.config.patch_nums[-1] * self.downsample

    def encode(self, img):
        """(B, 3, H*s, W*s) in [-1, 1] -> f (B, C, H, W), s = 2**(len(ch_mult)-1)."""
        return self.quant_conv(self.encoder(img))

    def decode(self, f_hat):
        """f_hat (B, C, H, W) -> image (B, 3, H*s, W*s), not clamped (training)."""
        return self.decoder(self.post_quant_conv(f_hat))

    def forward(self, img):
        """Training forward: img (B, 3, h, w) -> (reconstruction, vq_loss, list of K (B, pn^2))."""
        f_hat, vq_loss, idx_list = self.quantize(self.encode(img))
        return self.decode(f_hat), vq_loss, idx_list

    @torch.no_grad()
    def img_to_idx(self, img):
        """Tokenise: img (B, 3, h, w) in [-1, 1] -> list of K LongTensors (B, pn_k^2)."""
        f = self.encode(img).float()
        return [idx.flatten(1) for _, idx, _ in self.quantize.residual_steps(f)]

    @torch.no_grad()
    def idx_to_img(self, idx_list):
        """Detokenise: list of k <= K (B, pn^2) -> image (B, 3, h, w) in [-1, 1]. With fewer
        than K scales this renders the coarse partial sum (the coarse-to-fine pictures)."""
        f_hat = self.quantize.idx_to_fhat(idx_list, self.config.patch_nums[-1])
        return self.decode(f_hat).clamp(-1, 1)

    def fhat_to_img(self, f_hat):
        """f_hat (B, C, H, W) -> image in [-1, 1] (used by VAR's sampler)."""
        return self.decode(f_hat).clamp(-1, 1)

    @torch.no_grad()
    def idx_to_var_input(self, idx_list):
        """Teacher-forcing input for VAR: list of K (B, pn^2) -> (B, L - 1, C)."""
        return self.quantize.idx_to_var_input(idx_list)

    @classmethod
    def frozen(cls, path, resolution, device):
        """The frozen tokenizer of VAR or DiGIT's stage 2, checked against the image size."""
        if not os.path.exists(path):
            raise UserError(f'--vae {path} not found: train a tokenizer first (python train.py '
                            '--model vqvae ...) or pass the released vae_ch160v4096z32.pth')
        vae = cls.from_checkpoint(path).to(device).eval().requires_grad_(False)
        if resolution != vae.config.patch_nums[-1] * vae.downsample:
            raise UserError(f'--resolution {resolution} does not fit the tokenizer, '
                            f'made for {vae.config.patch_nums[-1] * vae.downsample} px images')
        return vae

    @classmethod
    def from_checkpoint(cls, path, use_ema=True):
        """Load the official `vae_ch160v4096z32.pth` (a bare state dict, default config) or a
        `train.py --model vqvae` checkpoint (config inside). Errors name what does not fit."""
        ckpt = checkpoint.load(path, 'VQVAE checkpoint')
        if isinstance(ckpt, dict) and 'kind' in ckpt:     # ours
            checkpoint.check_run(ckpt, path, 'VQVAE checkpoint', ['vqvae'])
            state = ckpt['ema'] if use_ema and ckpt.get('ema') else ckpt['model']
            model = cls(**ckpt['config'])
        else:                                             # official: the released tokenizer
            state, model = ckpt, cls()
            if isinstance(state, dict) and any(k.startswith('blocks.') for k in state):
                raise UserError(f'{path} holds a VAR transformer, not its VQVAE tokenizer')
        ema = state.get('quantize.ema_vocab_hit_SV') if isinstance(state, dict) else None
        if ema is not None and ema.shape != model.quantize.ema_vocab_hit_SV.shape:
            state = {**state, 'quantize.ema_vocab_hit_SV': model.quantize.ema_vocab_hit_SV}
        return checkpoint.fill(model, state, path, f'VQVAE({asdict(model.config)})')
