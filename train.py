r"""
The training loop every model of the repo shares, nanoGPT-sized: data, DDP, mixed precision,
gradient accumulation, clipping, EMA, logs, validation, PNG grids, checkpoints and exact resume.
It never names a model. `--model NAME` looks up the model's training task in MODELS, and that
task lives beside its model:

    --model vqvae    vqvae_train.Training  VAR's multi-scale VQVAE (vqvae.py), VQGAN-style losses
    --model var      var.Training          VAR on the tokens of a frozen VQVAE
    --model ssl      standin.Training      the self-supervised ViT standing in for DINOv2 offline
    --model gpt      digit.GPTTraining     DiGIT's raster-order GPT on a DiGIT tokenizer's tokens
    --model stage2   digit.Stage2Training  DiGIT's stage 2: DiGIT tokens -> VQ tokens
    --model probe    digit.ProbeTraining   DiGIT's linear probe of a frozen GPT (Table 2)
    --model pixdec   pixdec.Training       DiGIT tokens -> pixels in one pass (the open problem)

A training task is a small class; train.py uses exactly this of it:
    add_args(parser)          its flags, in an argument group of its own (a static method)
    defaults                  a dict: its values for shared flags left unset (its recipe)
    finish_args(args)         defaults derived from other flags, e.g. lr from the batch size
    Training(args, train_set, val_set, run)   sets .train_set, .val_set (maybe token
                              caches, made with frozen tokenizers) and .config (architecture)
    build()                   a new model from .config (on resume, the checkpoint's config)
    loss(model, batch, step)  (loss, {name: scalar}) on one micro-batch; step None: validation
    val_sums(model, batch)    optional: held-out sums {name: sum, 'n': items} (default: loss)
    picture(model, path)      a PNG grid from the model, named picture_name_<step>.png
    summary(stats, step)      the final report, from the held-out figures
    frozen                    flags of its frozen inputs (--vae): a resume must keep them
    no_decay                  parameter-name parts that get no weight decay
and where a model needs them: discriminator(), disc_loss(disc, step) (the VQVAE's GAN), after_step
(model, batch, step) -> log counts, log_extras(model), figures(sums); fid_images(model, indices)
-> images in [-1, 1] whose FID (fid.HeldOut) is logged at every eval (all but ssl, gpt, probe).

    python train.py --model vqvae                         # laptop / CPU: built-in data, 32 px
    python train.py --model var --depth 4 --lr 1e-3 --max_iters 300     # ... then VAR on it
    torchrun --standalone --nproc_per_node=8 train.py --model var --depth 16 --data ~/imagenet \
        --resolution 256 --vae vae_ch160v4096z32.pth --total_batch_size 768    # 8 GPUs
    torchrun --nproc_per_node=2 train.py --model vqvae --device cpu      # DDP on CPU (gloo)

Rerunning a command resumes from `<out_dir>/ckpt.pt` (`--resume never` starts over), exactly:
randomness is a function of (seed, rank, step), data order of (seed, epoch). --total_batch_size
images make a step whatever the number of GPUs; --batch_size is the micro-batch (lower on OOM).
"""
import argparse
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint
import cli
import data
import digit
import dist
import fid
import pixdec
import standin
import var
import vqvae_train
from cli import below_one, fraction, nonneg_float, nonneg_int, positive_float, positive_int

MODELS = {'vqvae': vqvae_train.Training, 'var': var.Training, 'ssl': standin.Training,
          'gpt': digit.GPTTraining, 'stage2': digit.Stage2Training,
          'probe': digit.ProbeTraining, 'pixdec': pixdec.Training}
