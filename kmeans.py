"""
Lloyd K-Means in plain torch (CPU or GPU, optionally torch.distributed), the tokenizer of DiGIT
(Zhu et al., NeurIPS 2024): K centroids of a frozen self-supervised ViT's patch features; a patch's
token is the index of its nearest centroid.

    init     greedy k-means++ (Arthur & Vassilvitskii 2007; sklearn's, with 2 (2 + ln K) local
             trials) on a random sample of 64 points per centroid, or K random points ('random')
    E-step   a(x) = argmin_k ||x - c_k||^2 = argmin_k (||c_k||^2 - 2 x.c_k), fp32 addmm per block
    M-step   c_k = s_k / n_k, s_k = sum_{a(x)=k} x in float64, updated across iterations only by
             the points whose a(x) changed: s_a(x) += x, s_a_old(x) -= x
    objective  inertia = sum_x ||x - c_a(x)||^2

DiGIT ran faiss.Kmeans(d, 8192, niter=20) (random init, 256 points per centroid, CPU) and released
the centroids as `km_8k.npy`, float32 [K, D], the format of `save`/`load`. Deviations from faiss:
greedy k-means++ init by default (it reaches a lower inertia than random init, RESULTS.md); an
empty cluster splits the largest one by an additive random perturbation (faiss: c (1 +- 1/1024)
on a random donor); an optional relative-tolerance stop. As in faiss, n_iter iterations are n_iter
assignment passes, `inertia_` that of the last (the centroids before the last update). Distances
are fp32, TF32 off (bf16 distances mis-assign points). The data is not centred. Letters:
N points, D features, K centroids. Subsampling (as faiss) follows the KMeans class.

The default trades init time for quality. Greedy k-means++ is K sequential steps over S points, L
candidates each, K L S D multiply-adds: sklearn's default has L = 2 + ln K and all N points, ours
L = 2 (2 + ln K) and S = 64 K (K centroids) of the <= 256 K points kept. `bench.py --kmeans`
compares the two defaults (RESULTS.md). An assignment pass is N K D multiply-adds, so the init
does the work of L S / N passes: L / 4 at N = 256 K (K = 1024: L = 16, 4 passes), in K small
sequential blocks that run slower per flop than the passes' large ones.

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
import torch.distributed
import torch.nn.functional as F

import checkpoint
import cli
import dist
from cli import UserError


# ---- distances: the E-step --------------------------------------------------------------------
def sq_dists(x, c, c_sq=None):
    """||x_i - c_k||^2 = ||x_i||^2 - 2 x_i.c_k + ||c_k||^2, fp32, clamped >= 0. x (n, D), c (K, D)
    -> (n, K). Never call this on the whole data set: it allocates n x K."""
    c_sq = (c * c).sum(1) if c_sq is None else c_sq                            # (K,)
    d = torch.addmm(c_sq[None], x, c.T, alpha=-2)                              # (n, K)
    return d.add_((x * x).sum(1, keepdim=True)).clamp_(min=0)


def row_min(d, block=64):
    """torch.min(d, 1) of d (n, K), first index on ties, faster on CPU (only amin vectorises):
    amin of each run of `block` columns, argmin over runs, min in the winning run -> (n,), (n,)."""
    n, K = d.shape
    if K % block:
        return d.min(1)
    j = d.view(n, K // block, block).amin(2).argmin(1)                          # (n,) winning run
    rows = torch.arange(0, n * (K // block), K // block, device=d.device) + j   # its row below
    val, i = d.view(-1, block).index_select(0, rows).min(1)                    # (n,), (n,)
    return val, j * block + i


def assign_chunk(x, c, c_sq, x_sq, out):
    """Nearest centroid: argmin_k (||c_k||^2 - 2 x.c_k) in the reused buffer out (>= n, K); sq adds
    ||x||^2, clamped >= 0. x (n, D), c (K, D), c_sq (K,), x_sq (n,) fp32 -> labels, sq (n,)."""
    d = torch.addmm(c_sq[None], x, c.T, alpha=-2, out=out[:len(x)])            # (n, K)
    val, labels = row_min(d)                                                   # (n,), (n,)
    return labels, val.add_(x_sq).clamp_(min=0)


def _sq_norms(x):
    """||x_i||^2 of each row of x (n, D) -> (n,), in blocks (an (n, D) temporary is slow)."""
    return torch.cat([(b * b).sum(1) for b in x.split(4096)])


# ---- init: greedy k-means++ -------------------------------------------------------------------
def kmeans_pp(x, k, n_trials, gen):
    """Greedy k-means++ (sklearn's): each step draws L = n_trials candidates with probability
    D(x)^2 / sum D^2, D(x) the distance to the nearest centre so far, and keeps the one that lowers
    sum_x D(x)^2 most. x (S, D) fp32 -> (k, D); O(k L S D) flops, one (L, S) block per step."""
    S, x_sq = x.shape[0], _sq_norms(x)                                         # (S,)
    chosen = torch.randint(S, (1,), generator=gen).repeat(k).to(x.device)      # (k,) rows of x
    closest = sq_dists(x, x[chosen[:1]])[:, 0]                                 # (S,) D(x)^2
    for i in range(1, k):
        cum = closest.double().cumsum(0)                                       # (S,)
        r = torch.rand(n_trials, generator=gen, dtype=torch.float64).to(x.device) * cum[-1]
        cand = torch.searchsorted(cum, r).clamp_(max=S - 1)                    # (L,)
        d = torch.minimum(sq_dists(x[cand], x, x_sq), closest)                 # (L, S)
        best = d.sum(1, dtype=torch.float64).argmin()  # no .item(): no GPU sync per step
        closest, chosen[i] = d[best], cand[best]                               # (S,), a row
    return x[chosen]                                                           # (k, D)


class KMeans:
    """Lloyd K-Means with k-means++ init, empty-cluster splitting and torch.distributed support.

    n_clusters K; n_iter Lloyd iterations (assignment + update); init 'k-means++' | 'random';
    tol: stop when the relative decrease of the inertia is <= tol (0 runs all n_iter); spherical:
    cosine K-Means on unit rows (||x - c||^2 = 2 - 2 cos); max_points_per_centroid: train on a
    random subsample of at most K * this many points (faiss: 256, None = all);
    init_sample_per_centroid, n_local_trials: k-means++ runs on K * this many of those with L =
    this many trials a step (None: 2 (2 + ln K); sklearn: all points, 2 + ln K); chunk_size: rows
    per distance block (default `block_rows`); device: where to compute (default: the data's)."""

    def __init__(self, n_clusters, n_iter=20, init='k-means++', tol=1e-4, seed=0, spherical=False,
                 max_points_per_centroid=256, init_sample_per_centroid=64, n_local_trials=None,
                 chunk_size=None, device=None, verbose=False):
        assert init in ('k-means++', 'random'), f"init must be 'k-means++' or 'random', got {init}"
        self.n_clusters, self.n_iter, self.init, self.tol = n_clusters, n_iter, init, tol
        self.seed, self.device, self.verbose = seed, device, verbose
        self.spherical, self.max_points_per_centroid = spherical, max_points_per_centroid
        self.init_sample_per_centroid, self.chunk_size = init_sample_per_centroid, chunk_size
        self.n_local_trials = n_local_trials or 2 * (2 + int(math.log(max(n_clusters, 1))))
        self.centroids = None      # (K, D) float32
        self.inertia_ = None       # inertia of the last assignment (= inertia_history[-1])
        self.inertia_history = []  # [i] = inertia of the centroids after i updates
        self.n_empty_history = []  # empty clusters found at each update

    # ---- fit ----------------------------------------------------------------------------------
    def fit(self, data, init_centroids=None):
        """data: a tensor or array (N, D), or an iterable of (n_i, D) chunks (e.g. .npy memmaps),
        read once, its (sub)sample kept in memory; under torch.distributed each rank's own shard.
        init_centroids (K, D) (the same on every rank): Lloyd starts there. Returns self."""
        data = torch.from_numpy(data) if isinstance(data, np.ndarray) else data
        K, (rank, world), mppc = self.n_clusters, dist.rank_world(), self.max_points_per_centroid
        with no_tf32():
            x, key, n_seen = _collect(data, K * mppc if mppc else None, self.seed,
                                      self._prepare)  # (n, D), (n,): all or K mppc, see below
            n = dist.all_gather_rows(torch.tensor([[len(x), n_seen]], device=x.device)).sum(0)
            n_total = int(n[0])
            if n_total < K:
                raise ValueError(f'kmeans: n_clusters={K} is larger than the {n_total} points')
            S = min(K * self.init_sample_per_centroid, n_total)
            sample = _init_sample(x, key, S)                                   # (S, D)
            gen = torch.Generator().manual_seed(self.seed)
            c = self._init_centroids(sample, x.shape[1], init_centroids, gen)  # (K, D)
            if self.verbose and rank == 0:
                print(f'kmeans: K={K}, {n_total} of {int(n[1])} points (D={x.shape[1]}), '
                      f'{self.init} init on {S}, {world} rank(s)')
            self.inertia_history, self.n_empty_history = [], []
            x_sq = _sq_norms(x)                                                # (n,)
            labels, sums = None, torch.zeros(K, x.shape[1], dtype=torch.float64, device=x.device)
            t0 = time.time()
            for it in range(max(self.n_iter, 1)):  # n_iter = 0: one pass, for the inertia
                labels, counts, sse, obj = self._lloyd_pass(x, x_sq, c, labels, sums)
                self.inertia_history.append(obj)
                if self.verbose and rank == 0:
                    n_empty = self.n_empty_history[-1] if it else 0
                    print(f'kmeans iter {it}/{self.n_iter}: inertia {obj:.6g}, {n_empty} empty '
                          f'clusters split, {time.time() - t0:.2f}s')
                prev = self.inertia_history[-2] if it > 0 else math.inf
                if it == self.n_iter or prev - obj <= self.tol * obj:
                    break  # converged (or n_iter = 0): obj is exactly the inertia of c
                t0 = time.time()
                c = self._update(c, sums, counts, sse, gen)                    # (K, D)
        self.centroids, self.inertia_ = c, obj
        return self

    def _init_centroids(self, sample, dim, init_centroids, gen):
        """Starting centroids (K, D) fp32: init_centroids (K, dim) if given, else greedy k-means++
        (L = n_local_trials) or K distinct rows ('random') of the init sample (S, D)."""
        K = self.n_clusters
        if init_centroids is not None:
            c = self._prepare(init_centroids, dim)                             # (K, D)
            if len(c) != K:
                raise ValueError(f'kmeans: init_centroids has {len(c)} rows, not {K}')
        elif self.init == 'k-means++':
            c = kmeans_pp(sample, K, self.n_local_trials, gen)                  # (K, D)
        else:
            perm = torch.randperm(len(sample), generator=gen)                  # (S,)
            c = sample[perm[:K].to(sample.device)]                             # (K, D)
        return F.normalize(c, dim=1) if self.spherical else c

    def _lloyd_pass(self, x, x_sq, c, labels, sums):
        """E-step on local rows x (n, D) (x_sq = ||x||^2) and M-step statistics over ranks: sums
        (K, D) float64 += the change of s_k = sum_{a(x)=k} x, from rows whose label is not `labels`
        (None: all; few late in a fit). -> labels (n,), n_k (K,), sse_k (K,), inertia (a float)."""
        K, D = c.shape
        buf = torch.zeros(K * D + 2 * K + 1, dtype=torch.float64, device=x.device)  # one reduce
        delta, counts, sse = buf[:K * D].view(K, D), buf[K * D:-K - 1], buf[-K - 1:-1]
        new, sq = self._assign(x, c, x_sq)                                     # (n,), (n,)
        moved = (torch.arange(len(x), device=x.device) if labels is None else
                 (new != labels).nonzero()[:, 0])                              # (m,)
        for idx in moved.split(1 << 16):  # fp32 sums within 65536 rows, float64 across
            xm = x.index_select(0, idx)                                        # (<= 65536, D)
            part = torch.zeros_like(c).index_add_(0, new[idx], xm)             # (K, D) fp32
            if labels is not None:
                part.index_add_(0, labels[idx], xm, alpha=-1)  # leaves its old cluster
            delta += part
        counts += torch.bincount(new, minlength=K)
        sse.index_add_(0, new, sq.double())
        buf[-1] = sse.sum()
        if dist.rank_world()[1] > 1:
            torch.distributed.all_reduce(buf)
        sums += delta
        sums[counts == 0] = 0  # exact zeros, not rounding residue, for emptied clusters
        return new, counts, sse, buf[-1].item()

    def _assign(self, x, c, x_sq):
        """assign_chunk on blocks of block_rows rows, all in one reused (rows, K) distance buffer.
        x (n, D), c (K, D), x_sq = ||x||^2 (n,) -> labels (n,), squared distances (n,)."""
        rows, c_sq = self.block_rows(x.device), (c * c).sum(1)                 # (K,)
        block = x.new_empty(min(rows, len(x)), len(c))                         # (rows, K)
        out = [assign_chunk(xb, c, c_sq, sb, block) for xb, sb in zip(x.split(rows),
                                                                       x_sq.split(rows))]
        return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])

    def block_rows(self, device):
        """Rows of an fp32 distance block (rows, K): chunk_size, else 4096 on CPU (as faiss; fewer
        are slower at large K), 65536 on GPU, within 256 MiB (CPU) / 512 MiB (GPU) of distances."""
        cpu = torch.device(device).type == 'cpu'
        rows = ((256 if cpu else 512) << 20) // (4 * self.n_clusters)
        return self.chunk_size or int(max(min(rows, 4096 if cpu else 65536), 256))

    def _update(self, c, sums, counts, sse, gen):
        """c_k = sums_k / n_k. An empty cluster j splits the currently largest i (faiss' idea, the
        same on every rank): c_j, c_i = c_i +- e, e = 0.01 sqrt(sse_i / n_i) u, u a random unit
        vector; n_i, sse_i halve, so the next empty takes the next largest. No NaN or 0 results."""
        new = c.clone()                                                        # (K, D)
        full = counts > 0
        new[full] = (sums[full] / counts[full, None]).float()
        empty = (~full).nonzero()[:, 0].tolist()
        counts, sse = counts.clone(), sse.clone()
        for j in empty:
            i = int(counts.argmax())
            u = torch.randn(c.shape[1], generator=gen, dtype=torch.float64)   # (D,)
            e = (0.01 * math.sqrt(sse[i] / counts[i]) * u / u.norm()).float().to(c.device)
            new[j], new[i] = new[i] + e, new[i] - e
            counts[i], sse[i] = counts[i] / 2, sse[i] / 2
            counts[j], sse[j] = counts[i], sse[i]
        self.n_empty_history.append(len(empty))
        return F.normalize(new, dim=1) if self.spherical else new

    # ---- use --------------------------------------------------------------------------------
    @torch.no_grad()
    def assign(self, x):
        """Nearest centroid and squared distance of every row, chunked fp32. x (N, D) ->
        labels (N,) int64, sq_dists (N,) fp32 (spherical: 2 - 2 cos)."""
        assert self.centroids is not None, 'kmeans: call fit() or load() first'
        x = self._prepare(x, self.centroids.shape[1])                          # (N, D) fp32
        with no_tf32():
            return self._assign(x, self.centroids.to(x.device), _sq_norms(x))

    def predict(self, x):
        """Token ids: index of the nearest centroid of each row. x (N, D) -> (N,) int64."""
        return self.assign(x)[0]

    def save(self, path):
        """Centroids as a float32 .npy of shape [K, D] (the format of DiGIT's km_8k.npy),
        written atomically."""
        with checkpoint.atomic_path(path) as tmp, open(tmp, 'wb') as f:
            np.save(f, self.centroids.detach().cpu().numpy().astype(np.float32))

    @classmethod
    def load(cls, path, **kwargs):
        """A KMeans with centroids from a [K, D] .npy; kwargs (spherical=True, ...) go to init."""
        c = read_npy(path, 'centroids')
        km = cls(c.shape[0], **kwargs)
        km.centroids = torch.from_numpy(c.astype(np.float32))                  # (K, D)
        return km

    # ---- input ------------------------------------------------------------------------------
    def _prepare(self, x, dim=None):
        """Check a chunk (n, D) and return it as fp32 on self.device (unit rows if spherical)."""
        x = x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))
        if x.ndim != 2 or not x.is_floating_point():
            raise ValueError(f'kmeans: features must be a 2-d float (N, D) array, got '
                             f'shape {tuple(x.shape)} dtype {x.dtype}')
        if dim is not None and x.shape[1] != dim:
            raise ValueError(f'kmeans: feature dimension {x.shape[1]} != expected {dim}')
        x = x.to(self.device or x.device, torch.float32)
        if x.numel() and not torch.isfinite(torch.stack(torch.aminmax(x))).all():  # NaN, inf
            raise ValueError('kmeans: features contain NaN or inf')
        return F.normalize(x, dim=1) if self.spherical else x


