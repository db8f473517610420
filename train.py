"""
One trainer for every model of the repo: `--model vqvae`, the multi-scale VQVAE of VAR (vqvae.py),
a tokenizer the official VAR code never released the training of; `--model var`, VAR itself
(var.py) on a frozen tokenizer; `--model ssl`, the small self-supervised ViT (tokenizer.py) that
stands in for DINOv2 in DiGIT's tokenizer where no pretrained weights can be downloaded;
`--model gpt`, DiGIT's raster-order GPT (gpt.py) on the tokens of a saved DiGIT tokenizer;
`--model stage2`, DiGIT's stage 2 (gpt.py): the tokens of a single-scale VQVAE from DiGIT's;
`--model probe`, DiGIT's linear probe (Table 2): a linear classifier per layer of a frozen GPT.

    python train.py --model vqvae                         # laptop / CPU: built-in data, 32 px
    python train.py --model var --depth 4 --lr 1e-3 --max_iters 300     # ... then VAR on it
    python train.py --model ssl && python tokenizer.py fit   # DiGIT's tokenizer, offline
    python train.py --model gpt --depth 4                    # ... then DiGIT's GPT on it
    python train.py --model vqvae --patch_nums 8 --out_dir out/vqvae_1scale   # and stage 2
    python train.py --model stage2 --depth 4 --vae out/vqvae_1scale/ckpt.pt
    python train.py --model probe --gpt out/gpt/ckpt.pt       # top-1 per layer of the GPT
    python train.py --model vqvae --data ~/imagenet --resolution 256     # one GPU, VAR's config
    torchrun --standalone --nproc_per_node=8 train.py --model var --depth 16 --data ~/imagenet \
        --resolution 256 --vae vae_ch160v4096z32.pth --total_batch_size 768   # 8 GPUs (2 nodes:
        add --nnodes 2 --node_rank 0/1 --master_addr HOST --master_port 29500; NCCL_IB_DISABLE=1
        without InfiniBand)
    torchrun --nproc_per_node=2 train.py --model vqvae --device cpu      # DDP on CPU (gloo)

Rerunning the same command resumes from `<out_dir>/ckpt.pt` (`--resume never` starts over).
`--total_batch_size` images make one optimizer step whatever the number of GPUs: gradient
accumulation is derived from it and `--batch_size`, the per-GPU micro-batch (lower that on OOM).
The random state is a pure function of (seed, rank, step) and the data order of (seed, epoch),
so an interrupted and resumed run ends with the same weights as an uninterrupted one (CPU;
with image folders also `--num_workers 0`, as worker processes draw their own crops).
"""
import argparse
import importlib.util
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import gpt
import tokenizer
import var
import vqvae

