"""
K-Means against the libraries people use for it, each printed next to ours as a ratio: our
defaults against scikit-learn's (inertia and time, several seeds), then every engine from the
same initial centroids (ours, faiss-cpu, scikit-learn's Lloyd) with s/iter, the share of the
fp32 GEMM peak and the final inertia, computed here exactly for every engine. faiss-cpu and
scikit-learn are optional comparisons (`pip install faiss-cpu scikit-learn threadpoolctl`);
without them only our rows print. Nothing here is a test: numbers depend on the machine.

    python bench_kmeans.py                          # N = 200k, D = 384, K = 1024, 20 iterations
    python bench_kmeans.py --n 60000 --k 256        # smaller
"""
import argparse
import time

import torch
import torch.nn.functional as F

import cli
import kmeans
from bench import timeit


def make_gmm(n, d, n_comp=2000, seed=0):
    """Stand-in for un-normalised ViT patch features: n_comp anisotropic components (centre
    offsets with a 1/j variance spectrum) around a common mean of norm 40, log-normal weights,
    sigma in [0.3, 0.6], 5% broad background noise. -> (n, d) fp32."""
    g = torch.Generator().manual_seed(seed)
    scale = 7.8 / torch.arange(1, d + 1).sqrt()                                    # (d,)
    mean = F.normalize(torch.randn(d, generator=g), dim=0) * 40                    # (d,)
    centres = mean + torch.randn(n_comp, d, generator=g) * scale                   # (C, d)
    weights = torch.randn(n_comp, generator=g).exp()                               # log-normal
    sigma = 0.3 + 0.3 * torch.rand(n_comp, generator=g)                            # (C,)
    comp = torch.multinomial(weights, n, replacement=True, generator=g)            # (n,)
    x = centres[comp] + torch.randn(n, d, generator=g) * sigma[comp, None]         # (n, d)
    noise = torch.rand(n, generator=g) < 0.05
    x[noise] = mean + torch.randn(int(noise.sum()), d, generator=g) * 2 * scale
    return x


def exact_inertia(x, c):
    """sum_x min_k ||x - c_k||^2 over every row of x (N, D), in float64, for centroids c (K, D)
    of any engine (numpy or torch, flat or not): the same fp32 assignment for all of them."""
    c = torch.as_tensor(c, dtype=torch.float32).reshape(-1, x.shape[1])             # (K, D)
    km = kmeans.KMeans(len(c))
    km.centroids = c
    return km.assign(x)[1].double().sum().item()


def sklearn_kmeans():
    """scikit-learn's KMeans and threadpoolctl's threadpool_limits, or (None, None) and a line."""
    try:
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits
        return KMeans, threadpool_limits
    except ImportError:
        print('scikit-learn not installed: pip install scikit-learn threadpoolctl')
        return None, None


def other_engines(x, c0, n_iter, threads):
    """faiss-cpu's and scikit-learn's K-Means where installed: {name: fit() -> centroids}, all
    from the centroids c0 but faiss's default (random init), which is timed once, not in rounds."""
    (n, d), k, engines = x.shape, len(c0), {}
    try:
        import faiss
        faiss.omp_set_num_threads(threads)
        xn, c0n = x.numpy(), c0.numpy()

        def faiss_fit(**kw):
            f = faiss.Kmeans(d, k, niter=n_iter, seed=1234, max_points_per_centroid=n)
            f.train(xn, **kw)
            return f.centroids
        engines['faiss-cpu (same init)'] = lambda: faiss_fit(init_centroids=c0n)
        engines['faiss-cpu random init (default)'] = faiss_fit
    except ImportError:
        print('faiss-cpu not installed: pip install faiss-cpu')
    SKKMeans, threadpool_limits = sklearn_kmeans()
    if SKKMeans is not None:
        def sklearn_fit():
            sk = SKKMeans(k, init=c0.numpy(), n_init=1, max_iter=n_iter, tol=0, algorithm='lloyd')
            with threadpool_limits(threads):
                return sk.fit(x.numpy()).cluster_centers_
        engines['sklearn lloyd (same init)'] = sklearn_fit
    return engines


