r"""
Images from a trained VAR, or from DiGIT's two stages (GPT -> DiGIT tokens -> stage 2 -> VQ
tokens -> VQVAE decoder): class-conditional grids, N samples packed as `.npz` for FID, and, for
VAR, zero-shot editing (VAR Appendix B: in-painting, out-painting, class-conditional editing).

    python sample.py --ckpt out/var/ckpt.pt                           # grid of every class
    python sample.py --ckpt var_d16.pth --vae vae_ch160v4096z32.pth --classes 207,360,387,974 \
        --cfg 4 --top_k 900 --top_p 0.95 --more_smooth               # the official weights
    torchrun --nproc_per_node=8 sample.py --ckpt var_d16.pth --vae vae_ch160v4096z32.pth \
        --num_samples 50000 --cfg 1.5 --top_k 900 --top_p 0.96 --npz var_d16.npz   # for FID
    python sample.py --ckpt out/var/ckpt.pt --edit_image dog.png --edit_mask hole.png \
        --classes 3                                                    # repaint the white area
    python sample.py --ckpt out/gpt/ckpt.pt --stage2 out/stage2/ckpt.pt      # DiGIT's grid
    python sample.py --ckpt out/gpt/ckpt.pt --pixdec out/pixdec/ckpt.pt   # tokens -> pixels
    python sample.py --ckpt checkpoint_stage1.pt --stage2 checkpoint_stage2.pt \
        --vqgan vqgan_jax_strongaug.ckpt                 # DiGIT's released fairseq checkpoints
    torchrun --nproc_per_node=8 sample.py --ckpt checkpoint_stage1.pt --stage2 \
        checkpoint_stage2.pt --num_samples 50000 --npz digit_base.npz        # DiGIT's FID run

Defaults: VAR cfg 4, top-k 900, top-p 0.95 (its demo); DiGIT stage 1 top-k 300 of its 8192
tokens (DiGIT's class-conditional base run), for ours the same share of the vocabulary
(digit_top_k: 19 of 512), and cfg 2 (DiGIT used none; ours is trained with label dropping);
stage 2 top-p 0.8 (DiGIT's). DiGIT's released stage 1 (gpt.from_fairseq): top-k 200
unconditional, 300 class-conditional, cfg 0 (it learnt no null class). Its special symbols are
never sampled and its end of sequence never before the 256th token: the GPT's head holds the
image tokens only. Its stage 2 renders through MAGE's VQGAN (vqgan.py), by default the copy
stored inside the stage-2 file (--vqgan reads the separate file instead).

The `.npz` holds `arr_0`, uint8 (N, H, W, 3) as the ADM evaluator reads it, and `labels`:
sample i has class i % num_classes (50 per class for 50,000 ImageNet samples). Every rank makes
the samples i = rank, rank + world, ... and saves them; rank 0 gathers them into the file.
"""
import argparse
import glob
import os

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import checkpoint
import cli
import data
import dist
import gpt
import pixdec
import var
import vqgan
import vqvae
from cli import UserError


CLASS_IDS = cli.number(lambda text: [int(c) for c in text.split(',')], lambda ids: min(ids) >= 0,
                       'a comma-separated list of class ids >= 0')