# Architecture presets; any flag given on the command line overrides its preset value.
VQVAE_PRESETS = {
    'tiny': dict(vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1),
    'var': dict(vocab_size=4096, z_channels=32, ch=160, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2),
}
# Per-model defaults of flags left unset: VQGAN's Adam for the tokenizer, VAR's recipe
# (AdamW (0.9, 0.95), wd 0.05, lr 1e-4 per 256 images, warmup 2%, linear decay) for VAR.
MODEL_DEFAULTS = {
    'vqvae': dict(weight_decay=0.0, beta1=0.5, beta2=0.9, lr_schedule='cosine', warmup_iters=50),
    'var': dict(weight_decay=0.05, beta1=0.9, beta2=0.95, lr_schedule='linear'),
    'ssl': dict(weight_decay=0.05, beta1=0.9, beta2=0.95, lr_schedule='cosine', warmup_iters=20,
                depth=4, total_batch_size=64, batch_size=64, max_iters=200),
    # DiGIT's fairseq recipe: Adam (0.9, 0.98), wd 0.01, inverse-sqrt schedule, smoothing 0.1
    'gpt': dict(weight_decay=0.01, beta1=0.9, beta2=0.98, lr_schedule='inverse_sqrt',
                label_smooth=0.1, grad_clip=1.0, dropout=0.1),
}
MODEL_DEFAULTS['stage2'] = MODEL_DEFAULTS['gpt']   # DiGIT trains stage 2 the same way
MODEL_DEFAULTS['probe'] = dict(weight_decay=0.0, beta1=0.9, beta2=0.999, lr_schedule='cosine',
                               warmup_iters=0, max_iters=300, total_batch_size=64, batch_size=64)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group('model')
    g.add_argument('--model', choices=['vqvae', 'var', 'ssl', 'gpt', 'stage2', 'probe'],
                   default='vqvae',
                   help='what to train')
    g.add_argument('--depth', type=int, help='VAR: blocks (default 16); width 64*depth, heads = '
                   'depth (paper: 16, 20, 24, 30). ssl: blocks (default 4); width 32*depth, '
                   'heads = depth/2. gpt, stage2: as VAR (DiGIT-base: 16)')
    g.add_argument('--patch_size', type=int,
                   help='ssl: ViT patch side (default: resolution / 8, an 8x8 token grid)')
    g.add_argument('--vae', help='var: the frozen tokenizer, a train.py checkpoint or '
                   'vae_ch160v4096z32.pth (default out/vqvae/ckpt.pt); stage2: a single-scale '
                   'VQVAE (default out/vqvae_1scale/ckpt.pt)')
    g.add_argument('--cache_tokens', action=argparse.BooleanOptionalAction, default=True,
                   help='VAR: tokenize the data once (eval crops) instead of every batch')
    g.add_argument('--label_smooth', type=float, help='label smoothing (VAR 0, gpt 0.1)')
    g.add_argument('--tokenizer', default='out/tokenizer/tokenizer.pt',
                   help='gpt, stage2: the frozen DiGIT tokenizer (python tokenizer.py fit)')
    g.add_argument('--gpt', default='out/gpt/ckpt.pt', help='probe: the GPT to probe (its '
                   'tokenizer comes with it)')
    g.add_argument('--cond', choices=['token', 'adaln'], default='token',
                   help='gpt: class as the start token, or also AdaLN in every block')
    g.add_argument('--dropout', type=float, help='gpt, stage2: dropout (0.1)')
    g.add_argument('--cfg', type=float, default=4.0, help='var, gpt: guidance of the sample grids')
    g.add_argument('--top_k', type=int, default=0, help='var, gpt: top-k of the sample grids')
    g.add_argument('--top_p', type=float, default=0.0, help='var, gpt: top-p of the sample grids')
    g.add_argument('--vae_preset', choices=list(VQVAE_PRESETS), default=None,
                   help="tokenizer size: 'tiny' (default up to 64 px) or 'var' = the released "
                        "vae_ch160v4096z32 (default above 64 px)")
    g.add_argument('--vocab_size', type=int, help='codebook size V')
    g.add_argument('--z_channels', type=int, help='latent channels C')
    g.add_argument('--ch', type=int, help='base conv width (multiple of 32)')
    g.add_argument('--ch_mult', type=_ints, help='width multipliers, e.g. 1,2,2 (downsample 4)')
    g.add_argument('--num_res_blocks', type=int, help='residual blocks per resolution')
    g.add_argument('--patch_nums', type=_ints,
                   help='token map sides, ending at the latent size (default: by latent size)')
    g.add_argument('--beta', type=float, default=0.25, help='commitment weight (VAR Eq. 5)')
    g = p.add_argument_group('tokenizer losses')
    g.add_argument('--l1', type=float, default=1.0, help='weight of the L1 reconstruction loss')
    g.add_argument('--l2', type=float, default=1.0, help='weight of the L2 reconstruction loss')
    g.add_argument('--lpips_vgg', default='', help='torchvision vgg16 weights: enables LPIPS')
    g.add_argument('--lpips_lin', default='', help="LPIPS' vgg.pth linear-layer weights")
    g.add_argument('--lpips_weight', type=float, default=1.0, help='weight of LPIPS')
    g.add_argument('--disc_weight', type=float, default=0.0,
                   help='PatchGAN hinge loss weight (VQGAN uses 0.8); 0 = no discriminator')
    g.add_argument('--disc_start', type=int, default=0, help='step the GAN loss starts at')
    g.add_argument('--reseed_every', type=int, default=100,
                   help='re-seed unused codes from live features every N steps (0 = never)')
    g = p.add_argument_group('data')
    g.add_argument('--data', default='builtin', help="'builtin' (offline procedural set) or an "
                   'image folder (class sub-folders, or train/ and val/)')
    g.add_argument('--resolution', type=int, default=32, help='image side in pixels')
    g.add_argument('--hflip', action=argparse.BooleanOptionalAction, default=False,
                   help='random horizontal flips')
    g.add_argument('--train_images', type=int, default=0,
                   help='use only this many training images (0 = all), for quick experiments')
    g.add_argument('--num_workers', type=int, default=-1,
                   help='data loader processes per GPU (-1: 0 for builtin, else min(8, cores))')
    g = p.add_argument_group('optimisation')
    g.add_argument('--max_iters', type=int, help='optimizer steps in all (ssl 200, else 400)')
    g.add_argument('--total_batch_size', type=int,
                   help='images per optimizer step (ssl 64, else 32)')
    g.add_argument('--batch_size', type=int, help='micro-batch per GPU (ssl 64, else 32; ssl: '
                   'the InfoNCE negatives are this micro-batch)')
    g.add_argument('--lr', type=float, help='peak learning rate (AdamW); default: vqvae 1e-3 '
                   "(tiny) or 2e-4 ('var' preset), var 1e-4 * total_batch_size / 256, ssl 1e-3")
    g.add_argument('--weight_decay', type=float, help='decoupled weight decay of matrices')
    g.add_argument('--beta1', type=float, help='AdamW beta1')
    g.add_argument('--beta2', type=float, help='AdamW beta2')
    g.add_argument('--warmup_iters', type=int, help='linear warmup steps (var: 2%%, gpt: 10%% '
                   'of all)')
    g.add_argument('--lr_schedule', choices=['cosine', 'linear', 'constant', 'inverse_sqrt'],
                   help='decay after warmup (vqvae cosine, var linear, gpt inverse_sqrt: '
                   'lr sqrt(warmup / step), fairseq\'s)')
    g.add_argument('--min_lr_ratio', type=float, default=0.1, help='final lr / peak lr')
    g.add_argument('--grad_clip', type=float, help='max grad norm (0 = off; gpt 1, else 2)')
    g.add_argument('--ema', type=float, default=0.0, help='EMA decay of weights (0 = off)')
    g = p.add_argument_group('system')
    g.add_argument('--device', default='', help='cuda, mps or cpu (default: best available)')
    g.add_argument('--dtype', choices=['float32', 'bfloat16', 'float16'], default=None,
                   help='autocast dtype (default: bfloat16 on CUDA, float32 elsewhere)')
    g.add_argument('--compile', action=argparse.BooleanOptionalAction, default=None,
                   help='torch.compile the model (default: on with CUDA when Triton is installed)')
    g.add_argument('--seed', type=int, default=0, help='seed of init, data order and sampling')
    g = p.add_argument_group('output')
    g.add_argument('--out_dir', help='checkpoint, log and images go here (out/<model>)')
    g.add_argument('--resume', choices=['auto', 'never'], default='auto',
                   help='auto: continue from <out_dir>/ckpt.pt when it exists')
    g.add_argument('--log_every', type=int, default=50, help='steps between log lines')
    g.add_argument('--eval_every', type=int, default=200, help='steps between validations')
    g.add_argument('--eval_images', type=int, default=1000, help='validation images (at most)')
    g.add_argument('--sample_every', type=int, default=200, help='steps between PNG grids')
    g.add_argument('--save_every', type=int, default=200, help='steps between checkpoints')
    g.add_argument('--stop_after', type=int, default=0,
                   help='exit after this many steps in this run (checkpointed; rerun resumes)')
    args = p.parse_args(argv)
    args.out_dir = args.out_dir or os.path.join('out', args.model)
    args.vae_preset = args.vae_preset or ('tiny' if args.resolution <= 64 else 'var')
    for k, v in {**dict(depth=16, total_batch_size=32, batch_size=32, max_iters=400,
                        label_smooth=0.0, grad_clip=2.0, dropout=0.0),
                 **MODEL_DEFAULTS[args.model]}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.lr is None and args.model == 'vqvae':   # VQGAN-like: the tiny model takes more
        args.lr = 1e-3 if args.vae_preset == 'tiny' else 2e-4
    elif args.lr is None:
        args.lr = {'ssl': 1e-3, 'gpt': 3e-4, 'stage2': 5e-4, 'probe': 3e-3}.get(
            args.model, 1e-4 * args.total_batch_size / 256)
    args.vae = args.vae or ('out/vqvae_1scale/ckpt.pt' if args.model == 'stage2'
                            else 'out/vqvae/ckpt.pt')
    if args.warmup_iters is None and args.model in ('var', 'gpt', 'stage2'):
        args.warmup_iters = args.max_iters // (50 if args.model == 'var' else 10)
    return args