def read_npy(path, what, mmap_mode=None):
    """A finite (unless memory-mapped) 2-d float .npy (N, D), or a UserError naming the file."""
    try:
        a = np.load(path, mmap_mode=mmap_mode)
    except (OSError, ValueError, EOFError) as e:   # missing, not an .npy, truncated
        raise UserError(f'{what} {path} does not read ({type(e).__name__}: {e})') from None
    if not isinstance(a, np.ndarray) or a.ndim != 2 or a.dtype.kind != 'f' or \
            (mmap_mode is None and not np.isfinite(a).all()):
        held = f'{a.dtype} {a.shape}' if isinstance(a, np.ndarray) else 'an .npz archive'
        raise UserError(f'{what} {path} holds {held}, not a finite 2-d float (N, D) array')
    return a


# ---- subsampling ------------------------------------------------------------------------------
# With m = K * max_points_per_centroid, fit trains on the m rows of smallest key, a hash of (global
# row index, seed): in effect the first m of a random permutation, a uniform subset that depends on
# the rows alone, not on chunks or (tensors) ranks; k-means++ on the K * init_sample_per_centroid
# smallest, in data order. key = hash * 2^31 + (index mod 2^31): the 31-bit hash orders the keys,
# the index breaks ties and gives data order. hash = _mix31(_mix31(hi ^ lo) ^ hi), lo the index's
# low 31 bits, hi = (index >> 31) * _HI_MULT + seed mod _SEED_MOD + 1.
_MASK31 = 0x7FFFFFFF      # 2^31 - 1: hash values and the key's index field are 31 bits
_HI_MULT = 40503          # Knuth's Fibonacci-hashing multiplier: 2^16 / golden ratio, rounded
_SEED_MOD = 65521         # the largest prime below 2^16 (as Adler-32): the seed's salt
_LCG_MULT, _LCG_INC = 1103515245, 12345  # the C standard's example rand() (an LCG), mod 2^31
_XORSHIFT, _MIX_ROUNDS = 13, 3  # h ^= h >> 13 folds high bits into low; LCG + xorshift rounds
_RANK_STRIDE = 1 << 40    # chunk iterators: rank r numbers its rows r * 2^40 + 0, 1, ...