def build_parser():
    """The command line; main() reports what only the loaded model can check (class ids)
    through its error(), as argparse does: the usage line, one line naming the flag, exit 2."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('--ckpt', required=True, help='train.py var or gpt checkpoint, or an official '
                   'var_d*.pth')
    p.add_argument('--vae', default='', help="the VQVAE (default: the one the checkpoint names)")
    p.add_argument('--stage2', default='out/stage2/ckpt.pt', help='DiGIT: the stage-2 checkpoint '
                   '(ours or the released fairseq file)')
    p.add_argument('--pixdec', default='', help='DiGIT: render the tokens in one pass with this '
                   'train.py --model pixdec checkpoint instead of stage 2')
    p.add_argument('--vqgan', default='', help="DiGIT's released stage 2: MAGE's VQGAN file "
                   '(default: the copy inside --stage2)')
    p.add_argument('--stage2_top_p', type=cli.fraction, default=0.8, help='DiGIT: stage-2 top-p')
    p.add_argument('--classes', type=CLASS_IDS, help='comma-separated labels (default: up to 10; '
                   'none for an unconditional model)')
    p.add_argument('--per_class', type=cli.positive_int, default=4,
                   help='grid rows: samples of each class')
    p.add_argument('--cfg', type=cli.nonneg_float, help='classifier-free guidance (VAR 4, its '
                   'FID 1.5; DiGIT 2)')
    p.add_argument('--top_k', type=cli.nonneg_int, help='keep the k most likely tokens (0: all; '
                   'VAR 900, DiGIT 300 of 8192 tokens, ours the same share)')
    p.add_argument('--top_p', type=cli.fraction, help='nucleus sampling mass (0: off; VAR 0.95, '
                   'DiGIT 0)')
    p.add_argument('--more_smooth', action='store_true', help='Gumbel-softmax codes (for looks)')
    p.add_argument('--temperature', type=cli.positive_float, default=1.0,
                   help='softmax temperature')
    p.add_argument('--seed', type=cli.seed, default=0, help='sampling seed')
    p.add_argument('--num_samples', type=cli.nonneg_int, default=0,
                   help='write this many samples to --npz')
    p.add_argument('--npz', default='samples.npz', help='output of --num_samples')
    p.add_argument('--batch_size', type=cli.positive_int, default=25,
                   help='images generated at once')
    p.add_argument('--edit_image', default='', help='zero-shot editing: the input image')
    p.add_argument('--edit_mask', default='', help='white = regenerate, black = keep')
    p.add_argument('--out', default='', help='PNG to write (default: next to --pixdec if given, '
                   'else next to --ckpt)')
    p.add_argument('--device', default='', help='cuda, mps or cpu (default: best available)')
    p.add_argument('--dtype', choices=['float32', 'bfloat16', 'float16'], help='autocast dtype '
                   '(default: bfloat16 on CUDA and on bf16-native CPUs, else float32)')
    p.add_argument('--no_ema', action='store_true', help='use the raw weights, not the EMA')
    return p


def get_args(argv=None):
    """The parsed command line (argv: a list for tests, None for sys.argv)."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.edit_image and not args.edit_mask:
        p.error('argument --edit_mask: required with --edit_image')
    if args.edit_mask and not args.edit_image:
        p.error('argument --edit_image: required with --edit_mask')
    if args.num_samples and os.path.isdir(args.npz):
        p.error(f'argument --npz: {args.npz} is a folder; name the .npz file to write')
    return args


def load(args, device):
    """A sampler from a checkpoint: generate(labels (B,), seed, **edit) -> images (B, 3, H, W)
    in [0, 1], the VQVAE, the number of classes and the class names. VAR: ours names its VQVAE,
    official files need --vae. DiGIT: a gpt checkpoint (ours or the released stage 1) and
    --stage2."""
    ckpt = checkpoint.load(args.ckpt, '--ckpt', foreign=True)
    kind = 'gpt' if checkpoint.is_fairseq(ckpt) else ckpt.get('kind', 'var') if isinstance(
        ckpt, dict) else type(ckpt).__name__
    if kind not in ('var', 'gpt'):
        raise UserError(f'--ckpt {args.ckpt} holds a {kind}, not a var or gpt checkpoint')
    if kind == 'gpt':
        return load_digit(args, ckpt, device)
    if args.pixdec:
        raise UserError(f'--pixdec {args.pixdec} renders DiGIT tokens; --ckpt {args.ckpt} is a '
                        'VAR, which its VQVAE renders')
    defaults(args, cfg=4.0, top_k=900, top_p=0.95)
    vae_path = args.vae or (ckpt.get('vae') if isinstance(ckpt.get('vae'), str) else '')
    if not vae_path:
        raise UserError(f'{args.ckpt} names no VQVAE: pass --vae vae_ch160v4096z32.pth')
    vae = vqvae.VQVAE.from_checkpoint(vae_path).to(device).eval()
    model = var.VAR.from_checkpoint(args.ckpt, vae, use_ema=not args.no_ema).to(device).eval()
    generate = lambda labels, seed, **kw: model.generate(
        labels, args.cfg, args.top_k, args.top_p, seed, args.more_smooth,
        temperature=args.temperature, **kw)
    return generate, vae, model.num_classes, ckpt.get('class_names')


def defaults(args, **values):
    """Sampling flags the user left unset take the model's defaults."""
    for k, v in values.items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))


def digit_top_k(vocab_size):
    """Stage 1's default top-k for our DiGIT tokenizers: DiGIT's 300 of its 8192 tokens, as the
    same share (3.7%) of vocab_size (19 of 512). The tail is what loses the class: a larger k
    admits more of it, and fewer of the chain's samples keep their class (RESULTS.md)."""
    return max(1, round(300 * vocab_size / 8192))