def _ints(s):
    return tuple(int(v) for v in s.split(','))


# ----------------------------------------------------------------------------------------------
# Device, distributed setup, optimisation

def setup(args):
    """Device autodetection (cuda > mps > cpu) and torchrun DDP: NCCL on GPU, gloo on CPU."""
    device = args.device or ('cuda' if torch.cuda.is_available() else
                             'mps' if torch.backends.mps.is_available() else 'cpu')
    ddp = 'RANK' in os.environ
    rank, world = (int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])) if ddp else (0, 1)
    if ddp:
        if torch.device(device).type == 'cuda':
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    device_type = torch.device(device).type
    if args.dtype is None:
        args.dtype = 'bfloat16' if device_type == 'cuda' else 'float32'
    if args.compile is None:   # compiling needs Triton for GPU kernels (absent on Windows)
        args.compile = device_type == 'cuda' and importlib.util.find_spec('triton') is not None
    if device_type == 'cuda':   # TF32 matmuls: faster, not bit-reproducible across GPUs
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device, rank, world


def lr_at(step, args):
    """Linear warmup to --lr, then cosine / linear decay to --lr * --min_lr_ratio, or fairseq's
    inverse square root lr * sqrt(warmup / step) (no floor)."""
    if step < args.warmup_iters:
        return args.lr * (step + 1) / args.warmup_iters
    if args.lr_schedule == 'inverse_sqrt':
        return args.lr * math.sqrt(max(1, args.warmup_iters) / (step + 1))
    p = (step - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters)
    decay = {'cosine': 0.5 * (1 + math.cos(math.pi * p)), 'linear': 1 - p, 'constant': 1}
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * decay[args.lr_schedule])


NO_DECAY = ('embedding', 'class_emb', 'lvl_embed', 'pos_start', 'pos_1LC', 'scale_mul', 'ada_gss',
            'pos_embed', 'cls_token', 'register_tokens', 'mask_token', 'wpe')


