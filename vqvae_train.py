"""
Training VAR's multi-scale VQVAE (vqvae.py), the part the official VAR code never released:
the loss VQGAN made standard (Esser et al. 2021), the codebook kept alive, and the task of
`train.py --model vqvae`.

    loss = l1 |x - x_hat| + l2 (x - x_hat)^2 + L_vq (VAR Eq. 5) [+ w_lpips LPIPS(x, x_hat)]
           [+ disc_weight * lambda * -D(x_hat)]       once step >= disc_start, where
    lambda = ||grad_last rec_loss|| / (||grad_last -D(x_hat)|| + 1e-4)   (VQGAN's adaptive weight,
             grad_last: w.r.t. the decoder's last conv), and the PatchGAN D minimises the hinge
    L_D = 1/2 (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))]).

Every --reseed_every steps, codes no scale has used lately get a live residual of the batch
(dead-code re-seeding; the official tokenizer has no such step). Presets: 'tiny' (1M parameters,
up to 64 px, the quick start) and 'var' (the released vae_ch160v4096z32 architecture).

    python train.py --model vqvae                                   # 32 px built-in data, CPU
    python train.py --model vqvae --data ~/imagenet --resolution 256 --disc_weight 0.8
Test: `python -m pytest test_all.py -k "vqvae or gan or lpips"`.
"""
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import cli
import data
import vqvae
from cli import UserError

# ----------------------------------------------------------------------------------------------
# PatchGAN, hinge loss, adaptive weight, LPIPS

class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / VQGAN): a real-vs-fake logit per overlapping patch, (B, 1, h', w')."""

    def __init__(self, ch=64, n_layers=3):
        super().__init__()
        layers, c = [nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2)], ch
        for i in range(1, n_layers + 1):
            c_next = ch * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(c, c_next, 4, stride, 1, bias=False), nn.BatchNorm2d(c_next),
                       nn.LeakyReLU(0.2)]
            c = c_next
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():   # the DCGAN init that VQGAN uses
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)


def hinge_d_loss(logits_real, logits_fake):
    """Discriminator hinge loss: 1/2 (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))])."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def adaptive_gan_weight(rec_loss, g_loss, last_layer, max_weight=1e4):
    """VQGAN's balance: ||grad_last rec_loss|| / (||grad_last g_loss|| + 1e-4), clamped."""
    rec_grad, = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    g_grad, = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, max_weight).detach()


class LPIPS(nn.Module):
    """LPIPS perceptual distance (Zhang et al. 2018) on VGG-16: unit-normalise the channels of
    5 ReLU feature maps, square the difference, weight channels by a learnt 1x1 conv, average
    over space, sum over layers. Weights are loaded by path: torchvision's `vgg16-397923af.pth`
    (keys `features.N.*`) and LPIPS' `vgg.pth` (keys `linL.model.1.weight`). Frozen."""

    cfg = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512)

    def __init__(self):
        super().__init__()
        layers, c, self.taps = [], 3, []
        for v in self.cfg:
            if v == 'M':
                self.taps.append(len(layers) - 1)         # the ReLU just before each pooling
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
                c = v
        self.taps.append(len(layers) - 1)
        self.features = nn.Sequential(*layers)
        self.lins = nn.ParameterList([nn.Parameter(torch.ones(1, c, 1, 1) / c)
                                      for c in (64, 128, 256, 512, 512)])
        self.register_buffer('shift', torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1), False)
        self.register_buffer('scale', torch.tensor([.458, .448, .450]).view(1, 3, 1, 1), False)
        self.requires_grad_(False)

    def load(self, vgg_path, lin_path):
        vgg = checkpoint.load(vgg_path, '--lpips_vgg')
        self.features.load_state_dict({k[len('features.'):]: v for k, v in vgg.items()
                                       if k.startswith('features.')}, strict=True)
        lin = checkpoint.load(lin_path, '--lpips_lin')
        for i, p in enumerate(self.lins):
            p.data.copy_(lin[f'lin{i}.model.1.weight'])
        return self

    def forward(self, x, y):
        """x, y (B, 3, H, W) in [-1, 1] -> per-image distance (B,)."""
        h = torch.cat([x, y]).sub(self.shift).div(self.scale)                     # (2B, 3, H, W)
        dist_sum, taps = 0.0, iter(self.lins)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.taps:
                n = h / (h.square().sum(1, keepdim=True).sqrt() + 1e-10)      # unit channels
                a, b = n.chunk(2)
                dist_sum = dist_sum + ((a - b).square() * next(taps)).sum(1).mean((1, 2))
                if i == self.taps[-1]:
                    break
        return dist_sum


