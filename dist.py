"""
Where the code runs: the device, and the processes of a `torchrun` job.

Every entry point (train.py, sample.py, fid.py, tokenizer.py, kmeans.py) starts with
`device, rank, world = dist.setup(args.device)` (train.py: `training_run(args)`, which also picks
its precision) and ends with `dist.cleanup()`; nothing else in the repo reads RANK or picks a
device. Plain `python script.py` is one process (rank 0 of 1);
under `torchrun` every process joins one group, NCCL on GPUs and gloo on CPU (so DDP can be
tested on any machine), and takes the GPU of its LOCAL_RANK.

    torchrun --standalone --nproc_per_node=8 train.py ...     # 8 GPUs, one machine
    torchrun --nproc_per_node=2 train.py --device cpu ...     # 2 CPU processes (gloo)
"""
import importlib.util
import os
from collections import namedtuple
from contextlib import nullcontext

import torch
import torch.distributed as dist

from cli import UserError


def best_device(mps=True):
    """cuda, else Apple's mps (if allowed: it has no float64, which K-Means sums in), else cpu."""
    if torch.cuda.is_available():
        return 'cuda'
    return 'mps' if mps and torch.backends.mps.is_available() else 'cpu'


def setup(device='', mps=True, tf32=False):
    """The device (`device`, or the best available) and, under torchrun, the process group.
    tf32: TF32 matmuls and convolutions on CUDA (faster, not bit-reproducible across GPUs; the
    official VAR code's setting). Returns (device, rank, world); device is e.g. 'cuda:3' for
    the process of LOCAL_RANK 3."""
    device = checked_device(device) if device else best_device(mps)
    if tf32 and torch.device(device).type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if 'RANK' not in os.environ:
        return device, 0, 1
    if torch.device(device).type == 'cuda':
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    return device, dist.get_rank(), dist.get_world_size()


def checked_device(device):
    """--device as given, or a UserError if this machine has no such device."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ('cpu', 'cuda', 'mps'):
        raise UserError(f'--device {device!r} is not a device: cpu, cuda, cuda:N or mps')
    if kind == 'cuda' and not torch.cuda.is_available():
        raise UserError(f'--device {device}: torch finds no CUDA device here (--device cpu?)')
    if kind == 'cuda' and (torch.device(device).index or 0) >= torch.cuda.device_count():
        raise UserError(f'--device {device}: this machine has {torch.cuda.device_count()} GPUs')
    if kind == 'mps' and not torch.backends.mps.is_available():
        raise UserError(f'--device {device}: Apple MPS is not available here (--device cpu?)')
    return device


def check_fits(task, device, args):
    """A UserError if the parameters of task.build() (built on the meta device: no memory),
    their gradients and AdamW's two moments (16 bytes each in fp32) exceed the memory of the
    device (the machine's, for the CPU)."""
    with torch.device('meta'):
        n_params = sum(p.numel() for p in task.build().parameters())
    if torch.device(device).type == 'cuda':
        have = torch.cuda.get_device_properties(torch.device(device)).total_memory
    else:
        have = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    if 16 * n_params > have:
        raise UserError(f'--model {args.model} --depth {args.depth} at --resolution '
                        f'{args.resolution} has {n_params / 1e6:,.0f}M parameters: about '
                        f'{16 * n_params / 2 ** 30:,.0f} GiB for them, their gradients and AdamW, '
                        f'more than the {have / 2 ** 30:.0f} GiB of {device}')


Run = namedtuple('Run', 'device rank world autocast')   # what a training task knows of the run


def training_run(args):
    """train.py's setup(): the device and process group, TF32 on, then the defaults that depend
    on the device: --dtype (default_dtype), --compile (on with CUDA when Triton is installed,
    which GPU kernels need; off on CPU, where it rarely pays: RESULTS.md) and --fused_adamw (on
    with CUDA). --compile on a CPU without a working C++ compiler trains eagerly and says so."""
    device, rank, world = setup(args.device, tf32=True)
    device_type = torch.device(device).type
    say = print if rank == 0 else (lambda *a: None)
    args.dtype = args.dtype or default_dtype(device_type)
    if args.compile is None:
        args.compile = device_type == 'cuda' and importlib.util.find_spec('triton') is not None
    elif args.compile and device_type == 'cpu':
        failure = cpu_compile_failure()
        if failure:
            say(f'note: --compile needs a C++ compiler on CPU (g++, clang++ or $CXX) and '
                f'torch.compile failed ({failure}); training eagerly')
            args.compile = False
    if args.fused_adamw is None:
        args.fused_adamw = device_type == 'cuda'
    if device_type == 'cpu' and args.dtype == 'bfloat16' and cpu_has_native_bf16() is False:
        say('note: --dtype bfloat16 on a CPU without native bf16 (no avx512_bf16 or amx_bf16 in '
            '/proc/cpuinfo) is slower than float32, not faster')
    dtype = getattr(torch, args.dtype)
    ctx = torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    return Run(device, rank, world, ctx)


def default_dtype(device_type):
    """The autocast dtype where --dtype is not given: bfloat16 on CUDA and on a CPU that
    multiplies it natively (1.1-1.7x faster per step there, 11-33x slower where oneDNN emulates
    it: RESULTS.md), float32 elsewhere (Apple MPS included)."""
    native = device_type == 'cuda' or (device_type == 'cpu' and cpu_has_native_bf16() is True)
    return 'bfloat16' if native else 'float32'


def cpu_compile_failure():
    """None if torch.compile works on this CPU, else why not in one line. Inductor turns each
    graph into C++ that a compiler builds (g++ or clang++, or $CXX), so a tiny function is
    compiled and run once (2-5 s; torch caches the result on disk)."""
    try:
        torch.compile(lambda x: x * 2 + 1, dynamic=False)(torch.arange(4.0))
        return None
    except Exception as e:   # no compiler, no headers, a broken toolchain: all mean eager
        lines = [ln for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        return lines[0][:200]


def cpu_has_native_bf16(cpuinfo='/proc/cpuinfo'):
    """Whether the CPU multiplies bf16 natively (avx512_bf16 or amx_bf16 among the flags of
    Linux's cpuinfo); None where that file or its flags are absent (macOS, ARM). Without native
    bf16, oneDNN emulates it and bf16 autocast is slower than float32; with it, faster
    (RESULTS.md)."""
    try:
        with open(cpuinfo) as f:
            flags = next((ln.split(':', 1)[1].split() for ln in f if ln.startswith('flags')),
                         None)
    except OSError:
        return None
    return None if flags is None else bool({'avx512_bf16', 'amx_bf16'} & set(flags))


def rank_world():
    """(rank, world) of this process: (0, 1) outside torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_gather_rows(t):
    """Concatenate the tensors (n_r, ...) of all ranks along dim 0 in rank order (n_r may vary)."""
    rank, world = rank_world()
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


def barrier():
    """Wait for every rank (nothing to wait for in one process)."""
    if dist.is_initialized():
        dist.barrier()


def cleanup():
    """Leave the process group (torchrun with one process included: NCCL warns otherwise)."""
    if dist.is_initialized():
        dist.destroy_process_group()
