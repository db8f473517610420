"""
Performance figures, each printed next to a baseline measured in the same process, as a ratio.
Nothing here is a test: numbers depend on the machine.

    python bench.py                 # tiny VAR (32 px) on this machine's CPU or GPU
    python bench.py --gpu --official official/VAR   # VAR-d16: levers, the official code
    python bench.py --fid           # FID Inception features/s (random weights: same speed)
    python bench.py --cpu           # the quick starts' 5 training steps, each CPU lever
    python bench.py --chain         # DiGIT's tokens -> pixels: stage 2 + VQVAE vs pixdec

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
--chain: img/s of DiGIT's chain from the same GPT's tokens (--gpt), rendered by stage 2 (one
forward per VQ token) and its VQVAE's decoder (--stage2) or by the pixel decoder in one forward
(--pixdec, pixdec.py); the GPT alone is timed too, so the pixel stage's own rate shows.
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
import gpt
import inception
import kmeans
import pixdec
import sample
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


@torch.no_grad()
def bench_chain(gpt_path, stage2_path, pixdec_path, batch, n_images=500):
    """DiGIT's pixel stage two ways from the same tokens, float32: stage 2 (top-p 0.8) + its
    VQVAE decoder vs the pixel decoder, each as sample.py loads it. Speed: img/s of the pixel
    stage on the GPT's samples and of the whole chain (GPT + pixel stage), best of 3. Quality:
    n_images held-out images of the GPT's data rendered from their own DiGIT tokens, their PSNR
    and their fine detail as a share of the images' (pixdec.laplacian_energy)."""
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    ckpt = checkpoint.load(gpt_path, '--gpt')
    stage1 = gpt.GPT.from_checkpoint(ckpt, ['gpt'], source=f'--gpt {gpt_path}').to(device)
    args = sample.get_args(['--ckpt', gpt_path, '--stage2', stage2_path, '--pixdec', pixdec_path])
    sample.digit_defaults(args, ckpt, stage1)   # sample.py's cfg and top-k for this GPT
    labels = torch.arange(batch, device=device) % max(stage1.num_classes, 1)
    sampled = lambda: stage1.generate(labels, cfg=args.cfg, top_k=args.top_k, seed=0)
    t_gpt, tokens = timeit(sampled, device=device), sampled()                    # (B, L)
    tok = tokenizer.Tokenizer.load(ckpt['args']['tokenizer']).to(device)
    a = ckpt['args']
    held_out = data.build_dataset(a['data'], a['resolution'], False, seed=a['seed'])
    img = torch.stack([held_out[i][0] for i in range(min(n_images, len(held_out)))])
    source = torch.cat([tok.encode(b.to(device)) for b in img.split(100)])      # (N, L)
    print(f'DiGIT pixel stage, {device}, float32, batch {batch}; GPT alone '
          f'{batch / t_gpt:.1f} img/s; PSNR over {len(img)} held-out images')
    rows = []
    for name, load in (('stage 2 + VQVAE decoder', sample.load_stage2),
                       ('pixel decoder', sample.load_pixdec)):
        render = load(args, ckpt, stage1, device)[0]
        t = timeit(lambda: render(tokens, 0), device=device)
        rec = torch.cat([render(s, 0).float().cpu() for s in source.split(100)])
        mse = ((rec.clamp(-1, 1) - img) / 2).square().mean((1, 2, 3))           # (N,)
        detail = pixdec.laplacian_energy(rec) / pixdec.laplacian_energy(img) * 100
        rows.append((name, batch / t, batch / (t + t_gpt), (-10 * mse.log10()).mean(), detail))
    for name, stage, chain, psnr, detail in rows:
        print(f'  {name:25s} pixel stage {stage:8.1f} img/s ({stage / rows[0][1]:5.2f}x)  '
              f'chain {chain:8.1f} img/s ({chain / rows[0][2]:5.2f}x)  PSNR {psnr:.2f} dB  '
              f'fine detail {detail:.0f}%')


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
    if args.chain:
        return bench_chain(args.gpt, args.stage2, args.pixdec, args.gen_batch)
    if args.gpu:
        return bench_gpu(args)
    if args.fid:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
        return bench_fid(device, args.batch or (200 if device == 'cuda' else 16))
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
    p.add_argument('--fid', action='store_true', help='the FID Inception benchmark instead')
    p.add_argument('--cpu', action='store_true', help="the quick starts' five training steps at "
                   '32 px, each CPU lever on and off (compile, bf16, channels_last, threads)')
    p.add_argument('--repeat', type=int, default=5, help='--cpu: timed steps (best of)')
    p.add_argument('--chain', action='store_true', help="DiGIT's chain: stage 2 vs pixdec")
    p.add_argument('--gpt', default='out/gpt/ckpt.pt', help='--chain: the GPT')
    p.add_argument('--stage2', default='out/stage2/ckpt.pt', help='--chain: stage 2')
    p.add_argument('--pixdec', default='out/pixdec/ckpt.pt', help='--chain: the pixel decoder')
    return p


if __name__ == '__main__':
    cli.run(lambda: main(build_parser().parse_args()))