# shared flags left unset and not set by the model's defaults
SHARED_DEFAULTS = dict(depth=16, total_batch_size=32, batch_size=32, max_iters=400,
                       label_smooth=0.0, grad_clip=2.0, dropout=0.0)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group('model (flags of one model are in its own group below)')
    g.add_argument('--model', choices=list(MODELS), default='vqvae', help='what to train')
    g.add_argument('--depth', type=positive_int, help='blocks: var, gpt, stage2 16 (width '
                   '64*depth, heads = depth; VAR paper: 16-30; DiGIT-base 16); ssl 4')
    g.add_argument('--vae', help='var: the frozen tokenizer, a train.py checkpoint or vae_ch160v'
                   '4096z32.pth (out/vqvae/ckpt.pt); stage2: 1-scale VQVAE (out/vqvae_1scale/...)')
    g.add_argument('--dropout', type=below_one, help='dropout (gpt, stage2 0.1)')
    g.add_argument('--label_smooth', type=below_one, help='label smoothing (var 0, gpt 0.1)')
    g.add_argument('--cfg', type=nonneg_float, default=4.0, help='var, gpt: guidance of grids')
    g.add_argument('--top_k', type=nonneg_int, default=0, help='var, gpt, stage2: grids\' top-k')
    g.add_argument('--top_p', type=fraction, default=0.0, help="var, gpt: grids' top-p (0: "
                   "off; stage2: 0.8, DiGIT's)")
    for task in dict.fromkeys(MODELS.values()):
        task.add_args(p)
    add_shared_args(p)
    return p


def get_args(argv=None):
    args = build_parser().parse_args(argv)
    task = MODELS[args.model]
    args.out_dir = args.out_dir or os.path.join('out', args.model)
    for k, v in {**SHARED_DEFAULTS, **task.defaults}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    task.finish_args(args)
    return args


def add_shared_args(p):
    """The flags of every model: data, optimisation, system, output."""
    g = p.add_argument_group('data')
    g.add_argument('--data', default='builtin', help="'builtin' (offline procedural set) or an "
                   'image folder (class sub-folders, or train/ and val/)')
    g.add_argument('--resolution', type=positive_int, default=32, help='image side in pixels')
    g.add_argument('--hflip', action=argparse.BooleanOptionalAction, default=False,
                   help='random horizontal flips')
    g.add_argument('--token_crops', type=positive_int, default=1, help='var, gpt, stage2: '
                   'tokenize each training image this many times, each a new random crop')
    g.add_argument('--train_images', type=nonneg_int, default=0,
                   help='use only this many training images (0 = all), for quick experiments')
    g.add_argument('--num_workers', type=cli.number(int, lambda v: v >= -1, 'an integer >= -1'),
                   default=-1, help='loader processes per GPU (-1: 0 builtin, else min(8, cores))')
    g = p.add_argument_group('optimisation')
    g.add_argument('--max_iters', type=positive_int, help='steps (ssl 200, probe 300, else 400)')
    g.add_argument('--total_batch_size', type=positive_int, help='images a step (ssl, probe 64, '
                   'else 32)')
    g.add_argument('--batch_size', type=positive_int, help='micro-batch per GPU (ssl, probe 64, '
                   'else 32; ssl: the InfoNCE negatives are this micro-batch)')
    g.add_argument('--lr', type=positive_float, help="peak learning rate (vqvae 1e-3, 'var' "
                   'preset 2e-4; var 1e-4 * total_batch_size / 256; ssl 1e-3; gpt 3e-4; stage2 '
                   '5e-4; probe 3e-3)')
    g.add_argument('--weight_decay', type=nonneg_float, help='AdamW decay of matrices')
    g.add_argument('--beta1', type=below_one, help='AdamW beta1')
    g.add_argument('--beta2', type=below_one, help='AdamW beta2')
    g.add_argument('--warmup_iters', type=nonneg_int, help='linear warmup (var 2%%, gpt 10%%)')
    g.add_argument('--lr_schedule', choices=['cosine', 'linear', 'constant', 'inverse_sqrt'],
                   help="after warmup (vqvae cosine, var linear, gpt fairseq's inverse_sqrt)")
    g.add_argument('--min_lr_ratio', type=fraction, default=0.1, help='final lr / peak lr')
    g.add_argument('--grad_clip', type=nonneg_float, help='max grad norm (0 off; gpt 1, else 2)')
    g.add_argument('--ema', type=below_one, default=0.0, help='EMA decay of weights (0 = off)')
    g.add_argument('--max_bad_steps', type=positive_int, default=10, help='stop after this '
                   'many steps in a row with a non-finite loss or gradient (each is skipped)')
    g = p.add_argument_group('system')
    g.add_argument('--device', default='', help='cuda, mps or cpu (default: best available)')
    g.add_argument('--dtype', choices=['float32', 'bfloat16', 'float16'], default=None,
                   help='autocast (default: bfloat16 on CUDA and bf16-native CPUs, else float32)')
    g.add_argument('--compile', action=argparse.BooleanOptionalAction, default=None,
                   help='torch.compile the model (default: on with CUDA when Triton is installed)')
    g.add_argument('--fused_adamw', action=argparse.BooleanOptionalAction,
                   help="AdamW's fused kernel, one launch for all tensors (default: on with CUDA)")
    g.add_argument('--seed', type=cli.seed, default=0, help='init, data order, sampling')
    g = p.add_argument_group('output')
    g.add_argument('--out_dir', help='checkpoint, log and images go here (out/<model>)')
    g.add_argument('--resume', choices=['auto', 'never'], default='auto',
                   help='auto: continue from <out_dir>/ckpt.pt when it exists')
    g.add_argument('--log_every', type=positive_int, default=50, help='steps between log lines')
    g.add_argument('--eval_every', type=positive_int, default=200, help='steps between evals')
    g.add_argument('--eval_images', type=positive_int, default=1000, help='held-out images used')
    g.add_argument('--sample_every', type=positive_int, default=200, help='steps between grids')
    g.add_argument('--save_every', type=positive_int, default=200, help='steps between saves')
    g.add_argument('--stop_after', type=nonneg_int, default=0, help='pause after N steps')
    g.add_argument('--fid_images', type=nonneg_int, default=1000, help='FID at evals (0: off)')


