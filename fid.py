"""
FID, sFID, Inception Score and precision/recall of generated images, with the FID Inception-v3
written here: the evaluation both VAR and DiGIT report on ImageNet 256x256.

    FID    ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))   (Heusel et al. 2017), on the
           2048-d pool features; sFID: the same on 2023 spatial features (Nash et al. 2021)
    IS     exp E_x KL(p(y|x) || p(y)) over splits of 5000 (Salimans et al. 2016)
    P / R  improved precision and recall, k = 3 (Kynkaanniemi et al. 2019)

The network is pytorch-fid's FID Inception (inception.py) with its weights,
pt_inception-2015-12-05-6726825d.pth, every float tensor used. Two preprocessings of uint8
images share it, and the output names the one used:
    adm          TF1 bilinear resize to 299 (src = dst * in / out), then (x - 128) / 128: the
                 ADM evaluator (guided-diffusion), whose reference batches VAR and DiGIT use
    pytorch_fid  x / 255, bilinear resize to 299 (half-pixel centres), then 2x - 1
The network always runs in eval mode, fp32, TF32 off; statistics are float64 sums; the Frechet
distance is float64 through symmetric eigendecompositions (no scipy sqrtm). As in the ADM
evaluator, IS uses the fc without its bias, splits are consecutive, and sFID uses the first 7
channels of Mixed_6d.branch1x1 flattened in NHWC order. Deviation: P/R distances are fp32, not
fp16 as ADM's. Under torchrun each rank reads a contiguous share of the images.

    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz     # FID, sFID, IS, P, R
    python fid.py /data/imagenet/train --center_crop 256 --save_stats ref.npz   # reference stats
    torchrun --nproc_per_node 8 fid.py samples.npz ref.npz --mode pytorch_fid
Weights: --weights PATH, $FID_INCEPTION_WEIGHTS, the torch hub cache, or --download.
"""
import argparse
import hashlib
import os
import warnings
import zipfile
import zlib

import numpy as np
import torch
import torch.distributed
from tqdm import tqdm

import checkpoint
import cli
import data
import dist
from cli import UserError
from data import IMG_EXTENSIONS, list_images, load_rgb
from inception import (MODES, WEIGHTS_NAME, center_crop, find_weights, load_inception,
                       preprocess)
from kmeans import no_tf32, sq_dists


# -----------------------------------------------------------------------------
# inputs: .npz of uint8 images (ADM's arr_0, what sample.py writes) and image folders

DAMAGED = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error)  # a bad .npz raises


def npz_images(path):
    """(file handle, N, H, W) of the uint8 (N, H, W, 3) array `arr_0` in an .npz, read lazily
    (ADM's 50k samples at 256 px are 10 GB); a UserError naming the file if it has none."""
    try:
        z = zipfile.ZipFile(path)
        if 'arr_0.npy' not in z.namelist():
            raise UserError(f'fid: {path} has no arr_0 (uint8 images), keys: {z.namelist()}')
        f = z.open('arr_0.npy')
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
    except DAMAGED as e:
        raise UserError(f'fid: {path}: arr_0 does not read ({type(e).__name__}: {e})') from None
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran:
        raise UserError(f'fid: {path} arr_0 is {dtype} {shape}; expected uint8 (N, H, W, 3) '
                        f'images as sample.py and the ADM evaluator write')
    return f, shape[0], shape[1], shape[2]


def npz_batches(path, start, stop, batch_size):
    """uint8 (b, H, W, 3) numpy batches of rows start..stop of arr_0, streamed from the zip;
    a UserError naming the file if it is truncated or corrupt."""
    f, n, h, w = npz_images(path)
    row = h * w * 3
    try:
        f.seek(f.tell() + start * row)
        for i in range(start, stop, batch_size):
            b = min(batch_size, stop - i)
            buf = f.read(b * row)
            if len(buf) < b * row:
                raise EOFError(f'the file ends within image {i + len(buf) // row} of {n}')
            yield np.frombuffer(buf, np.uint8).reshape(b, h, w, 3)
    except DAMAGED as e:
        raise UserError(f'fid: {path} is damaged: {type(e).__name__}: {e}') from None
    finally:
        f.close()