def make_optimizer(model, args):
    """AdamW; no weight decay on vectors (norms, biases), embeddings, positions, temperatures."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or any(n in name for n in NO_DECAY) else decay).append(p)
    groups = [dict(params=decay, weight_decay=args.weight_decay),
              dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2))


# ----------------------------------------------------------------------------------------------
# The VQVAE task: config, loss, validation, picture

PATCH_NUMS = {4: (1, 2, 3, 4), 8: (1, 2, 3, 4, 6, 8), 16: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
              32: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)}   # 16 and 32: VAR's 256 px and 512 px


def vqvae_config(args):
    """The preset for the resolution, overridden by any architecture flag that was given."""
    cfg = dict(VQVAE_PRESETS[args.vae_preset], beta=args.beta)
    for k in ('vocab_size', 'z_channels', 'ch', 'ch_mult', 'num_res_blocks', 'patch_nums'):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    latent, rem = divmod(args.resolution, 2 ** (len(cfg['ch_mult']) - 1))
    if rem or ('patch_nums' not in cfg and latent not in PATCH_NUMS):
        raise SystemExit(f'resolution {args.resolution} gives no standard latent size with '
                         f"ch_mult {cfg['ch_mult']}: pass --patch_nums ending at the latent side")
    cfg.setdefault('patch_nums', PATCH_NUMS.get(latent))
    return cfg


def vqvae_loss(model, raw, img, step, args, disc, lpips):
    """Generator loss: l1 |x - x_hat| + l2 (x - x_hat)^2 + vq (Eq. 5) [+ LPIPS] [+ adaptive
    weight * hinge generator loss -D(x_hat)]. Returns the loss, its parts and x_hat."""
    rec, vq_loss, _ = model(img)
    l1, l2 = (rec - img).abs().mean(), F.mse_loss(rec, img)
    rec_loss = args.l1 * l1 + args.l2 * l2
    parts = dict(l1=l1.detach(), l2=l2.detach(), vq=vq_loss.detach())
    if lpips is not None:
        perceptual = lpips(rec.float(), img.float()).mean()
        rec_loss = rec_loss + args.lpips_weight * perceptual
        parts['lpips'] = perceptual.detach()
    loss = rec_loss + vq_loss
    if disc is not None and step >= args.disc_start:
        disc.requires_grad_(False)   # important! the generator step must not train D
        g_loss = -disc(rec).mean()
        weight = vqvae.adaptive_gan_weight(rec_loss, g_loss, raw.decoder.conv_out.weight)
        loss = loss + args.disc_weight * weight * g_loss
        parts.update(g=g_loss.detach(), g_weight=weight)
    return loss, parts, rec


def vqvae_val_sums(model, batch, device, ctx):
    """Held-out sums of one batch: L2, PSNR (per image, on [0, 1] pixels), VQ loss, code hits."""
    img = batch[0].to(device)
    with ctx:
        rec, vq_loss, idx = model(img)
    mse = ((rec.float().clamp(-1, 1) - img) / 2).square().mean((1, 2, 3))           # (B,)
    hits = torch.stack([torch.bincount(i.flatten(), minlength=model.config.vocab_size)
                        for i in idx])                                              # (K, V)
    return {'l2': 4 * mse.sum(), 'psnr': (-10 * mse.clamp_min(1e-10).log10()).sum(),
            'vq': vq_loss * len(img), 'codes%': hits, 'n': torch.tensor(len(img))}


@torch.no_grad()
def save_reconstructions(model, val_set, path, device, n=8):
    """Grid: the first n held-out images on top, then their reconstruction from the first
    1, 2, ..., K scales (coarse to fine): the multi-scale tokens, seen."""
    model.eval()
    img = torch.stack([val_set[i][0] for i in range(min(n, len(val_set)))]).to(device)
    idx = model.img_to_idx(img)
    rows = [img] + [model.idx_to_img(idx[:k]) for k in range(1, len(idx) + 1)]
    data.save_image_grid(torch.cat(rows).float().cpu(), path, nrow=len(img))
    model.train()


# ----------------------------------------------------------------------------------------------
# The ssl task: the stand-in encoder of DiGIT's tokenizer (tokenizer.ContrastiveViT)

def ssl_views_seed(batch, seed):
    """Validation views come from a generator seeded by the batch's first label and seed, so
    every validation sees the same views."""
    return torch.Generator().manual_seed(seed * 1009 + int(batch[1][0]))


@torch.no_grad()
def save_feature_maps(model, val_set, path, device, n=8):
    """Grid: n held-out images, above the first 3 principal components of their last-block
    patch features as RGB (the usual picture of DINO-like features: parts that look alike
    get alike colours)."""
    model.eval()
    img = torch.stack([val_set[i][0] for i in range(min(n, len(val_set)))]).to(device)
    f = model.vit.forward_features(img)['x_norm_patchtokens'].float()          # (n, L, C)
    g = int(math.sqrt(f.shape[1]))
    flat = f.flatten(0, 1) - f.flatten(0, 1).mean(0)                          # (n L, C)
    pcs = flat @ torch.linalg.svd(flat, full_matrices=False).Vh[:3].T         # (n L, 3)
    pcs = pcs / pcs.abs().amax(0).clamp_min(1e-8)                             # [-1, 1]
    maps = pcs.view(len(img), g, g, 3).permute(0, 3, 1, 2)                   # (n, 3, g, g)
    maps = F.interpolate(maps, size=img.shape[-2:], mode='nearest')
    data.save_image_grid(torch.cat([img, maps]).float().cpu(), path, nrow=len(img))
    model.train()


# ----------------------------------------------------------------------------------------------
# The GPT task: DiGIT's raster-order GPT on the tokens of a frozen DiGIT tokenizer

def gpt_loss(model, batch, args, device, source_len=0):
    """DiGIT's label-smoothed cross-entropy over the L tokens; also the plain cross-entropy
    and the top-1 token accuracy. batch: cached tokens (B, L) and labels (B,); stage 2:
    (B, S + L), the S DiGIT tokens its source, unconditional."""
    tokens, labels = batch[0].to(device, non_blocking=True), batch[1].to(device)
    source, tokens = tokens[:, :source_len], tokens[:, source_len:]              # (B, S), (B, L)
    if source_len:
        logits = model(tokens, source=source)                                     # (B, L, V)
    else:
        logits = model(tokens, labels)                                            # (B, L, V)
    loss = gpt.loss(logits, tokens, args.label_smooth)
    ce = F.cross_entropy(logits.detach().flatten(0, 1), tokens.flatten())
    return loss, dict(ce=ce, acc=(logits.detach().argmax(-1) == tokens).float().mean() * 100)


@torch.no_grad()
def patch_means(tokens, images, vocab_size):
    """The mean image patch of every token, from tokens (N, g*g) of images (N, 3, H, W):
    (V, 3, H/g, W/g), grey for unseen tokens. A crude decoder to look at DiGIT tokens before
    stage 2 exists: render_tokens pastes these patches."""
    N, L = tokens.shape
    g = math.isqrt(L)
    p, q = images.shape[2] // g, images.shape[3] // g
    patches = images[:, :, :g * p, :g * q].unfold(2, p, p).unfold(3, q, q)    # (N, 3, g, g, p, q)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(N * L, 3 * p * q)
    sums = torch.zeros(vocab_size, 3 * p * q).index_add_(0, tokens.flatten(), patches)
    counts = torch.bincount(tokens.flatten(), minlength=vocab_size).clamp_min(1)
    return (sums / counts[:, None]).view(vocab_size, 3, p, q)                  # (V, 3, p, q)


def render_tokens(tokens, means):
    """Token maps (B, g*g) -> images (B, 3, g*p, g*q) in [-1, 1] made of mean patches."""
    B, L = tokens.shape
    g, (_, p, q) = math.isqrt(L), means.shape[1:]
    x = means.to(tokens.device)[tokens]                                         # (B, L, 3, p, q)
    return x.view(B, g, g, 3, p, q).permute(0, 3, 1, 4, 2, 5).reshape(B, 3, g * p, g * q)


@torch.no_grad()
def save_gpt_samples(model, means, path, args, num_classes, device, per_class=4):
    """Generated token maps, rendered with the tokens' mean patches: one column per class."""
    model.eval()
    labels = torch.arange(min(num_classes, 10), device=device).repeat(per_class)   # row-major
    tokens = model.generate(labels, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p,
                            seed=args.seed)                                        # (B, L)
    data.save_image_grid(render_tokens(tokens, means).cpu(), path, nrow=min(num_classes, 10))
    model.train()


@torch.no_grad()
def save_stage2_samples(model, vae, token_set, images, path, args, device, n=8):
    """Grid: n held-out images; their VQVAE reconstruction (stage 2's ceiling); two stage-2
    renderings of their DiGIT tokens (top-p 0.8, DiGIT's), decoded by the VQVAE."""
    model.eval()
    S = model.config.source_len
    tokens = torch.stack([token_set[i][0] for i in range(n)]).to(device)          # (n, S + L)
    rows = [torch.stack([images[i][0] for i in range(n)]).to(device),
            vae.idx_to_img([tokens[:, S:]])]
    for seed in (args.seed, args.seed + 1):
        vq = model.generate(torch.zeros(n, dtype=torch.long, device=device), top_k=args.top_k,
                            top_p=args.top_p or 0.8, seed=seed, source=tokens[:, :S])
        rows.append(vae.idx_to_img([vq]))
    data.save_image_grid(torch.cat(rows).float().cpu(), path, nrow=n)
    model.train()


