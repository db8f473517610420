"""
Performance figures, each printed next to a baseline measured in the same process, as a ratio.
Nothing here is a test: numbers depend on the machine.

    python bench.py                 # tiny VAR (32 px) on this machine's CPU or GPU
    python bench.py --gpu --official official/VAR   # VAR-d16: levers, the official code
    python bench.py --kmeans        # K-Means: our default vs scikit-learn's, then ours vs
                                    # faiss-cpu and scikit-learn from one init (if installed)
    python bench.py --fid           # FID Inception features/s (random weights: same speed)
    python bench.py --cpu           # the quick starts' 5 training steps, each CPU lever

VAR training: images/s of one optimizer step (teacher forcing, backward, AdamW) from the token
cache of train.py vs the official trainer's way, which runs the frozen VQVAE on every batch.
VAR sampling: images/s of `generate` with the kv cache vs recomputing the whole prefix at every
scale (what a model without a cache does), same tokens.
--gpu (at most 5 minutes on one H100): VAR-d16 at 256 px, batch 32, each training lever on and
off (bf16, fused AdamW, torch.compile, FlexAttention's block mask) with img/s, the model FLOP
utilisation (6 N L FLOP per image, N parameters, L tokens, over the bf16 dense peak) and peak
memory; sampling at cfg 1.5, top-k 900, top-p 0.96 in fp32 and bf16. --official PATH (an
extracted FoundationVision/VAR checkout, never committed) adds the official model, loaded with
the same weights, in the same run: its trainer's step (eager, fused AdamW) and its sampler
under bf16 and fp16 autocast (its demo's); ratios are then against it.
--cpu: ms per training step of the quick starts' vqvae, var, ssl, gpt and stage2 (32 px, their
default flags, random weights) in eager float32, under bf16 autocast (native or emulated, as the
CPU's flags and ONEDNN_MAX_CPU_ISA say), in channels_last (the conv net), on one thread and
compiled, each as a ratio to eager; and where the eager step's time goes (torch.profiler).
FID features: images/s of fid.py's whole path (uint8 256 px -> ADM preprocessing -> pool and
spatial features, fp32, TF32 off) vs the network alone on ready inputs; on a GPU also vs the
same network with TF32 convolutions (what a default pytorch-fid run gets on Ampere and later).
"""
import argparse
import contextlib
import importlib
import io
import os
import shutil
import sys
import tempfile
import time
import types
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import checkpoint
import cli
import data
import dist
import inception
import kmeans
import standin
import tokenizer
import train
import var
import vqvae
import vqvae_train
from cli import UserError

PEAK_BF16 = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12}   # dense tensor-core FLOP/s


def timeit(fn, warmup=1, repeat=3, device='cpu'):
    """Best wall time of fn() over `repeat` runs after `warmup` runs, in seconds."""
    for _ in range(warmup):
        fn()
    best = float('inf')
    for _ in range(repeat):
        if device == 'cuda':
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == 'cuda':
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def build(depth, device, tiny):
    """VAR on a random-weight VQVAE: the released sizes, or the quick start's tiny ones."""
    torch.manual_seed(0)
    vae_cfg = (dict(vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                    patch_nums=(1, 2, 3, 4, 6, 8)) if tiny else {})
    vae = vqvae.VQVAE(**vae_cfg).to(device).eval().requires_grad_(False)
    model = var.VAR(vae, depth=depth, num_classes=10 if tiny else 1000,
                    patch_nums=vae.config.patch_nums).to(device)
    return vae, model


