r"""
DiGIT's discriminative tokenizer (Zhu et al., NeurIPS 2024, Sec. 3): the patch features of a
frozen self-supervised ViT, clustered with K-Means (kmeans.py); a patch's token is the index of
its nearest centroid:

    f     = ViT.get_intermediate_layers(normalise(img), n=[layer], norm=True)[0]   # (B, L, C)
    token = argmin_k ||f - c_k||^2                                                # (B, L)

DiGIT: DINOv2 ViT-B/14 with 4 registers (dinov2.py), block layer = depth - 3 after the final
norm, 224 px -> 16x16 tokens, K = 8192 (ViT-L: 16k), faiss K-Means with 20 iterations.
Offline (no DINOv2 weights: the quick start, CI) a small ViT trained here on the data with a
discriminative objective (standin.py: InfoNCE between two views, global and per patch;
`train.py --model ssl`) stands in for DINOv2; it is a stand-in, not a reproduction.
Also here: DiGIT Table 1, how far pixel noise moves VQVAE tokens vs discriminative tokens.

    python train.py --model ssl                        # the stand-in encoder, out/ssl/ckpt.pt
    python tokenizer.py fit --encoder out/ssl/ckpt.pt  # K-Means -> out/tokenizer/tokenizer.pt
    python tokenizer.py stability --vae out/vqvae/ckpt.pt          # Table 1, held-out images
    python tokenizer.py fit --encoder dinov2_vitb14_reg4_pretrain.pth --centroids km_8k.npy \
        --out digit_base.pt                            # DiGIT's released centroids, as they are
    torchrun --nproc_per_node=8 tokenizer.py fit --encoder dinov2_vitb14_reg4_pretrain.pth \
        --data ~/imagenet --k 8192                     # features and K-Means over 8 GPUs

Deviations from DiGIT: K-Means sees centre crops of a seeded random image subset (DiGIT: random
crops of an unseeded ~10% of ImageNet; both keep 256 points per centroid), greedy k-means++
init (faiss: random), fp32 distances (DiGIT's fp16 training assigned tokens in fp16).
Test: `python -m pytest test_all.py -k "tokenizer or stability or contrastive"`.
"""
import argparse
import math
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import cli
import data
import dist
import kmeans
import standin
import vqvae
from dinov2 import DINOv2, IMAGENET_MEAN, IMAGENET_STD
from cli import UserError


# ----------------------------------------------------------------------------------------------
# The tokenizer: ViT features -> nearest K-Means centroid

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
            raise ValueError(f'resolution {resolution} is not a multiple of patch '
                             f'{cfg.patch_size}')
        self.encoder = encoder.eval().requires_grad_(False)
        self.layer, self.resolution = layer, resolution
        for name, value in (('mean', IMAGENET_MEAN), ('std', IMAGENET_STD)):
            self.register_buffer(name, torch.tensor(value).view(1, 3, 1, 1), persistent=False)
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
        """Features (..., C) -> id of the nearest centroid (...), chunked fp32 (kmeans.py),
        also under autocast (bf16 distances would mis-assign about 10% of the patches)."""
        if self.centroids is None:
            raise RuntimeError('tokenizer has no centroids: fit() it or load a saved one')
        km = kmeans.KMeans(self.vocab_size)
        km.centroids = self.centroids
        with torch.autocast(f.device.type, enabled=False):
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
        checkpoint.save(state, path)

    @classmethod
    def load(cls, path):
        """A tokenizer saved by save(); any other file is a UserError naming it."""
        state = checkpoint.load(path, 'tokenizer')
        if not isinstance(state, dict) or state.get('kind') != 'tokenizer':
            raise UserError(f'{path} is not a tokenizer saved by tokenizer.py (a DINOv2 .pth '
                            'or a train.py --model ssl checkpoint goes to `tokenizer.py fit '
                            '--encoder`)')
        try:
            encoder = checkpoint.fill(DINOv2(**state['encoder_config']), state['encoder'], path,
                                      'its DINOv2 encoder')
            return cls(encoder, state['layer'], state['resolution'], state['centroids'])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:   # edited or damaged
            raise UserError(f'tokenizer {path} does not load: {type(e).__name__}: '
                            f'{" ".join(str(e).split())[:200]}') from None