# ----------------------------------------------------------------------------------------------
# The VAR task: tokens, loss, validation, samples

class TokenDataset(torch.utils.data.Dataset):
    """Cached token sequences (N, L) with labels, served like images: (tokens, label, 0)."""

    def __init__(self, tokens, labels):
        self.tokens, self.labels = tokens, labels

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return self.tokens[i].long(), self.labels[i], 0


def load_vqvae(args, device):
    """The frozen VQVAE of --vae, checked against --resolution."""
    if not os.path.exists(args.vae):
        raise SystemExit(f'--vae {args.vae} not found: train a tokenizer first (python train.py '
                         '--model vqvae ...) or pass the released vae_ch160v4096z32.pth')
    vae = vqvae.VQVAE.from_checkpoint(args.vae).to(device).eval().requires_grad_(False)
    if args.resolution != vae.config.patch_nums[-1] * vae.downsample:
        raise SystemExit(f'--resolution {args.resolution} does not fit the tokenizer, '
                         f'made for {vae.config.patch_nums[-1] * vae.downsample} px images')
    return vae


def tokenizer_key(config, tensors):
    """What a token cache depends on: the tokenizer's config and a checksum of its weights."""
    return dict(config=config, weights=sum(t.double().sum().item() for t in tensors))


@torch.no_grad()
def tokenize(encode, key, dataset, path, args, device, rank, world, limit=None):
    """Tokenize a dataset once with a frozen tokenizer, encode(img (B, 3, H, W)) -> ids (B, L)
    (eval crops, so no augmentation), each rank a slice, gathered on every rank and cached in
    `path` under `key`: a TokenDataset of (N, L) ids."""
    n = min(len(dataset), limit or len(dataset))
    key = dict(key, n=n, data=args.data, resolution=args.resolution)
    if os.path.exists(path):   # reused only if made by the same tokenizer from the same data
        cache = torch.load(path, map_location='cpu', weights_only=True)
        if cache.get('key') == key:
            return TokenDataset(cache['tokens'], cache['labels'])
    mine = range(rank, n, world)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), args.batch_size,
                                         num_workers=args.num_workers)
    tokens, labels = [], []
    for img, label, _ in tqdm(loader, desc=f'tokenizing {n} images', disable=rank != 0):
        tokens.append(encode(img.to(device)).cpu())                                  # (B, L)
        labels.append(label)
    tokens, labels = torch.cat(tokens), torch.cat(labels)
    if world > 1:   # rank r holds items r, r + world, ...: gather and interleave
        per_rank = math.ceil(n / world)
        pad = lambda t: torch.cat([t, t.new_zeros(per_rank - len(t), *t.shape[1:])])
        gathered = [[torch.zeros_like(pad(t)) for _ in range(world)] for t in (tokens, labels)]
        for g, t in zip(gathered, (tokens, labels)):
            dist.all_gather(g, pad(t))
        tokens = torch.stack(gathered[0], 1).flatten(0, 1)[:n]
        labels = torch.stack(gathered[1], 1).flatten(0, 1)[:n]
    dtype = torch.int16 if tokens.max() <= 32767 else torch.int32
    if rank == 0:
        save_checkpoint(path, dict(tokens=tokens.to(dtype), labels=labels, key=key))
    return TokenDataset(tokens.to(dtype), labels)


def var_loss(model, vae, batch, args, device):
    """Cross-entropy over all L tokens (mean, as the official trainer), and per scale the
    loss and the accuracy. batch: cached tokens (B, L) or images (tokenized here)."""
    tokens, labels = batch[0].to(device, non_blocking=True), batch[1].to(device)
    if tokens.ndim == 4:    # images, not cached tokens: tokenize now (random crops included)
        tokens = torch.cat(vae.img_to_idx(tokens), 1)                                # (B, L)
    idx = tokens.split([pn * pn for pn in vae.config.patch_nums], dim=1)           # K x (B, l)
    x = vae.idx_to_var_input(idx)                                                   # (B, L-1, C)
    logits = model(labels, x)                                                       # (B, L, V)
    ce = F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction='none',
                         label_smoothing=args.label_smooth).view(tokens.shape)       # (B, L)
    parts, start = {}, 0
    hit = (logits.detach().argmax(-1) == tokens).float()                           # (B, L)
    for k, pn in enumerate(vae.config.patch_nums):
        parts[f'ce_{k}'] = ce[:, start:start + pn * pn].detach().mean()
        parts[f'acc_{k}'] = hit[:, start:start + pn * pn].mean() * 100
        start += pn * pn
    return ce.mean(), parts


def loss_sums(loss_fn, batch, ctx):
    """Held-out sums of one batch for validate(): loss_fn() -> (loss, parts) means, times B."""
    with ctx:
        loss, parts = loss_fn()
    B = len(batch[0])
    return {**{k: v * B for k, v in dict(parts, loss=loss).items()}, 'n': torch.tensor(B)}


