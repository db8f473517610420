"""
The FID Inception-v3: pytorch-fid's port of the TF 2015 graph that every FID since TTUR uses,
written here with the checkpoint's module names, and its weights loader. fid.py runs it.

Differences from torchvision's Inception3, all from the TF graph: 3x3 average pools do not count
padding, Mixed_7c pools with a 3x3 max pool, BatchNorm eps 1e-3, a 1008-way fc (no AuxLogits, no
input re-normalisation). x (B, 3, 299, 299) in [-1, 1] -> pool (B, 2048), the TF 'pool_3'; with
spatial=True also sFID's 2023 features (7 channels of Mixed_6d.branch1x1, NHWC).
Weights: pt_inception-2015-12-05-6726825d.pth (23,885,392 floats, 472 float tensors), from a path,
$FID_INCEPTION_WEIGHTS, the torch hub cache, or a download when asked. The file is reported under
that name only if its sha256 starts with 6726825d (torch hub's naming rule); any other file of
the right shapes is reported as unofficial weights, by its path. NaN or inf weights are refused.

    python -m pytest test_all.py -k fid     # keys, pooling quirks, loading errors
"""
import hashlib
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint

WEIGHTS_NAME = 'pt_inception-2015-12-05-6726825d.pth'
WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
               + WEIGHTS_NAME)
WEIGHTS_SHA256 = '6726825d'   # the name's suffix: the first hex digits of the file's sha256

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
        """The 1008 class logits of IS, without the fc bias as in the ADM evaluator."""
        return pool @ self.fc.weight.T                                      # (B, 1008)


def find_weights(path=None, download=False):
    """The checkpoint file: `path`, else $FID_INCEPTION_WEIGHTS, else the torch hub cache (where
    pytorch-fid and torch-fidelity put it), else a download there when asked."""
    path = path or os.environ.get('FID_INCEPTION_WEIGHTS')
    if path:
        if not os.path.isfile(path):
            raise SystemExit(f'FID Inception weights not found: {path}')
        return path
    cache = os.path.join(torch.hub.get_dir(), 'checkpoints')
    for name in (WEIGHTS_NAME, 'weights-inception-2015-12-05-6726825d.pth'):
        if os.path.isfile(os.path.join(cache, name)):
            return os.path.join(cache, name)
    if not download:
        raise SystemExit(f'no FID Inception weights: pass --weights PATH, set '
                         f'$FID_INCEPTION_WEIGHTS, put {WEIGHTS_NAME} in {cache}, or use '
                         f'--download ({WEIGHTS_URL})')
    os.makedirs(cache, exist_ok=True)
    torch.hub.download_url_to_file(WEIGHTS_URL, os.path.join(cache, WEIGHTS_NAME))
    return os.path.join(cache, WEIGHTS_NAME)


def weights_name(path):
    """WEIGHTS_NAME if the file's sha256 starts with WEIGHTS_SHA256 (the official file, under any
    name), else 'unofficial weights PATH (sha256 ...)': what fid.py reports it used."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    sha = digest.hexdigest()
    if sha.startswith(WEIGHTS_SHA256):
        return WEIGHTS_NAME
    return f'unofficial weights {path} (sha256 {sha[:8]}..., not {WEIGHTS_SHA256}...)'


def load_inception(path=None, device='cpu', download=False):
    """FIDInception with pytorch-fid's weights, every float tensor checked (shape, finite) and
    used (its num_batches_tracked, if any, is ignored); eval mode, no gradients. A file that
    does not fit is SystemExit naming it. `.weights` holds weights_name(path)."""
    path = find_weights(path, download)
    state = checkpoint.load(path, 'FID Inception weights')
    if not isinstance(state, dict):
        raise SystemExit(f'{path} is not the FID Inception ({WEIGHTS_NAME}): it holds a '
                         f'{type(state).__name__}, not a state dict')
    state = {k: v for k, v in state.items() if not k.endswith('num_batches_tracked')}
    model = FIDInception()
    want = {k: v.shape for k, v in model.state_dict().items()
            if not k.endswith('num_batches_tracked')}
    missing, extra = sorted(want.keys() - state.keys()), sorted(state.keys() - want.keys())
    wrong = [f'{k} {tuple(getattr(state[k], "shape", ()))} != {tuple(s)}'
             for k, s in want.items() if k in state and getattr(state[k], 'shape', ()) != s]
    if missing or extra or wrong:
        raise SystemExit(f'{path} is not the FID Inception ({WEIGHTS_NAME}): '
                         f'{len(missing)} missing keys {missing[:3]}, {len(extra)} unexpected '
                         f'{extra[:3]}, {len(wrong)} wrong shapes {wrong[:3]}')
    broken = [k for k in want   # min and max hold NaN or inf if any entry does: fast
              if not torch.isfinite(torch.stack(torch.aminmax(state[k].float()))).all()]
    if broken:
        raise SystemExit(f'FID Inception weights {path}: {len(broken)} tensors hold NaN or inf, '
                         f'e.g. {broken[0]}')
    model.load_state_dict(state, strict=False)  # only num_batches_tracked stays unset
    model.weights = weights_name(path)
    return model.to(device).eval().requires_grad_(False)
