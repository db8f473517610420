"""
Pixels straight from DiGIT's discriminative tokens, in one forward pass: the question DiGIT
leaves open (Zhu et al., NeurIPS 2024, Appendix A.1: "the discriminative tokenizer induced by
the SSL model cannot directly render pixels"). DiGIT renders its tokens with stage 2, a second
autoregressive transformer (DiGIT tokens -> VQ tokens, one forward per token), and a VQ decoder.
Here a decoder renders them directly:

    tokens s (B, g, g) -> centroids c_s (B, C, g, g) -> 1x1 conv (B, z, g, g) -> vqvae.Decoder
    -> image (B, 3, g * 2^(levels - 1), ...)

Each token enters as its K-Means centroid, the ViT feature the tokenizer assigned it by, so the
decoder reads what a token means rather than an arbitrary id; the centroids are a frozen buffer
saved with the decoder, which then needs no tokenizer to render a GPT's tokens. The conv decoder
is the VQVAE's (same presets and flags: --ch, --ch_mult, --num_res_blocks, --z_channels). It
trains on (image, its tokens) pairs, the tokenizer frozen and run on every batch, with the
VQVAE's losses (vqvae_train.py: L1 + L2, LPIPS and the PatchGAN as options).

A token stands for every patch of its cluster, so a decoder trained on L1 + L2 alone renders
their mean: the held-out grid shows each image, the mean training patch of each of its tokens
(digit.patch_means, what the tokens alone say) and the decoder's rendering.

    python train.py --model pixdec                 # after: python tokenizer.py fit
    python sample.py --ckpt out/gpt/ckpt.pt --pixdec out/pixdec/ckpt.pt
Test: `python -m pytest test_all.py -k pixdec`.
"""
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

import checkpoint
import data
import digit
import vqvae
import vqvae_train
from cli import UserError


@dataclass
class PixelDecoderConfig:
    vocab_size: int = 512           # K, the tokenizer's centroids
    feature_dim: int = 192          # C, the ViT features the centroids live in
    grid: int = 8                   # g, tokens per side
    z_channels: int = 16            # the decoder's input width (the VQVAE's latent width)
    ch: int = 32                    # the VQVAE decoder's base width (multiple of 32)
    ch_mult: tuple = (1, 2, 2)      # its width multipliers; upsampling 2^(len - 1)
    num_res_blocks: int = 1         # its residual blocks per level (it uses one more)


class PixelDecoder(nn.Module):
    """DiGIT token maps -> images, one forward pass through the centroids and vqvae.Decoder."""

    def __init__(self, centroids=None, **kwargs):
        super().__init__()
        self.config = cfg = PixelDecoderConfig(**kwargs)
        self.register_buffer('centroids', torch.zeros(cfg.vocab_size, cfg.feature_dim))
        if centroids is not None:
            self.centroids.copy_(centroids)                                      # (K, C)
        self.proj = nn.Conv2d(cfg.feature_dim, cfg.z_channels, 1)
        self.decoder = vqvae.Decoder(vqvae.VQVAEConfig(
            z_channels=cfg.z_channels, ch=cfg.ch, ch_mult=tuple(cfg.ch_mult),
            num_res_blocks=cfg.num_res_blocks))

    @property
    def resolution(self):
        return self.config.grid * 2 ** (len(self.config.ch_mult) - 1)

    def forward(self, tokens):
        """tokens (B, g*g) or (B, g, g) ids -> images (B, 3, H, W), H = W = resolution."""
        g = self.config.grid
        f = self.centroids[tokens.reshape(len(tokens), g, g)]                     # (B, g, g, C)
        return self.decoder(self.proj(f.permute(0, 3, 1, 2).to(self.proj.weight)))

    @classmethod
    def from_checkpoint(cls, ckpt, use_ema=True, source=None):
        """The decoder of a train.py --model pixdec checkpoint, a path or its loaded dict (its
        EMA if any and use_ema), in eval mode. Errors name `source` (default: the path)."""
        is_path = isinstance(ckpt, (str, os.PathLike))
        state = checkpoint.load(ckpt, 'pixel decoder checkpoint') if is_path else ckpt
        source = source or (ckpt if is_path else 'the checkpoint')
        checkpoint.check_run(state, source, 'pixel decoder checkpoint', ['pixdec'])
        model = cls(**state['config'])
        weights = state['ema'] if use_ema and state.get('ema') else state['model']
        return checkpoint.fill(model, weights, source, f'PixelDecoder({state["config"]})').eval()


def laplacian_energy(x):
    """Sum over images of the mean |discrete Laplacian| (4 x - its 4 neighbours) of x
    (B, C, H, W) in [-1, 1]: the fine detail of an image, a sharpness measure. A decoder that
    renders a token's mean patch has less of it than the images it was trained on."""
    x = x.float().clamp(-1, 1)
    lap = 4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] \
        - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]                                  # (B, C, H-2, W-2)
    return lap.abs().mean((1, 2, 3)).sum()


