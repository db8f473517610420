"""
The offline stand-in for DINOv2 in DiGIT's tokenizer (it lets every DiGIT stage run offline,
without downloads): a small ViT (dinov2.py's class) trained here, on the data itself, with a
discriminative objective at the two levels DiGIT Table 4(a) finds to matter, global and patch:

    L = (InfoNCE(g1, g2) + InfoNCE(z1(p), z2)) / 2

over two augmented views of every image (random_views); g is the projected class token, z the
projected patch features, z1(p) view 1's feature map sampled where view 2's patch centres lie.
tokenizer.py then clusters its block depth-3 features exactly as DiGIT clusters DINOv2's.
A stand-in, not a reproduction: nothing pretrained, no teacher, no masking.

    python train.py --model ssl                           # out/ssl/ckpt.pt, a few minutes on CPU
    python tokenizer.py fit --encoder out/ssl/ckpt.pt     # K-Means on its features
Test: `python -m pytest test_all.py -k "contrastive or info_nce or views"`.
"""
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import data
from dinov2 import DINOv2


@dataclass
class StandInConfig:
    img_size: int = 32         # training resolution (the tokenizer's resolution)
    patch_size: int = 4        # 32 px / 4 = 8x8 tokens
    embed_dim: int = 128
    depth: int = 4             # the tokenizer reads block depth - 3 = 1, as DiGIT's rule
    num_heads: int = 2
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
    """The offline stand-in for DINOv2 (it lets every DiGIT stage run offline, without
    downloads): a small ViT of dinov2.py's DINOv2 class trained on the data with a discriminative
    objective at the two levels DiGIT Table 4(a) finds to matter, global and patch:
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
        """img (B, 3, H, W) in [-1, 1] -> loss, {'glob', 'patch', 'acc_g', 'acc_p'}."""
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
# The task of train.py: --model ssl

class Training:
    """--model ssl: the stand-in on the images; held-out InfoNCE and retrieval of the other view;
    a grid of the patch features' principal components."""
    defaults = dict(weight_decay=0.05, beta1=0.9, beta2=0.95, lr_schedule='cosine',
                    warmup_iters=20, depth=4, total_batch_size=64, batch_size=64, max_iters=200)
    no_decay = ('pos_embed', 'cls_token', 'register_tokens', 'mask_token')
    picture_name = 'features'
    frozen = ()

    @staticmethod
    def add_args(parser):
        g = parser.add_argument_group('ssl: the stand-in encoder (--model ssl; also --depth: '
                                      'blocks, width 32*depth, heads depth/2)')
        g.add_argument('--patch_size', type=cli.positive_int,
                       help='ViT patch side (default: resolution / 8, an 8x8 token grid)')

    @staticmethod
    def finish_args(args):
        if args.lr is None:
            args.lr = 1e-3
        args.patch_size = args.patch_size or max(1, args.resolution // 8)   # 8x8 tokens
        if args.resolution % args.patch_size:
            raise cli.UserError(f'--patch_size {args.patch_size} does not divide --resolution '
                                f'{args.resolution}')

    def __init__(self, args, train_set, val_set, run):
        self.args, self.run = args, run
        self.train_set, self.val_set = train_set, val_set
        self.config = asdict(StandInConfig(
            img_size=args.resolution, patch_size=args.patch_size,
            embed_dim=32 * args.depth, depth=args.depth, num_heads=max(1, args.depth // 2)))

    def build(self):
        return ContrastiveViT(**self.config)

    def loss(self, model, batch, step):
        """The loss above on random views; at validation (step None) the views come from a
        generator seeded by the batch's first label and --seed, the same at every validation."""
        img = batch[0].to(self.run.device, non_blocking=True)
        if step is not None:
            return model(img)
        return model(img, torch.Generator().manual_seed(self.args.seed * 1009 + int(batch[1][0])))

    @torch.no_grad()
    def picture(self, model, path, n=8):
        """n held-out images, above the first 3 principal components of their last-block patch
        features as RGB (the usual picture of DINO-like features: parts that look alike get
        alike colours)."""
        model.eval()
        img = torch.stack([self.val_set[i][0] for i in range(min(n, len(self.val_set)))])
        img = img.to(self.run.device)                                             # (n, 3, H, W)
        f = model.vit.forward_features(img)['x_norm_patchtokens'].float()          # (n, L, C)
        g = int(math.sqrt(f.shape[1]))
        flat = f.flatten(0, 1) - f.flatten(0, 1).mean(0)                          # (n L, C)
        pcs = flat @ torch.linalg.svd(flat, full_matrices=False).Vh[:3].T         # (n L, 3)
        pcs = pcs / pcs.abs().amax(0).clamp_min(1e-8)                             # [-1, 1]
        maps = pcs.view(len(img), g, g, 3).permute(0, 3, 1, 2)                   # (n, 3, g, g)
        maps = F.interpolate(maps, size=img.shape[-2:], mode='nearest')
        data.save_image_grid(torch.cat([img, maps]).float().cpu(), path, nrow=len(img))
        model.train()

    def summary(self, r, step):
        return (f'held-out InfoNCE loss {r["loss"]:.3f} after {step} steps (global '
                f'{r["glob"]:.3f}, patch {r["patch"]:.3f}); top-1 retrieval of the other view '
                f'{100 * r["acc_g"]:.1f}% (images), {100 * r["acc_p"]:.1f}% (patches)\n'
                f'next: python tokenizer.py fit --encoder '
                + os.path.join(self.args.out_dir, 'ckpt.pt'))