def bench_kmeans_defaults(threads=2, rounds=3, seeds=(0, 1, 2)):
    """Default fit vs default fit: ours (greedy k-means++, 2 (2 + ln K) trials, 64 points per
    centroid, <= 20 Lloyd passes) vs scikit-learn's KMeans(K, random_state=seed) (greedy
    k-means++, 2 + ln K trials on all points, Lloyd until the centre shift is below 1e-4 of the
    mean variance, <= 300 iterations) on make_gmm(60000, 96, 512 components), K = 256, `threads`
    threads. Per seed the two run interleaved `rounds` times; time = the fastest round;
    inertia = sum_x min_k ||x - c_k||^2 over all N (exact_inertia)."""
    torch.set_num_threads(threads)
    x, k = make_gmm(60_000, 96, n_comp=512), 256                                  # (N, D)
    SKKMeans, threadpool_limits = sklearn_kmeans()

    def run(fit):
        t = time.perf_counter()
        c = fit()                                                                  # (K, D)
        return time.perf_counter() - t, exact_inertia(x, c)

    def sklearn_fit(seed):
        with threadpool_limits(threads):
            return SKKMeans(k, random_state=seed).fit(x.numpy()).cluster_centers_
    print(f'K-Means defaults, N=60000 D=96 (512-component mixture) K={k}, {threads} threads, '
          f'best of {rounds} interleaved rounds')
    print(f'{"seed":>4s} {"ours inertia":>13s} {"time":>7s} {"sklearn inertia":>16s} '
          f'{"time":>7s}  ours/sklearn: inertia  time')
    ratios = []
    for seed in seeds:
        best = {}
        for _ in range(rounds):
            engines = {'ours': lambda: kmeans.KMeans(k, seed=seed).fit(x).centroids}
            if SKKMeans is not None:
                engines['sklearn'] = lambda: sklearn_fit(seed)
            for name, fit in engines.items():
                best[name] = min(best.get(name, (float('inf'),)), run(fit))
        (t, inr), (t_sk, inr_sk) = best['ours'], best.get('sklearn', (float('nan'),) * 2)
        ratios.append((inr / inr_sk, t / t_sk))
        print(f'{seed:4d} {inr:13.6g} {t:6.2f}s {inr_sk:16.6g} {t_sk:6.2f}s  '
              f'{ratios[-1][0]:20.4f} {ratios[-1][1]:5.2f}x')
    print(f'mean ratio ours/sklearn: inertia {sum(r[0] for r in ratios) / len(ratios):.4f}, '
          f'time {sum(r[1] for r in ratios) / len(ratios):.2f}x')