def load_digit(args, ckpt, device):
    """DiGIT's chain: GPT -> DiGIT tokens -> pixels, through stage 2 and its VQ decoder, or in
    one forward pass through a pixel decoder (--pixdec, pixdec.py). Returns load()'s values."""
    stage1 = gpt.GPT.from_checkpoint(ckpt, ['gpt'], not args.no_ema, f'--ckpt {args.ckpt}')
    stage1 = stage1.to(device)
    render, decoder = (load_pixdec if args.pixdec else load_stage2)(args, ckpt, stage1, device)
    digit_defaults(args, ckpt, stage1)

    def generate(labels, seed, **edit):
        if edit:
            raise UserError('zero-shot editing is VAR\'s; DiGIT completes prefixes instead')
        tokens = stage1.generate(labels, cfg=args.cfg, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, seed=seed)    # (B, S)
        return (render(tokens, seed) + 1) / 2
    return generate, decoder, stage1.num_classes, ckpt.get('class_names')


def digit_defaults(args, ckpt, stage1):
    """Stage 1's sampling flags the user left unset: DiGIT's for its released file (no null
    class, so no guidance), ours otherwise (cfg 2, digit_top_k)."""
    if checkpoint.is_fairseq(ckpt):
        defaults(args, cfg=0.0, top_k=300 if stage1.num_classes else 200, top_p=0.0)
        if args.cfg:
            raise UserError(f"--cfg {args.cfg}: DiGIT's released stage 1 learnt no null class, "
                            'so it has no guidance; use --cfg 0')
    defaults(args, cfg=2.0, top_k=digit_top_k(stage1.config.vocab_size), top_p=0.0)


def load_pixdec(args, ckpt, stage1, device):
    """render(tokens (B, S), seed) -> images in [-1, 1] by --pixdec, and the decoder; it must
    have been trained on the tokenizer of stage 1 (the same file, by SHA-256, where both
    checkpoints name it)."""
    state = checkpoint.load(args.pixdec, '--pixdec')
    decoder = pixdec.PixelDecoder.from_checkpoint(state, not args.no_ema,
                                                  f'--pixdec {args.pixdec}')
    digests = [c.get('args', {}).get('frozen_sha256', {}).get('tokenizer') for c in (ckpt, state)]
    cfg = decoder.config
    if (cfg.vocab_size, cfg.grid ** 2) != (stage1.config.vocab_size, stage1.config.block_size) \
            or (all(digests) and digests[0] != digests[1]):
        raise UserError(f'--pixdec {args.pixdec} was trained on another DiGIT tokenizer than '
                        f'--ckpt {args.ckpt}')
    decoder = decoder.to(device)
    return lambda tokens, seed: decoder(tokens), decoder


def load_stage2(args, ckpt, stage1, device):
    """render(tokens (B, S), seed) -> images in [-1, 1] through --stage2 (top-p
    --stage2_top_p) and its VQ decoder: our VQVAE, or MAGE's VQGAN for DiGIT's released stage 2
    (--vqgan, or the copy inside it); and that decoder."""
    if not os.path.exists(args.stage2):
        raise UserError(f'--stage2 {args.stage2} not found: train it (python train.py --model '
                        'stage2) to turn DiGIT tokens into pixels, or pass --pixdec')
    s2_ckpt = checkpoint.load(args.stage2, '--stage2', foreign=True)
    stage2 = gpt.GPT.from_checkpoint(s2_ckpt, ['stage2'], not args.no_ema,
                                     f'--stage2 {args.stage2}').to(device)
    if (stage2.config.source_len, stage2.config.source_vocab_size) != \
            (stage1.config.block_size, stage1.config.vocab_size):
        raise UserError(f'{args.stage2} was trained on another DiGIT tokenizer than {args.ckpt}')
    if checkpoint.is_fairseq(s2_ckpt) and args.vae:
        raise UserError(f'--vae {args.vae}: DiGIT\'s released stage 2 decodes with MAGE\'s '
                        'VQGAN (--vqgan, or the copy inside --stage2), not a VQVAE')
    if checkpoint.is_fairseq(s2_ckpt):
        vae = vqgan.VQGAN.from_checkpoint(args.vqgan) if args.vqgan else \
            vqgan.VQGAN.from_state_dict(s2_ckpt['model'], 'vqgan.', f'--stage2 {args.stage2}')
    elif args.vqgan:
        raise UserError(f'--vqgan {args.vqgan}: only DiGIT\'s released stage 2 decodes with a '
                        f'VQGAN; {args.stage2} decodes with its VQVAE (--vae)')
    else:
        vae = vqvae.VQVAE.from_checkpoint(args.vae or s2_ckpt['vae'])
    codes = (len(vae.config.patch_nums), vae.config.vocab_size)
    if codes != (1, stage2.config.vocab_size):
        raise UserError(f'--vae {args.vae or s2_ckpt["vae"]} has {codes[0]} scales of '
                        f'{codes[1]} codes; stage 2 writes 1 scale of {stage2.config.vocab_size}')
    vae = vae.to(device).eval()

    def render(tokens, seed):
        vq = stage2.generate(torch.zeros(len(tokens), dtype=torch.long, device=tokens.device),
                             top_p=args.stage2_top_p, seed=seed, source=tokens)   # (B, L)
        return vae.idx_to_img([vq])
    return render, vae


