"""
Lloyd K-Means in plain torch (CPU or GPU, optionally over torch.distributed): the tokenizer of
DiGIT (Zhu et al., NeurIPS 2024, arXiv 2410.12490), which clusters the patch features of a frozen
self-supervised ViT into K centroids and uses the index of the nearest centroid as the token.

    init     greedy k-means++ (Arthur & Vassilvitskii 2007, sklearn's 2 + ln K local trials)
             on a random sample of 16 K points, or K random sample points ('random', faiss)
    E-step   a(x) = argmin_k ||x - c_k||^2 = argmin_k (||c_k||^2 - 2 x.c_k), chunked fp32 addmm
    M-step   c_k = sum_{a(x)=k} x / n_k, sums and counts accumulated in float64
    objective  inertia = sum_x ||x - c_a(x)||^2

DiGIT ran faiss.Kmeans(d, 8192, niter=20) (random init, 256 points per centroid, CPU) and
released the centroids as `km_8k.npy`, float32 [K, D]; `save`/`load` use that format.
Deviations from faiss: greedy k-means++ init by default (about 15% lower inertia in our
measurements, see shared/reference/kmeans_notes.md), an empty cluster splits the largest one with
an additive random perturbation (faiss: multiplicative c (1 +- 1/1024) on a random donor), and an
optional relative-tolerance stop. Distances are always fp32 with TF32 off: bf16 distances assign
about 10% of points wrongly. The data is not centred. Letters: N points, D features, K centroids.

Under torch.distributed every rank passes its own shard to `fit`; per-cluster sums and counts
are all-reduced, so every rank holds identical centroids. Test: `python -m pytest test_all.py -k
kmeans`. Fit a .npy of features: `python kmeans.py feats_*.npy --k 8192 --out km_8k.npy`.
"""
import argparse
import math
import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F


@contextmanager
def no_tf32():
    """Exact fp32 matmuls inside the block (training scripts often switch TF32 on globally)."""
    m = torch.backends.cuda.matmul
    try:
        attr, old = 'allow_tf32', m.allow_tf32
        m.allow_tf32 = False
    except RuntimeError:  # the caller uses the new fp32_precision API; torch forbids mixing them
        attr, old = 'fp32_precision', m.fp32_precision
        m.fp32_precision = 'ieee'
    try:
        yield
    finally:
        setattr(m, attr, old)


def sq_dists(x, c, c_sq=None):
    """||x_i - c_k||^2 = ||x_i||^2 - 2 x_i.c_k + ||c_k||^2, fp32, clamped >= 0. x (n, D), c (K, D)
    -> (n, K). Never call this on the whole data set: it allocates n x K."""
    c_sq = (c * c).sum(1) if c_sq is None else c_sq                            # (K,)
    d = torch.addmm(c_sq[None], x, c.T, alpha=-2)                              # (n, K)
    return d.add_((x * x).sum(1, keepdim=True)).clamp_(min=0)


def _row_keys(idx, seed):
    """A pseudo-random, unique int64 key per global row index (a hash, so that the kept sample
    depends neither on chunking nor on sharding). idx (n,) int64 -> (n,) int64."""
    h = (idx >> 31) * 40503 + seed % 65521 + 1                                 # (n,)
    for part in (idx & 0x7FFFFFFF, h):  # mix the low and high 31 bits into h
        h = (h ^ part) & 0x7FFFFFFF
        for _ in range(3):
            h = (h * 1103515245 + 12345) & 0x7FFFFFFF
            h = h ^ (h >> 13)
    return (h << 31) | (idx & 0x7FFFFFFF)   # low bits = index, so keys are unique per row


def _world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _all_gather_cat(t):
    """Concatenate a tensor (n_r, ...) of every rank along dim 0, in rank order (sizes may differ)."""
    rank, world = _world()
    if world == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    pad = t.new_zeros((max(sizes) - t.shape[0], *t.shape[1:]))
    out = [t.new_empty((max(sizes), *t.shape[1:])) for _ in range(world)]
    dist.all_gather(out, torch.cat([t, pad]))
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


def kmeans_pp(x, k, n_trials, gen):
    """Greedy k-means++ (sklearn's variant): each step draws n_trials candidates with probability
    D(x)^2 / sum D^2 and keeps the one that lowers the potential sum_x D(x)^2 most, where D(x) is
    the distance to the nearest centre chosen so far. x (S, D) fp32 -> (k, D). O(k n_trials S D)."""
    S = x.shape[0]
    centres = x.new_empty(k, x.shape[1])                                       # (k, D)
    centres[0] = x[torch.randint(S, (1,), generator=gen).item()]
    closest = sq_dists(x, centres[:1])[:, 0]                                   # (S,)
    for i in range(1, k):
        cum = closest.double().cumsum(0)                                       # (S,)
        r = torch.rand(n_trials, generator=gen, dtype=torch.float64).to(x.device) * cum[-1]
        cand = torch.searchsorted(cum, r).clamp_(max=S - 1)                    # (L,)
        d = torch.minimum(sq_dists(x, x[cand]).T, closest)                     # (L, S)
        best = d.double().sum(1).argmin()
        closest = d[best]                                                      # (S,)
        centres[i] = x[cand[best]]
    return centres