class ImageFiles(torch.utils.data.Dataset):
    """The image files under a folder (recursive, sorted) as uint8 (H, W, 3), or None when a file
    does not decode (the caller counts it). crop: ADM's center_crop to that size first."""

    def __init__(self, paths, crop=0):
        self.paths, self.crop = paths, crop

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            img = load_rgb(self.paths[i])
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
            warnings.warn(f'skipping unreadable image {self.paths[i]}: {type(e).__name__}: {e}')
            return None
        return center_crop(img, self.crop) if self.crop else np.asarray(img)


# -----------------------------------------------------------------------------
# features and statistics

class Moments:
    """Running float64 n, sum x and sum x x^T of (n, D) features -> mean (D,), covariance (D, D)
    with n - 1 in the denominator (np.cov's). Summable across ranks."""

    def __init__(self, dim, device):
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, x):
        x = x.to(self.sum.device, torch.float64)                            # (n, D)
        self.n += len(x)
        self.sum += x.sum(0)
        self.outer.addmm_(x.T, x)

    def all_reduce(self):
        n = torch.tensor([self.n], dtype=torch.float64, device=self.sum.device)
        for t in (n, self.sum, self.outer):
            torch.distributed.all_reduce(t)
        self.n = int(n.item())

    def mean_cov(self):
        mu = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mu, mu)) / max(self.n - 1, 1)
        return mu.cpu().numpy(), cov.cpu().numpy()


@torch.no_grad()
def extract(model, batches, mode, device, total=None, desc='features'):
    """Run uint8 image batches (see preprocess; None entries are skipped and counted) through the
    network in eval mode, fp32, TF32 off. Under torch.distributed each rank passes its own share
    and gets the result of all. -> dict: n, n_bad, mu, sigma (2048-d), mu_s, sigma_s (2023-d),
    pool (N, 2048) and logits (N, 1008) float32 numpy, in rank order."""
    model.eval()
    rank, world = dist.rank_world()
    stat_device = 'cpu' if torch.device(device).type == 'mps' else device  # MPS has no float64
    pool_m, spatial_m = Moments(2048, stat_device), Moments(2023, stat_device)
    pools, logits, n_bad = [], [], 0
    show = rank == 0
    with no_tf32(), tqdm(total=total, desc=desc, unit='img', disable=not show) as bar:
        for batch in batches:
            if isinstance(batch, list):
                n_bad += sum(im is None for im in batch)
                batch = [im for im in batch if im is not None]
            if len(batch) == 0:
                continue
            pool, spatial = model(preprocess(batch, mode, device), spatial=True)
            pool_m.update(pool)
            spatial_m.update(spatial)
            pools.append(pool)
            if model.fc is not None:   # NVIDIA's port may stop at the pool: no IS
                logits.append(model.logits(pool))
            bar.update(len(pool) * world)
    pool = torch.cat(pools) if pools else torch.zeros(0, 2048, device=device)    # (n, 2048)
    logit = torch.cat(logits) if logits else torch.zeros(0, 1008, device=device)  # (n, 1008)
    if world > 1:
        pool, logit = dist.all_gather_rows(pool), dist.all_gather_rows(logit)
        bad = torch.tensor([n_bad], device=device)
        torch.distributed.all_reduce(bad)
        n_bad = int(bad.item())
        pool_m.all_reduce()
        spatial_m.all_reduce()
    if 0 < pool_m.n < 2048:   # none: read_input's error
        warnings.warn(f'fid: only {pool_m.n} images: the 2048 x 2048 covariance is singular and '
                      f'FID is biased upwards; the standard is 50000 samples')
    (mu, sigma), (mu_s, sigma_s) = pool_m.mean_cov(), spatial_m.mean_cov()
    return dict(n=pool_m.n, n_bad=n_bad, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s,
                pool=pool.cpu().numpy(), logits=logit.cpu().numpy())