def load_image(path, resolution, mode='RGB'):
    """Center crop to a square, resize to resolution: (3 or 1, H, W) in [0, 1]. A file that
    does not decode is a UserError naming it."""
    try:
        img = data.load_rgb(path).convert(mode)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:   # PIL's
        raise UserError(f'image {path} does not read: {type(e).__name__}: {e}') from None
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    x = np.asarray(img.resize((resolution, resolution), Image.Resampling.LANCZOS), np.float32)
    return torch.from_numpy(x / 255).reshape(resolution, resolution, -1).permute(2, 0, 1)


@torch.no_grad()
def main(args):
    device, rank, world = dist.setup(args.device, tf32=True)   # TF32: as VAR's demo
    draw, vae, K, class_names = load(args, device)
    kind = torch.device(device).type
    dtype = getattr(torch, args.dtype or dist.default_dtype(kind))

    def gen(labels, seed, **edit):   # images in [0, 1], float32
        with torch.autocast(kind, dtype, enabled=dtype != torch.float32):
            return draw(labels, seed, **edit).float()
    bad = [c for c in args.classes or () if c >= K]
    if bad:
        build_parser().error(f'argument --classes: {bad[0]} is not a class of this model ' +
                             (f'(0..{K - 1})' if K else '(it is unconditional)'))
    n_labels = max(K, 1)   # unconditional: every sample gets label 0, the BOS
    resolution = vae.resolution
    if args.num_samples:   # N samples for FID, sharded over ranks
        prefix = glob.escape(args.npz)   # the shards and temporary files of a killed run:
        for old in glob.glob(prefix + '.rank*.npy*') + glob.glob(prefix + '.tmp*'):
            if rank == 0:
                os.remove(old)
        dist.barrier()
        mine = list(range(rank, args.num_samples, world))
        out = []
        for b in tqdm(range(0, len(mine), args.batch_size), disable=rank != 0, desc='sampling'):
            labels = torch.tensor(mine[b:b + args.batch_size], device=device) % n_labels
            out.append(data.to_uint8(gen(labels, args.seed + rank * 1_000_003 + b) * 2 - 1))
        shard = np.concatenate(out) if out else np.zeros((0, resolution, resolution, 3), np.uint8)
        with checkpoint.atomic_path(f'{args.npz}.rank{rank}.npy') as tmp, open(tmp, 'wb') as f:
            np.save(f, shard)      # shards on disk, not in memory
        dist.barrier()
        if rank == 0:
            images = np.empty((args.num_samples, resolution, resolution, 3), np.uint8)
            for r in range(world):
                images[r::world] = np.load(f'{args.npz}.rank{r}.npy')
                os.remove(f'{args.npz}.rank{r}.npy')
            with checkpoint.atomic_path(args.npz) as tmp, open(tmp, 'wb') as f:
                np.savez(f, arr_0=images, labels=np.arange(args.num_samples) % n_labels)
            print(f'wrote {args.num_samples} samples {images.shape[1:]} to {args.npz}')
    elif rank == 0:
        classes = args.classes or list(range(min(K, 10))) or [0] * 10
        labels = torch.tensor(classes * args.per_class, device=device)        # row-major grid
        kw = {}
        if args.edit_image:   # keep the input's tokens outside the white area of the mask
            img = load_image(args.edit_image, resolution)[None].to(device) * 2 - 1
            hole = load_image(args.edit_mask, resolution, 'L')[0].to(device)
            kw = dict(edit_idx=[i.expand(len(labels), -1) for i in vae.img_to_idx(img)],
                      edit_mask=(hole < 0.5).float().expand(len(labels), -1, -1))
        images = gen(labels, args.seed, **kw) * 2 - 1
        beside = os.path.dirname(args.pixdec or args.ckpt) or '.'
        path = args.out or os.path.join(beside, 'sample_grid.png')
        data.save_image_grid(images.cpu(), path, nrow=len(classes))
        names = [class_names[c] for c in classes] if class_names else classes
        print(f'columns: {names if K else "unconditional"}\nwrote {path}')
    dist.cleanup()


if __name__ == '__main__':
    cli.run(lambda: main(get_args()))