class Training(vqvae_train.Training):
    """--model pixdec: a PixelDecoder on the tokens of the frozen --tokenizer, trained as the
    VQVAE is (its flags, recipe and losses); held-out PSNR of image -> tokens -> pixels beside
    that of the mean patches; rFID of those renderings."""
    frozen = ('tokenizer',)
    no_decay = ()
    add_args = staticmethod(lambda parser: None)   # the VQVAE's flags, and DiGIT's --tokenizer

    def __init__(self, args, train_set, val_set, run):
        self.tok = tok = digit.load_tokenizer(args.tokenizer, run.device)
        super().__init__(args, train_set, val_set, run)   # make_config, LPIPS, the PatchGAN
        n = min(len(train_set), 1000)
        images = torch.stack([train_set[i][0] for i in range(n)])                 # (n, 3, H, W)
        tokens = torch.cat([self.tokens(b.to(run.device)).cpu() for b in images.split(100)])
        self.means = digit.patch_means(tokens, images, tok.vocab_size)           # (K, 3, p, p)

    def make_config(self, args):
        """The VQVAE's decoder flags (its preset where unset) on the tokenizer's grid."""
        preset = vqvae_train.PRESETS[args.vae_preset]
        cfg = {k: getattr(args, k) or preset[k]
               for k in ('z_channels', 'ch', 'ch_mult', 'num_res_blocks')}
        side = self.tok.grid * 2 ** (len(cfg['ch_mult']) - 1)
        if side != args.resolution:
            raise UserError(f"--ch_mult {','.join(map(str, cfg['ch_mult']))} upsamples the "
                            f"tokenizer's {self.tok.grid}x{self.tok.grid} tokens to {side} px, "
                            f'not --resolution {args.resolution}: use levels that reach it')
        return asdict(PixelDecoderConfig(vocab_size=self.tok.vocab_size, grid=self.tok.grid,
                                         feature_dim=self.tok.centroids.shape[1], **cfg))

    def tokens(self, img):
        """img (B, 3, H, W) -> its DiGIT tokens (B, L), in float32 whatever --dtype."""
        with torch.autocast(img.device.type, enabled=False):
            return self.tok.encode(img)

    def build(self):
        return PixelDecoder(self.tok.centroids, **self.config)

    def reconstruct(self, model, img):
        """The decoder's rendering of the tokens of img; no VQ loss."""
        return model(self.tokens(img)), None

    def after_step(self, model, batch, step):
        return {}

    def log_extras(self, model):
        return {}

    def val_sums(self, model, batch):
        """Held-out sums: L2 and PSNR of the rendering, PSNR of the tokens' mean patches, and
        the fine detail (laplacian_energy) of the rendering and of the images."""
        img = batch[0].to(self.run.device)
        tokens = self.tokens(img)                                                 # (B, L)
        with self.run.autocast:
            rec = model(tokens).float()
        sums = {'n': torch.tensor(len(img))}
        for name, x in (('', rec), ('means_', digit.render_tokens(tokens, self.means))):
            mse = ((x.clamp(-1, 1) - img) / 2).square().mean((1, 2, 3))           # (B,)
            sums[name + 'psnr'] = (-10 * mse.clamp_min(1e-10).log10()).sum()
            sums[name + 'l2'] = 4 * mse.sum()
        sums['detail'], sums['detail_ref'] = laplacian_energy(rec), laplacian_energy(img)
        return sums

    @staticmethod
    def figures(sums):
        """Means per image; detail% = the renderings' fine detail as a share of the images'."""
        n, ref = sums.pop('n').clamp_min(1), sums.pop('detail_ref')
        out = {k: (v / n).item() for k, v in sums.items() if k != 'detail'}
        out['detail%'] = (100 * sums['detail'] / ref.clamp_min(1e-12)).item()
        return out

    @torch.no_grad()
    def picture(self, model, path, n=8):
        """n held-out images; their tokens drawn as mean patches; the decoder's rendering."""
        model.eval()
        img = torch.stack([self.val_set[i][0] for i in range(min(n, len(self.val_set)))])
        img = img.to(self.run.device)                                             # (n, 3, H, W)
        tokens = self.tokens(img)
        rows = [img, digit.render_tokens(tokens, self.means), model(tokens)]
        data.save_image_grid(torch.cat(rows).float().cpu(), path, nrow=len(img))
        model.train()

    def fid_images(self, model, indices):
        """rFID: renderings of the tokens of the held-out images `indices`, (b, 3, H, W)."""
        img = torch.stack([self.val_set[i][0] for i in indices]).to(self.run.device)
        tokens = self.tokens(img)
        with self.run.autocast:
            return model(tokens).float()

    def summary(self, r, step):
        return (f'held-out reconstruction from DiGIT tokens PSNR {r["psnr"]:.2f} dB (l2 '
                f'{r["l2"]:.4f}) after {step} steps; their mean patches {r["means_psnr"]:.2f} dB'
                f'\nfine detail of the renderings: {r["detail%"]:.0f}% of the images\' '
                f'(mean |Laplacian|)')