# ----------------------------------------------------------------------------------------------
# Optimisation (the device and precision: dist.training_run)

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


def make_optimizer(model, args, no_decay_names=()):
    """AdamW; no weight decay on vectors (norms, biases) and on parameters whose name contains
    one of no_decay_names (embeddings, positions, temperatures: the task's list)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            skip = p.ndim < 2 or any(n in name for n in no_decay_names)
            (no_decay if skip else decay).append(p)
    groups = [dict(params=decay, weight_decay=args.weight_decay),
              dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2),
                             fused=args.fused_adamw)


# ----------------------------------------------------------------------------------------------
# Validation and logs

@torch.no_grad()
def validate(model, task, args, run, fid_ref=None):
    """Every rank sums the task's held-out sums over its slice of the first --eval_images items;
    the sums are all-reduced and divided by the item count (or made figures by the task's
    figures(sums)). With fid_ref (fid.HeldOut), also the FID of the task's fid_images."""
    model.eval()
    items, sums = range(run.rank, min(len(task.val_set), args.eval_images), run.world), {}
    for batch in torch.utils.data.DataLoader(torch.utils.data.Subset(task.val_set, items),
                                             args.batch_size, num_workers=args.num_workers):
        if hasattr(task, 'val_sums'):
            batch_sums = task.val_sums(model, batch)
        else:   # the loss's figures (batch means) times the batch size
            with run.autocast:
                loss, parts = task.loss(model, batch, None)
            batch_sums = {**{k: v * len(batch[0]) for k, v in dict(parts, loss=loss).items()},
                          'n': torch.tensor(len(batch[0]))}
        for k, v in batch_sums.items():
            sums[k] = sums.get(k, 0.0) + v.to(run.device, torch.float32)
    fid_value = fid_ref(lambda idx: task.fid_images(model, idx)) if fid_ref else None
    model.train()
    for v in sums.values() if run.world > 1 else ():
        torch.distributed.all_reduce(v)
    if hasattr(task, 'figures'):
        out = task.figures(sums)
    else:
        n = sums.pop('n').clamp_min(1)
        out = {k: (v / n).tolist() if v.ndim else (v / n).item() for k, v in sums.items()}
    return out if fid_value is None else dict(out, fid=fid_value)


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