def _mix31(h):
    """Pseudo-random bijection of [0, 2^31), each step invertible (odd LCG multiplier, xorshift):
    low 31 bits of h, then _MIX_ROUNDS x (LCG step mod 2^31, xorshift). h (n,) int64 -> (n,)."""
    h = h & _MASK31                                                            # (n,)
    for _ in range(_MIX_ROUNDS):
        h = (h * _LCG_MULT + _LCG_INC) & _MASK31  # < 2^62: no int64 overflow
        h = h ^ (h >> _XORSHIFT)
    return h


def _row_keys(idx, seed):
    """The key of each global row index: hash(index, seed) * 2^31 + (index mod 2^31), distinct for
    indices less than 2^31 apart. idx (n,) int64 >= 0 -> (n,) int64 in [0, 2^62)."""
    lo = idx & _MASK31                                                         # (n,)
    hi = (idx >> 31) * _HI_MULT + seed % _SEED_MOD + 1                         # (n,) the salt
    return (_mix31(_mix31(hi ^ lo) ^ hi) << 31) | lo                          # (n,)


def _collect(data, m, seed, prepare):
    """Stream `data` (a tensor (N, D) or an iterable of (n_i, D) chunks) once and keep the m rows
    of smallest key (all if m is None); prepare(chunk, dim) checks and converts each chunk. -> the
    rows (n, D) in data order, their keys (n,), the rows read here. Row numbers: a tensor's are
    global (lower ranks first, as one process), an iterator's (length unknown) start at rank *
    _RANK_STRIDE. Memory stays O(m): past 2 m held rows _smallest keeps the m smallest, whose
    largest key tau filters later chunks; across ranks: key <= the m-th smallest of all."""
    rank, world = dist.rank_world()
    chunks = [data] if torch.is_tensor(data) else data
    offset = rank * _RANK_STRIDE  # iterators: each rank numbers its rows in its own range
    if torch.is_tensor(data) and world > 1:  # tensors: true global row indices
        n = torch.tensor([data.shape[0]], device=data.device)
        offset = int(dist.all_gather_rows(n)[:rank].sum())
    keep, kept, n_seen, tau, dim = [], 0, 0, None, None  # keep: [(rows (n_i, D), keys (n_i,))]
    for chunk in chunks:
        chunk = prepare(chunk, dim)
        dim = chunk.shape[1]
        key = _row_keys(torch.arange(n_seen, n_seen + len(chunk)) + offset, seed)
        key = key.to(chunk.device)                                             # (n_i,)
        n_seen += len(chunk)
        if tau is not None:  # only rows that can still make it into the smallest m
            chunk, key = chunk[key <= tau], key[key <= tau]
        keep.append((chunk, key))
        kept += len(chunk)
        if m is not None and kept > 2 * m:  # compact to the m smallest keys
            keep, tau = _smallest(keep, m)
            kept = m
    if dim is None:
        raise ValueError('kmeans: no data')
    keep, _ = _smallest(keep, m if m is not None else kept)
    x, key = keep[0]
    if world > 1 and m is not None:  # global m-th smallest key, as if on one process
        all_keys = dist.all_gather_rows(key)                                   # (sum n_r,)
        tau = all_keys.kthvalue(min(m, len(all_keys))).values
        x, key = x[key <= tau], key[key <= tau]
    if m is not None:  # topk shuffled the rows: back to data order (low key bits = index)
        order = torch.argsort(key & _MASK31)                                   # (n,)
        x, key = x[order], key[order]
    return x, key, n_seen