def load_encoder(path):
    """A frozen ViT and its tokenizer defaults {layer, resolution, k}, from an official DINOv2
    .pth (DiGIT's recipe: block depth-3, 224 px, K 8192, the pos_embed resized with offset 0.1
    and no antialias as DiGIT's copy of DINOv2 does, also for `_reg4`), or from a `train.py
    --model ssl` checkpoint (the offline stand-in: its EMA weights if any, block depth-3, its
    training resolution, K 512). Any other file is a UserError naming it."""
    state = checkpoint.load(path, 'encoder')
    if isinstance(state, dict) and state.get('kind') == 'ssl':
        model = checkpoint.fill(standin.ContrastiveViT(**state['config']),
                                state['ema'] or state['model'], path, 'the stand-in ViT')
        vit = model.vit.eval().requires_grad_(False)
        return vit, dict(layer=vit.config.depth - 3, resolution=vit.config.img_size, k=512)
    if not isinstance(state, dict) or 'cls_token' not in state:
        held = f"a train.py {state['kind']} run" if isinstance(state, dict) and 'kind' in state \
            else 'no DINOv2 weights (no cls_token)'
        raise UserError(f'encoder {path} holds {held}: pass a DINOv2 .pth or a train.py '
                        '--model ssl checkpoint')
    vit = DINOv2.from_checkpoint(path, interpolate_offset=0.1, interpolate_antialias=False)
    return vit, dict(layer=vit.config.depth - 3, resolution=224, k=8192)


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
    return {name: dict(change=(s[0] / count[name][0]).tolist(),
                       cos=(s[1] / count[name][1]).tolist()) for name, s in sums.items()}


def vq_encoder(vae):
    """(features, tokens) of a vqvae.VQVAE for stability(): the encoder output f per latent
    position (B, h*w, C) and the tokens of all scales concatenated (B, sum pn^2)."""
    def fn(img):
        f = vae.encode(img).float()                                           # (B, C, h, w)
        tokens = torch.cat([idx.flatten(1) for _, idx, _ in vae.quantize.residual_steps(f)], 1)
        return f.flatten(2).transpose(1, 2), tokens
    return fn


def digit_encoder(tok):
    """(features, tokens) of a Tokenizer for stability(): (B, L, C) and (B, L)."""
    def fn(img):
        f = tok.features(img)
        return f, tok.nearest(f)
    return fn


# ----------------------------------------------------------------------------------------------
# Command line: fit a tokenizer (sharded over torchrun ranks), and the stability table