def log_means(sums, counts, steps, run):
    """Figures since the last log line, averaged over ranks: sums per step, counts in all."""
    stats = torch.stack([v.to(run.device) for v in [*sums.values(), *counts.values()]])
    if run.world > 1:   # .tolist() below syncs; average over ranks first
        torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.AVG)
    return {k: v / (steps if k in sums else 1) for k, v in zip([*sums, *counts], stats.tolist())}


# ----------------------------------------------------------------------------------------------
# The run: build, resume, loop, report

def build(task, args, run, ckpt, master_print):
    """The run's state: the model, its EMA, optimizers, discriminator, resumed from ckpt."""
    if ckpt is not None and ckpt['config'] != task.config:
        changed = {k: v for k, v in ckpt['config'].items() if task.config.get(k) != v}
        master_print(f'architecture taken from the checkpoint, not the flags: {changed}')
        task.config = ckpt['config']
    dist.check_fits(task, run.device, args)   # its size first: one that cannot fit is one line
    torch.manual_seed(args.seed)   # same init on every rank
    raw_model = task.build().to(run.device)
    n_params = sum(p.numel() for p in raw_model.parameters())
    master_print(f'{args.model}: {n_params / 1e6:.2f}M parameters, {task.config}')
    ema = task.build().to(run.device).requires_grad_(False) if args.ema > 0 else None
    optimizer = make_optimizer(raw_model, args, task.no_decay)
    disc = task.discriminator() if hasattr(task, 'discriminator') else None
    disc_opt = make_optimizer(disc, args) if disc is not None else None
    scaler = torch.amp.GradScaler(torch.device(run.device).type, enabled=args.dtype == 'float16')
    state = dict(raw_model=raw_model, ema=ema, optimizer=optimizer, disc=disc, disc_opt=disc_opt,
                 scaler=scaler, step=0, cursor=(0, 0), skipped=[])
    if ckpt is not None:
        checkpoint.restore(state, ckpt)
    elif ema is not None:
        ema.load_state_dict(raw_model.state_dict())
    state['bad'] = data.BadFiles(task.train_set, state['skipped'])   # unreadable, by path
    return state