@torch.no_grad()
def save_samples(model, path, args, num_classes, device, per_class=4):
    """A grid of generated images: one column per class (at most 10), per_class rows."""
    model.eval()
    classes = torch.arange(min(num_classes, 10), device=device)
    labels = classes.repeat(per_class)                                             # row-major
    img = model.generate(labels, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    data.save_image_grid(img.float().cpu() * 2 - 1, path, nrow=len(classes))
    model.train()


@torch.no_grad()
def validate(model, val_set, args, device, world, rank, batch_sums):
    """Every rank sums batch_sums(batch) over its slice of the first --eval_images held-out
    items; the sums are all-reduced and divided by the item count. Code hits ('codes%', (K, V))
    become the share of the codebook each scale used."""
    model.eval()
    subset = torch.utils.data.Subset(val_set, range(rank, min(len(val_set), args.eval_images),
                                                    world))
    sums = {}
    for batch in torch.utils.data.DataLoader(subset, args.batch_size,
                                             num_workers=args.num_workers):
        for k, v in batch_sums(batch).items():
            sums[k] = sums.get(k, 0.0) + v.to(device, torch.float32)
    model.train()
    for v in sums.values() if world > 1 else ():
        dist.all_reduce(v)
    n = sums.pop('n').clamp_min(1)
    if 'codes%' in sums:
        sums['codes%'] = (sums['codes%'] > 0).float().mean(1) * 100 * n
    return {k: (v / n).tolist() if v.ndim else (v / n).item() for k, v in sums.items()}


def format_stats(stats):
    """{'l2': 0.1, 'acc_0': 5, 'acc_1': 7, 'usage%': [..]} -> 'l2 0.1 acc 5 7 usage% ..': the
    numbered keys (per scale) are grouped, so a log line stays one greppable line."""
    groups = {}
    for k, v in stats.items():
        name, _, index = k.rpartition('_')
        name = name if index.isdigit() else k
        groups.setdefault(name, []).extend(v if isinstance(v, list) else [v])
    fmt = lambda v: f'{v:.4g}' if abs(v) < 100 else f'{v:.0f}'
    return ' '.join(f"{k} {' '.join(fmt(v) for v in vs)}" for k, vs in groups.items())


def save_checkpoint(path, state):
    """Atomic: a crash while writing leaves the previous checkpoint intact."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    torch.save(state, path + '.tmp')
    os.replace(path + '.tmp', path)


# ----------------------------------------------------------------------------------------------
# The loop

def main(args):
    device, rank, world = setup(args)
    master, device_type = rank == 0, torch.device(device).type
    dtype = getattr(torch, args.dtype)
    ctx = torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    accum, rem = divmod(args.total_batch_size, args.batch_size * world)
    if rem or not accum:
        raise SystemExit(f'--total_batch_size {args.total_batch_size} must be a multiple of '
                         f'--batch_size {args.batch_size} x {world} processes')
    if args.num_workers < 0:
        args.num_workers = 0 if args.data == 'builtin' else min(8, (os.cpu_count() or 1) // world)
    print0 = print if master else (lambda *a, **k: None)
    train_set = data.build_dataset(args.data, args.resolution, True, args.hflip, args.seed,
                                   size=args.train_images or None)
    val_set = data.build_dataset(args.data, args.resolution, False, seed=args.seed)
    class_names = train_set.class_names
    print0(f'data: {len(train_set)} train / {len(val_set)} val images, '
           f'{train_set.num_classes} classes; {world} process(es) x {args.batch_size} x {accum} '
           f'accumulation = {args.total_batch_size} images per step; device {device} {args.dtype}')

    # model, optimizer, and everything a resume needs
    ckpt_path = os.path.join(args.out_dir, 'ckpt.pt')
    log_path = os.path.join(args.out_dir, 'log.txt')
    ckpt = None
    if args.resume == 'auto' and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=True)
        if ckpt.get('kind') != args.model:
            raise SystemExit(f"{ckpt_path} holds a {ckpt.get('kind')} run, not {args.model}: "
                             'choose another --out_dir or pass --resume never')
        print0(f'resuming from {ckpt_path} at step {ckpt["step"]}')
    vae = None
    if args.model == 'var':   # the frozen tokenizer, and the data as its tokens
        vae = load_vqvae(args, device)
        if args.cache_tokens:
            encode = lambda img: torch.cat(vae.img_to_idx(img), 1)                  # (B, L)
            key = tokenizer_key(asdict(vae.config), vae.parameters())
            train_set = tokenize(encode, key, train_set, os.path.join(args.out_dir,
                                 'tokens_train.pt'), args, device, rank, world)
            val_set = tokenize(encode, key, val_set, os.path.join(args.out_dir, 'tokens_val.pt'),
                               args, device, rank, world, limit=args.eval_images)
        config = asdict(var.VARConfig(depth=args.depth, num_classes=len(class_names),
                                      patch_nums=vae.config.patch_nums))
        build = lambda: var.VAR(vae, **config)
    elif args.model in ('gpt', 'stage2', 'probe'):   # frozen tokenizers, the data as tokens
        if args.model == 'probe':   # the GPT to probe names its tokenizer
            if not os.path.exists(args.gpt):
                raise SystemExit(f'--gpt {args.gpt} not found: train one (python train.py '
                                 '--model gpt)')
            probed = torch.load(args.gpt, map_location='cpu', weights_only=True)
            if probed.get('kind') != 'gpt':
                raise SystemExit(f"--gpt {args.gpt} holds a {probed.get('kind')} run, not a gpt")
            args.tokenizer = probed['tokenizer']
        if not os.path.exists(args.tokenizer):
            raise SystemExit(f'--tokenizer {args.tokenizer} not found: make one first (python '
                             'train.py --model ssl; python tokenizer.py fit)')
        tok = tokenizer.Tokenizer.load(args.tokenizer).to(device)
        key = tokenizer_key(dict(encoder=asdict(tok.encoder.config), layer=tok.layer,
                                 resolution=tok.resolution), [tok.centroids, *tok.parameters()])
        encode, S = tok.encode, 0
        if args.model == 'stage2':   # source: DiGIT tokens (B, S); target: VQ tokens (B, L)
            vae = load_vqvae(args, device)
            if len(vae.config.patch_nums) != 1:
                raise SystemExit(f'--vae {args.vae} has {len(vae.config.patch_nums)} scales; '
                                 'stage 2 needs one: python train.py --model vqvae --patch_nums '
                                 '8 --out_dir out/vqvae_1scale')
            key = dict(key, vae=tokenizer_key(asdict(vae.config), vae.parameters()))
            encode, S = lambda img: torch.cat((tok.encode(img), vae.img_to_idx(img)[0]), 1), \
                tok.grid ** 2
        images = val_set
        train_set = tokenize(encode, key, train_set, os.path.join(args.out_dir,
                             'tokens_train.pt'), args, device, rank, world)
        val_set = tokenize(encode, key, val_set, os.path.join(args.out_dir, 'tokens_val.pt'),
                           args, device, rank, world, limit=args.eval_images)
        if args.model == 'probe':
            config = dict(gpt=probed['config'], num_classes=len(class_names))
            build = lambda: gpt.LinearProbe(gpt.GPT.from_checkpoint(probed, ['gpt']),
                                            config['num_classes'])
        elif args.model == 'gpt':
            n = min(len(val_set), 1000)
            means = patch_means(val_set.tokens[:n].long(), torch.stack([images[i][0]
                                for i in range(n)]), tok.vocab_size)             # (V, 3, p, q)
            config = asdict(gpt.GPTConfig(vocab_size=tok.vocab_size, block_size=tok.grid ** 2,
                                          depth=args.depth, num_classes=len(class_names),
                                          cond=args.cond, dropout=args.dropout))
        else:
            config = asdict(gpt.GPTConfig(
                vocab_size=vae.config.vocab_size, block_size=vae.config.patch_nums[0] ** 2,
                depth=args.depth, num_classes=0, dropout=args.dropout,
                source_vocab_size=tok.vocab_size, source_len=S))
        if args.model != 'probe':
            build = lambda: gpt.GPT(**config)
    elif args.model == 'ssl':
        config = asdict(tokenizer.StandInConfig(
            img_size=args.resolution, patch_size=args.patch_size or max(1, args.resolution // 8),
            embed_dim=32 * args.depth, depth=args.depth, num_heads=max(1, args.depth // 2)))
        build = lambda: tokenizer.ContrastiveViT(**config)
    else:
        config = vqvae_config(args)
        build = lambda: vqvae.VQVAE(**config)
    if ckpt is not None and ckpt['config'] != config:
        changed = {k: v for k, v in ckpt['config'].items() if config.get(k) != v}
        print0(f'architecture taken from the checkpoint, not the flags: {changed}')
        config = ckpt['config']
    torch.manual_seed(args.seed)   # same init on every rank
    raw = build().to(device)
    print0(f'{args.model}: {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M parameters, '
           f'{config}')
    ema = build().to(device).requires_grad_(False) if args.ema > 0 else None
    optimizer = make_optimizer(raw, args)
    disc = None
    if args.disc_weight > 0:   # VQGAN's 3 layers; fewer for tiny images (patches must fit)
        n_layers = max(1, min(3, int(math.log2(args.resolution)) - 2))
        disc = vqvae.PatchDiscriminator(n_layers=n_layers).to(device)
    disc_opt = make_optimizer(disc, args) if disc is not None else None
    lpips = None
    if args.lpips_vgg:
        lpips = vqvae.LPIPS().load(args.lpips_vgg, args.lpips_lin).to(device)
    step, cursor, skipped = 0, (0, 0), 0
    if ckpt is not None:
        raw.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        if ema is not None:
            ema.load_state_dict(ckpt['ema'] or ckpt['model'])
        if disc is not None and ckpt.get('disc'):
            disc.load_state_dict(ckpt['disc'])
            disc_opt.load_state_dict(ckpt['disc_optimizer'])
        scaler.load_state_dict(ckpt['scaler'])
        step, cursor, skipped = ckpt['step'], tuple(ckpt['data_cursor']), ckpt['skipped_files']
    elif ema is not None:
        ema.load_state_dict(raw.state_dict())
    model = raw
    if args.compile:   # compiles at the first step; if that fails, rerun with --no-compile
        model = torch.compile(raw)
    if world > 1:
        model = DDP(model, device_ids=[int(os.environ['LOCAL_RANK'])] if device_type == 'cuda'
                    else None)
        disc = DDP(disc) if disc is not None else None
    disc_raw = disc.module if isinstance(disc, DDP) else disc
    eval_model = ema if ema is not None else raw   # validation and pictures use the EMA
    if args.model in ('gpt', 'stage2'):
        S = config['source_len']
        batch_sums = lambda batch: loss_sums(lambda: gpt_loss(eval_model, batch, args, device, S),
                                             batch, ctx)
        picture = (lambda path: save_gpt_samples(eval_model, means, path, args,
                                                 len(class_names), device)) if not S else (
            lambda path: save_stage2_samples(eval_model, vae, val_set, images, path, args, device))
        picture_name = 'samples'
    elif args.model == 'probe':
        batch_sums = lambda batch: loss_sums(lambda: eval_model(
            batch[0].to(device), batch[1].to(device)), batch, ctx)
        picture, picture_name = None, 'probe'
    elif args.model == 'ssl':
        batch_sums = lambda batch: loss_sums(lambda: eval_model(
            batch[0].to(device), ssl_views_seed(batch, args.seed)), batch, ctx)
        picture = lambda path: save_feature_maps(eval_model, val_set, path, device)
        picture_name = 'features'
    elif args.model == 'vqvae':
        batch_sums = lambda batch: vqvae_val_sums(eval_model, batch, device, ctx)
        picture = lambda path: save_reconstructions(eval_model, val_set, path, device)
        picture_name = 'recon'
    else:
        batch_sums = lambda batch: loss_sums(lambda: var_loss(eval_model, vae, batch, args,
                                                              device), batch, ctx)
        picture = lambda path: save_samples(eval_model, path, args, len(class_names), device)
        picture_name = 'samples'
    run_validation = lambda: validate(eval_model, val_set, args, device, world, rank, batch_sums)

    def checkpoint():
        if master:
            save_checkpoint(ckpt_path, dict(
                kind=args.model, config=config, model=raw.state_dict(),
                vae=args.vae if vae is not None else None,
                tokenizer=args.tokenizer if args.model in ('gpt', 'stage2', 'probe') else None,
                ema=ema.state_dict() if ema is not None else None,
                optimizer=optimizer.state_dict(), step=step, data_cursor=list(cursor),
                skipped_files=skipped, args=vars(args), class_names=class_names,
                disc=disc_raw.state_dict() if disc is not None else None,
                disc_optimizer=disc_opt.state_dict() if disc is not None else None,
                scaler=scaler.state_dict()))
        if world > 1:
            dist.barrier()

    def log(line):
        print0(line)
        if master:
            with open(log_path, 'a') as f:
                f.write(line + '\n')

    os.makedirs(args.out_dir, exist_ok=True)
    batches = data.endless_batches(train_set, args.batch_size, args.num_workers, rank, world,
                                   args.seed, *cursor, pin_memory=device_type == 'cuda')
    start = last_log = step
    sums, t0 = {}, time.time()
    bar = tqdm(total=args.max_iters, initial=step, disable=not master, dynamic_ncols=True)
    while step < args.max_iters:
        torch.manual_seed(args.seed * 1_000_003 + rank * 10_007 + step)  # resumable randomness
        lr = lr_at(step, args)
        for opt in (optimizer, disc_opt):
            for group in (opt.param_groups if opt is not None else []):
                group['lr'] = lr
        for micro in range(accum):
            cursor, batch = next(batches)
            img, skipped = batch[0].to(device, non_blocking=True), skipped + int(batch[2].sum())
            sync = micro == accum - 1   # important! all-reduce gradients on the last micro-step
            with model.no_sync() if world > 1 and not sync else nullcontext():
                with ctx:
                    if args.model == 'var':
                        loss, parts = var_loss(model, vae, batch, args, device)
                    elif args.model in ('ssl', 'probe'):
                        loss, parts = model(img) if args.model == 'ssl' else \
                            model(img, batch[1].to(device))
                    elif args.model in ('gpt', 'stage2'):
                        loss, parts = gpt_loss(model, batch, args, device, S)
                    else:
                        loss, parts, rec = vqvae_loss(model, raw, img, step, args, disc_raw, lpips)
                scaler.scale(loss / accum).backward()
            if disc is not None and step >= args.disc_start:
                disc_raw.requires_grad_(True)
                with disc.no_sync() if world > 1 and not sync else nullcontext():
                    with ctx:
                        d_loss = vqvae.hinge_d_loss(disc(img), disc(rec.detach()))
                    scaler.scale(d_loss / accum).backward()
                parts['d'] = d_loss.detach()
            for k, v in dict(parts, loss=loss.detach()).items():
                sums[k] = sums.get(k, 0.0) + v.float() / accum
        for opt, net in ((optimizer, raw), (disc_opt, disc_raw)):
            if opt is None or not any(p.grad is not None for p in net.parameters()):
                continue
            scaler.unscale_(opt)
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip)
            scaler.step(opt)
            opt.zero_grad(set_to_none=True)
        scaler.update()
        if ema is not None:
            for e, p in zip(ema.state_dict().values(), raw.state_dict().values()):
                e.lerp_(p, 1 - args.ema) if e.is_floating_point() else e.copy_(p)
        step += 1
        bar.update(1)
        if args.model == 'vqvae' and args.reseed_every and step % args.reseed_every == 0:
            with torch.no_grad(), ctx:
                n_dead = raw.quantize.reseed_dead_codes(raw.encode(img))
            sums['reseeded'] = sums.get('reseeded', 0.0) + torch.tensor(float(n_dead))

        if step % args.log_every == 0 or step == args.max_iters:
            stats = torch.stack([v.to(device) for v in sums.values()])
            if world > 1:   # .item() below syncs; average over ranks first
                dist.all_reduce(stats, op=dist.ReduceOp.AVG)
            n, last_log = step - last_log, step
            mean = {k: v / (1 if k == 'reseeded' else n) for k, v in zip(sums, stats.tolist())}
            if args.model == 'vqvae':
                mean['usage%'] = raw.quantize.usage().tolist()
            log(f'step {step} {format_stats(mean)} lr {lr:.3g} '
                f'ms/step {(time.time() - t0) / n * 1000:.0f}'
                + (f' skipped_files {skipped}' if skipped else ''))
            bar.set_postfix(loss=f"{stats[list(sums).index('loss')].item() / n:.4f}")
            sums, t0 = {}, time.time()
        last = step == args.max_iters or (args.stop_after and step - start >= args.stop_after)
        if step % args.eval_every == 0 or last:
            r = run_validation()
            log(f'eval {step} {format_stats(r)}')
        if master and picture and (step % args.sample_every == 0 or last):
            picture(os.path.join(args.out_dir, f'{picture_name}_{step:06d}.png'))
        if step % args.save_every == 0 or last:
            checkpoint()
        if last:
            break
    bar.close()
    if step - start == 0:   # already done: report the finished run again
        r = run_validation()
    if master:
        per_scale = lambda v: ', '.join(f'{pn}x{pn}: {c:.1f}%'
                                        for pn, c in zip(config['patch_nums'], v))
        if args.model == 'probe':
            accs = [r[f'acc_{i}'] for i in range(len(raw.heads))]
            best = max(range(len(accs)), key=accs.__getitem__)
            print(f'\nlinear probe of {args.gpt}, held-out top-1 per layer (0 = embeddings) '
                  f'after {step} steps:\n' + ' '.join(f'{i}: {a:.1f}%' for i, a in
                                                      enumerate(accs)) + f'\nbest: layer {best}')
        elif args.model in ('gpt', 'stage2'):
            print(f'\nheld-out cross-entropy {r["ce"]:.3f} (label-smoothed loss {r["loss"]:.3f}) '
                  f'after {step} steps; token accuracy {r["acc"]:.1f}%')
        elif args.model == 'ssl':
            print(f'\nheld-out InfoNCE loss {r["loss"]:.3f} after {step} steps (global '
                  f'{r["glob"]:.3f}, patch {r["patch"]:.3f}); top-1 retrieval of the other view '
                  f'{100 * r["acc_g"]:.1f}% (images), {100 * r["acc_p"]:.1f}% (patches)\n'
                  f'next: python tokenizer.py fit --encoder {ckpt_path}')
        elif args.model == 'vqvae':
            print(f'\nheld-out reconstruction PSNR {r["psnr"]:.2f} dB (l2 {r["l2"]:.4f}) after '
                  f'{step} steps\ncodebook used per scale on held-out images: '
                  f'{per_scale(r["codes%"])}')
        else:
            accs = [r[f'acc_{k}'] for k in range(len(config['patch_nums']))]
            print(f'\nheld-out cross-entropy {r["loss"]:.3f} after {step} steps; token accuracy '
                  f'per scale: {per_scale(accs)}')
        last_picture = os.path.join(args.out_dir, f'{picture_name}_{step:06d}.png')
        print(f'checkpoint {ckpt_path}\n' + (f'{picture_name} {last_picture}\n' if picture else '')
              + f'log {log_path}' + (f'\n{skipped} unreadable files were skipped' if skipped
                                     else ''))
    if dist.is_initialized():   # torchrun, one process included
        dist.destroy_process_group()
    return raw


if __name__ == '__main__':
    main(get_args())