class KMeans:
    """Lloyd K-Means with k-means++ init, empty-cluster splitting and torch.distributed support.

    n_clusters K; n_iter Lloyd updates; init 'k-means++' | 'random'; tol: stop when the relative
    decrease of the inertia is <= tol (0 runs all n_iter); spherical: unit-normalise features and
    centroids (cosine K-Means, ||x - c||^2 = 2 - 2 cos); max_points_per_centroid: train on a random
    subsample of at most K * this many points (faiss: 256, None = all); init_sample_per_centroid:
    k-means++ runs on a sample of K * this many points; chunk_size: rows per distance block
    (default: about 256 MiB of distances); device: where to compute (default: the data's)."""

    def __init__(self, n_clusters, n_iter=20, init='k-means++', tol=1e-4, seed=0, spherical=False,
                 max_points_per_centroid=256, init_sample_per_centroid=16, chunk_size=None,
                 device=None, verbose=False):
        assert init in ('k-means++', 'random'), f"init must be 'k-means++' or 'random', got {init}"
        self.n_clusters, self.n_iter, self.init, self.tol, self.seed = n_clusters, n_iter, init, tol, seed
        self.spherical, self.max_points_per_centroid = spherical, max_points_per_centroid
        self.init_sample_per_centroid, self.device, self.verbose = init_sample_per_centroid, device, verbose
        self.chunk_size = chunk_size or int(min(max((256 << 20) // (4 * n_clusters), 1024), 65536))
        self.centroids = None      # (K, D) float32
        self.inertia_ = None       # inertia of the returned centroids
        self.inertia_history = []  # inertia before each update, then of the result (length <= n_iter+1)
        self.n_empty_history = []  # empty clusters found at each update

    # ---- data ---------------------------------------------------------------------------------
    def _prepare(self, x, dim=None):
        """Check a chunk (n, D) and return it as fp32 on self.device (unit rows if spherical)."""
        if not torch.is_tensor(x):
            x = torch.as_tensor(np.asarray(x))
        if x.ndim != 2 or not x.is_floating_point():
            raise ValueError(f'kmeans: features must be a 2-d float (N, D) array, got '
                             f'shape {tuple(x.shape)} dtype {x.dtype}')
        if dim is not None and x.shape[1] != dim:
            raise ValueError(f'kmeans: feature dimension {x.shape[1]} != expected {dim}')
        x = x.to(self.device or x.device, torch.float32)
        if not torch.isfinite(x).all():
            raise ValueError('kmeans: features contain NaN or inf')
        return F.normalize(x, dim=1) if self.spherical else x

    def _collect(self, data, m):
        """Stream chunks and keep the m rows with the smallest hash keys of their global index
        (a uniform random subset, identical for any chunking and any sharding of tensors; an
        iterator's rows are numbered per rank). Returns rows (n, D) in data order, their keys."""
        rank, world = _world()
        chunks = [data] if torch.is_tensor(data) else data
        offset = rank << 40  # iterators: each rank numbers its rows in its own range
        if torch.is_tensor(data) and world > 1:  # tensors: true global row indices
            n = torch.tensor([data.shape[0]], device=data.device)
            offset = int(_all_gather_cat(n)[:rank].sum())
        keep, kept, n_seen, tau, dim = [], 0, 0, None, None
        for chunk in chunks:
            chunk = self._prepare(chunk, dim)
            dim = chunk.shape[1]
            key = _row_keys(torch.arange(n_seen, n_seen + len(chunk)) + offset, self.seed)
            key = key.to(chunk.device)                                         # (n_i,)
            n_seen += len(chunk)
            if tau is not None:  # only rows that can still make it into the smallest m
                chunk, key = chunk[key <= tau], key[key <= tau]
            keep.append((chunk, key))
            kept += len(chunk)
            if m is not None and kept > 2 * m:  # compact to the m smallest keys
                keep, tau = self._smallest(keep, m)
                kept = m
        if dim is None:
            raise ValueError('kmeans: no data')
        keep, _ = self._smallest(keep, m if m is not None else kept)
        x, key = keep[0]
        if world > 1 and m is not None:  # global m-th smallest key, as if on one process
            all_keys = _all_gather_cat(key)                                    # (sum n_r,)
            tau = all_keys.kthvalue(min(m, len(all_keys))).values
            x, key = x[key <= tau], key[key <= tau]
        order = torch.argsort(key & 0x7FFFFFFF)  # low bits = row index: back to data order
        return x[order], key[order], n_seen

    @staticmethod
    def _smallest(keep, m):
        x = torch.cat([c for c, _ in keep])                                    # (n, D)
        key = torch.cat([k for _, k in keep])                                  # (n,)
        if len(key) > m:
            idx = torch.topk(key, m, largest=False).indices                    # (m,)
            x, key = x[idx], key[idx]
        tau = key.max() if len(key) else None
        return [(x, key)], tau