@torch.no_grad()
def reseed_dead_codes(quantize, f):
    """Codes unused at every scale get a random live residual z_k of this batch (scale k drawn
    uniformly, so coarse scales are fed too); f (B, C, H, W) from the encoder. Returns how many
    were re-seeded. Under torch.distributed rank 0's choice is broadcast to all ranks."""
    ema = quantize.ema_vocab_hit_SV
    if ema.sum() == 0:
        return 0
    dead = (~quantize.used().any(0)).nonzero().flatten()                          # (D,)
    if len(dead):
        pools = [z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
                 for z, _, _ in quantize.residual_steps(f.float())]               # K x (N_k, C)
        scale = torch.randint(len(pools), (len(dead),))
        rows = [pools[s][torch.randint(len(pools[s]), ())] for s in scale.tolist()]
        quantize.embedding.weight[dead] = torch.stack(rows).to(quantize.embedding.weight)
        ema[:, dead] = 0.0   # in use only once picked; still unused next time: re-seeded
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(quantize.embedding.weight.data, 0)
        dist.broadcast(ema, 0)
    return len(dead)


# ----------------------------------------------------------------------------------------------
# The task of train.py: --model vqvae

# Architecture presets; any flag given on the command line overrides its preset value.
PRESETS = {
    'tiny': dict(vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1),
    'var': dict(vocab_size=4096, z_channels=32, ch=160, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2),
}
PATCH_NUMS = {4: (1, 2, 3, 4), 8: (1, 2, 3, 4, 6, 8), 16: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
              32: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)}   # 16 and 32: VAR's 256 px and 512 px
ARCH_FLAGS = ('vocab_size', 'z_channels', 'ch', 'ch_mult', 'num_res_blocks', 'patch_nums')


def config_from_args(args):
    """The preset for the resolution, overridden by any architecture flag that was given."""
    cfg = dict(PRESETS[args.vae_preset], beta=args.beta)
    for k in ARCH_FLAGS:
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    latent, rem = divmod(args.resolution, 2 ** (len(cfg['ch_mult']) - 1))
    if rem or ('patch_nums' not in cfg and latent not in PATCH_NUMS):
        raise UserError(f'resolution {args.resolution} gives no standard latent size with '
                        f"ch_mult {cfg['ch_mult']}: pass --patch_nums ending at the latent side")
    cfg.setdefault('patch_nums', PATCH_NUMS.get(latent))
    if cfg['patch_nums'][-1] != latent:
        raise UserError(f"--patch_nums {','.join(map(str, cfg['patch_nums']))} must end at the "
                        f'latent side {latent} (--resolution {args.resolution} / '
                        f"{2 ** (len(cfg['ch_mult']) - 1)})")
    return cfg