def bench_kmeans(n, d, k, n_iter, threads=2, rounds=3):
    """K-Means on make_gmm data, every engine from the same initial centroids, `threads` CPU
    threads. The engines run interleaved `rounds` times (the machine may be shared) and each
    row is the best round. s/iter = fit time / n_iter: ours and faiss run n_iter assignment
    passes, sklearn one more (its final E-step). % peak = 2 N K D flops per iteration over the
    fp32 GEMM peak, measured on the assignment's own GEMM (a block of rows times c.T into a
    reused buffer), best of 20 calls, before and after the engines. Also timed alone: our E-step
    (one assignment pass over all N) and a bare torch.mm of the same work in the same blocks.
    Final inertia: computed here, exactly, for every engine's returned centroids. First, the
    defaults against scikit-learn's (bench_kmeans_defaults)."""
    bench_kmeans_defaults(threads, rounds)
    torch.set_num_threads(threads)
    x = make_gmm(n, d)                                                             # (N, D)
    c0 = x[torch.randperm(n, generator=torch.Generator().manual_seed(0))[:k]]     # (K, D)
    km = kmeans.KMeans(k, n_iter=n_iter, tol=0, max_points_per_centroid=None)
    rows = min(km.block_rows('cpu'), n)
    xb, out = x[:rows].clone(), torch.empty(rows, k)                               # (rows, D/K)

    def gemm_flops():
        return 2 * rows * d * k / timeit(lambda: torch.mm(xb, c0.T, out=out), 3, 20)

    def run(fn):
        t = time.perf_counter()
        c = fn()
        return (time.perf_counter() - t) / n_iter, exact_inertia(x, c)
    peak = gemm_flops()
    engines = {'ours (same init)': lambda: km.fit(x, init_centroids=c0).centroids}
    engines.update(other_engines(x, c0, n_iter, threads))
    results = {}
    for _ in range(rounds):  # interleaved; keep each engine's fastest round
        for name, fn in engines.items():
            if 'default' not in name:
                results[name] = min(results.get(name, (float('inf'),)), run(fn))
    peak = max(peak, gemm_flops())
    with kmeans.no_tf32():  # the E-step alone, and a bare torch.mm of the same work, same blocks
        x_sq = kmeans._sq_norms(x)                                                 # (N,)
        t_estep = timeit(lambda: km._assign(x, c0, x_sq), 1, 2 * rounds)
        t_mm = timeit(lambda: [torch.mm(b, c0.T, out=out[:len(b)]) for b in x.split(rows)],
                      1, 2 * rounds)
    kpp = kmeans.KMeans(k, n_iter=n_iter, tol=0, max_points_per_centroid=None)
    results['ours k-means++ (fit incl. init)'] = run(lambda: kpp.fit(x).centroids)
    default = 'faiss-cpu random init (default)'
    if default in engines:
        results[default] = run(engines[default])

    print(f'K-Means N={n} D={d} K={k}, {n_iter} iterations, {threads} threads, best of {rounds} '
          f'rounds; fp32 GEMM peak ({rows}x{d})x({d}x{k}) {peak / 1e9:.1f} GFLOP/s; '
          f'initial inertia {exact_inertia(x, c0):.5g}')
    t0, i0 = results['ours (same init)']
    print(f'{"implementation":32s} {"s/iter":>7s} {"% peak":>7s} {"final inertia":>14s}  '
          f'ratio vs ours (time, inertia)')
    for name, (t, inr) in results.items():
        print(f'{name:32s} {t:7.3f} {2 * n * k * d / t / peak * 100:6.1f}% {inr:14.6g}  '
              f'{t / t0:.2f}x  {inr / i0:.4f}')
    flops = 2 * n * k * d
    print(f'ours E-step alone (distances + argmin) {t_estep:.3f} s = {flops / t_estep / peak:.1%} '
          f'of peak; a bare torch.mm of the same (N x D)(D x K) in the same blocks {t_mm:.3f} s '
          f'= {flops / t_mm / peak:.1%} of peak')
    if 'faiss-cpu random init (default)' in results:
        ratio = (results['ours k-means++ (fit incl. init)'][1]
                 / results['faiss-cpu random init (default)'][1])
        print(f'defaults: ours k-means++ / faiss random init final inertia {ratio:.4f}')


def build_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--n', type=int, default=200_000, help='points')
    p.add_argument('--d', type=int, default=384, help='feature dimension')
    p.add_argument('--k', type=int, default=1024, help='centroids')
    p.add_argument('--iter', type=int, default=20, help='Lloyd iterations')
    p.add_argument('--rounds', type=int, default=3, help='interleaved repeats (best of)')
    p.add_argument('--threads', type=int, default=2, help='CPU threads of every engine')
    return p


if __name__ == '__main__':
    a = build_parser().parse_args()
    cli.run(lambda: bench_kmeans(a.n, a.d, a.k, a.iter, a.threads, a.rounds))