def _smallest(keep, m):
    """Concatenate the held (rows (n_i, D), keys (n_i,)) pairs and keep the m rows with the
    smallest keys (topk's order) -> [(rows (<= m, D), keys)] and tau, the largest kept or None."""
    x, key = keep[0] if len(keep) == 1 else [torch.cat(t) for t in zip(*keep)]  # (n, D), (n,)
    if len(key) > m:
        idx = torch.topk(key, m, largest=False).indices                        # (m,)
        x, key = x[idx], key[idx]
    tau = key.max() if len(key) else None
    return [(x, key)], tau


def _init_sample(x, key, S):
    """The init sample: the S rows of smallest key over all ranks (each gives its own S smallest),
    in data order: the same on every rank and in one process. x (n, D), key (n,) -> (S, D)."""
    idx = torch.topk(key, min(S, len(key)), largest=False).indices             # (s,) sorted
    cand_x, cand_key = dist.all_gather_rows(x[idx]), dist.all_gather_rows(key[idx])
    keep = torch.argsort(cand_key, stable=True)[:S]                            # (S,) key order
    return cand_x[keep[torch.argsort(cand_key[keep] & _MASK31, stable=True)]]  # (S, D)


# ---- exact fp32 -------------------------------------------------------------------------------
@contextmanager
def no_tf32():
    """Exact fp32 matmuls and cuDNN convolutions inside the block (training scripts often switch
    TF32 on globally, and cuDNN uses it for convolutions by default)."""
    saved = []  # (object, attribute, old value)
    try:
        for legacy, modern in ((torch.backends.cuda.matmul, torch.backends.cuda.matmul),
                               (torch.backends.cudnn, torch.backends.cudnn.conv)):
            try:
                old, legacy.allow_tf32 = legacy.allow_tf32, False   # read, then set
                saved.append((legacy, 'allow_tf32', old))
            except RuntimeError:  # the caller uses the fp32_precision API; torch forbids mixing
                old, modern.fp32_precision = modern.fp32_precision, 'ieee'
                saved.append((modern, 'fp32_precision', old))
        yield
    finally:
        for obj, attr, old in reversed(saved):
            setattr(obj, attr, old)


