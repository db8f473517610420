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
    device = device or best_device(mps)
    if tf32 and torch.device(device).type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if 'RANK' not in os.environ:
        return device, 0, 1
    if torch.device(device).type == 'cuda':
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    return device, dist.get_rank(), dist.get_world_size()


Run = namedtuple('Run', 'device rank world autocast')   # what a training task knows of the run


def training_run(args):
    """train.py's setup(): the device and process group, TF32 on, then the defaults that depend
    on the device: --dtype (bfloat16 autocast on CUDA, float32 elsewhere), --compile (on
    with CUDA when Triton is installed, which GPU kernels need; absent on Windows) and
    --fused_adamw (on with CUDA)."""
    device, rank, world = setup(args.device, tf32=True)
    device_type = torch.device(device).type
    if args.dtype is None:
        args.dtype = 'bfloat16' if device_type == 'cuda' else 'float32'
    if args.compile is None:
        args.compile = device_type == 'cuda' and importlib.util.find_spec('triton') is not None
    if args.fused_adamw is None:
        args.fused_adamw = device_type == 'cuda'
    if rank == 0 and device_type == 'cpu' and args.dtype == 'bfloat16' and \
            cpu_has_native_bf16() is False:
        print('note: --dtype bfloat16 on a CPU without native bf16 (no avx512_bf16 or amx_bf16 '
              'in /proc/cpuinfo) is slower than float32, not faster')
    dtype = getattr(torch, args.dtype)
    ctx = torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    return Run(device, rank, world, ctx)


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