# -----------------------------------------------------------------------------
# metrics

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr (S1 S2)^(1/2), float64, -> float. S1 S2 is similar
    to the PSD M = R S2 R with R = S1^(1/2), so tr (S1 S2)^(1/2) = sum_i sqrt(lambda_i(M)): two
    symmetric eigendecompositions, real even for singular covariances (faster than scipy's
    sqrtm, at the same accuracy). With S1 = V W V^T restricted to its numerical rank r (n
    images give r < n), R = H V^T, H = V W^(1/2) (d, r), and M has the nonzero eigenvalues of
    the r x r matrix H^T S2 H: the second one is small whenever the images are fewer than the
    d features. Tiny negative eigenvalues are clamped to 0; the result is not."""
    mu1, mu2 = (torch.as_tensor(np.asarray(m), dtype=torch.float64) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(np.asarray(s), dtype=torch.float64) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f'fid: statistics do not match: mu {tuple(mu1.shape)} vs '
                         f'{tuple(mu2.shape)}, sigma {tuple(s1.shape)} vs {tuple(s2.shape)}')
    w, v = torch.linalg.eigh(s1)
    keep = w > w.max().clamp(min=0) * len(w) * torch.finfo(w.dtype).eps      # S1's rank r
    half = v[:, keep] * w[keep].sqrt()                                       # H (d, r)
    core = half.T @ s2 @ half                                                # (r, r)
    tr_sqrt = torch.linalg.eigvalsh((core + core.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)


def inception_score(logits, split_size=5000):
    """exp(mean_x KL(p(y|x) || p(y))) per split of split_size consecutive samples, p(y) the
    split's mean, averaged over splits (the ADM evaluator's definition; float64 here).
    logits (N, C) -> float."""
    p = torch.softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), 1)  # (N, C)
    scores = []
    for part in p.split(split_size):
        kl = torch.xlogy(part, part) - torch.xlogy(part, part.mean(0, keepdim=True))  # (n, C)
        scores.append(kl.sum(1).mean().exp())
    return float(torch.stack(scores).mean())


def precision_recall(ref, samples, k=3, device='cpu'):
    """Improved precision and recall (Kynkaanniemi et al. 2019) as the ADM evaluator computes
    them: each point's radius is the squared distance to its k-th nearest neighbour within its
    own set (the point itself is the 0th); precision = fraction of samples inside some ref
    radius, recall = fraction of refs inside some sample radius. Squared distances in fp32.
    ref (N1, D), samples (N2, D) -> (precision, recall)."""
    ref, samples = (torch.as_tensor(np.asarray(a), dtype=torch.float32, device=device)
                    for a in (ref, samples))

    def blocks(x, n_cols):  # row blocks of x whose distance block stays within 256 MiB
        return x.split(max(1, (64 << 20) // max(n_cols, 1)))

    def radii(x):
        if len(x) <= k:
            raise ValueError(f'fid: precision/recall needs more than k={k} points, got {len(x)}')
        return torch.cat([sq_dists(b, x).kthvalue(k + 1, 1).values for b in blocks(x, len(x))])

    def inside(x, centres, r):  # (n,) bool: within the radius of some centre
        return torch.cat([(sq_dists(b, centres) <= r).any(1) for b in blocks(x, len(centres))])

    with no_tf32():
        precision = inside(samples, ref, radii(ref)).double().mean()
        recall = inside(ref, samples, radii(samples)).double().mean()
    return float(precision), float(recall)


# -----------------------------------------------------------------------------
# command line

STATS = {'mu': (2048,), 'sigma': (2048, 2048), 'mu_s': (2023,), 'sigma_s': (2023, 2023)}


def read_npz(path, mode):
    """The keys of the .npz `path` and its statistics (mu, sigma[, mu_s, sigma_s], n, mode):
    a UserError naming the file if it is not an .npz, or its statistics are incomplete, of
    other shapes, not finite or of another preprocessing mode than `mode`."""
    if not os.path.isfile(path):
        raise UserError(f'fid: not found: {path}')
    with open(path, 'rb') as f:
        if f.read(4) != b'PK\x03\x04':   # every .npz is a zip archive
            raise UserError(f'fid: {path} is not an .npz (a zip archive) nor an image folder')
    try:
        with np.load(path) as f:
            keys = set(f.files)
            stats = {k: f[k] for k in (*STATS, 'n', 'mode') if k in keys}
    except DAMAGED as e:
        raise UserError(f'fid: {path} does not read ({type(e).__name__}: {e})') from None
    if 'mode' in stats and str(stats['mode']) != mode:
        raise UserError(f'fid: {path} holds statistics of mode {stats["mode"]}, not {mode}')
    if 'arr_0' not in keys and 'mu' not in keys:
        raise UserError(f'fid: {path} holds neither images (arr_0) nor statistics (mu, sigma); '
                        f'keys: {sorted(keys)}')
    for pair in (('mu', 'sigma'), ('mu_s', 'sigma_s')):
        for k in pair if any(k in stats for k in pair) else ():
            a = stats.get(k)
            if a is None or a.shape != STATS[k] or a.dtype.kind not in 'fi' or \
                    not np.isfinite(a).all():
                got = 'missing' if a is None else f'{a.dtype} {a.shape}'
                raise UserError(f'fid: {path}: statistics {k} is {got}, expected finite '
                                f'{STATS[k]}')
    return keys, stats


def checked(out, path, model):
    """extract()'s result for the input `path`, or a UserError: no image of it could be read, or
    the network gave NaN or inf (broken weights), which would print 'IS nan'."""
    if out['n'] == 0:
        raise UserError(f'fid: no image of {path} could be read ({out["n_bad"]} unreadable)')
    bad = [k for k in ('pool', 'logits', 'mu', 'sigma', 'mu_s', 'sigma_s')
           if not np.isfinite(out[k]).all()]
    if bad:
        raise UserError(f'fid: the Inception network gave NaN or inf {bad[0]} on {path}; '
                        f'its weights: {getattr(model, "weights", "given")}')
    return out


def read_input(path, model, args, images=True):
    """path: statistics (.npz with mu, sigma[, mu_s, sigma_s]), uint8 images (.npz with arr_0;
    ADM's reference batches hold both) or an image folder. Statistics are taken as stored; images
    are run through the network (if `images`) for P/R and IS, and for statistics when none are
    stored. -> dict with some of n, mu, sigma, mu_s, sigma_s, pool, logits, n_bad, and `what`."""
    rank, world = dist.rank_world()
    shard = lambda n: (n * rank // world, n * (rank + 1) // world)  # noqa: E731 contiguous
    if os.path.isdir(path):
        paths, other, _ = list_images(path)
        empty = [p for p in other if p.lower().endswith(IMG_EXTENSIONS)]   # 0 bytes: unreadable
        for p in empty if rank == 0 else ():
            warnings.warn(f'skipping unreadable image {p}: an empty file (0 bytes)')
        if not paths:
            raise UserError(f'fid: no images found in {path}')
        start, stop = shard(len(paths))
        loader = torch.utils.data.DataLoader(ImageFiles(paths[start:stop], args.center_crop),
                                             args.batch_size, num_workers=args.num_workers,
                                             collate_fn=list)
        out = checked(extract(model, loader, args.mode, args.device, len(paths),
                              os.path.basename(path)), path, model)
        out['n_bad'] += len(empty)
        return dict(out, what=f'{out["n"]} images ({out["n_bad"]} unreadable skipped)')
    keys, stats = read_npz(path, args.mode)
    what = 'statistics' if 'mu' in keys else ''
    if 'arr_0' in keys and (images or 'mu' not in keys):
        n = npz_images(path)[1]
        start, stop = shard(n)
        batches = npz_batches(path, start, stop, args.batch_size)
        out = checked(extract(model, batches, args.mode, args.device, n,
                              os.path.basename(path)), path, model)
        what = ' + '.join(w for w in (what, f'{out["n"]} images') if w)
        stats = dict(out, **stats)  # stored statistics win (ADM: over all of ImageNet train)
    return dict(stats, what=what)


def save_stats(path, s, mode):
    """mu, sigma, mu_s, sigma_s, n, mode as an .npz (readable by pytorch-fid and the ADM
    evaluator), written atomically."""
    keys = ('mu', 'sigma', 'mu_s', 'sigma_s', 'n')
    with checkpoint.atomic_path(path) as tmp, open(tmp, 'wb') as f:
        np.savez(f, mode=mode, **{k: s[k] for k in keys if k in s})


# -----------------------------------------------------------------------------
# FID inside train.py: a model's images against held-out images

class HeldOut:
    """FID of n images of a model (reconstructions, or samples of classes i % classes) against
    the first n held-out images, ADM preprocessing. The held-out statistics are computed once and
    cached in cache_dir (an .npz as --save_stats writes it) under a name keyed by the data, n and
    the weights. Under torchrun every rank makes its share. Few images bias FID upwards (a
    floor above 0 even for real images): compare runs at the same n."""

    def __init__(self, model, n, data_key, cache_dir, val_set):
        self.model, self.n = model, n
        key = hashlib.sha256(repr((data_key, n, model.weights)).encode()).hexdigest()[:12]
        self.cache = os.path.join(cache_dir, f'fid_stats_{key}.npz')
        self.cached = os.path.exists(self.cache)
        if self.cached:
            self.ref = read_npz(self.cache, 'adm')[1]
        else:
            self.ref = self.stats(lambda idx: torch.stack([val_set[i][0] for i in idx]))
            if dist.rank_world()[0] == 0:
                os.makedirs(cache_dir, exist_ok=True)
                save_stats(self.cache, self.ref, 'adm')

    @classmethod
    def for_run(cls, task, val_set, args, device, master_print):
        """train.py's: the first --fid_images held-out images when the task makes images
        (fid_images(model, indices) -> (b, 3, H, W)), statistics cached beside --out_dir."""
        n = min(args.fid_images, len(val_set)) if hasattr(task, 'fid_images') else 0
        key = (os.path.abspath(args.data), args.resolution, len(val_set), args.seed)
        cache = os.path.join(os.path.dirname(os.path.abspath(args.out_dir)), 'fid_stats')
        return cls.start(n, key, cache, val_set, device, master_print)

    @classmethod
    def start(cls, n, data_key, cache_dir, val_set, device, master_print):
        """A HeldOut, or None (n = 0; no weights found: one line says so)."""
        try:
            path = find_weights() if n else None
        except UserError:
            master_print('FID off: no Inception weights ($FID_INCEPTION_WEIGHTS or the torch '
                         'hub cache, as fid.py finds them); --fid_images 0 silences this line')
            return None
        if path is None:
            return None
        held_out = cls(load_inception(path, device), n, data_key, cache_dir, val_set)
        master_print(f'FID at every eval: {n} images vs {n} held-out ones (statistics '
                     f'{"read from" if held_out.cached else "cached in"} {held_out.cache}); '
                     f'Inception {held_out.model.weights}')
        return held_out

    def stats(self, images_at, batch_size=50):
        """extract() of images_at(indices) -> (b, 3, H, W) in [-1, 1], for indices 0..n-1."""
        rank, world = dist.rank_world()
        mine = list(range(rank, self.n, world))
        batches = (data.to_uint8(images_at(mine[i:i + batch_size]))
                   for i in range(0, len(mine), batch_size))
        device = next(self.model.parameters()).device
        return extract(self.model, batches, 'adm', device, self.n, desc='FID')

    def __call__(self, images_at):
        s = self.stats(images_at)
        return frechet_distance(s['mu'], s['sigma'], self.ref['mu'], self.ref['sigma'])


def build_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('samples', help='.npz of uint8 (N, H, W, 3) images as arr_0 (sample.py '
                   'writes it), an image folder, or a statistics .npz (mu, sigma)')
    p.add_argument('reference', nargs='?', help='the same kinds; ImageNet 256: the ADM '
                   'evaluator\'s VIRTUAL_imagenet256_labeled.npz (stats + 10k images for P/R)')
    p.add_argument('--mode', default='adm', choices=list(MODES), help='preprocessing: ' +
                   '; '.join(f'{k}: {v}' for k, v in MODES.items()))
    p.add_argument('--weights', default=None, help=f'{WEIGHTS_NAME} (default: '
                   '$FID_INCEPTION_WEIGHTS, then the torch hub cache)')
    p.add_argument('--download', action='store_true', help='download the weights if missing')
    p.add_argument('--batch_size', type=cli.positive_int, default=100, help='images per forward')
    p.add_argument('--num_workers', type=cli.nonneg_int, default=4, help='image decoding workers')
    p.add_argument('--center_crop', type=cli.nonneg_int, default=0, help='image folders: ADM\'s '
                   'centre crop to this size first (256 for ImageNet 256 reference statistics)')
    p.add_argument('--split_size', type=cli.positive_int, default=5000, help='IS split (ADM 5000)')
    p.add_argument('--no_pr', action='store_true', help='skip precision/recall')
    p.add_argument('--save_stats', default='', help='write the samples\' statistics here')
    p.add_argument('--device', default='', help="'' = cuda, else mps, else cpu")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.device, rank, _ = dist.setup(args.device)  # torchrun: a contiguous share per rank
    main_rank = rank == 0
    for path in filter(None, (args.samples, args.reference)):   # fail before the weights load
        if not os.path.isdir(path):
            read_npz(path, args.mode)
    model = load_inception(args.weights, args.device, args.download)
    samples = read_input(args.samples, model, args)
    results = {}
    if len(samples.get('logits', ())):
        results['IS'] = inception_score(samples['logits'], args.split_size)
    if args.reference:
        want_images = 'pool' in samples and not args.no_pr
        ref = read_input(args.reference, model, args, images=want_images)
        results['FID'] = frechet_distance(samples['mu'], samples['sigma'], ref['mu'], ref['sigma'])
        if 'mu_s' in samples and 'mu_s' in ref:
            results['sFID'] = frechet_distance(samples['mu_s'], samples['sigma_s'], ref['mu_s'],
                                               ref['sigma_s'])
        if want_images and 'pool' in ref:
            if min(len(ref['pool']), len(samples['pool'])) <= 3:   # k = 3 nearest neighbours
                raise UserError('fid: precision/recall needs more than 3 images in each input; '
                                'pass --no_pr')
            results['precision'], results['recall'] = precision_recall(
                ref['pool'], samples['pool'], device=args.device)
    if main_rank:
        print(f'samples   {args.samples}: {samples["what"]}')
        if args.reference:
            print(f'reference {args.reference}: {ref["what"]}')
        print(f'Inception {model.weights}, fp32, TF32 off; preprocessing {args.mode}: '
              f'{MODES[args.mode]}')
        print('  '.join(f'{k} {v:.4f}' for k, v in results.items()) or 'nothing to compare')
        if args.save_stats:
            save_stats(args.save_stats, samples, args.mode)
            print(f'wrote statistics of {samples["n"]} images to {args.save_stats}')
    dist.cleanup()
    return results


if __name__ == '__main__':
    cli.run(main)
