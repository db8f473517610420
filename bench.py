"""
Performance figures, each printed next to a baseline measured in the same process, as a ratio.
Nothing here is a test: numbers depend on the machine.

    python bench.py                 # tiny VAR on CPU (and VAR-d16 when a GPU is there)
    python bench.py --depth 16      # a chosen depth

VAR training: images/s of one optimizer step (teacher forcing, backward, AdamW) from the token
cache of train.py vs the official trainer's way, which runs the frozen VQVAE on every batch;
on a GPU also bf16 vs fp32, the model FLOP utilisation (6 * parameters * tokens per second /
bf16 dense peak) and peak memory.
VAR sampling: images/s of `generate` with the kv cache vs recomputing the whole prefix at every
scale (what a model without a cache does), same tokens.
"""
import argparse
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import var
import vqvae

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


def bench_training(model, vae, batch, device, dtype, tokenize_every_step=False):
    """Seconds per optimizer step at the given autocast dtype (None: fp32), from cached tokens
    or, as the official trainer does, tokenizing the images with the frozen VQVAE every step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    res = model.patch_nums[-1] * vae.downsample
    images = torch.rand(batch, 3, res, res, device=device) * 2 - 1
    labels = torch.randint(0, model.num_classes, (batch,), device=device)
    cached = torch.cat(vae.img_to_idx(images), 1)                                  # (B, L)
    ctx = torch.autocast(device, dtype=dtype) if dtype else nullcontext()

    def step():
        tokens = torch.cat(vae.img_to_idx(images), 1) if tokenize_every_step else cached
        x = vae.idx_to_var_input(tokens.split([pn * pn for pn in model.patch_nums], 1))
        with ctx:
            logits = model(labels, x)
        F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.train()
    return timeit(step, device=device)


@torch.no_grad()
def generate_without_cache(model, labels, cfg):
    """Greedy next-scale sampling that re-runs the teacher-forced model over the whole prefix at
    every scale: the baseline of the kv cache (same tokens as sample_tokens with top_k=1)."""
    vae, B, K = model.vae[0], len(labels), len(model.patch_nums)
    null = torch.full_like(labels, model.num_classes)
    idx = []
    for k, (start, end) in enumerate(model.begin_ends):
        x = vae.idx_to_var_input(idx + [torch.zeros_like(labels)[:, None].expand(-1, pn * pn)
                                        for pn in model.patch_nums[k:]])[:, :end - 1]
        cond, uncond = model(labels, x)[:, start:end], model(null, x)[:, start:end]
        t = cfg * k / (K - 1)
        idx.append(((1 + t) * cond - t * uncond).argmax(-1))                     # (B, pn^2)
    return vae.idx_to_img(idx)


def main(args):
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    configs = [(args.depth or 4, True)]
    if device == 'cuda' and not args.depth:
        configs.append((16, False))
    print(f'device {device}' + (f' ({torch.cuda.get_device_name()})' if device == 'cuda' else '')
          + f', torch {torch.__version__}, {torch.get_num_threads()} CPU threads')
    for depth, tiny in configs:
        vae, model = build(depth, device, tiny)
        n_params = sum(p.numel() for p in model.parameters())
        name = f"VAR-d{depth} ({n_params / 1e6:.1f}M, {'tiny 32 px' if tiny else '256 px'})"
        batch = args.batch or (32 if tiny else 16)
        fast = torch.bfloat16 if device == 'cuda' else None
        t_ours = bench_training(model, vae, batch, device, fast)
        t_official = bench_training(model, vae, batch, device, fast, tokenize_every_step=True)
        line = (f'{name} train: {batch / t_ours:8.1f} img/s from cached tokens  vs tokenizing '
                f'every batch (official) {batch / t_official:8.1f} img/s  ratio '
                f'{t_official / t_ours:.2f}x')
        if device == 'cuda':
            t_fp32 = bench_training(model, vae, batch, device, None)
            line += f'  bf16 vs fp32 {t_fp32 / t_ours:.2f}x'
            peak = next((v for k, v in PEAK_BF16.items() if k in torch.cuda.get_device_name()), 0)
            flops = 6 * n_params * batch * model.L / t_ours
            line += f'  MFU {flops / peak * 100:.1f}%' if peak else ''
            line += f'  peak mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB'
        print(line)
        model.eval()
        labels = torch.arange(args.gen_batch, device=device) % model.num_classes
        t_cache = timeit(lambda: model.generate(labels, cfg=1.5, top_k=1), device=device)
        t_full = timeit(lambda: generate_without_cache(model, labels, 1.5), device=device)
        print(f'{name} sample: {len(labels) / t_cache:8.1f} img/s with kv cache  vs recompute '
              f'{len(labels) / t_full:8.1f} img/s  ratio {t_full / t_cache:.2f}x')


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--depth', type=int, default=0, help='one VAR depth (default: 4, +16 on GPU)')
    p.add_argument('--batch', type=int, default=0, help='training batch (default 32 / 16)')
    p.add_argument('--gen_batch', type=int, default=16, help='images per generate call')
    main(p.parse_args())