def datasets(args, run, master_print):
    """The training and held-out images (data.py), and the accumulation steps of a step."""
    accum, rem = divmod(args.total_batch_size, args.batch_size * run.world)
    if rem or not accum:
        raise cli.UserError(f'--total_batch_size {args.total_batch_size} must be a multiple of '
                            f'--batch_size {args.batch_size} x {run.world} processes')
    if args.data != 'builtin' and data.contains(*map(os.path.realpath, (args.data, args.out_dir))):
        raise cli.UserError(f'--out_dir {args.out_dir} is inside --data {args.data}: its PNGs '
                            'would become training images; choose an --out_dir outside it')
    if args.num_workers < 0:   # the built-in data is made in memory
        args.num_workers = 0 if args.data == 'builtin' else min(8, os.cpu_count() // run.world)
    train_set = data.build_dataset(args.data, args.resolution, True, args.hflip, args.seed,
                                   size=args.train_images or None)
    val_set = data.build_dataset(args.data, args.resolution, False, seed=args.seed)
    if len(train_set) // run.world < args.batch_size:   # no full batch: the loader would spin
        raise cli.UserError(f'--batch_size {args.batch_size} is more than the {len(train_set)} '
                            f'training images give each of {run.world} process(es)')
    master_print(f'data: {len(train_set)} train / {len(val_set)} val images, '
                 f'{train_set.num_classes} classes; {args.total_batch_size} images a step = '
                 f'{run.world} process(es) x {args.batch_size} x {accum} accumulation; device '
                 f'{run.device} {args.dtype}')
    return train_set, val_set, accum


def train_step(model, disc, task, batches, state, args, run, accum, lr, sums):
    """One optimizer step at learning rate lr over accum micro-batches: forward and backward of
    the task's loss (gradients all-reduced on the last micro-batch only), its discriminator's,
    clipping, AdamW, EMA; figures added to sums. A step whose loss or gradient norm is not
    finite is skipped whole. Returns the last micro-batch and the step's loss (None: skipped)."""
    step, scaler, before = state['step'], state['scaler'], dict(sums)
    for opt in (state['optimizer'], state['disc_opt']):
        for group in (opt.param_groups if opt is not None else []):
            group['lr'] = lr
    finite = torch.ones((), dtype=torch.int32, device=run.device)   # 0 once anything is not
    for micro in range(accum):
        state['cursor'], batch = next(batches)
        state['bad'].update(batch[2])   # the unreadable files met: counted once each, by path
        sync = micro == accum - 1   # important! all-reduce gradients on the last micro-step
        with model.no_sync() if run.world > 1 and not sync else nullcontext():
            with run.autocast:
                loss, parts = task.loss(model, batch, step)
            scaler.scale(loss / accum).backward()
        if disc is not None:
            with disc.no_sync() if run.world > 1 and not sync else nullcontext():
                with run.autocast:
                    d_loss = task.disc_loss(disc, step)   # None before the GAN starts
                if d_loss is not None:
                    scaler.scale(d_loss / accum).backward()
                    parts['d'] = d_loss.detach()
        for k, v in dict(parts, loss=loss.detach()).items():
            sums[k] = sums.get(k, 0.0) + v.float() / accum
        finite &= torch.isfinite(loss.detach()).int()
    nets = ((state['optimizer'], state['raw_model']), (state['disc_opt'], state['disc']))
    stepped = [(opt, net) for opt, net in nets
               if opt is not None and any(p.grad is not None for p in net.parameters())]
    for opt, net in stepped:
        scaler.unscale_(opt)   # the norm: clipped at --grad_clip, or only measured (inf)
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip or math.inf)
        if not scaler.is_enabled():   # fp16: the scaler skips steps with overflowed gradients
            finite &= torch.isfinite(norm).int()
    if run.world > 1:   # every rank skips, or none
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    ok = bool(finite.item())   # the step's one host sync
    for opt, _ in stepped:
        if ok:
            scaler.step(opt)
        opt.zero_grad(set_to_none=True)
    scaler.update()
    if not ok:   # a diverged step changes nothing: weights, EMA and logged figures stay
        sums.clear()
        sums.update(before)
        return batch, None
    if state['ema'] is not None:
        weights = state['raw_model'].state_dict().values()
        for e, p in zip(state['ema'].state_dict().values(), weights):
            e.lerp_(p, 1 - args.ema) if e.is_floating_point() else e.copy_(p)
    return batch, sums['loss'] - before.get('loss', 0.0)


def main(args):
    run = dist.training_run(args)
    with checkpoint.OutDirLock(args.out_dir) if run.rank == 0 else nullcontext():
        raw_model = fit(args, run)
    dist.cleanup()
    return raw_model