def bench_training(model, vae, batch, device, dtype, tokenize_every_step=False, fused=None,
                   compiled=False):
    """Seconds per optimizer step at the given autocast dtype (None: fp32), from cached tokens
    or, as the official trainer does, tokenizing the images with the frozen VQVAE every step.
    fused: AdamW's fused kernel (None: torch's default, foreach); compiled: torch.compile of
    the model, whose first calls compile (untimed). Works for the official VAR too (same call)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    forward = torch.compile(model) if compiled else model
    res = model.patch_nums[-1] * vae.downsample
    images = torch.rand(batch, 3, res, res, device=device) * 2 - 1
    labels = torch.randint(0, model.num_classes, (batch,), device=device)
    cached = torch.cat(vae.img_to_idx(images), 1)                                  # (B, L)
    ctx = torch.autocast(device, dtype=dtype) if dtype else nullcontext()

    def step():
        tokens = torch.cat(vae.img_to_idx(images), 1) if tokenize_every_step else cached
        x = vae.idx_to_var_input(tokens.split([pn * pn for pn in model.patch_nums], 1))
        with ctx:
            logits = forward(labels, x)
        F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.train()
    return timeit(step, warmup=3 if compiled else 1, device=device)


@torch.no_grad()
def generate_without_cache(model, labels, cfg):
    """Greedy next-scale sampling that re-runs the teacher-forced model over the whole prefix at
    every scale: the baseline of the kv cache (same tokens as sample_tokens with top_k=1)."""
    vae, K = model.vae[0], len(model.patch_nums)
    null = torch.full_like(labels, model.num_classes)
    idx = []
    for k, (start, end) in enumerate(model.begin_ends):
        x = vae.idx_to_var_input(idx + [torch.zeros_like(labels)[:, None].expand(-1, pn * pn)
                                        for pn in model.patch_nums[k:]])[:, :end - 1]
        cond, uncond = model(labels, x)[:, start:end], model(null, x)[:, start:end]
        t = cfg * k / (K - 1)
        idx.append(((1 + t) * cond - t * uncond).argmax(-1))                     # (B, pn^2)
    return vae.idx_to_img(idx)


OFFICIAL_NO_INIT = (nn.Linear, nn.LayerNorm, nn.BatchNorm2d, nn.SyncBatchNorm, nn.Conv1d,
                    nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d)   # build_vae_var's list


def load_official(path, vae, model, device):
    """The official VQVAE and VAR (models/ of a FoundationVision/VAR checkout at `path`, never
    committed) holding the weights of ours: the same function, so any difference is speed.
    Its code has three side effects, each undone here: it imports its own top-level `dist` (a
    name ours has too), it needs huggingface_hub (only for VARHF; a stub when absent), and
    build_vae_var switches nn init off for the whole process."""
    if not os.path.isfile(os.path.join(path, 'models', 'var.py')):
        raise UserError(f'--official {path}: not a FoundationVision/VAR checkout '
                        '(no models/var.py)')
    theirs = ('dist', 'models', 'huggingface_hub')   # top-level names it brings or shadows
    saved = {n: m for n, m in sys.modules.items() if n.split('.')[0] in theirs}
    for name in saved:
        del sys.modules[name]
    if importlib.util.find_spec('huggingface_hub') is None:
        stub = sys.modules['huggingface_hub'] = types.ModuleType('huggingface_hub')
        stub.PyTorchModelHubMixin = object
    inits = {c: c.__dict__.get('reset_parameters') for c in OFFICIAL_NO_INIT}
    sys.path.insert(0, path)
    try:
        vae_ref, ref = importlib.import_module('models').build_vae_var(
            device, patch_nums=tuple(model.patch_nums), V=vae.config.vocab_size,
            Cvae=vae.config.z_channels, ch=vae.config.ch, num_classes=model.num_classes,
            depth=model.config.depth, shared_aln=model.config.shared_aln,
            attn_l2_norm=model.config.attn_l2_norm)
    finally:
        sys.path.remove(path)
        for name in [n for n in sys.modules if n.split('.')[0] in theirs]:
            del sys.modules[name]
        sys.modules.update(saved)
        for c, init in inits.items():
            if init is not None:
                c.reset_parameters = init
            elif 'reset_parameters' in c.__dict__:   # inherited before: inherit again
                del c.reset_parameters
    vae_ref.load_state_dict(vae.state_dict())
    ref.load_state_dict(model.state_dict())
    return ref   # its VQVAE: ref.vae_proxy[0]


def bench_gpu(args):
    """python bench.py --gpu (see the top of the file): VAR-d16 at 256 px, random weights, on
    one CUDA GPU; ratios are against the official model when it is there, else the first row."""
    if not torch.cuda.is_available():
        raise UserError('--gpu needs a CUDA device (torch.cuda.is_available() is False)')
    vae, model = build(16, 'cuda', tiny=False)
    ref = load_official(args.official, vae, model, 'cuda') if args.official else None
    B, n_params = args.batch or 32, sum(p.numel() for p in model.parameters())
    flop = 6 * n_params * model.L
    peak = next((v for k, v in PEAK_BF16.items() if k in torch.cuda.get_device_name()), 0)
    print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}; VAR-d{model.config.depth} '
          f'({n_params / 1e6:.1f}M parameters N, L = {model.L} tokens), batch {B}; MFU = '
          f'6 N L ({flop / 1e12:.3f} TFLOP per image) x img/s / {peak / 1e12:.0f} TFLOP/s')
    train = [('ours eager, fp32 (TF32 off), AdamW foreach', model, dict(dtype=None)),
             ('ours eager, AdamW foreach', model, {}),
             ('ours eager, AdamW fused', model, dict(fused=True)),
             ('ours compiled, AdamW fused', model, dict(fused=True, compiled=True)),
             ('ours compiled, FlexAttention, AdamW fused', model,
              dict(fused=True, compiled=True, flex=True))]
    if ref is not None:
        train.append(('official eager, AdamW fused (its trainer)', ref, dict(fused=True)))
    model.block_mask(model.L, torch.device('cuda', torch.cuda.current_device()))  # outside compile
    rows = []
    for name, m, kw in train:
        model.attn_impl = 'flex' if kw.pop('flex', False) else 'sdpa'
        torch.cuda.reset_peak_memory_stats()
        t = bench_training(m, vae, B, 'cuda', kw.pop('dtype', torch.bfloat16), **kw)
        rows.append((name, B / t, f'MFU {flop * B / t / peak * 100:5.1f}%' if peak else '',
                     f'peak mem {torch.cuda.max_memory_allocated() / 2**30:6.2f} GiB'))
    model.attn_impl = 'sdpa'
    print_rows('train (cached tokens; bf16 autocast and SDPA unless said)', rows)
    labels = torch.arange(args.gen_batch, device='cuda') % model.num_classes
    kw = dict(cfg=1.5, top_k=900, top_p=0.96)
    sample = [('ours fp32', None, lambda: model.generate(labels, **kw)),
              ('ours bf16 autocast', torch.bfloat16, lambda: model.generate(labels, **kw))]
    official = lambda: ref.autoregressive_infer_cfg(len(labels), labels, **kw)
    model.eval()
    if ref is not None:
        ref.eval()
        sample += [('official bf16 autocast', torch.bfloat16, official),
                   ('official fp16 autocast (its demo)', torch.float16, official)]
    rows = []
    for name, dtype, fn in sample:
        with torch.autocast('cuda', dtype=dtype, enabled=dtype is not None), torch.no_grad():
            rows.append((name, len(labels) / timeit(fn, device='cuda')))
    print_rows(f'sample (batch {len(labels)}, cfg 1.5, top-k 900, top-p 0.96, + decode)', rows)


def print_rows(title, rows):
    """One line per row: name, img/s, ratio to the official row (else the first), extras."""
    base = next((r[1] for r in rows if r[0].startswith('official')), rows[0][1])
    print(title)
    for name, rate, *extras in rows:
        print(f'  {name:45s} {rate:8.1f} img/s  {rate / base:5.2f}x  ' + '  '.join(extras))


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


@torch.no_grad()
def bench_fid(device, batch):
    """Inception features per second; random weights (the speed does not depend on them)."""
    model = inception.FIDInception().to(device).eval()
    u8 = torch.randint(0, 256, (batch, 256, 256, 3), dtype=torch.uint8).numpy()  # ADM's format
    x = inception.preprocess(u8, 'adm', device)                       # (B, 3, 299, 299)
    with kmeans.no_tf32():
        t_full = timeit(lambda: model(inception.preprocess(u8, 'adm', device), spatial=True),
                        device=device)
        t_net = timeit(lambda: model(x), device=device)
    line = (f'FID Inception ({device}, batch {batch}): {batch / t_full:8.1f} img/s uint8 256 px '
            f'-> adm preprocessing -> features, fp32  vs network alone {batch / t_net:8.1f} '
            f'img/s  ratio {t_full / t_net:.2f}x')
    if device == 'cuda':
        old = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = True
        t_tf32 = timeit(lambda: model(x), device=device)
        torch.backends.cudnn.allow_tf32 = old
        line += f'  TF32 convolutions (not used) {batch / t_tf32:.1f} img/s'
    print(line)


# ----------------------------------------------------------------------------------------------
# The CPU levers: the quick starts' training steps at 32 px

QUICK_STARTS = {   # train.py flags of the quick starts' steps (frozen inputs: random weights)
    'vqvae': [], 'var': ['--depth', '4', '--lr', '1e-3'], 'ssl': ['--depth', '4'],
    'gpt': ['--depth', '4', '--lr', '1e-3'], 'stage2': ['--depth', '4', '--lr', '1e-3']}


def quick_start_tasks(folder):
    """{name: (task, args)}: train.py's training task of each quick-start step, on 64 built-in
    images, its frozen inputs (VQVAEs, a DiGIT tokenizer) made with random weights in folder."""
    save = lambda m, kind, path: checkpoint.save(dict(kind=kind, config=asdict(m.config),
                                                      model=m.state_dict(), ema=None), path)
    torch.manual_seed(0)
    files = {k: os.path.join(folder, f'{k}.pt') for k in ('vae', 'vae1', 'tok')}
    for key, scales in (('vae', None), ('vae1', (8,))):
        cfg = vqvae_train.config_from_args(train.get_args(['--patch_nums', '8'] if scales else []))
        save(vqvae.VQVAE(**cfg), 'vqvae', files[key])
    vit = standin.ContrastiveViT(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=2)
    tokenizer.Tokenizer(vit.vit, 1, 32, torch.randn(512, 128)).save(files['tok'])
    run = dist.Run('cpu', 0, 1, nullcontext())
    tasks = {}
    for name, flags in QUICK_STARTS.items():
        vae = files['vae1'] if name == 'stage2' else files['vae']
        args = train.get_args(['--model', name, *flags, '--vae', vae, '--tokenizer', files['tok'],
                               '--out_dir', os.path.join(folder, name), '--eval_images', '8',
                               '--fid_images', '0', '--device', 'cpu', '--num_workers', '0'])
        sets = [data.build_dataset('builtin', 32, split, seed=0, size=64) for split in (1, 0)]
        with contextlib.redirect_stderr(io.StringIO()):   # the token caches' progress bars
            tasks[name] = train.MODELS[name](args, *sets, run), args
    return tasks


def step_fn(task, args, model, autocast=nullcontext(), channels_last=False):
    """One training step of `model` on a fixed batch: forward, backward, AdamW."""
    opt = train.make_optimizer(model, args, task.no_decay)
    batch = next(iter(torch.utils.data.DataLoader(task.train_set, args.batch_size)))
    if channels_last:
        model.to(memory_format=torch.channels_last)
        batch = [b.contiguous(memory_format=torch.channels_last) if b.ndim == 4 else b
                 for b in batch]

    def step():
        with autocast:
            loss, _ = task.loss(model, batch, 10)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def profile_line(step):
    """Where a step's time goes: GEMMs and convolutions, the other ops, and the host (Python and
    launch overhead: wall time outside any op), over 3 steps."""
    stderr, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)   # its C++ side prints a start and a stop line there
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            for _ in range(3):
                step()
            wall = (time.perf_counter() - t) * 1e6   # us, as the profiler counts
    finally:
        os.dup2(stderr, 2)
        os.close(stderr)
        os.close(devnull)
    ops = [e for e in prof.key_averages() if e.key.startswith('aten::')]
    heavy = sum(e.self_cpu_time_total for e in ops
                if any(k in e.key for k in ('mm', 'conv', 'linear', 'scaled_dot_product')))
    other = sum(e.self_cpu_time_total for e in ops) - heavy
    return (f'GEMM/conv {heavy / wall:.0%}, other ops {other / wall:.0%}, '
            f'host {max(0.0, 1 - (heavy + other) / wall):.0%}')


def bench_cpu(repeat):
    """Each quick-start step with each CPU lever, as ms/step and the ratio to eager float32."""
    flags = open('/proc/cpuinfo').read() if os.path.exists('/proc/cpuinfo') else ''
    have = [f for f in ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16') if f' {f}' in flags]
    isa = os.environ.get('ONEDNN_MAX_CPU_ISA', 'ALL').upper()   # a cap emulates an older CPU
    native = dist.cpu_has_native_bf16() and (isa == 'ALL' or 'BF16' in isa or 'AMX' in isa)
    print(f"CPU flags: {' '.join(have) or 'unknown'}; ONEDNN_MAX_CPU_ISA {isa}; "
          f'{torch.get_num_threads()} threads; C++ compiler: '
          f"{shutil.which('c++') or shutil.which('g++') or 'none'}; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as folder:
        for name, (task, args) in quick_start_tasks(folder).items():
            torch.manual_seed(0)
            fresh = lambda: task.build().train()
            model = fresh()
            base = timeit(step_fn(task, args, model), warmup=2, repeat=repeat)
            n = sum(p.numel() for p in model.parameters()) / 1e6
            cells = [f'eager fp32 {base * 1e3:.0f} ms']
            bf16 = torch.autocast('cpu', torch.bfloat16)
            levers = [('bf16 ' + ('native' if native else 'emulated'), dict(autocast=bf16))]
            if name in ('vqvae',):   # the conv net
                levers.append(('channels_last', dict(channels_last=True)))
            for label, kw in levers:
                t = timeit(step_fn(task, args, fresh(), **kw), warmup=2, repeat=repeat)
                cells.append(f'{label} {t * 1e3:.0f} ms ({base / t:.2f}x)')
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            t = timeit(step_fn(task, args, fresh()), warmup=1, repeat=repeat)
            torch.set_num_threads(threads)
            cells.append(f'1 thread {t * 1e3:.0f} ms ({base / t:.2f}x)')
            start = time.perf_counter()
            step = step_fn(task, args, torch.compile(fresh()))
            step()
            warm = time.perf_counter() - start
            t = timeit(step, warmup=1, repeat=repeat)
            cells.append(f'compiled {t * 1e3:.0f} ms ({base / t:.2f}x; compile {warm:.0f} s, '
                         f'{warm / max(base - t, 1e-9):.0f} steps to pay)' if t < base else
                         f'compiled {t * 1e3:.0f} ms ({base / t:.2f}x; compile {warm:.0f} s)')
            print(f'{name} ({n:.2f}M): ' + ' | '.join(cells))
            print(f'  profile of the eager step: {profile_line(step_fn(task, args, model))}')


def main(args):
    if args.cpu:
        return bench_cpu(args.repeat)
    if args.gpu:
        return bench_gpu(args)
    if args.fid:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
        return bench_fid(device, args.batch or (200 if device == 'cuda' else 16))
    if args.kmeans:
        return bench_kmeans(args.kmeans_n, args.kmeans_d, args.kmeans_k, args.kmeans_iter,
                            rounds=args.kmeans_rounds)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    print(f'device {device}' + (f' ({torch.cuda.get_device_name()})' if device == 'cuda' else '')
          + f', torch {torch.__version__}, {torch.get_num_threads()} CPU threads')
    depth, batch = args.depth or 4, args.batch or 32
    vae, model = build(depth, device, tiny=True)
    name = f'VAR-d{depth} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M, tiny 32 px)'
    fast = torch.bfloat16 if device == 'cuda' else None
    t_ours = bench_training(model, vae, batch, device, fast)
    t_official = bench_training(model, vae, batch, device, fast, tokenize_every_step=True)
    print(f'{name} train: {batch / t_ours:8.1f} img/s from cached tokens  vs tokenizing every '
          f'batch (official) {batch / t_official:8.1f} img/s  ratio {t_official / t_ours:.2f}x')
    model.eval()
    labels = torch.arange(args.gen_batch, device=device) % model.num_classes
    t_cache = timeit(lambda: model.generate(labels, cfg=1.5, top_k=1), device=device)
    t_full = timeit(lambda: generate_without_cache(model, labels, 1.5), device=device)
    print(f'{name} sample: {len(labels) / t_cache:8.1f} img/s with kv cache  vs recompute '
          f'{len(labels) / t_full:8.1f} img/s  ratio {t_full / t_cache:.2f}x')
    if device == 'cuda':
        print('VAR-d16 at 256 px, each lever, beside the official code: python bench.py --gpu')


def build_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--depth', type=int, default=0, help='VAR depth at 32 px (default 4)')
    p.add_argument('--batch', type=int, default=0, help='training batch (default 32)')
    p.add_argument('--gen_batch', type=int, default=16, help='images per generate call')
    p.add_argument('--gpu', action='store_true', help='VAR-d16 on one CUDA GPU: every lever, '
                   'train and sample (at most 5 min on an H100)')
    p.add_argument('--official', default='', help='--gpu: an extracted FoundationVision/VAR '
                   'checkout, run beside ours')
    p.add_argument('--kmeans', action='store_true', help='the K-Means benchmark instead of VAR')
    p.add_argument('--fid', action='store_true', help='the FID Inception benchmark instead')
    p.add_argument('--cpu', action='store_true', help="the quick starts' five training steps at "
                   '32 px, each CPU lever on and off (compile, bf16, channels_last, threads)')
    p.add_argument('--repeat', type=int, default=5, help='--cpu: timed steps (best of)')
    p.add_argument('--kmeans_n', type=int, default=200_000, help='K-Means points')
    p.add_argument('--kmeans_d', type=int, default=384, help='K-Means feature dimension')
    p.add_argument('--kmeans_k', type=int, default=1024, help='K-Means centroids')
    p.add_argument('--kmeans_iter', type=int, default=20, help='K-Means Lloyd iterations')
    p.add_argument('--kmeans_rounds', type=int, default=3, help='K-Means interleaved repeats')
    return p


if __name__ == '__main__':
    cli.run(lambda: main(build_parser().parse_args()))