class Training:
    """--model vqvae: reconstruction + VQ (+ LPIPS, + PatchGAN) on images; held-out PSNR and the
    codebook share per scale; a grid of coarse-to-fine reconstructions."""
    # VQGAN's Adam for the tokenizer
    defaults = dict(weight_decay=0.0, beta1=0.5, beta2=0.9, lr_schedule='cosine', warmup_iters=50)
    no_decay = ('embedding',)
    picture_name = 'recon'
    frozen = ()

    @staticmethod
    def add_args(parser):
        g = parser.add_argument_group('vqvae: the multi-scale tokenizer (--model vqvae)')
        g.add_argument('--vae_preset', choices=list(PRESETS), default=None,
                       help="tokenizer size: 'tiny' (default up to 64 px) or 'var' = the released "
                            "vae_ch160v4096z32 (default above 64 px)")
        g.add_argument('--vocab_size', type=cli.number(int, lambda v: v >= 2, 'an integer >= 2'),
                       help='codebook size V')
        g.add_argument('--z_channels', type=cli.positive_int, help='latent channels C')
        g.add_argument('--ch', type=cli.number(int, lambda v: v > 0 and v % 32 == 0,
                                               'a positive multiple of 32'),
                       help='base conv width (GroupNorm(32): a multiple of 32)')
        g.add_argument('--ch_mult', type=cli.positive_ints,
                       help='width multipliers, e.g. 1,2,2 (downsampling 4)')
        g.add_argument('--num_res_blocks', type=cli.positive_int,
                       help='residual blocks per resolution')
        g.add_argument('--patch_nums', type=cli.positive_ints,
                       help='token map sides, ending at the latent size (default: by latent size)')
        g.add_argument('--beta', type=cli.nonneg_float, default=0.25,
                       help='commitment weight (VAR Eq. 5)')
        g.add_argument('--l1', type=cli.nonneg_float, default=1.0, help='weight of the L1 loss')
        g.add_argument('--l2', type=cli.nonneg_float, default=1.0, help='weight of the L2 loss')
        g.add_argument('--lpips_vgg', default='', help='torchvision vgg16 weights: enables LPIPS')
        g.add_argument('--lpips_lin', default='', help="LPIPS' vgg.pth linear-layer weights")
        g.add_argument('--lpips_weight', type=cli.nonneg_float, default=1.0,
                       help='weight of LPIPS')
        g.add_argument('--disc_weight', type=cli.nonneg_float, default=0.0,
                       help='PatchGAN hinge loss weight (VQGAN uses 0.8); 0 = no discriminator')
        g.add_argument('--disc_start', type=cli.nonneg_int, default=0,
                       help='step the GAN loss starts at')
        g.add_argument('--reseed_every', type=cli.nonneg_int, default=100,
                       help='re-seed unused codes from live features every N steps (0 = never)')

    @staticmethod
    def finish_args(args):
        args.vae_preset = args.vae_preset or ('tiny' if args.resolution <= 64 else 'var')
        if args.lr is None:   # VQGAN-like: the tiny model takes more
            args.lr = 1e-3 if args.vae_preset == 'tiny' else 2e-4

    def __init__(self, args, train_set, val_set, run):
        self.args, self.run = args, run
        self.train_set, self.val_set = train_set, val_set
        self.config = self.make_config(args)
        self.lpips = None
        if args.lpips_vgg:
            self.lpips = LPIPS().load(args.lpips_vgg, args.lpips_lin).to(run.device)
        self.disc = self.last = None

    def make_config(self, args):
        return config_from_args(args)

    def build(self):
        return vqvae.VQVAE(**self.config)

    def discriminator(self):
        """VQGAN's PatchGAN of 3 layers; fewer for tiny images (its patches must fit)."""
        if self.args.disc_weight <= 0:
            return None
        n_layers = max(1, min(3, int(math.log2(self.args.resolution)) - 2))
        self.disc = PatchDiscriminator(n_layers=n_layers).to(self.run.device)
        return self.disc

    def loss(self, model, batch, step):
        """The generator loss above; its parts for the log. Keeps (x, x_hat) for disc_loss."""
        args = self.args
        img = batch[0].to(self.run.device, non_blocking=True)
        rec, vq_loss = self.reconstruct(model, img)
        l1, l2 = (rec - img).abs().mean(), F.mse_loss(rec, img)
        rec_loss = args.l1 * l1 + args.l2 * l2
        parts = dict(l1=l1.detach(), l2=l2.detach())
        if vq_loss is not None:
            parts['vq'] = vq_loss.detach()
        if self.lpips is not None:
            perceptual = self.lpips(rec.float(), img.float()).mean()
            rec_loss = rec_loss + args.lpips_weight * perceptual
            parts['lpips'] = perceptual.detach()
        loss = rec_loss + vq_loss if vq_loss is not None else rec_loss
        if self.disc is not None and step >= args.disc_start:
            self.disc.requires_grad_(False)   # important! the generator step must not train D
            g_loss = -self.disc(rec).mean()
            last_layer = next(p for name, p in model.named_parameters()   # through DDP and
                              if name.endswith('decoder.conv_out.weight'))  # torch.compile
            weight = adaptive_gan_weight(rec_loss, g_loss, last_layer)
            loss = loss + args.disc_weight * weight * g_loss
            parts.update(g=g_loss.detach(), g_weight=weight)
        self.last = img, rec
        return loss, parts

    def reconstruct(self, model, img):
        """x_hat (B, 3, H, W) and the VQ loss (VAR Eq. 5) of img; pixdec.py renders tokens."""
        rec, vq_loss, _ = model(img)
        return rec, vq_loss

    def disc_loss(self, disc, step):
        """The hinge loss of D on the images and reconstructions loss() just saw."""
        if step < self.args.disc_start:
            return None
        self.disc.requires_grad_(True)
        img, rec = self.last
        return hinge_d_loss(disc(img), disc(rec.detach()))

    def after_step(self, model, batch, step):
        every = self.args.reseed_every
        if not every or step % every:
            return {}
        with torch.no_grad(), self.run.autocast:
            f = model.encode(batch[0].to(self.run.device, non_blocking=True))
            return {'reseeded': reseed_dead_codes(model.quantize, f)}

    def log_extras(self, model):
        return {'usage%': model.quantize.usage().tolist()}

    def val_sums(self, model, batch):
        """Held-out sums of a batch: L2, PSNR (per image, on [0, 1] pixels), VQ loss, code hits."""
        img = batch[0].to(self.run.device)
        with self.run.autocast:
            rec, vq_loss, idx = model(img)
        mse = ((rec.float().clamp(-1, 1) - img) / 2).square().mean((1, 2, 3))       # (B,)
        hits = torch.stack([torch.bincount(i.flatten(), minlength=model.config.vocab_size)
                            for i in idx])                                          # (K, V)
        return {'l2': 4 * mse.sum(), 'psnr': (-10 * mse.clamp_min(1e-10).log10()).sum(),
                'vq': vq_loss * len(img), 'codes%': hits, 'n': torch.tensor(len(img))}

    @staticmethod
    def figures(sums):
        """Held-out means; code hits (K, V) become the share of the codebook each scale used."""
        n = sums.pop('n').clamp_min(1)
        sums['codes%'] = (sums['codes%'] > 0).float().mean(1) * 100 * n
        return {k: (v / n).tolist() if v.ndim else (v / n).item() for k, v in sums.items()}

    @torch.no_grad()
    def picture(self, model, path, n=8):
        """The first n held-out images on top, then their reconstruction from the first 1, 2,
        ..., K scales (coarse to fine): the multi-scale tokens, seen."""
        model.eval()
        img = torch.stack([self.val_set[i][0] for i in range(min(n, len(self.val_set)))])
        img = img.to(self.run.device)                                             # (n, 3, H, W)
        idx = model.img_to_idx(img)
        rows = [img] + [model.idx_to_img(idx[:k]) for k in range(1, len(idx) + 1)]
        data.save_image_grid(torch.cat(rows).float().cpu(), path, nrow=len(img))
        model.train()

    def fid_images(self, model, indices):
        """rFID: the reconstructions of the held-out images `indices`, (b, 3, H, W)."""
        img = torch.stack([self.val_set[i][0] for i in indices]).to(self.run.device)
        with self.run.autocast:
            return model.idx_to_img(model.img_to_idx(img)).float()

    def summary(self, r, step):
        per_scale = ', '.join(f'{pn}x{pn}: {c:.1f}%'
                              for pn, c in zip(self.config['patch_nums'], r['codes%']))
        return (f'held-out reconstruction PSNR {r["psnr"]:.2f} dB (l2 {r["l2"]:.4f}) after '
                f'{step} steps\ncodebook used per scale on held-out images: {per_scale}')