def fit(args, run):
    """Build, resume, train to --max_iters (or --stop_after more steps), report."""
    master = run.rank == 0
    master_print = print if master else (lambda *a, **k: None)
    train_set, val_set, accum = datasets(args, run, master_print)
    ckpt_path = os.path.join(args.out_dir, 'ckpt.pt')
    ckpt = checkpoint.to_resume(ckpt_path, args, MODELS[args.model].frozen, master_print)
    task = MODELS[args.model](args, train_set, val_set, run)
    state = build(task, args, run, ckpt, master_print)
    keeper = checkpoint.Keeper(ckpt_path, ckpt, run)   # saves only states it can trust
    raw_model, ema, disc = state['raw_model'], state['ema'], state['disc']
    model = torch.compile(raw_model) if args.compile else raw_model   # compiles at the first step
    if run.world > 1:
        model = DDP(model, device_ids=[int(os.environ['LOCAL_RANK'])]
                    if run.device.startswith('cuda') else None)
        disc = DDP(disc) if disc is not None else None
    eval_model = ema if ema is not None else raw_model   # validation and pictures use the EMA
    fid_ref = fid.HeldOut.for_run(task, val_set, args, run.device, master_print)
    log_path = os.path.join(args.out_dir, 'log.txt')
    log = lambda line: checkpoint.append_log(line, log_path if master else None)
    batches = data.endless_batches(task.train_set, args.batch_size, args.num_workers, run.rank,
                                   run.world, args.seed, *state['cursor'],
                                   pin_memory=run.device.startswith('cuda'))
    start = last_log = state['step']
    sums, counts, t0, bad_in_a_row = {}, {}, time.time(), 0
    bar = tqdm(total=args.max_iters, initial=start, disable=not master, dynamic_ncols=True)
    while state['step'] < args.max_iters:
        step = state['step']
        torch.manual_seed(args.seed * 1_000_003 + run.rank * 10_007 + step)  # resumable RNG
        lr = lr_at(step, args)
        batch, loss = train_step(model, disc, task, batches, state, args, run, accum, lr, sums)
        step = state['step'] = step + 1
        bar.update(1)
        keeper.after_step(loss)
        bad_in_a_row = 0 if loss is not None else bad_in_a_row + 1
        if loss is None:
            counts['skipped_steps'] = counts.get('skipped_steps', 0.0) + torch.tensor(1.0)
            if bad_in_a_row >= args.max_bad_steps:
                bar.close()
                keeper.diverged(f'at step {step}, the loss or gradient was not finite in the '
                                f'last {bad_in_a_row} steps (--lr {args.lr:g})')
        elif hasattr(task, 'after_step'):
            for k, v in task.after_step(raw_model, batch, step).items():
                counts[k] = counts.get(k, 0.0) + torch.tensor(float(v))
        if step % args.log_every == 0 or step == args.max_iters:
            mean = log_means(sums, counts, step - last_log, run)
            n_bad = len(state['bad'].sync())   # all ranks' files (every rank logs: a collective)
            if hasattr(task, 'log_extras'):
                mean.update(task.log_extras(raw_model))
            log(f'step {step} {format_stats(mean)} lr {lr:.3g} '
                f'ms/step {(time.time() - t0) / (step - last_log) * 1000:.0f}'
                + (f' skipped_files {n_bad}' if n_bad else ''))
            bar.set_postfix(loss=f"{mean.get('loss', math.nan):.4f}")
            sums, counts, t0, last_log = {}, {}, time.time(), step
        last = step == args.max_iters or (args.stop_after and step - start >= args.stop_after)
        if step % args.eval_every == 0 or last:
            held_out = validate(eval_model, task, args, run, fid_ref)
            log(f'eval {step} {format_stats(held_out)}')
        if master and task.picture_name and (step % args.sample_every == 0 or last):
            task.picture(eval_model, os.path.join(args.out_dir,
                                                  f'{task.picture_name}_{step:06d}.png'))
        if step % args.save_every == 0 or last:
            state['skipped'] = state['bad'].sync()   # all ranks' files, saved as a list of paths
            keeper.save(state, task.config, args, task.frozen, train_set.class_names)
            dist.barrier()
        if last:
            break
    bar.close()
    if state['step'] == start:   # already done: report the finished run again
        held_out = validate(eval_model, task, args, run)
    values = [x for v in held_out.values() for x in (v if isinstance(v, list) else [v])]
    if not all(math.isfinite(x) for x in values):   # a diverged run must not pass for done
        keeper.diverged(f'the held-out figures are not finite: {format_stats(held_out)}', True)
    keeper.vouched()
    if master:
        report(task, held_out, fid_ref, args, state, ckpt_path, log_path)
    return raw_model


def report(task, held_out, fid_ref, args, state, ckpt_path, log_path):
    """The final held-out figures (the task's summary, FID) and where the results are."""
    step, name, bad = state['step'], task.picture_name, state['bad'].paths
    print('\n' + task.summary(held_out, step))
    if 'fid' in held_out:
        print(f"FID {held_out['fid']:.2f} ({fid_ref.n} images vs {fid_ref.n} held-out ones)")
    picture = os.path.join(args.out_dir, f'{name}_{step:06d}.png')
    print(f'checkpoint {ckpt_path}\n' + (f'{name} {picture}\n' if name else '') + f'log {log_path}'
          + (f'\n{len(bad)} unreadable files were skipped' if bad else ''))


if __name__ == '__main__':
    cli.run(lambda: main(get_args()))