def image_batches(dataset, indices, batch_size, num_workers, desc, show):
    """Images (B, 3, H, W) of dataset[indices], in order, with a progress bar if show; the
    unreadable files met are skipped, warned about and counted once (data.BadFiles)."""
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size,
                                         num_workers=num_workers)
    bad = data.BadFiles(dataset)
    for img, _, skipped in tqdm(loader, desc=desc, disable=not show, dynamic_ncols=True):
        bad.update(skipped)
        yield img
    n_bad = len(bad.sync())   # every rank's (a collective: every rank reads all its batches)
    if show and n_bad:
        print(f'{n_bad} unreadable files were skipped')


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    f = sub.add_parser('fit', help='K-Means on encoder features -> a saved tokenizer')
    f.add_argument('--encoder', default='out/ssl/ckpt.pt', help='an official dinov2_*_pretrain'
                   '.pth, or a train.py --model ssl checkpoint (the offline stand-in)')
    f.add_argument('--centroids', default='', help="a [K, C] .npy (DiGIT's km_8k.npy): no fit")
    f.add_argument('--layer', type=cli.nonneg_int,
                   help='0-based block (default: depth - 3, as DiGIT)')
    f.add_argument('--resolution', type=cli.positive_int,
                   help='encoder input side (default: 224 for DINOv2, the stand-in\'s own)')
    f.add_argument('--k', type=cli.positive_int, help='centroids (default: 8192 for DINOv2 as '
                   'DiGIT-base, 512 for the stand-in)')
    f.add_argument('--images', type=cli.positive_int, help='random training images whose '
                   'patches are clustered (default: 4x what K-Means samples, 256 per centroid)')
    f.add_argument('--n_iter', type=cli.nonneg_int, default=20,
                   help='Lloyd iterations (DiGIT: 20)')
    f.add_argument('--out', default='out/tokenizer/tokenizer.pt')
    f.set_defaults(error=f.error)   # for flags that do not fit the encoder
    s = sub.add_parser('stability', help='DiGIT Table 1: token change and feature cosine '
                       'under pixel noise, VQVAE tokens vs discriminative tokens')
    s.add_argument('--tokenizer', default='out/tokenizer/tokenizer.pt')
    s.add_argument('--vae', default='out/vqvae/ckpt.pt', help='train.py vqvae checkpoint or '
                   'the released vae_ch160v4096z32.pth')
    s.add_argument('--images', type=cli.positive_int, default=1000,
                   help='held-out images to average over')
    for q in (f, s):
        q.add_argument('--data', default='builtin', help="'builtin' or an image folder")
        q.add_argument('--batch_size', type=cli.positive_int, default=64)
        q.add_argument('--num_workers', type=cli.nonneg_int, default=0,
                       help='data loader processes')
        q.add_argument('--device', default='', help="'' = cuda if available, else cpu")
        q.add_argument('--seed', type=cli.seed, default=0)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    device, rank, world = dist.setup(args.device, mps=False)   # torchrun: a share per rank
    torch.manual_seed(args.seed)
    if args.command == 'fit':
        result = fit_command(args, device, rank, world, args.error)
    else:
        result = stability_command(args, device)
    dist.cleanup()
    return result


def fit_command(args, device, rank, world, error):
    """`tokenizer.py fit`; error: the subparser's, for flags that do not fit the encoder."""
    encoder, default = load_encoder(args.encoder)
    layer = default['layer'] if args.layer is None else args.layer
    resolution, cfg = args.resolution or default['resolution'], encoder.config
    if not 0 <= layer < cfg.depth:
        error(f'argument --layer: {layer} is not a block of this {cfg.depth}-block encoder')
    if resolution % cfg.patch_size:
        error(f'argument --resolution: {resolution} is not a multiple of the patch size '
              f'{cfg.patch_size}')
    tok = Tokenizer(encoder, layer, resolution).to(device)
    if args.centroids:
        centroids = kmeans.KMeans.load(args.centroids).centroids
        if centroids.shape[1] != cfg.embed_dim:
            raise UserError(f'--centroids {args.centroids}: centroids of shape '
                            f'{tuple(centroids.shape)} do not fit this encoder: expected '
                            f'[K, {cfg.embed_dim}]')
        tok.set_centroids(centroids)
    else:
        k = args.k or default['k']
        dataset = data.build_dataset(args.data, tok.resolution, train=True, seed=args.seed)
        n = args.images or math.ceil(4 * 256 * k / tok.grid ** 2)
        if min(n, len(dataset)) * tok.grid ** 2 < k:
            error(f'argument --k: {k} centroids but only {min(n, len(dataset))} images x '
                  f'{tok.grid ** 2} patches to cluster (raise --images or lower --k)')
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
    table = stability({'VQ': vq_encoder(vae), 'DiGIT': digit_encoder(tok)},
                      (b.to(device) for b in batches), seed=args.seed)
    print(f"\nlatent stability on {min(args.images, len(dataset))} held-out images of "
          f"{args.data} (DiGIT Table 1; SNR in dB, Gaussian pixel noise)")
    print(f"{'SNR (dB)':36s}" + ''.join(f'{s:>7g}' for s in SNRS_DB))
    for metric, label in (('change', 'token change (lower: stabler)'), ('cos', 'cos-sim')):
        for name, r in table.items():
            print(f'{name + " " + label:36s}' + ''.join(f'{v:7.3f}' for v in r[metric]))
    return table


if __name__ == '__main__':
    cli.run(main)