def build_parser():
    p = argparse.ArgumentParser(description='Fit K-Means centroids to .npy feature shards (N, D). '
                                'Under torchrun every rank reads files[rank::world].')
    p.add_argument('features', nargs='+', help='.npy files of (N_i, D) features (memory-mapped)')
    p.add_argument('--k', type=cli.positive_int, default=8192, help='centroids (DiGIT: 8192)')
    p.add_argument('--n_iter', type=cli.nonneg_int, default=20, help='Lloyd iterations (DiGIT 20)')
    p.add_argument('--init', default='k-means++', choices=['k-means++', 'random'])
    p.add_argument('--max_points_per_centroid', type=cli.nonneg_int, default=256, help='0: all')
    p.add_argument('--tol', type=cli.nonneg_float, default=0.0, help='stop at this relative drop')
    p.add_argument('--spherical', action=argparse.BooleanOptionalAction, default=False)
    p.add_argument('--seed', type=cli.seed, default=0)
    p.add_argument('--device', default='', help="'' = cuda if available, else cpu")
    p.add_argument('--out', default='km.npy', help='output centroids, float32 [K, D]')
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    shapes = [read_npy(f, 'features', 'r').shape for f in args.features]  # all files, every rank
    odd = [f'{f} {s}' for f, s in zip(args.features, shapes) if s[1] != shapes[0][1]]
    if odd:
        raise UserError(f'features of another D: {args.features[0]} {shapes[0]}, {odd[0]}')
    if sum(n for n, _ in shapes) < args.k:
        p.error(f'argument --k: {args.k} centroids but only {sum(n for n, _ in shapes)} points')
    device, rank, world = dist.setup(args.device, mps=False)
    files = args.features[rank::world]   # torchrun: one shard of the files per rank

    def chunks(rows=65536):
        for f, a in ((f, np.load(f, mmap_mode='r')) for f in files):
            for i in range(0, len(a), rows):
                x = np.array(a[i:i + rows])  # a copy: memmaps are read-only
                if not np.isfinite(x).all():
                    raise UserError(f'features {f} has NaN or inf in rows {i}..{i + len(x) - 1}')
                yield torch.from_numpy(x)

    km = KMeans(args.k, n_iter=args.n_iter, init=args.init, tol=args.tol, seed=args.seed,
                spherical=args.spherical, device=device, verbose=True,
                max_points_per_centroid=args.max_points_per_centroid or None).fit(chunks())
    if rank == 0:
        km.save(args.out)
        print(f'saved centroids {tuple(km.centroids.shape)} to {args.out}, '
              f'inertia {km.inertia_:.6g}')
    dist.cleanup()


if __name__ == '__main__':
    cli.run(main)
