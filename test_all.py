"""
The test suite: CPU, tiny configs, a few minutes. Each test checks an equation, an invariant or
an error message, and is named after it.

    python -m pytest test_all.py -q                 # everything
    python -m pytest test_all.py -q -k vqvae        # one part
"""
import argparse
import errno
import hashlib
import io
import math
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import types
import typing
import warnings
import zipfile
import zlib
from collections import OrderedDict, defaultdict

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

import bench
import checkpoint
import cli
import data
import dist
import digit
import fid
import inception
import gpt
import kmeans
import pixdec
import sample
import standin
import tokenizer
import train
import transformer
import var
import vqgan
import vqvae
import vqvae_train
from dinov2 import DINOv2, DINOV2_CONFIGS

REPO = os.path.dirname(os.path.abspath(__file__))
REFERENCE = os.path.join(REPO, '..', 'shared', 'reference')


# --- data.py ---------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def float32_on_cpu(monkeypatch):
    """The suite's figures are float32 on every CPU: where the CPU multiplies bf16 natively,
    train.py and sample.py default to bf16 (dist.default_dtype, tested on its own)."""
    real = dist.default_dtype
    monkeypatch.setattr(dist, 'default_dtype', lambda kind: 'float32' if kind == 'cpu' else
                        real(kind))


def solid(color, size=(8, 8), mode='RGB'):
    return Image.new(mode, size, color)


def pm1(v):
    """8-bit value(s) -> the float32 [-1, 1] value(s) the loader must produce."""
    return torch.as_tensor(v, dtype=torch.float32) / 255 * 2 - 1


def folder_dataset(root, **kw):
    kw = {'resolution': 8, 'train': False, 'mid_reso': 1.0, **kw}  # 8x8 files: no resize, no crop
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return data.ImageFolder(str(root), **kw)


def by_name(ds, name):
    i = [os.path.basename(p) for p, _ in ds.samples].index(name)
    return ds[i][0]


# --- loading: every PIL mode becomes RGB in [-1, 1] ---

def test_data_pil_modes_to_rgb(tmp_path):
    ramp16 = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    ramp16[0, 1] = 128 * 257  # exactly 8-bit 128 after scaling
    pal = Image.new('P', (8, 8), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (0, 0, 4, 8))  # left half blue, right half index 0 = transparent red
    pal.info['transparency'] = 0  # written as the PNG tRNS chunk
    rgba = solid((10, 200, 30, 255), mode='RGBA')
    rgba.paste((0, 0, 0, 0), (4, 0, 8, 8))  # right half fully transparent
    files = {
        'l0.png': solid(0, mode='L'), 'l255.png': solid(255, mode='L'),
        'la.png': solid((100, 255), mode='LA'), 'p.png': pal, 'rgba.png': rgba,
        'cmyk.tif': solid((0, 255, 255, 0), mode='CMYK'),  # magenta + yellow ink = red
        'i16.png': Image.fromarray(ramp16), 'one.bmp': solid(1, mode='1'),
        'i32.tif': Image.fromarray(ramp16.astype(np.int32)),
        'f.tif': Image.fromarray(np.full((8, 8), 0.5, np.float32)),
    }
    for name, img in files.items():
        img.save(tmp_path / name)
    assert Image.open(tmp_path / 'i16.png').mode.startswith('I')  # really a 16-bit file
    ds = folder_dataset(tmp_path)
    assert len(ds) == len(files) and ds.num_skipped_at_scan == 0
    for name in files:
        x = by_name(ds, name)
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32, name
        assert x.min() >= -1 and x.max() <= 1, name
    assert torch.all(by_name(ds, 'l0.png') == -1) and torch.all(by_name(ds, 'l255.png') == 1)
    assert torch.all(by_name(ds, 'one.bmp') == 1)
    for name in ('i16.png', 'i32.tif'):  # 16-bit is rescaled, not clipped
        x = by_name(ds, name)
        assert x.max() == 1 and x.min() == -1, name
        assert torch.allclose(x[:, 0, 1], pm1(128)), name
        assert len(x[0].unique()) > 50, name  # the ramp survives: not clipped at 255
    assert torch.allclose(by_name(ds, 'f.tif'), pm1(128))
    assert torch.allclose(by_name(ds, 'cmyk.tif')[:, 0, 0], torch.tensor([1., -1., -1.]))
    assert torch.allclose(by_name(ds, 'la.png'), pm1(100))  # opaque grey
    p = by_name(ds, 'p.png')  # blue stays blue, transparent becomes white
    assert torch.allclose(p[:, 0, 0], torch.tensor([-1., -1., 1.]))
    assert torch.all(p[:, :, 4:] == 1)
    x = by_name(ds, 'rgba.png')
    assert torch.allclose(x[:, 0, 0], pm1([10, 200, 30]))
    assert torch.all(x[:, :, 4:] == 1)


# --- bad files: skipped at scan time or at load time, counted exactly, never fatal ---

def make_messy_folder(root):
    """3 good images, 3 corrupt ones (non-adjacent, one last), 2 skipped at scan time."""
    root.mkdir(exist_ok=True)
    good = {'a0.png': (255, 0, 0), 'a2.png': (0, 255, 0), 'a4.png': (0, 0, 255)}
    for name, color in good.items():
        solid(color).save(root / name)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))
    noise.save(root / 'a1.png')
    raw = (root / 'a1.png').read_bytes()
    (root / 'a1.png').write_bytes(raw[:len(raw) // 2])  # truncated PNG
    (root / 'a3.jpg').write_bytes(np.random.default_rng(1).bytes(500))  # not an image at all
    (root / 'z9.jpg').write_bytes(b'\xff\xd8\xff' + bytes(100))  # broken JPEG, wraps to a0
    (root / 'empty.jpg').write_bytes(b'')
    (root / 'notes.txt').write_text('hello')
    return good


@pytest.mark.parametrize('num_workers', [0, 2])
def test_data_corrupt_files_never_crash_an_epoch(tmp_path, num_workers):
    good = make_messy_folder(tmp_path / 'messy')
    with pytest.warns(UserWarning, match='skipped 2 empty or non-image'):
        ds = data.ImageFolder(str(tmp_path / 'messy'), 8, train=False, mid_reso=1.0)
    assert ds.num_skipped_at_scan == 2 and len(ds) == 6
    colors = {tuple(pm1(c).tolist()) for c in good.values()}
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=num_workers)
    seen, n_bad = 0, 0
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for x, y, bad in loader:
            seen += len(x)
            n_bad += int(bad[:, 1].sum())  # bad rows: (index, files skipped from it on)
            assert all(tuple(img[:, 0, 0].tolist()) in colors for img in x)
    assert seen == len(ds) and n_bad == 3


def test_data_bad_file_warns_once(tmp_path):
    make_messy_folder(tmp_path / 'messy')
    ds = folder_dataset(tmp_path / 'messy')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        assert ds[1][2].tolist() == [1, 1]  # a1.png is truncated: a2.png is returned instead
        assert not caught  # the dataset never warns itself (DataLoader workers would, each)
        bad = data.BadFiles(ds)  # warns about the 0-byte empty.jpg
        for _ in range(3):
            bad.update(ds[1][2])
    assert len(caught) == 2 and sum('a1.png' in str(w.message) for w in caught) == 1


def test_data_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match='nowhere'):   # a user's mistake: one line, no traceback
        data.ImageFolder(str(tmp_path / 'nowhere'), 8)
    with pytest.raises(SystemExit, match='nowhere'):
        data.build_dataset(str(tmp_path / 'nowhere'), 8, train=True)
    (tmp_path / 'junk').mkdir()
    (tmp_path / 'junk' / 'a.txt').write_text('x')
    with pytest.raises(SystemExit, match='no images found'):
        folder_dataset(tmp_path / 'junk')
    (tmp_path / 'bad').mkdir()
    for i in range(3):
        (tmp_path / 'bad' / f'{i}.png').write_bytes(b'not a png')
    with pytest.raises(SystemExit, match='bad: none of its 3 image files can be read'):
        folder_dataset(tmp_path / 'bad')   # found when the dataset is built, not at a batch


# --- labels and splits ---

def test_data_labels_from_class_folders(tmp_path):
    for cls, n in (('dog', 2), ('ant', 1), ('cat', 3)):
        (tmp_path / 'c' / cls / 'nested').mkdir(parents=True)
        for i in range(n):
            solid((i, 0, 0)).save(tmp_path / 'c' / cls / 'nested' / f'{i}.png')
    (tmp_path / 'c' / '.ipynb_checkpoints').mkdir()  # hidden: not a class
    (tmp_path / 'c' / 'cat' / '.cache').mkdir()  # hidden: not listed
    solid((0, 0, 0)).save(tmp_path / 'c' / 'cat' / '.cache' / 'thumb.png')
    ds = folder_dataset(tmp_path / 'c')
    assert ds.class_names == ['ant', 'cat', 'dog'] and ds.num_classes == 3
    assert [label for _, label in ds.samples] == [0, 1, 1, 1, 2, 2]
    assert [ds[i][1] for i in range(len(ds))] == [0, 1, 1, 1, 2, 2]
    (tmp_path / 'flat').mkdir()
    for i in range(4):
        solid((i, 0, 0)).save(tmp_path / 'flat' / f'{i}.jpg')
    flat = folder_dataset(tmp_path / 'flat')
    assert flat.num_classes == 1 and flat.class_names == ['unlabeled']
    assert len(flat) == 4 and {flat[i][1] for i in range(4)} == {0}


def test_data_build_dataset_splits(tmp_path):
    for split in ('train', 'val'):
        for cls in ('a', 'b'):
            (tmp_path / 'tv' / split / cls).mkdir(parents=True)
            solid((0, 0, 0)).save(tmp_path / 'tv' / split / cls / f'{split}.png')
    for train in (True, False):
        ds = data.build_dataset(str(tmp_path / 'tv'), 8, train=train)
        assert ds.class_names == ['a', 'b'] and ds.train == train
        assert all(os.sep + ('train' if train else 'val') + os.sep in p for p, _ in ds.samples)
    os.rename(tmp_path / 'tv' / 'val' / 'b', tmp_path / 'tv' / 'val' / 'c')
    with pytest.raises(SystemExit, match='same class folders'):
        data.build_dataset(str(tmp_path / 'tv'), 8, train=False)
    (tmp_path / 'flat').mkdir()
    for i in range(60):
        solid((i, 0, 0)).save(tmp_path / 'flat' / f'{i:02d}.png')
    tr = {p for p, _ in data.build_dataset(str(tmp_path / 'flat'), 8, train=True).samples}
    va = {p for p, _ in data.build_dataset(str(tmp_path / 'flat'), 8, train=False).samples}
    assert len(va) == 2 and len(tr) == 58 and not tr & va  # 2% held out, never trained on
    assert len(data.build_dataset(str(tmp_path / 'flat'), 8, train=True, size=10)) == 10
    b_tr, b_va = data.build_dataset('builtin', 16, True), data.build_dataset('builtin', 16, False)
    assert (len(b_tr), len(b_va)) == (10000, 1000) and not torch.equal(b_tr[0][0], b_va[0][0])


# --- VAR's transform: shorter side -> mid_reso * resolution, then crop ---

def test_data_resize_then_crop(tmp_path):
    torch.manual_seed(0)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), np.uint8))
    img.save(tmp_path / 'wide.png')
    val = data.ImageFolder(str(tmp_path), 32, train=False, hflip=True)  # no flip in eval
    assert val.mid_size == 36  # round(1.125 * 32)
    x = val[0][0]
    assert x.shape == (3, 32, 32) and torch.equal(x, val[0][0])  # eval is deterministic
    ref = img.resize((60, 36), Image.LANCZOS).crop((14, 2, 46, 34))  # torchvision's numbers
    assert np.array_equal(data.to_uint8(x[None])[0], np.asarray(ref))
    train = data.ImageFolder(str(tmp_path), 32, train=True, hflip=True)
    draws = []
    for seed in range(6):
        torch.manual_seed(seed)
        a = train[0][0]
        torch.manual_seed(seed)
        assert torch.equal(a, train[0][0])  # reproducible under torch.manual_seed
        draws.append(a)
    assert any(not torch.equal(draws[0], d) for d in draws[1:])  # but random across seeds


# --- the built-in procedural dataset ---

def test_data_procedural_deterministic_and_shaped():
    ds, again = data.ProceduralDataset(100, 32), data.ProceduralDataset(100, 32)
    x, y, n_bad = ds[7]
    assert torch.equal(x, ds[7][0]) and torch.equal(x, again[7][0]) and n_bad.tolist() == [7, 0]
    assert not torch.equal(x, ds[17][0]) and ds[17][1] == y  # same class, another sample
    assert not torch.equal(x, data.ProceduralDataset(100, 32, seed=1)[7][0])
    for res in (16, 32, 64):
        x = data.ProceduralDataset(10, res)[3][0]
        assert x.shape == (3, res, res) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.2
    big = data.ProceduralDataset(100, 16, num_classes=40)
    assert len(set(big.class_names)) == 40 and big[39][1] == 39


def test_data_procedural_classes_are_distinguishable():
    """Nearest class mean on 4x4 thumbnails: the coarse scale alone identifies the class."""
    def features(seed):
        ds = data.ProceduralDataset(200, 32, seed=seed)
        x, y, _ = next(iter(torch.utils.data.DataLoader(ds, batch_size=200)))
        return x, torch.nn.functional.avg_pool2d(x, 8).flatten(1), y  # (200, 48)
    x, f_train, y_train = features(0)
    _, f_test, y_test = features(1)
    assert torch.equal(torch.bincount(y_train), torch.full((10,), 20))  # balanced
    means = torch.stack([f_train[y_train == c].mean(0) for c in range(10)])  # (10, 48)
    acc = (torch.cdist(f_test, means).argmin(1) == y_test).float().mean().item()
    assert acc > 0.9, acc  # chance is 0.1; measured 1.0
    # the fine scale carries energy: what a 2x average-pool-and-upsample removes
    blur = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x, 2), scale_factor=2)
    assert ((x - blur) ** 2).mean() / x.var() > 0.02


# --- saving ---

def test_data_save_image_grid_round_trip(tmp_path):
    u8 = torch.randint(0, 256, (10, 32, 32, 3), dtype=torch.uint8)
    x = u8.permute(0, 3, 1, 2).float() / 255 * 2 - 1  # (10, 3, 32, 32), as the loader makes
    assert np.array_equal(data.to_uint8(x), u8.numpy())  # exact inverse of x/255*2-1
    out_of_range = torch.tensor([-3.0, 0.0, 7.0]).view(1, 3, 1, 1)
    assert data.to_uint8(out_of_range).tolist() == [[[[0, 128, 255]]]]  # clamped, rounded
    path = tmp_path / 'sub' / 'grid.png'
    data.save_image_grid(x, str(path), nrow=5, padding=2, min_side=32)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 34 + 2, 5 * 34 + 2, 3)
    assert np.array_equal(grid[36:68, 104:136], u8[8].numpy())  # row 1, column 3
    assert grid[:2].max() == 0 and grid[:, 34:36].max() == 0  # black padding
    assert os.listdir(path.parent) == ['grid.png']  # no temporary file left behind
    data.save_image_grid(x, str(path), nrow=5, padding=2)  # default: 32 px shown as 64 px
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 66 + 2, 5 * 66 + 2, 3)
    cell = grid[68:132, 200:264]                                    # row 1, column 3
    assert np.array_equal(cell[::2, ::2], u8[8].numpy()) and np.array_equal(cell[1::2, 1::2],
                                                                             u8[8].numpy())


def real(paths):
    return [os.path.realpath(p) for p in paths]


def save_images(folder, n, start=0):
    os.makedirs(folder, exist_ok=True)
    for i in range(start, start + n):
        Image.new('RGB', (8, 8), (i, 0, 0)).save(os.path.join(folder, f'{i:03d}.png'))


def test_data_symlink_loop_lists_each_image_once_and_val_stays_out(tmp_path):
    root = tmp_path / 'img'
    save_images(root / 'a', 40)
    save_images(root / 'b', 40, start=40)
    os.symlink('..', root / 'a' / 'loop')  # a/loop/a/loop/... : os.walk followed it ~40 deep
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        train = data.build_dataset(str(root), 8, train=True)
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert 'loop' in str(caught[0].message) and str(root / 'a' / 'loop') in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        val = data.build_dataset(str(root), 8, train=False)
        listed = data.list_images(str(root))[0]
    tr, va = real(p for p, _ in train.samples), real(p for p, _ in val.samples)
    assert len(listed) == len(set(real(listed))) == 80  # each real file once
    assert len(tr) == len(set(tr)) == 78 and len(va) == 2 and not set(tr) & set(va)
    assert all(os.path.realpath(p) == p for p, _ in train.samples)  # the real paths are kept
    assert [y for _, y in train.samples] == [0] * 39 + [1] * 39  # b's files keep label b


def test_data_train_link_to_a_val_image_is_not_trained_on(tmp_path):
    root = tmp_path / 'tv'
    for split, start in (('train', 0), ('val', 100)):
        for cls in ('a', 'b'):
            save_images(root / split / cls, 3, start)
    os.symlink('../../val/a/100.png', root / 'train' / 'a' / 'leak.png')  # a file link
    os.symlink('../../val/b', root / 'train' / 'b' / 'more')  # a folder link
    os.link(root / 'val' / 'a' / '101.png', root / 'train' / 'a' / 'hard.png')  # a hard link
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        train = data.build_dataset(str(root), 8, train=True)
    val = data.build_dataset(str(root), 8, train=False)
    va = {os.stat(p)[1:3] for p, _ in val.samples}  # (inode, device)
    assert len(val) == 6 and not {os.stat(p)[1:3] for p, _ in train.samples} & va
    assert len(train) == 6 and all('val' not in os.path.relpath(p, root) for p, _ in train.samples)
    assert len(caught) == 1 and 'leak.png' in str(caught[0].message)  # named, left out


def make_three_bad(root):
    """5 good images; a truncated PNG, an empty .jpg and a .png that is text."""
    save_images(root, 5)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
    Image.fromarray(noise).save(root / '001b.png')
    raw = (root / '001b.png').read_bytes()
    (root / '001b.png').write_bytes(raw[:len(raw) // 2])
    (root / '002b.jpg').write_bytes(b'')
    (root / '004b.png').write_text('not an image at all')
    return [str(root / n) for n in ('001b.png', '002b.jpg', '004b.png')]


def test_data_bad_files_counted_and_warned_once_over_epochs_and_workers(tmp_path):
    bad_paths = make_three_bad(tmp_path / 'bad')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ds = data.ImageFolder(str(tmp_path / 'bad'), 8, train=False, mid_reso=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        bad = data.BadFiles(ds)
        for epoch in range(2):
            for x, _, b in torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2):
                assert x.shape[1:] == (3, 8, 8) and b.shape == (len(x), 2)
                bad.update(b)
    messages = sorted(str(w.message) for w in caught)
    assert len(bad.paths) == 3 and len(messages) == 3, messages
    assert all(p in m for p, m in zip(bad_paths, messages))
    assert 'Error' in messages[0] and 'Error' in messages[2]  # the reason is given
    assert bad.sync() == sorted(bad_paths)  # one process: the merge is this process's files
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        resumed = data.BadFiles(ds, bad.sync())  # resumed from a checkpoint: no new warning
        resumed.update(torch.tensor([[2, 1], [6, 1]]))  # 001b.png and 004b.png again
        old = data.BadFiles(ds, 11)  # an older checkpoint's int of decode attempts
    assert len(resumed.paths) == 3 and len(caught) == 1 and len(old.paths) == 1  # 0-byte file
    assert data.ProceduralDataset(4, 16)[3][2].tolist() == [3, 0]


def test_data_sample_reports_the_run_of_bad_files_it_skipped(tmp_path):
    save_images(tmp_path / 'r', 5)
    for name in ('001.png', '002.png', '004.png'):
        (tmp_path / 'r' / name).write_text('not an image')
    ds = data.ImageFolder(str(tmp_path / 'r'), 8, train=False, mid_reso=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        got = [ds[i][2].tolist() for i in range(5)]
    assert got == [[0, 0], [1, 2], [2, 1], [3, 0], [4, 1]]  # (index, files skipped from it on)
    assert not caught  # the dataset itself never warns: BadFiles does, once per file
    bad = data.BadFiles(ds)
    with pytest.warns(UserWarning) as caught:
        bad.update(torch.tensor(got))
    assert len(bad.paths) == len(caught) == 3


def test_data_a_class_folder_linked_into_another_keeps_its_own_label(tmp_path):
    root = tmp_path / 'c'
    save_images(root / 'cat', 2)
    save_images(root / 'dog', 3, start=10)
    os.symlink('../dog', root / 'cat' / 'dogs')  # a duplicate link to another class
    with pytest.warns(UserWarning, match=r'skipped 1 repeats \(loops, links\)'):
        ds = data.ImageFolder(str(root), 8, train=False, mid_reso=1.0)
    assert [(os.path.basename(os.path.dirname(p)), y) for p, y in ds.samples] == \
        [('cat', 0)] * 2 + [('dog', 1)] * 3


def test_data_empty_class_folder_warns_and_keeps_the_labels(tmp_path):
    for cls, n in (('ant', 2), ('bee', 0), ('cat', 1)):
        os.makedirs(tmp_path / 'c' / cls)
        save_images(tmp_path / 'c' / cls, n)
    (tmp_path / 'c' / 'bee' / 'notes.txt').write_text('no images here')
    with pytest.warns(UserWarning, match=r"without images \(still classes\): \['bee'\]"):
        ds = data.ImageFolder(str(tmp_path / 'c'), 8, train=False, mid_reso=1.0)
    assert ds.class_names == ['ant', 'bee', 'cat'] and ds.num_classes == 3
    assert [y for _, y in ds.samples] == [0, 0, 2]  # cat keeps label 2


def test_data_listing_unchanged_on_plain_folders_and_links_still_followed(tmp_path):
    """Without loops or duplicates, the listing is os.walk(followlinks=True)'s, sorted."""
    root = tmp_path / 'd'
    save_images(root / 'x' / 'deep' / 'er', 2)
    save_images(root / 'x-y', 2, start=5)
    save_images(tmp_path / 'elsewhere', 2, start=9)
    os.symlink(tmp_path / 'elsewhere', root / 'x' / 'linked')  # a folder link: followed
    os.makedirs(root / 'x' / '.hidden')
    save_images(root / 'x' / '.hidden', 1)
    (root / 'x' / 'readme.txt').write_text('hi')
    want = []
    for dirpath, dirnames, files in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith('.')]
        want += [os.path.join(dirpath, f) for f in files if f.endswith('.png')]
    good, other = data.list_images(str(root))[:2]
    assert good == sorted(want) and len(good) == 6 and other == [str(root / 'x' / 'readme.txt')]
    ds = data.ImageFolder(str(root), 8, train=False, mid_reso=1.0)
    assert ds.samples == [(p, 0) for p in sorted(w for w in want if os.sep + 'x' + os.sep in w)] \
        + [(p, 1) for p in sorted(w for w in want if 'x-y' in w)]  # by class, then path


# --- vqvae.py --------------------------------------------------------------------------------

def tiny_vqvae(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
               patch_nums=(1, 2, 3, 4, 6, 8), using_sa=True)
    return vqvae.VQVAE(**{**cfg, **kw}).eval()


def save_vqvae(model, path):
    """A train.py-style tokenizer checkpoint, for VAR and sample.py to load."""
    checkpoint.save(dict(kind='vqvae', config=vqvae.asdict(model.config),
                          model=model.state_dict(), ema=None), str(path))


def images(b=4, res=16, seed=0):
    return torch.rand(b, 3, res, res, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_vqvae_official_key_structure():
    """VQVAE() has exactly the keys and shapes of vae_ch160v4096z32.pth (324 tensors, 108.9M)."""
    with torch.device('meta'):
        model = vqvae.VQVAE()
    listing = [(k, str(tuple(v.shape))) for k, v in model.state_dict().items()]
    ref_file = os.path.join(REFERENCE, 'var_vae_keys.txt')
    if os.path.exists(ref_file):   # the full list, when shared/ is beside the repo
        ref = [tuple(line.split('\t')[:2]) for line in open(ref_file) if not line.startswith('#')]
        assert sorted(listing) == sorted(ref)
    digest = hashlib.sha256('\n'.join(f'{k} {s}' for k, s in listing).encode()).hexdigest()
    assert digest == 'e9fa04ab7ec229689594422d705ea40a71926f493fa8f168b4f964d53a25eebc'
    assert sum(p.numel() for p in model.parameters()) == 108_948_355


def test_vqvae_phi_sharing_matches_official_ticks():
    """4 shared phi over 10 scales: scale k uses phi argmin|tick - k/9| = 0,0,1,1,1,2,2,3,3,3."""
    with torch.device('meta'):
        q = vqvae.VQVAE().quantize
    assert q.phi_index == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert tiny_vqvae(share_quant_resi=0).quantize.phi_index == list(range(6))  # one per scale
    assert tiny_vqvae(share_quant_resi=1).quantize.phi_index == [0] * 6


def test_vqvae_nearest_code_is_brute_force_argmin():
    q = tiny_vqvae().quantize
    z = torch.randn(2, 8, 3, 3)
    brute = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, 8), q.embedding.weight).argmin(1)
    assert torch.equal(q.nearest_code(z).flatten(), brute)


def test_vqvae_idx_to_img_equals_encode_path():
    """Alg. 2 on the tokens of Alg. 1 gives back Alg. 1's f_hat, hence the same image."""
    model, x = tiny_vqvae(), images()
    with torch.no_grad():
        f_hat_ste, _, idx_fwd = model.quantize(model.encode(x))
        idx = model.img_to_idx(x)
        assert all(torch.equal(a, b) for a, b in zip(idx, idx_fwd))
        f_hat = model.quantize.idx_to_fhat(idx, 8)
        torch.testing.assert_close(f_hat, f_hat_ste, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.idx_to_img(idx), model.fhat_to_img(f_hat))
    assert [t.shape for t in idx] == [(4, pn * pn) for pn in (1, 2, 3, 4, 6, 8)]


def test_vqvae_error_falls_as_scales_are_added():
    """With phi = identity and a dense codebook, ||f - f_hat_k|| falls with every scale k."""
    model = tiny_vqvae(z_channels=2, vocab_size=1024, quant_resi=0.0)
    with torch.no_grad():
        f = model.encode(images())
        grid = torch.linspace(-f.abs().max().item(), f.abs().max().item(), 32)
        model.quantize.embedding.weight.copy_(torch.cartesian_prod(grid, grid))
        f_hat, errors = 0.0, []
        for _, _, h in model.quantize.residual_steps(f):
            f_hat = f_hat + h
            errors.append((f - f_hat).square().mean().item())
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.01 * f.square().mean().item()


def test_vqvae_straight_through_and_commitment_gradients():
    """d f_hat_ste / d f = identity; d vq_loss / d f = 2 beta / K sum_k (f - f_hat_k) / numel."""
    q = tiny_vqvae().quantize
    f = torch.randn(2, 8, 8, 8, requires_grad=True)
    g = torch.randn_like(f)
    f_hat, vq_loss, idx = q(f)
    (f_hat * g).sum().backward()
    torch.testing.assert_close(f.grad, g)
    f.grad = None
    q.zero_grad()
    q(f)[1].backward()
    with torch.no_grad():
        f_hats = torch.stack([q.idx_to_fhat(idx[:k + 1], 8) for k in range(6)])
        expected = 2 * q.beta / 6 * (f - f_hats).sum(0) / f.numel()
    torch.testing.assert_close(f.grad, expected, atol=1e-7, rtol=1e-4)
    assert q.embedding.weight.grad.abs().sum() > 0          # the codebook term trains E
    unused = torch.ones(64, dtype=torch.bool)
    unused[torch.cat(idx, 1).unique()] = False
    assert q.embedding.weight.grad[unused].abs().sum() == 0  # only picked codes move


def test_vqvae_teacher_forcing_input_is_downsampled_partial_fhat():
    """Input for scale k+1 = area_down(f_hat_k, pn_{k+1}), f_hat_k = sum of scales <= k; and the
    inference step next_var_input reproduces it scale by scale."""
    model = tiny_vqvae()
    idx = model.img_to_idx(images())
    x = model.idx_to_var_input(idx)
    pns = model.config.patch_nums
    assert x.shape == (4, sum(p * p for p in pns) - 1, 8)
    start, f_hat = 0, torch.zeros(4, 8, 8, 8)
    for k, pn_next in enumerate(pns[1:]):
        partial = model.quantize.idx_to_fhat(idx[:k + 1], 8)
        expected = F.interpolate(partial, size=(pn_next, pn_next), mode='area')
        got = x[:, start:start + pn_next ** 2].transpose(1, 2).reshape(4, 8, pn_next, pn_next)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        h = model.quantize.embedding(idx[k].view(4, pns[k], pns[k])).permute(0, 3, 1, 2)
        f_hat, nxt = model.quantize.next_var_input(k, f_hat, h)
        torch.testing.assert_close(nxt, expected, atol=1e-6, rtol=1e-5)
        start += pn_next ** 2
    h = model.quantize.embedding(idx[-1].view(4, 8, 8)).permute(0, 3, 1, 2)
    f_hat, _ = model.quantize.next_var_input(len(pns) - 1, f_hat, h)
    torch.testing.assert_close(f_hat, model.quantize.idx_to_fhat(idx, 8), atol=1e-6, rtol=1e-5)


def test_vqvae_single_scale_is_a_plain_vqvae():
    model = tiny_vqvae(patch_nums=(8,))
    idx = model.img_to_idx(images())
    assert len(idx) == 1 and idx[0].shape == (4, 64)
    assert model.idx_to_var_input(idx).shape == (4, 0, 8)
    assert model.idx_to_img(idx).shape == (4, 3, 16, 16)


def test_vqvae_wrong_latent_size_is_named():
    with pytest.raises(ValueError, match='patch_nums must end at the latent size'):
        tiny_vqvae().img_to_idx(images(res=32))


def test_vqvae_usage_ema_and_dead_code_reseeding():
    """Hits are recorded in training only; codes unused at every scale get a live residual."""
    model, x = tiny_vqvae(), images(8)
    model(x)                                                    # eval: nothing recorded
    assert model.quantize.ema_vocab_hit_SV.sum() == 0
    model.train()
    _, _, idx = model(x)
    hits = model.quantize.ema_vocab_hit_SV
    assert torch.equal(hits[0], torch.bincount(idx[0].flatten(), minlength=64).float())
    usage = model.quantize.usage()
    assert usage[0] == 100 * (idx[0].unique().numel()) / 64
    used_any = (hits > 0).any(0)
    before = model.quantize.embedding.weight.detach().clone()
    with torch.no_grad():
        f = model.encode(x)
        pool = torch.cat([z.permute(0, 2, 3, 1).reshape(-1, 8)
                          for z, _, _ in model.quantize.residual_steps(f)])
        n = vqvae_train.reseed_dead_codes(model.quantize, f)
    after = model.quantize.embedding.weight.detach()
    assert n == int((~used_any).sum()) > 0
    assert torch.equal(after[used_any], before[used_any])       # live codes untouched
    for row in after[~used_any]:                               # each dead code = a residual
        assert (pool - row).abs().amax(1).min() < 1e-6
    assert torch.equal(model.quantize.usage(), usage)           # not used until picked


def test_vqvae_checkpoint_errors_name_the_problem(tmp_path):
    var_like = {'blocks.0.attn.mat_qkv.weight': torch.zeros(3, 3)}
    torch.save(var_like, tmp_path / 'var.pth')
    with pytest.raises(SystemExit, match='VAR transformer'):
        vqvae.VQVAE.from_checkpoint(tmp_path / 'var.pth')
    torch.save(tiny_vqvae().state_dict(), tmp_path / 'small.pth')   # bare dict = official config
    with pytest.raises(SystemExit, match=r'small.pth does not fit VQVAE\(.*\): \d+ missing .*; '
                       r'\d+ mis-shaped \(encoder.conv_in.weight \(32, 3, 3, 3\) for \(160, 3'):
        vqvae.VQVAE.from_checkpoint(tmp_path / 'small.pth')
    torch.save(dict(kind='var', config={}, model={}), tmp_path / 'other.pt')
    with pytest.raises(SystemExit, match='holds a train.py --model var checkpoint, not a '
                       'train.py --model vqvae'):
        vqvae.VQVAE.from_checkpoint(tmp_path / 'other.pt')
    for foreign in ([1, 2], {'a': 1}):   # a plain list, a dict of no weights: one line each
        torch.save(foreign, tmp_path / 'foreign.pt')
        with pytest.raises(SystemExit, match='foreign.pt'):
            vqvae.VQVAE.from_checkpoint(tmp_path / 'foreign.pt')


def test_vqvae_checkpoint_round_trip_gives_identical_tokens(tmp_path):
    model = tiny_vqvae()
    save_vqvae(model, tmp_path / 'ckpt.pt')
    loaded = vqvae.VQVAE.from_checkpoint(tmp_path / 'ckpt.pt').eval()
    x = images()
    assert all(torch.equal(a, b) for a, b in zip(model.img_to_idx(x), loaded.img_to_idx(x)))


def test_hinge_and_adaptive_gan_weight_formulas():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.25])
    # 1/2 (mean(relu(1 - real)) + mean(relu(1 + fake))) = 1/2 (0.25 + 0.625)
    assert vqvae_train.hinge_d_loss(real, fake).item() == pytest.approx(0.4375)
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    rec, g = (3 * w).sum(), (w * w).sum()   # grads (3, 3) and (2, 4)
    expected = np.hypot(3, 3) / (np.hypot(2, 4) + 1e-4)
    assert vqvae_train.adaptive_gan_weight(rec, g, w).item() == pytest.approx(expected, rel=1e-6)


def test_patch_discriminator_gives_patch_logits():
    d = vqvae_train.PatchDiscriminator(ch=8, n_layers=2)
    out = d(images(2, 32))
    assert out.shape == (2, 1, 6, 6)   # 32 -> 16 -> 8 (stride 2) -> 7 -> 6 (4x4, stride 1)


def test_lpips_loads_official_layout_and_is_a_distance(tmp_path):
    torch.manual_seed(0)
    net = vqvae_train.LPIPS()
    vgg = {f'features.{k}': torch.randn_like(v) * 0.05
           for k, v in net.features.state_dict().items()}
    vgg['classifier.0.weight'] = torch.zeros(1)            # torchvision's file has more: ignored
    lin = {f'lin{i}.model.1.weight': torch.rand_like(p) for i, p in enumerate(net.lins)}
    torch.save(vgg, tmp_path / 'vgg16.pth')
    torch.save(lin, tmp_path / 'lin.pth')
    net.load(tmp_path / 'vgg16.pth', tmp_path / 'lin.pth')
    assert torch.equal(net.features[28].weight, vgg['features.28.weight'])
    assert torch.equal(net.lins[4], lin['lin4.model.1.weight'])
    x, y = images(2, 32, seed=1), images(2, 32, seed=2)
    assert torch.allclose(net(x, x), torch.zeros(2), atol=1e-6)
    assert (net(x, y) > 0).all()
    torch.testing.assert_close(net(x, y), net(y, x))


# --- kmeans.py -------------------------------------------------------------------------------

def blobs(n_per=200, k=5, d=8, sep=20.0, seed=0):
    """k well-separated Gaussian blobs (unit noise) around random centres of norm ~sep."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * sep                            # (k, D)
    x = centres.repeat_interleave(n_per, 0) + torch.randn(k * n_per, d, generator=g)
    return x, torch.arange(k).repeat_interleave(n_per), centres


def test_kmeans_inertia_monotone():
    x = torch.randn(2000, 8, generator=torch.Generator().manual_seed(0)) + 3.0
    km = kmeans.KMeans(16, n_iter=15, tol=0.0, max_points_per_centroid=None).fit(x)
    h = km.inertia_history
    for i in range(1, len(h)):
        if km.n_empty_history[i - 1] == 0:  # Lloyd steps without a split never raise inertia
            assert h[i] <= h[i - 1] * (1 + 1e-9), (i, h)
    assert h[-1] < h[0] and km.inertia_ == h[-1]


def test_kmeans_blobs_recovered():
    x, y, centres = blobs()
    km = kmeans.KMeans(5, n_iter=10).fit(x)
    labels = km.predict(x)
    perm = torch.stack([labels[y == j].mode().values for j in range(5)])      # true -> found
    assert sorted(perm.tolist()) == list(range(5))                            # a bijection
    assert torch.equal(labels, perm[y])                                       # every point
    assert (km.centroids[perm] - centres).norm(dim=1).max() < 0.5


def test_kmeans_assign_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 32, generator=g) + 10.0                             # un-centred
    c = torch.randn(100, 32, generator=g) + 10.0
    km = kmeans.KMeans(100, chunk_size=257)
    km.centroids = c
    labels, sq = km.assign(x)
    d = torch.cdist(x.double(), c.double()) ** 2                              # (N, K)
    top2 = d.topk(2, dim=1, largest=False).values
    clear = (top2[:, 1] - top2[:, 0]) > 1e-4 * top2[:, 0]                     # not a near-tie
    assert torch.equal(labels[clear], d.argmin(1)[clear]) and clear.float().mean() > 0.99
    torch.testing.assert_close(sq.double(), top2[:, 0], rtol=1e-4, atol=1e-3)


def test_kmeans_row_min_and_incremental_sums():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(300, 256, generator=g)
    d[3, 40] = d[3, 200] = d[3].min() - 1                                     # a tie: first wins
    for dd in (d, d[:, :250].contiguous()):  # 250 columns: not a multiple of the run length
        val, idx = kmeans.row_min(dd)
        assert torch.equal(val, dd.min(1).values) and torch.equal(idx, dd.argmin(1))
    # sums updated from the rows that changed cluster = sums over the new assignment
    x = torch.randn(2000, 8, generator=g) + 5.0
    km, sums = kmeans.KMeans(16, chunk_size=300), torch.zeros(16, 8, dtype=torch.float64)
    labels, *_ = km._lloyd_pass(x, (x * x).sum(1), x[:16], None, sums)
    labels2, counts, _, _ = km._lloyd_pass(x, (x * x).sum(1), x[16:32], labels, sums)
    assert (labels2 != labels).any() and counts.sum() == 2000
    direct = torch.zeros(16, 8, dtype=torch.float64).index_add_(0, labels2, x.double())
    torch.testing.assert_close(sums, direct, rtol=1e-5, atol=0)  # fp32 within 65536 rows


def test_kmeans_npy_roundtrip(tmp_path):
    km = kmeans.KMeans(4, n_iter=3).fit(blobs(k=4)[0])
    km.save(tmp_path / 'km.npy')
    a = np.load(tmp_path / 'km.npy')
    assert a.dtype == np.float32 and a.shape == (4, 8)
    km2 = kmeans.KMeans.load(tmp_path / 'km.npy')
    assert torch.equal(km2.centroids, km.centroids)
    x = blobs(k=4, seed=1)[0]
    assert torch.equal(km2.predict(x), km.predict(x))


def test_kmeans_iterator_equals_tensor():
    x = blobs(n_per=300, k=6)[0] + torch.randn(1800, 8)  # subsampled to 6*100, init on 6*16
    kw = dict(n_iter=5, max_points_per_centroid=100, seed=3)
    a = kmeans.KMeans(6, **kw).fit(x)
    b = kmeans.KMeans(6, **kw).fit(iter(x.split(97)))
    c = kmeans.KMeans(6, **kw).fit(x.numpy())
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.centroids, c.centroids)
    assert a.inertia_history == b.inertia_history


def test_kmeans_empty_clusters_split():
    # 3 distinct points repeated: random init picks duplicates, so clusters go empty
    x = (torch.randn(3, 4) + 5.0).repeat(100, 1)                              # (300, 4)
    km = kmeans.KMeans(8, n_iter=5, init='random', tol=0.0).fit(x)
    assert sum(km.n_empty_history) > 0
    assert torch.isfinite(km.centroids).all() and (km.centroids.norm(dim=1) > 1).all()
    # the split itself: empties 0 and 3 take halves of the largest cluster (1), then of 2
    c = torch.randn(4, 4)
    sums, counts = torch.randn(4, 4).double(), torch.tensor([0., 10., 7., 0.]).double()
    sse = torch.tensor([0., 10., 7., 0.]).double()
    new = kmeans.KMeans(4)._update(c, sums * counts[:, None], counts, sse, torch.Generator())
    mean1, mean2 = sums[1].float(), sums[2].float()
    assert torch.isfinite(new).all()
    torch.testing.assert_close((new[0] + new[1]) / 2, mean1)                  # symmetric split
    assert 0 < (new[0] - new[1]).norm() < 0.1
    torch.testing.assert_close((new[3] + new[2]) / 2, mean2)                  # next largest


def test_kmeans_spherical_unit_norm():
    x = blobs(k=4, sep=3.0)[0]
    km = kmeans.KMeans(4, n_iter=5, spherical=True).fit(x)
    torch.testing.assert_close(km.centroids.norm(dim=1), torch.ones(4))
    cos = torch.nn.functional.normalize(x, dim=1) @ km.centroids.T            # (N, K)
    assert (km.predict(x) == cos.argmax(1)).float().mean() > 0.999


def test_kmeans_tf32_off_inside_fit(monkeypatch):
    seen, inner = [], kmeans.assign_chunk
    def spy(*a):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return inner(*a)
    monkeypatch.setattr(kmeans, 'assign_chunk', spy)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True  # as train.py does on CUDA
        km = kmeans.KMeans(4, n_iter=2).fit(blobs(k=4)[0])
        km.predict(blobs(k=4)[0])
        assert seen and not any(seen)                 # off in every fit/predict matmul
        assert torch.backends.cuda.matmul.allow_tf32  # and restored afterwards
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def test_kmeans_tol_stops_early():
    x = blobs()[0]
    km = kmeans.KMeans(5, n_iter=50, tol=1e-3).fit(x)
    assert len(km.inertia_history) < 10
    assert len(kmeans.KMeans(5, n_iter=4, tol=-1.0).fit(x).inertia_history) == 4  # n_iter passes


def test_kmeans_deterministic_seed():
    x = torch.randn(1000, 8, generator=torch.Generator().manual_seed(0))
    a, b = (kmeans.KMeans(10, n_iter=5, seed=1).fit(x) for _ in range(2))
    assert torch.equal(a.centroids, b.centroids) and a.inertia_history == b.inertia_history
    assert not torch.equal(a.centroids, kmeans.KMeans(10, n_iter=5, seed=2).fit(x).centroids)


def test_kmeans_bad_input():
    x = torch.randn(50, 4)
    with pytest.raises(ValueError, match='NaN'):
        kmeans.KMeans(3).fit(torch.cat([x, torch.full((1, 4), float('nan'))]))
    with pytest.raises(ValueError, match='larger than'):
        kmeans.KMeans(60).fit(x)
    with pytest.raises(ValueError, match='2-d'):
        kmeans.KMeans(3).fit(x.flatten())
    with pytest.raises(ValueError, match='dimension'):
        kmeans.KMeans(3, n_iter=1).fit(x).predict(torch.randn(5, 7))
    with pytest.raises(ValueError, match='dimension'):
        kmeans.KMeans(3).fit(iter([x, torch.randn(5, 7)]))


def _dist_worker(rank, world, port, path):
    torch.distributed.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}',
                                         rank=rank, world_size=world)
    x = blobs(n_per=150, k=6)[0] + torch.randn(900, 8, generator=torch.Generator().manual_seed(1))
    shard = x[:350] if rank == 0 else x[350:]                                 # uneven shards
    km = kmeans.KMeans(6, n_iter=6, tol=0.0, max_points_per_centroid=80).fit(shard)
    torch.save(km.centroids, f'{path}/c{rank}.pt')
    torch.distributed.destroy_process_group()


def test_kmeans_distributed_equals_single_process():
    with tempfile.TemporaryDirectory() as path:
        port = 29500 + os.getpid() % 1000
        mp.spawn(_dist_worker, args=(2, port, path), nprocs=2, join=True)
        c0, c1 = torch.load(f'{path}/c0.pt'), torch.load(f'{path}/c1.pt')
    x = blobs(n_per=150, k=6)[0] + torch.randn(900, 8, generator=torch.Generator().manual_seed(1))
    single = kmeans.KMeans(6, n_iter=6, tol=0.0, max_points_per_centroid=80).fit(x)
    assert torch.equal(c0, c1)                                                # same on all ranks
    torch.testing.assert_close(c0, single.centroids, rtol=0, atol=1e-5)       # = one process


def test_kmeans_fit_from_given_centroids():
    x, _, _ = blobs()
    c0 = x[:5].clone()
    km = kmeans.KMeans(5, n_iter=0, max_points_per_centroid=None).fit(x, init_centroids=c0)
    assert torch.equal(km.centroids, c0)                    # no update: the given start
    km = kmeans.KMeans(5, n_iter=5, max_points_per_centroid=None).fit(x, init_centroids=c0)
    assert km.inertia_history[-1] <= km.inertia_history[0]
    with pytest.raises(ValueError, match='init_centroids has 4 rows, not 5'):
        kmeans.KMeans(5).fit(x, init_centroids=c0[:4])


# --- kmeans.py: the default init (greedy k-means++, 2 (2 + ln K) trials, on 64 K points) ---

def mixture(n=300, k=6, d=8, seed=0):
    """A small imbalanced Gaussian mixture: k centres ~ N(0, 5^2), weights 1..k, unit noise."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 5                              # (k, D)
    comp = torch.multinomial(torch.arange(1.0, k + 1), n, replacement=True, generator=g)
    return centres[comp] + torch.randn(n, d, generator=g)                     # (n, D)


def greedy_kmeans_pp(x, k, seed, n_trials=None):
    """k-means++ by hand (sklearn's greedy variant), float64, one candidate at a time: c_1 a
    uniform row; then L = 2 (2 + int(ln k)) candidates (the default; sklearn: 2 + int(ln k))
    drawn with P(x) = D(x)^2 / sum D^2 (inverse CDF: the first row whose cumulative D^2 reaches
    u * sum D^2), keeping the one that leaves the smallest potential sum_x min(D(x)^2,
    ||x - cand||^2). Same generator calls as kmeans.py."""
    gen, x64 = torch.Generator().manual_seed(seed), x.double()
    chosen = [int(torch.randint(len(x), (1,), generator=gen))]
    d2 = ((x64 - x64[chosen[0]]) ** 2).sum(1)                                 # D(x)^2 (N,)
    for _ in range(1, k):
        L = n_trials or 2 * (2 + int(math.log(k)))
        u = torch.rand(L, generator=gen, dtype=torch.float64)
        cdf, best = d2.cumsum(0), None
        for ui in u:
            cand = min(int((cdf < ui * cdf[-1]).sum()), len(x) - 1)
            pot = torch.minimum(d2, ((x64 - x64[cand]) ** 2).sum(1))
            if best is None or pot.sum() < best[1].sum():
                best = (cand, pot)
        chosen.append(best[0])
        d2 = best[1]
    return x[chosen]                                                          # (k, D)


def test_kmeans_default_init_is_greedy_kmeans_pp_by_hand():
    x = mixture()                       # 300 points < 64 K: k-means++ runs on all, in data order
    for k, seed in ((6, 0), (10, 3)):
        km = kmeans.KMeans(k, n_iter=0, seed=seed).fit(x)   # n_iter 0: the init itself
        ref = greedy_kmeans_pp(x, k, seed)
        assert torch.equal(km.centroids, ref), (k, seed)
        inertia = torch.cdist(x.double(), ref.double()).pow(2).min(1).values.sum()
        assert math.isclose(km.inertia_, inertia.item(), rel_tol=1e-5)
        assert km.inertia_history == [km.inertia_]


def test_kmeans_init_sample_is_seeded_subset_in_data_order():
    # with K * init_sample_per_centroid < N, k-means++ runs on the S rows of smallest hash key
    # (a seeded uniform subset, the same for tensors, chunks and ranks), kept in data order
    x, k, seed = mixture(), 6, 2
    keys = kmeans._row_keys(torch.arange(len(x)), seed)                       # (N,)
    subset = keys.argsort()[:k * 20].sort().values                            # (S,) data order
    km = kmeans.KMeans(k, n_iter=0, seed=seed, init_sample_per_centroid=20).fit(x)
    assert torch.equal(km.centroids, greedy_kmeans_pp(x[subset], k, seed))
    chunked = kmeans.KMeans(k, n_iter=0, seed=seed, init_sample_per_centroid=20)
    assert torch.equal(chunked.fit(iter(x.split(37))).centroids, km.centroids)


def test_kmeans_default_inertia_never_rises():
    x = mixture(n=1200, k=12, d=16, seed=1)
    km = kmeans.KMeans(24).fit(x)                               # all defaults (tol 1e-4)
    h = km.inertia_history
    assert len(h) >= 3 and h[-1] < h[0] and km.inertia_ == h[-1]
    for i in range(1, len(h)):
        if km.n_empty_history[i - 1] == 0:                      # a split may raise it
            assert h[i] <= h[i - 1] * (1 + 1e-9), (i, h)
    # the first entry is the inertia of the hand-computed k-means++ start
    start = greedy_kmeans_pp(x, 24, 0)
    assert math.isclose(h[0], torch.cdist(x.double(), start.double()).pow(2).min(1).values
                        .sum().item(), rel_tol=1e-5)


def test_kmeans_default_init_settings():
    km = kmeans.KMeans(256)
    assert km.init_sample_per_centroid == 64 and km.n_local_trials == 2 * (2 + 5)  # ln 256 = 5.5
    assert kmeans.KMeans(8192).n_local_trials == 22                               # ln 8192 = 9.01
    assert kmeans.KMeans(256, n_local_trials=3).n_local_trials == 3
    # n_local_trials=1 is plain k-means++ (Arthur & Vassilvitskii): one D^2 draw a step
    x = mixture()
    c = kmeans.KMeans(6, n_iter=0, seed=4, n_local_trials=1).fit(x).centroids
    assert torch.equal(c, greedy_kmeans_pp(x, 6, 4, n_trials=1))


# --- dinov2.py -------------------------------------------------------------------------------

TINY = dict(embed_dim=32, depth=4, num_heads=2, img_size=56)   # 4x4 stored position grid


def _read_keys(path):
    """Reference key file: '# header' then 'name<TAB>(shape)<TAB>dtype' per tensor."""
    keys = {}
    for line in open(path):
        if line.strip() and not line.startswith('#'):
            name, shape = line.split('\t')[:2]
            keys[name] = tuple(int(s) for s in shape.strip('()').split(',') if s.strip())
    return keys


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    m = DINOv2(**{**TINY, **kw}).eval()
    with torch.no_grad():       # non-trivial weights: random gamma, norms, pos_embed, tokens
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


# sha256 of the sorted 'key (shape)' lines of each official list, for clones without shared/
DINOV2_KEY_DIGESTS = {
    'vits14': 'd2688998b6a3fd60dc0099068901cc9ea19e4d5d4d00396efa40e97c6e4c477f',
    'vitb14': '6af41c6986427c4813961bf5f48a37cf0f19337406a5f555b2660e01b13fdc19',
    'vitb14_reg4': '795f3d8884a77380bcb7d630fd1a2600f55f516f5bdd4733063d4a258af104ae',
    'vitl14_reg4': '922c667c88c84a6ea0ab19e65ee2a92bd12967eabae57a01611f85ac2859134a',
}


@pytest.mark.parametrize('name', list(DINOV2_KEY_DIGESTS))
def test_dinov2_keys_match_official(name):
    with torch.device('meta'):
        m = DINOv2(**DINOV2_CONFIGS[name])
    ours = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    path = os.path.join(REFERENCE, f'dinov2_{name}_keys.txt')
    if os.path.exists(path):   # the full list, when shared/ is beside the repo
        assert ours == _read_keys(path)
    listing = sorted(f'{k} {s}' for k, s in ours.items())
    assert hashlib.sha256('\n'.join(listing).encode()).hexdigest() == DINOV2_KEY_DIGESTS[name]


def test_dinov2_vitg14_swiglu_shapes():
    with torch.device('meta'):
        m = DINOv2(**DINOV2_CONFIGS['vitg14_reg4'])
    sd = m.state_dict()
    assert len([k for k in sd if k.endswith('mlp.w12.weight')]) == 40
    assert sd['blocks.0.mlp.w12.weight'].shape == (8192, 1536)   # hidden 4096 (official rule)
    assert sd['blocks.0.mlp.w3.weight'].shape == (1536, 4096)
    assert sd['register_tokens'].shape == (1, 4, 1536)


def test_dinov2_from_checkpoint_infers_variant(tmp_path):
    for name in ['vits14', 'vitb14_reg4']:
        with torch.device('meta'):
            shapes = DINOv2(**DINOV2_CONFIGS[name]).state_dict()
        sd = {k: torch.full(v.shape, i / 1000) for i, (k, v) in enumerate(shapes.items())}
        path = tmp_path / f'{name}.pth'
        torch.save(sd, path)
        m = DINOv2.from_checkpoint(path)
        got = m.config.__dict__
        assert {k: got[k] for k in DINOV2_CONFIGS[name]} == DINOV2_CONFIGS[name], name
        assert got['img_size'] == 518 and not any(p.requires_grad for p in m.parameters())
        assert not any(p.is_meta for p in m.parameters())
        assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())   # every tensor used
        del sd, m


def test_dinov2_from_checkpoint_rejects_wrong_file(tmp_path):
    torch.save({'weight': torch.zeros(3)}, tmp_path / 'other.pth')
    with pytest.raises(ValueError, match='not a DINOv2 state dict'):
        DINOv2.from_checkpoint(tmp_path / 'other.pth')
    sd = _tiny().state_dict()
    sd['blocks.0.attn.qkv.weight'] = torch.zeros(96, 16)          # wrong shape
    sd['blocks.0.extra'] = torch.zeros(1)                         # unexpected key
    del sd['norm.bias']                                           # missing key
    torch.save(sd, tmp_path / 'bad.pth')
    with pytest.raises(ValueError) as e:
        DINOv2.from_checkpoint(tmp_path / 'bad.pth', num_heads=2)
    msg = str(e.value)
    assert 'norm.bias' in msg and 'blocks.0.extra' in msg and 'blocks.0.attn.qkv.weight' in msg
    with pytest.raises(ValueError, match='unknown DINOv2 name'):
        DINOv2.from_checkpoint(tmp_path / 'bad.pth', name='vitx14')


@pytest.mark.parametrize('reg', [0, 4])
def test_dinov2_interpolate_pos_encoding(reg):
    kw = DINOV2_CONFIGS['vits14_reg4' if reg else 'vits14']
    m = DINOv2(**{**TINY, **{k: v for k, v in kw.items() if 'interp' in k or 'reg' in k},
                  'img_size': 518})
    for (H, W), (h, w) in [((224, 224), (16, 16)), ((98, 140), (7, 10)), ((518, 518), (37, 37))]:
        pos = m.interpolate_pos_encoding(torch.zeros(1, 1 + h * w, 32), H, W)
        assert pos.shape == (1, 1 + h * w, 32)
        assert torch.equal(pos[:, 0], m.pos_embed[:, 0])           # cls position kept
    native = m.interpolate_pos_encoding(torch.zeros(1, 1 + 37 * 37, 32), 518, 518)
    assert native is m.pos_embed                                  # returned unchanged
    # a constant grid stays constant under bicubic resizing (weights sum to 1)
    with torch.no_grad():
        m.pos_embed[:, 1:] = 0.5
    pos = m.interpolate_pos_encoding(torch.zeros(1, 1 + 70, 32), 98, 140)
    assert torch.allclose(pos[:, 1:], torch.full_like(pos[:, 1:], 0.5), atol=1e-5)


@pytest.mark.parametrize('reg', [0, 4])
def test_dinov2_get_intermediate_layers(reg):
    m = _tiny(num_register_tokens=reg)
    x = torch.randn(2, 3, 42, 70)                                 # 3x5 patches, non-native
    with torch.no_grad():
        out = m.get_intermediate_layers(x, n=2)
        assert len(out) == 2 and all(o.shape == (2, 15, 32) for o in out)
        lst = m.get_intermediate_layers(x, n=[0, 3], norm=False)
        raw = m.get_intermediate_layers(x, n=[2, 3], norm=False)
        ff = m.forward_features(x)
        assert torch.allclose(out[1], ff['x_norm_patchtokens'], atol=1e-6)   # last = norm(final)
        assert torch.allclose(lst[1], ff['x_prenorm'][:, 1 + reg:], atol=1e-6)
        # norm=True applies the final LayerNorm to the same block outputs
        assert torch.allclose(out[0], m.norm(raw[0]), atol=1e-6)
        assert not torch.allclose(out[0], raw[0], atol=1e-3)
        rs = m.get_intermediate_layers(x, n=[1], reshape=True, return_class_token=True)
        (patches, cls), = rs
        assert patches.shape == (2, 32, 3, 5) and cls.shape == (2, 32)
        flat = m.get_intermediate_layers(x, n=[1])[0]
        assert torch.equal(patches.flatten(2).transpose(1, 2), flat)   # row-major patch order
        # DiGIT's layer: n=[depth-3] equals the first of the last three
        assert torch.equal(m.get_intermediate_layers(x, n=[1])[0],
                           m.get_intermediate_layers(x, n=3)[0])
    for bad in (0, 5, [4], [1, 1]):
        with pytest.raises(ValueError):
            m.get_intermediate_layers(x, n=bad)


def test_dinov2_tiny_deterministic_and_permutation_equivariant():
    m = _tiny()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        a, b = m.forward_features(x), m.forward_features(x)
        assert torch.equal(a['x_prenorm'], b['x_prenorm'])
        assert torch.allclose(_tiny()(x), m(x)) and torch.isfinite(a['x_prenorm']).all()
        # blocks have no positional mixing except attention, which is permutation-equivariant
        t = m.prepare_tokens(x)                                   # (B, T, C)
        perm = torch.randperm(t.shape[1])
        y = t
        for blk in m.blocks:
            y = blk(y)
        y_perm = t[:, perm]
        for blk in m.blocks:
            y_perm = blk(y_perm)
        assert torch.allclose(y[:, perm], y_perm, atol=1e-5)
        # a mask replaces patch embeddings by mask_token
        masks = torch.zeros(2, 16, dtype=torch.bool)
        masks[:, 3] = True
        tm = m.prepare_tokens(x, masks)
        pos = m.interpolate_pos_encoding(tm, 56, 56)
        assert torch.allclose(tm[:, 4], m.mask_token + pos[:, 4], atol=1e-6)


def test_dinov2_swiglu_and_no_layerscale():
    m = _tiny(ffn='swiglu', layerscale=False)
    assert 'blocks.0.ls1.gamma' not in m.state_dict()
    assert m.blocks[0].mlp.w12.weight.shape == (2 * 88, 32)       # (int(128*2/3)+7)//8*8 = 88
    with torch.no_grad():
        blk, t = m.blocks[0], torch.randn(1, 5, 32)
        h = t + blk.attn(blk.norm1(t))
        x1, x2 = blk.mlp.w12(blk.norm2(h)).chunk(2, -1)
        ref = h + blk.mlp.w3(torch.nn.functional.silu(x1) * x2)
        assert torch.allclose(blk(t), ref, atol=1e-6)
    assert tokenizer.IMAGENET_MEAN == (0.485, 0.456, 0.406)


# --- tokenizer.py (the DiGIT tokenizer, the stand-in encoder, stability) ---------------------

def _tokenizer(k=6, seed=0):
    """A fitted tokenizer on a tiny random ViT (patch 14, 4x4 stored grid), 56 px images."""
    torch.manual_seed(seed)
    tok = tokenizer.Tokenizer(_tiny(seed), layer=2, resolution=56)
    return tok.fit([images(8, 56, seed=1), images(8, 56, seed=2)], k, n_iter=5)


def test_tokenizer_encode_is_nearest_centroid_of_block_features():
    """features = the ViT's block-`layer` output after the final norm, of the [0, 1] image
    resized to `resolution` (bicubic) and normalised with ImageNet mean/std; encode = argmin
    of the Euclidean distance to the centroids (brute force here)."""
    tok = _tokenizer()
    img = images(3, 40, seed=5)                                              # resized to 56
    x = F.interpolate((img + 1) / 2, size=(56, 56), mode='bicubic', align_corners=False)
    x = (x - torch.tensor(tokenizer.IMAGENET_MEAN).view(1, 3, 1, 1)) / \
        torch.tensor(tokenizer.IMAGENET_STD).view(1, 3, 1, 1)
    blocks = tok.encoder.get_intermediate_layers(x, n=4, norm=True)          # blocks 0..3
    torch.testing.assert_close(tok.features(img), blocks[2], atol=1e-5, rtol=0)
    tokens = tok.encode(img)
    assert tokens.shape == (3, 16) and tokens.dtype == torch.int64
    brute = torch.cdist(blocks[2].reshape(-1, 32).double(), tok.centroids.double()).argmin(1)
    assert torch.equal(tokens.flatten(), brute)
    assert len(tokens.unique()) > 1   # not a degenerate codebook
    f = torch.randn(4000, 32)   # random features: many near-ties, which bf16 would flip
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert torch.equal(tok.nearest(f), torch.cdist(f.double(), tok.centroids.double())
                           .argmin(1))


def test_tokenizer_save_load_round_trip_identical_tokens(tmp_path):
    tok = _tokenizer()
    tok.save(str(tmp_path / 'tok.pt'))
    back = tokenizer.Tokenizer.load(str(tmp_path / 'tok.pt'))
    img = images(4, 56, seed=7)
    assert torch.equal(back.encode(img), tok.encode(img))
    assert torch.equal(back.centroids, tok.centroids)
    assert (back.layer, back.resolution, back.vocab_size, back.grid) == (2, 56, 6, 4)
    torch.save({'kind': 'var'}, tmp_path / 'other.pt')
    with pytest.raises(SystemExit, match='not a tokenizer'):
        tokenizer.Tokenizer.load(str(tmp_path / 'other.pt'))


def test_tokenizer_errors_name_the_problem():
    vit = _tiny()
    with pytest.raises(ValueError, match='layer 4 is not a block'):
        tokenizer.Tokenizer(vit, layer=4, resolution=56)
    with pytest.raises(ValueError, match='not a multiple of patch 14'):
        tokenizer.Tokenizer(vit, layer=1, resolution=50)
    with pytest.raises(ValueError, match=r'expected \[K, 32\]'):
        tokenizer.Tokenizer(vit, layer=1, resolution=56, centroids=torch.zeros(8, 768))
    with pytest.raises(RuntimeError, match='no centroids'):
        tokenizer.Tokenizer(vit, layer=1, resolution=56).encode(images(1, 56))


def test_tokenizer_cli_loads_dinov2_pth_and_released_centroids(tmp_path):
    """`fit --encoder dinov2.pth --centroids km.npy`: DiGIT's recipe (block depth-3, 224 px,
    pos_embed offset 0.1 without antialias even for registers) and the [K, C] file as is."""
    vit = _tiny(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)
    torch.save(vit.state_dict(), tmp_path / 'dinov2_reg4.pth')       # an official-layout file
    km = np.random.default_rng(0).standard_normal((10, 32)).astype(np.float32)
    np.save(tmp_path / 'km.npy', km)
    tokenizer.main(['fit', '--encoder', str(tmp_path / 'dinov2_reg4.pth'), '--centroids',
                    str(tmp_path / 'km.npy'), '--out', str(tmp_path / 'tok.pt')])
    tok = tokenizer.Tokenizer.load(str(tmp_path / 'tok.pt'))
    assert (tok.layer, tok.resolution, tok.grid) == (1, 224, 16)
    cfg = tok.encoder.config
    assert (cfg.num_register_tokens, cfg.interpolate_offset, cfg.interpolate_antialias) == \
        (4, 0.1, False)
    assert np.array_equal(tok.centroids.numpy(), km)
    assert tok.encode(images(1, 64)).shape == (1, 256)
    np.save(tmp_path / 'bad.npy', km[:, :16])
    with pytest.raises(SystemExit, match=r'\(10, 16\) do not fit'):
        tokenizer.main(['fit', '--encoder', str(tmp_path / 'dinov2_reg4.pth'), '--centroids',
                        str(tmp_path / 'bad.npy'), '--out', str(tmp_path / 'bad.pt')])


def test_crop_views_and_matching_points_agree_with_the_pixels():
    """On a linear image (bilinear resampling is exact on it): a view shows image point
    scale * u + shift at u, and view 1 sampled at matching_points equals view 2 at its patch
    centres wherever both views see the point (flips included)."""
    n, H = 4, 32
    ys, xs = torch.meshgrid(*(((torch.arange(H) + 0.5) / H * 2 - 1,) * 2), indexing='ij')
    img = torch.stack([xs, ys, 0.3 * xs - 0.7 * ys]).unsqueeze(0).repeat(5, 1, 1, 1)  # (5,3,H,W)
    g = torch.Generator().manual_seed(0)
    s = 0.5 + 0.5 * torch.rand(2, 5, generator=g)
    scale = torch.stack([s * torch.tensor([[1, -1, 1, -1, 1.]] * 2), s], -1)          # (2,5,2)
    shift = (1 - s).unsqueeze(-1) * (2 * torch.rand(2, 5, 2, generator=g) - 1)
    views = [standin.crop_views(img, scale[v], shift[v]) for v in (0, 1)]
    p, inside = standin.matching_points(scale, shift, n)                   # (5, 16, 2)
    c = (2 * torch.arange(n) + 1) / n - 1
    cy, cx = torch.meshgrid(c, c, indexing='ij')
    u = torch.stack([cx, cy], -1).view(1, n * n, 1, 2).expand(5, -1, -1, -1)
    at = lambda x, q: F.grid_sample(x, q, align_corners=False)[..., 0]       # (5, 3, 16)
    torch.testing.assert_close(at(views[1], u), at(img, scale[1, :, None, None] * u
                                                   + shift[1, :, None, None]), atol=1e-5, rtol=0)
    both = at(views[0], p.unsqueeze(2)) - at(views[1], u)                    # (5, 3, 16)
    interior = (p.abs() <= 1 - 1 / H).all(-1)   # half a pixel in: no border padding involved
    assert interior.float().mean() > 0.3 and not (interior & ~inside).any()
    assert both.abs().amax(1)[interior].max() < 1e-5


def test_info_nce_formula_and_mask():
    a = F.normalize(torch.randn(6, 4), dim=1)
    b = F.normalize(torch.randn(6, 4), dim=1)
    loss, acc = standin.info_nce(a, b, 0.5)
    logits = a @ b.T / 0.5
    manual = -(logits.diag() - logits.logsumexp(1)).mean() / 2 \
        - (logits.diag() - logits.logsumexp(0)).mean() / 2
    torch.testing.assert_close(loss, manual)
    assert acc == (logits.argmax(1) == torch.arange(6)).float().mean()
    all_but_diagonal = ~torch.eye(6, dtype=torch.bool)
    assert standin.info_nce(a, b, 0.5, all_but_diagonal)[0] == 0   # no negatives left
    assert standin.info_nce(a, a, 0.01)[1] == 1                     # self-retrieval


def test_contrastive_vit_loss_falls_and_views_are_reproducible():
    torch.manual_seed(0)
    m = standin.ContrastiveViT(embed_dim=32, depth=2, num_heads=1, patch_size=8)
    img = images(8, 32, seed=3)
    g = lambda: torch.Generator().manual_seed(1)
    v1, v2 = standin.random_views(img, 0.5, g()), standin.random_views(img, 0.5, g())
    assert all(torch.equal(x, y) for x, y in zip(v1, v2))
    assert v1[0].shape == (16, 3, 32, 32) and v1[0].abs().max() <= 1
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    losses = []
    for _ in range(15):
        loss, parts = m(img, g())     # the same views: the loss must fall
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert set(parts) == {'glob', 'patch', 'acc_g', 'acc_p'}


def test_add_noise_has_the_requested_snr():
    img = images(2, 64, seed=0)
    for snr in (20, 0.01):
        noise = (tokenizer.add_noise(img, snr, torch.Generator().manual_seed(0)) - img) / 2
        signal = ((img + 1) / 2).pow(2).mean((1, 2, 3))
        measured = 10 * torch.log10(signal / noise.pow(2).mean((1, 2, 3)))
        torch.testing.assert_close(measured, torch.full((2,), float(snr)), atol=0.1, rtol=0)


def test_stability_counts_token_changes_and_cosines():
    """A fake encoder whose tokens are the sign of the pixels: no noise -> change 0, cos 1;
    the change rate equals the flipped-sign fraction computed by hand; more noise, more change."""
    fn = lambda x: (x.flatten(1).unsqueeze(-1).repeat(1, 1, 2), (x.flatten(1) > 0).long())
    img = images(4, 16, seed=1)
    r = tokenizer.stability({'sign': fn}, [img], snrs=(300, 10, 0.01), seed=3)['sign']
    assert r['change'][0] == 0 and abs(r['cos'][0] - 1) < 1e-6
    g = torch.Generator().manual_seed(3)
    noisy = [tokenizer.add_noise(img, s, g) for s in (300, 10, 0.01)]
    assert abs(r["change"][1] - ((noisy[1] > 0) != (img > 0)).double().mean().item()) < 1e-12
    assert r['change'][1] < r['change'][2] and r['cos'][1] > r['cos'][2]


def test_stability_cli_prints_table(tmp_path, capsys):
    tok = _tokenizer()
    tok.save(str(tmp_path / 'tok.pt'))
    save_vqvae(tiny_vqvae(), tmp_path / 'vae.pt')
    table = tokenizer.main(['stability', '--tokenizer', str(tmp_path / 'tok.pt'), '--vae',
                            str(tmp_path / 'vae.pt'), '--images', '6'])
    out = capsys.readouterr().out
    assert 'VQ token change' in out and 'DiGIT cos-sim' in out and '0.01' in out
    assert set(table) == {'VQ', 'DiGIT'} and len(table['VQ']['change']) == 8


TOKENIZER_DDP_WORKER = '''
import os, sys, torch
sys.path.insert(0, {repo!r})
import torch.distributed as dist, standin, tokenizer
dist.init_process_group('gloo')
rank = dist.get_rank()
torch.manual_seed(0)
vit = standin.ContrastiveViT(embed_dim=32, depth=3, num_heads=1, patch_size=8).vit
tok = tokenizer.Tokenizer(vit, layer=0, resolution=32)
imgs = torch.load({imgs!r})
tok.fit([imgs[rank::2]], 8, n_iter=6)
torch.save(tok.centroids, os.path.join({out!r}, f'rank{{rank}}.pt'))
dist.destroy_process_group()
'''


def test_tokenizer_fit_over_two_ranks(tmp_path):
    """torchrun, 2 gloo ranks each with half of the images: both ranks end with the same
    centroids, as good (inertia over all features within 3%) as one process on all images."""
    imgs = images(16, 32, seed=4)
    torch.save(imgs, tmp_path / 'imgs.pt')
    script = tmp_path / 'worker.py'
    script.write_text(TOKENIZER_DDP_WORKER.format(repo=REPO, imgs=str(tmp_path / 'imgs.pt'),
                                                  out=str(tmp_path)))
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                    '--nproc_per_node', '2', str(script)], check=True, env=env, timeout=300,
                   cwd=tmp_path)
    c0, c1 = (torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in (0, 1))
    assert torch.equal(c0, c1)
    torch.manual_seed(0)
    vit = standin.ContrastiveViT(embed_dim=32, depth=3, num_heads=1, patch_size=8).vit
    one = tokenizer.Tokenizer(vit, layer=0, resolution=32).fit([imgs], 8, n_iter=6)
    f = one.features(imgs).flatten(0, 1)                                     # (256, 32)
    inertia = lambda c: torch.cdist(f, c).min(1).values.pow(2).sum()
    assert inertia(c0) < 1.03 * inertia(one.centroids)


# --- gpt.py, var.py ----------------------------------------------------------------------------

def tiny_var(vae=None, **kw):
    vae = vae or tiny_vqvae()
    torch.manual_seed(0)   # init_adaln_gamma 1: blocks far from the identity, so tests can fail
    cfg = dict(depth=2, num_classes=10, patch_nums=vae.config.patch_nums, init_adaln_gamma=1.0)
    return var.VAR(vae, **{**cfg, **kw}).eval()


def key_listing(model):
    return sorted((k, str(tuple(v.shape))) for k, v in model.state_dict().items())


def test_var_d16_and_d36_official_key_structure():
    """Built on the meta device: d16 has the 220 tensors (310.28M params) of var_d16.pth, and
    d36 (shared AdaLN, 512 px scales) the 446 tensors (2353.89M) of var_d36.pth."""
    with torch.device('meta'):
        d16 = var.VAR(vqvae.VQVAE(), depth=16)
        pn512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
        d36 = var.VAR(vqvae.VQVAE(patch_nums=pn512), depth=36, patch_nums=pn512, shared_aln=True)
    assert (len(d16.state_dict()), sum(p.numel() for p in d16.parameters())) == (220, 310_283_520)
    assert (len(d36.state_dict()), sum(p.numel() for p in d36.parameters())) == (446,
                                                                                 2_353_893_904)
    assert d16.state_dict()['lvl_1L'].dtype == torch.int64
    for model, name, every_block in ((d16, 'var_d16_keys.txt', True),
                                     (d36, 'var_d36_keys.txt', False)):
        path = os.path.join(REFERENCE, name)
        if os.path.exists(path):   # d36's list shows blocks.0 only: the others repeat it
            ref = [tuple(line.rstrip().split('\t')[:2]) for line in open(path) if line[0] != '#']
            ours = [kv for kv in key_listing(model) if every_block
                    or not kv[0].startswith('blocks.') or kv[0].startswith('blocks.0.')]
            assert ours == sorted(ref)


def test_var_block_causal_mask():
    """Eq. 6: changing the input of scale k+1 leaves the logits of scales <= k unchanged,
    while every token of scale k+1 sees the change (tokens of one scale see each other)."""
    model = tiny_var()
    vae = model.vae[0]
    idx = vae.img_to_idx(images())
    x, labels = vae.idx_to_var_input(idx), torch.tensor([0, 1, 2, 3])
    ref = model(labels, x)
    for k in range(1, len(model.patch_nums)):
        start, end = model.begin_ends[k]
        x2 = x.clone()
        x2[:, start - 1] += 1.0            # first input token of scale k (x lacks position 0)
        out = model(labels, x2)
        assert torch.equal(out[:, :start], ref[:, :start]), k
        assert ((out[:, start:end] - ref[:, start:end]).abs().amax(-1) > 1e-6).all(), k


def test_var_flex_attention_block_mask_equals_the_dense_mask():
    """--attn flex: Eq. 6 as a FlexAttention BlockMask gives the logits of the dense additive
    mask (eager flex on CPU, forward only: its backward is GPU-only; compiled on a GPU it skips
    the masked blocks), also for a prefix of the scales; the mask is built once per length."""
    model = tiny_var()
    vae = model.vae[0]
    x, labels = vae.idx_to_var_input(vae.img_to_idx(images())), torch.tensor([0, 1, 2, 3])
    outs = []
    for impl in ('sdpa', 'flex'):
        model.attn_impl = impl
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter('ignore')   # flex without torch.compile: unfused, warned
            outs.append((model(labels, x), model(labels, x[:, :4])))   # all; scales 1x1, 2x2
    for ref, flex in zip(*outs):
        torch.testing.assert_close(flex, ref, atol=1e-5, rtol=0)
    assert sorted(n for n, _ in model.block_masks) == [5, model.L]


def test_bench_loads_the_official_var_beside_ours(tmp_path):
    """bench.py --official: a checkout laid out as FoundationVision/VAR's (models/ importing its
    own top-level `dist` and huggingface_hub, build_vae_var switching nn init off for the
    process) loads holding our weights; afterwards `dist` is ours, nn init is back, nothing of
    it stays in sys.modules. A folder that is not a checkout, or no GPU for --gpu, is one line."""
    (tmp_path / 'models').mkdir()
    (tmp_path / 'dist.py').write_text("def get_device():\n    return 'theirs'\n")
    (tmp_path / 'models' / 'var.py').write_text('from var import VAR\nfrom vqvae import VQVAE\n')
    (tmp_path / 'models' / '__init__.py').write_text(
        'import torch.nn as nn\nimport dist\nfrom huggingface_hub import PyTorchModelHubMixin\n'
        'from .var import VAR, VQVAE\n\n\n'
        'def build_vae_var(device, patch_nums, V, Cvae, ch, num_classes, depth, shared_aln,\n'
        '                  attn_l2_norm):\n'
        "    assert dist.get_device() == 'theirs'\n"
        '    for clz in (nn.Linear, nn.LayerNorm, nn.Conv2d, nn.BatchNorm2d):\n'
        "        setattr(clz, 'reset_parameters', lambda self: None)\n"
        '    vae = VQVAE(vocab_size=V, z_channels=Cvae, ch=ch, ch_mult=(1, 2), num_res_blocks=1,\n'
        '                patch_nums=patch_nums, using_sa=True)\n'
        '    return vae, VAR(vae, depth=depth, num_classes=num_classes, patch_nums=patch_nums,\n'
        '                    shared_aln=shared_aln, attn_l2_norm=attn_l2_norm).to(device)\n')
    model = tiny_var()
    before, linear_init = set(sys.modules), torch.nn.Linear.reset_parameters
    ref = bench.load_official(str(tmp_path), model.vae[0], model, 'cpu')
    assert ref is not model
    for (k, a), (k2, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    for (k, a), b in zip(model.vae[0].state_dict().items(), ref.vae[0].state_dict().values()):
        assert torch.equal(a, b), k
    assert set(sys.modules) == before and sys.modules['dist'] is dist
    assert torch.nn.Linear.reset_parameters is linear_init
    assert 'reset_parameters' not in torch.nn.Conv2d.__dict__   # inherited again
    assert torch.nn.Linear(64, 64).weight.abs().max() > 0      # initialised, not empty
    with pytest.raises(SystemExit, match=r'^--official \S*nowhere: not a .*models/var.py'):
        bench.load_official(str(tmp_path / 'nowhere'), model.vae[0], model, 'cpu')
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match=r'^--gpu needs a CUDA device'):
            bench.bench_gpu(argparse.Namespace(official=''))


def test_bf16_on_a_cpu_without_native_bf16_gets_a_note(tmp_path, monkeypatch, capsys):
    """cpu_has_native_bf16 reads the flags of /proc/cpuinfo (None without them); training_run
    notes, in one line, that --dtype bfloat16 is slower on a CPU that only emulates it."""
    info = tmp_path / 'cpuinfo'
    for flags, native in (('fpu avx2 avx512f', False), ('avx512f avx512_bf16', True),
                          ('amx_bf16 amx_tile', True)):
        info.write_text(f'processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\n')
        assert dist.cpu_has_native_bf16(str(info)) is native
    info.write_text('Features\t: fp asimd bf16\n')   # ARM names no x86 flags: unknown
    assert dist.cpu_has_native_bf16(str(info)) is None
    assert dist.cpu_has_native_bf16(str(tmp_path / 'absent')) is None
    for native, noted in ((False, True), (True, False), (None, False)):
        monkeypatch.setattr(dist, 'cpu_has_native_bf16', lambda native=native: native)
        run = dist.training_run(train.get_args(['--device', 'cpu', '--dtype', 'bfloat16']))
        assert (capsys.readouterr().out.count('slower than float32') == 1) is noted
        with run.autocast:
            assert torch.get_autocast_dtype('cpu') is torch.bfloat16


def test_default_dtype_is_bf16_only_where_it_is_native(monkeypatch):
    """Without --dtype: bfloat16 on CUDA and on a CPU with avx512_bf16 or amx_bf16, float32 on a
    CPU without them, on one whose flags are unknown, and on Apple MPS."""
    monkeypatch.undo()   # the real default, not the suite's float32
    for native, dtype in ((True, 'bfloat16'), (False, 'float32'), (None, 'float32')):
        monkeypatch.setattr(dist, 'cpu_has_native_bf16', lambda native=native: native)
        assert dist.default_dtype('cpu') == dtype
        assert dist.default_dtype('cuda') == 'bfloat16' and dist.default_dtype('mps') == 'float32'
        args = train.get_args(['--device', 'cpu'])
        with dist.training_run(args).autocast:
            assert args.dtype == dtype and torch.is_autocast_enabled('cpu') is (native is True)


def test_compile_on_cpu_steps_as_eager_and_without_a_compiler_trains_eagerly(monkeypatch,
                                                                             capsys):
    """--compile on CPU: inductor's C++ gives a tiny GPT's training loss and gradients to
    float32 rounding (its random class dropout drawn as eager draws it); with no C++ compiler
    (hidden from torch's search), train.py says so in one line and trains eagerly."""
    monkeypatch.setattr(torch._inductor.config, 'fallback_random', True)
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = gpt.GPT(vocab_size=16, block_size=4, depth=1, num_classes=2,
                        cond_drop_rate=0.5)
        step = torch.compile(model) if compiled else model
        idx, labels = torch.randint(0, 16, (4, 4)), torch.tensor([0, 1, 0, 1])
        loss = F.cross_entropy(step(idx, labels).flatten(0, 1), idx.flatten())
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (loss_e, grads_e), (loss_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for g_c, g_e in zip(grads_c, grads_e):
        torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-6)
    args = train.get_args(['--device', 'cpu', '--compile'])
    dist.training_run(args)
    assert args.compile is True and 'note' not in capsys.readouterr().out
    monkeypatch.setattr(torch._inductor.config.cpp, 'cxx', ('no-such-compiler++',))
    torch._dynamo.reset()   # forget the probe compiled above
    dist.training_run(args)
    out = capsys.readouterr().out
    assert args.compile is False and out.count('\n') == 1
    assert out.startswith('note: --compile needs a C++ compiler') and 'no-such-compiler' in out


def test_fused_adamw_flag_steps_as_the_default_adamw():
    """--fused_adamw (default on with CUDA, off elsewhere) gives train.py the fused AdamW
    kernel; its step moves the weights as the default (foreach) AdamW does, to fp32 rounding."""
    args = train.get_args(['--device', 'cpu', '--lr', '0.01', '--weight_decay', '0.1'])
    dist.training_run(args)
    assert args.fused_adamw is False
    weights = []
    for fused in (False, True):
        args.fused_adamw = fused
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
        opt = train.make_optimizer(net, args)
        assert opt.defaults['fused'] is fused
        for _ in range(3):
            net(torch.randn(4, 8)).square().sum().backward()
            opt.step()
            opt.zero_grad()
        weights.append([p.detach() for p in net.parameters()])
    for before, fused in zip(*weights):
        torch.testing.assert_close(fused, before, rtol=1e-5, atol=1e-6)


def test_var_kv_cache_sampling_equals_full_recompute_and_cfg():
    """Greedy tokens drawn scale by scale with the kv cache equal the argmax of the
    teacher-forced logits recomputed from scratch; with cfg the recompute combines the
    conditional and null-class passes as (1 + t) c - t u, t = cfg * k / (K - 1); cfg 0 is the
    conditional model alone."""
    model = tiny_var()
    labels, null = torch.tensor([0, 3, 7, 9]), torch.full((4,), 10)
    K = len(model.patch_nums)
    for cfg in (0.0, 2.0):
        tokens, _ = model.sample_tokens(labels, cfg=cfg, top_k=1)
        x = model.vae[0].idx_to_var_input(tokens)
        cond, uncond = model(labels, x), model(null, x)
        for k, (start, end) in enumerate(model.begin_ends):
            t = cfg * k / (K - 1)
            guided = (1 + t) * cond[:, start:end] - t * uncond[:, start:end]
            assert torch.equal(guided.argmax(-1), tokens[k]), (cfg, k)


def test_var_adaln_blocks_start_near_identity():
    """With the official init (gates x 1e-5) every block starts as (almost) the identity."""
    model = tiny_var(init_adaln_gamma=1e-5)
    h, cond = torch.randn(2, model.L, model.width), torch.randn(2, model.width)
    for block in model.blocks:
        out = block(h, cond, model.attn_bias_for_masking)
        assert (out - h).abs().max() < 1e-3 * h.abs().max()


def test_var_sampling_is_seeded_and_filtered():
    model, labels = tiny_var(), torch.tensor([1, 2])
    a, _ = model.sample_tokens(labels, cfg=1.5, top_k=20, top_p=0.9, seed=3)
    b, _ = model.sample_tokens(labels, cfg=1.5, top_k=20, top_p=0.9, seed=3)
    c, _ = model.sample_tokens(labels, cfg=1.5, top_k=20, top_p=0.9, seed=4)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))
    greedy = [model.sample_tokens(labels, cfg=1.5, top_k=1, seed=s)[0] for s in (0, 1)]
    assert all(torch.equal(u, v) for u, v in zip(*greedy))
    img = model.generate(labels, cfg=4.0, top_k=20, top_p=0.9, seed=0, more_smooth=True)
    assert img.shape == (2, 3, 16, 16) and 0 <= img.min() and img.max() <= 1


def test_top_k_top_p_filter_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    kept = transformer.top_k_top_p_filter_(logits.clone(), top_k=2).isfinite()
    assert kept.tolist() == [[[False, False, True, True]]]
    p = torch.tensor([0.05, 0.15, 0.3, 0.5])        # top_p 0.75: {0.5, 0.3} reach 0.8
    kept = transformer.top_k_top_p_filter_(p.log()[None, None], top_p=0.75).isfinite()
    assert kept.tolist() == [[[False, False, True, True]]]
    kept = transformer.top_k_top_p_filter_(p.log()[None, None], top_p=0.1).isfinite()
    assert kept.tolist() == [[[False, False, False, True]]]   # the best token always stays
    rng = torch.Generator().manual_seed(0)   # a cold temperature is greedy; a hot one is not
    logits = torch.randn(2, 50, 16)
    cold = transformer.sample(logits.clone(), rng=rng, temperature=1e-4)
    assert torch.equal(cold, logits.argmax(-1))
    assert not torch.equal(transformer.sample(logits.clone(), rng=rng, temperature=10.0), cold)


def test_var_zero_shot_editing_forces_the_kept_tokens():
    """Mask 1 = keep: every token equals the input's; mask 0: only maps of <= 3 tokens."""
    model = tiny_var()
    vae, labels = model.vae[0], torch.tensor([1, 2, 3, 4])
    edit_idx = vae.img_to_idx(images())
    tokens, _ = model.sample_tokens(labels, top_k=50, seed=0, edit_idx=edit_idx,
                                    edit_mask=torch.ones(4, 16, 16))
    assert all(torch.equal(a, b) for a, b in zip(tokens, edit_idx))
    tokens, _ = model.sample_tokens(labels, top_k=50, seed=0, edit_idx=edit_idx,
                                    edit_mask=torch.zeros(4, 16, 16))
    assert torch.equal(tokens[0], edit_idx[0])
    assert sum(torch.equal(a, b) for a, b in zip(tokens[1:], edit_idx[1:])) == 0


def test_var_official_layout_checkpoint_round_trip(tmp_path):
    """A bare state dict (the official format) loads with the architecture read off it."""
    model = tiny_var(attn_l2_norm=False)
    torch.save(model.state_dict(), tmp_path / 'var.pth')
    loaded = var.VAR.from_checkpoint(tmp_path / 'var.pth', model.vae[0]).eval()
    assert loaded.config.depth == 2 and not loaded.config.attn_l2_norm
    x = model.vae[0].idx_to_var_input(model.vae[0].img_to_idx(images()))
    labels = torch.tensor([0, 1, 2, 3])
    assert torch.equal(loaded(labels, x), model(labels, x))
    torch.save(tiny_vqvae().state_dict(), tmp_path / 'vae.pth')
    with pytest.raises(SystemExit, match='not a VAR checkpoint'):
        var.VAR.from_checkpoint(tmp_path / 'vae.pth', model.vae[0])


# --- gpt.py: DiGIT's GPT, stage 2, linear probe ------------------------------------------

GV, GL, GNC = 16, 10, 5   # DiGIT GPT tests: vocabulary, tokens per image, classes


def tiny_gpt(**kw):
    """A depth-2 GPT, its weights perturbed so no block is near the identity (tests can fail)."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=GV, block_size=GL, depth=2, n_embd=32, n_head=2, num_classes=GNC)
    model = gpt.GPT(**{**cfg, **kw}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def gpt_tokens(B=4, seed=1):
    return torch.randint(0, GV, (B, GL), generator=torch.Generator().manual_seed(seed))


LABELS = torch.tensor([0, 2, 4, 1])
CONDS = ['token', 'adaln']


def test_gpt_config_depth_dial_and_official_size():
    """Width 64 * depth and heads = depth unless overridden; the default (DiGIT base: d16,
    1024 wide, GV 8192, 1000 classes) has ~219M parameters like the released 219M model."""
    with torch.device('meta'):
        model = gpt.GPT()
        assert (model.config.n_embd, model.config.n_head) == (1024, 16)
        assert 219e6 < sum(p.numel() for p in model.parameters()) < 220e6
        assert gpt.GPT(depth=3, n_head=4, cond='adaln').config.n_embd == 192
    with pytest.raises(ValueError, match='cond'):
        gpt.GPT(depth=1, cond='cross')


@pytest.mark.parametrize('cond', CONDS)
def test_gpt_causal_mask_output_at_t_ignores_inputs_after_t(cond):
    """Position t predicts idx[t] from idx[:t]: changing idx[:, t] leaves logits[:, :t+1]
    unchanged and changes every later position."""
    model, idx = tiny_gpt(cond=cond), gpt_tokens()
    ref = model(idx, LABELS)
    assert ref.shape == (4, GL, GV) and ref.dtype == torch.float32
    for t in range(GL - 1):
        idx2 = idx.clone()
        idx2[:, t] = (idx2[:, t] + 1) % GV
        out = model(idx2, LABELS)
        assert torch.equal(out[:, :t + 1], ref[:, :t + 1]), t
        assert ((out[:, t + 1:] - ref[:, t + 1:]).abs().amax(-1) > 1e-6).all(), t


@pytest.mark.parametrize('cond', CONDS)
def test_gpt_kv_cache_greedy_equals_argmax_of_full_recompute_with_cfg(cond):
    """Greedy tokens generated one at a time with the kv cache equal the argmax of the
    teacher-forced logits recomputed from scratch, guided as (1 + cfg) c - cfg u with u the
    null-class logits; cfg 0 is the conditional model alone."""
    model, null = tiny_gpt(cond=cond), torch.full((4,), GNC)
    for cfg in (0.0, 3.0):
        out = model.generate(LABELS, cfg=cfg, top_k=1)
        assert out.shape == (4, GL) and out.dtype == torch.long
        c, u = model(out, LABELS), model(out, null)
        assert torch.equal(((1 + cfg) * c - cfg * u).argmax(-1), out), cfg
    cold = model.generate(LABELS, cfg=3.0, temperature=1e-5, seed=0)   # temperature -> 0
    assert torch.equal(cold, model.generate(LABELS, cfg=3.0, top_k=1))
    assert all(b.attn.kv_cache is None for b in model.blocks)   # the cache is switched off


@pytest.mark.parametrize('cfg', [0.0, 2.0])
def test_gpt_prefix_is_kept_and_completion_equals_cached_continuation(cfg):
    """DiGIT Fig. 4b: given the first P tokens, the rest is generated; greedily it equals the
    unprompted generation whose first P tokens were those (the prompt runs as one causal pass,
    then the cache continues); a random prefix is kept verbatim, and num_tokens stops early."""
    model = tiny_gpt()
    full = model.generate(LABELS, cfg=cfg, top_k=1)
    for P in (1, 4, GL):
        assert torch.equal(model.generate(LABELS, cfg=cfg, top_k=1, prefix=full[:, :P]), full)
    prefix = gpt_tokens()[:, :3]
    out = model.generate(LABELS, cfg=cfg, top_k=1, prefix=prefix)
    guided = (1 + cfg) * model(out, LABELS) - cfg * model(out, torch.full((4,), GNC))
    assert torch.equal(out[:, :3], prefix) and torch.equal(guided.argmax(-1)[:, 3:], out[:, 3:])
    short = model.generate(LABELS, num_tokens=6, cfg=cfg, top_k=1, prefix=prefix)
    assert torch.equal(short, out[:, :6])
    with pytest.raises(ValueError, match='num_tokens'):
        model.generate(LABELS, num_tokens=GL + 1)


def test_gpt_seeded_sampling_is_reproducible_and_leaves_global_rng():
    """Same seed, same tokens; another seed, other tokens; a seeded call draws from its own
    torch.Generator, so the global RNG state is untouched."""
    model = tiny_gpt()
    state = torch.get_rng_state()
    a = model.generate(LABELS, cfg=1.5, top_k=8, top_p=0.9, seed=3)
    b = model.generate(LABELS, cfg=1.5, top_k=8, top_p=0.9, seed=3)
    c = model.generate(LABELS, cfg=1.5, top_k=8, top_p=0.9, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() < GV


def test_gpt_label_dropping_uses_null_class_only_in_training():
    """Training forward with cond_drop_rate 1 equals the null-class forward; in eval mode the
    labels are kept; labels=None means the null class."""
    model, idx = tiny_gpt(cond_drop_rate=1.0, dropout=0.0), gpt_tokens()
    null = model(idx, torch.full((4,), GNC))
    assert torch.equal(model(idx), null)
    cond = model(idx, LABELS)
    assert not torch.allclose(cond, null)
    model.train()
    assert torch.equal(model(idx, LABELS), null)
    model.config.cond_drop_rate = 0.0
    assert torch.equal(model(idx, LABELS), cond)   # dropout 0: train == eval otherwise


@pytest.mark.parametrize('cond', CONDS)
def test_gpt_class_condition_reaches_every_position(cond):
    """Changing the class changes the logits at every position (the class token at position 0
    is attended by all; with AdaLN it also modulates every block), and the loss gradient
    reaches the class embedding and, with AdaLN, every block's modulation."""
    model, idx = tiny_gpt(cond=cond), gpt_tokens()
    a, b = model(idx, LABELS), model(idx, (LABELS + 1) % GNC)
    assert ((a - b).abs().amax(-1) > 1e-6).all()
    gpt.loss(model(idx, LABELS), idx).backward()
    assert model.class_emb.weight.grad[LABELS].abs().sum(-1).gt(0).all()
    if cond == 'adaln':
        assert all(blk.ada_lin[-1].weight.grad.abs().sum() > 0 for blk in model.blocks)


def test_gpt_unconditional_has_one_learnt_bos_and_ignores_cfg():
    """num_classes 0: the only class row is the BOS; cfg changes nothing (cond = uncond);
    greedy decoding gives one image, the argmax of its own recompute."""
    model, idx = tiny_gpt(num_classes=0, dropout=0.0), gpt_tokens()
    assert model.class_emb.weight.shape == (1, 32)
    zeros = torch.zeros(4, dtype=torch.long)
    model.train()
    assert torch.equal(model(idx), model(idx, zeros))   # training: nothing to drop to
    model.eval()
    a = model.generate(zeros, top_k=8, seed=0)
    assert torch.equal(a, model.generate(zeros, cfg=3.0, top_k=8, seed=0))
    greedy = model.generate(zeros, top_k=1)   # one distribution: every row the same
    assert torch.equal(model(greedy).argmax(-1), greedy) and (greedy == greedy[:1]).all()


def test_gpt_loss_is_label_smoothed_cross_entropy():
    """loss = mean_t [(1 - eps) (-log p(x_t)) + eps mean_v (-log p_v)] (fairseq ce_loss_ls)."""
    torch.manual_seed(0)
    logits, targets = torch.randn(3, GL, GV), torch.randint(0, GV, (3, GL))
    logp = F.log_softmax(logits, -1)
    nll = -logp.gather(-1, targets[..., None]).squeeze(-1)
    for eps in (0.0, 0.1):
        ref = ((1 - eps) * nll - eps * logp.mean(-1)).mean()
        assert torch.allclose(gpt.loss(logits, targets, eps), ref, atol=1e-6)


# --- DiGIT stage 2: [source ; start, x_1..x_{GL-1}] under one causal mask ---------------------

VS, S = 12, 6   # source (DiGIT) vocabulary and tokens
STAGE2 = [('token', 0), ('adaln', GNC)]   # official (unconditional), and with classes + AdaLN


def tiny_stage2(cond='token', num_classes=0):
    return tiny_gpt(cond=cond, num_classes=num_classes, source_vocab_size=VS, source_len=S)


def gpt_source(B=4, seed=2):
    return torch.randint(0, VS, (B, S), generator=torch.Generator().manual_seed(seed))


def run_with_hidden(model, idx, labels, src):
    """-> target logits (B, GL, GV) and the final hidden states of all S + GL positions, the
    input of ln_f (B, S+GL, C)."""
    seen = []
    hook = model.ln_f.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        return model(idx, labels, source=src), seen[0]
    finally:
        hook.remove()


@pytest.mark.parametrize('cond,num_classes', STAGE2)
def test_stage2_source_reaches_targets_and_source_prefix_is_causal(cond, num_classes):
    """Changing source token j changes every target logit (all targets see the whole source)
    and the hidden states of source positions >= j, but not those of positions < j (DiGIT's
    prefix is causal too). Its own tables: src_wte (V_s rows), src_wpe (S rows)."""
    model, idx, src = tiny_stage2(cond, num_classes), gpt_tokens(), gpt_source()
    assert model.src_wte.weight.shape[0] == VS and model.src_wpe.weight.shape[0] == S
    labels = LABELS if num_classes else None
    ref, hid = run_with_hidden(model, idx, labels, src)
    assert ref.shape == (4, GL, GV) and hid.shape == (4, S + GL, 32)
    for j in range(S):
        src2 = src.clone()
        src2[:, j] = (src2[:, j] + 1) % VS
        out, hid2 = run_with_hidden(model, idx, labels, src2)
        assert ((out - ref).abs().amax(-1) > 1e-6).all(), j
        assert torch.equal(hid2[:, :j], hid[:, :j]), j
        assert ((hid2[:, j:S] - hid[:, j:S]).abs().amax(-1) > 1e-6).all(), j


@pytest.mark.parametrize('cond,num_classes', STAGE2)
def test_stage2_targets_stay_causal_and_source_positions_never_see_targets(cond, num_classes):
    """Changing target token t leaves the target logits at positions <= t and the hidden
    states of all S source positions unchanged, and changes every later target position."""
    model, idx, src = tiny_stage2(cond, num_classes), gpt_tokens(), gpt_source()
    labels = LABELS if num_classes else None
    ref, hid = run_with_hidden(model, idx, labels, src)
    for t in range(GL - 1):
        idx2 = idx.clone()
        idx2[:, t] = (idx2[:, t] + 1) % GV
        out, hid2 = run_with_hidden(model, idx2, labels, src)
        assert torch.equal(hid2[:, :S], hid[:, :S]), t
        assert torch.equal(out[:, :t + 1], ref[:, :t + 1]), t
        assert ((out[:, t + 1:] - ref[:, t + 1:]).abs().amax(-1) > 1e-6).all(), t


@pytest.mark.parametrize('cond,num_classes', STAGE2)
def test_stage2_kv_cache_greedy_with_source_equals_argmax_of_full_recompute(cond, num_classes):
    """Greedy tokens from the cached generation (source + start + prefix in one causal pass,
    then one token per step) equal the argmax of the teacher-forced logits recomputed with the
    same source, with CFG where there are classes, and with a target prefix kept verbatim;
    another source gives another generation."""
    model, src = tiny_stage2(cond, num_classes), gpt_source()
    labels, null = (LABELS, torch.full((4,), GNC)) if num_classes else (torch.zeros(4).long(),) * 2
    for cfg in (0.0, 2.0):
        out = model.generate(labels, cfg=cfg, top_k=1, source=src)
        assert out.shape == (4, GL)
        c, u = model(out, labels, source=src), model(out, null, source=src)
        assert torch.equal(((1 + cfg) * c - cfg * u).argmax(-1), out), cfg
        prefix = gpt_tokens()[:, :3]
        done = model.generate(labels, cfg=cfg, top_k=1, prefix=prefix, source=src)
        c, u = model(done, labels, source=src), model(done, null, source=src)
        assert torch.equal(done[:, :3], prefix)
        assert torch.equal(((1 + cfg) * c - cfg * u).argmax(-1)[:, 3:], done[:, 3:]), cfg
    assert not torch.equal(model.generate(labels, top_k=1, source=gpt_source(seed=5)),
                           model.generate(labels, top_k=1, source=src))
    assert all(b.attn.kv_cache is None for b in model.blocks)


def test_stage2_missing_or_wrong_source_raises():
    """A stage-2 model needs source ids of shape (B, source_len) in [0, source_vocab_size), in
    forward and generate; a model without a source refuses one; the two sizes come together."""
    model, idx, src, zeros = tiny_stage2(), gpt_tokens(), gpt_source(), torch.zeros(4).long()
    bad = {'missing': None, 'length': src[:, :-1], 'batch': src[:2],
           'negative': src - VS, 'too large': src + VS}
    for what, s in bad.items():
        with pytest.raises(ValueError, match='source'):
            model(idx, source=s)
        with pytest.raises(ValueError, match='source'):
            model.generate(zeros, source=s)
    with pytest.raises(ValueError, match='source_vocab_size 0'):
        tiny_gpt()(idx, LABELS, source=src)
    with pytest.raises(ValueError, match='source_len'):
        gpt.GPT(depth=1, source_vocab_size=VS)


# --- DiGIT's linear probe: frozen GPT, one linear head per layer on position-averaged states ---

@pytest.mark.parametrize('cond,stage2', [('token', False), ('adaln', False), ('token', True)])
def test_gpt_hidden_states_are_embeddings_and_block_outputs_ln_f_head_gives_logits(cond, stage2):
    """depth + 1 states (B, GL, C) at the target positions: [0] = class_emb(y) + wpe[0] at the
    start and wte(x_t) + wpe[t+1] after it; head(ln_f(states[-1])) = forward's logits."""
    model = tiny_stage2(cond) if stage2 else tiny_gpt(cond=cond)
    idx, labels = gpt_tokens(), None if stage2 else LABELS
    src = gpt_source() if stage2 else None
    states = model.hidden_states(idx, labels, src)
    assert len(states) == 3 and all(h.shape == (4, GL, 32) for h in states)
    y = torch.full((4,), 0 if stage2 else GNC) if labels is None else labels
    emb = torch.cat((model.class_emb(y)[:, None], model.wte(idx[:, :-1])), 1) + model.wpe.weight
    assert torch.allclose(states[0], emb)
    cond_args = (model.class_emb(y),) if cond == 'adaln' else ()
    final = model.ln_f(states[-1], *cond_args)
    assert torch.allclose(model.head(final), model(idx, labels, source=src), atol=1e-5)


def lower_upper_halves(B, seed):
    """Toy set: class 1 iff the tokens come from the upper half of the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (B,), generator=g)
    return torch.randint(0, GV // 2, (B, GL), generator=g) + y[:, None] * (GV // 2), y


def test_linear_probe_separates_lower_vs_upper_half_of_the_vocabulary():
    """40 Adam steps on the heads: some layer classifies held-out data ~perfectly; the loss is
    the sum of the per-layer cross-entropies; parts are acc_0..acc_D, ce_0..ce_D."""
    probe = digit.LinearProbe(tiny_gpt(), num_classes=2).train()
    opt = torch.optim.Adam(probe.heads.parameters(), lr=0.05)
    idx, y = lower_upper_halves(64, seed=0)
    for _ in range(40):
        loss, parts = probe(idx, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert sorted(parts) == sorted(f'{k}_{i}' for k in ('acc', 'ce') for i in range(3))
    assert torch.allclose(loss, sum(parts[f'ce_{i}'] for i in range(3)))
    loss, parts = probe.eval()(*lower_upper_halves(256, seed=1))
    assert max(parts[f'acc_{i}'] for i in range(3)) >= 98, parts


def test_linear_probe_gpt_stays_frozen_in_eval_mode_and_gets_no_grad():
    """Training the probe (in .train() mode) leaves the GPT's weights unchanged and without
    grads, its parameters do not require grad, and it stays in eval mode (no dropout: the
    features are deterministic even with dropout 0.5); the heads start at N(0, 0.01), bias 0."""
    model = tiny_gpt(dropout=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = digit.LinearProbe(model, num_classes=2).train()
    assert probe.heads.training and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert all(h.bias.eq(0).all() and h.weight.std() < 0.02 for h in probe.heads)
    opt = torch.optim.SGD([p for p in probe.parameters() if p.requires_grad], lr=0.4, momentum=0.9)
    idx, y = lower_upper_halves(16, seed=0)
    for _ in range(3):
        opt.zero_grad()
        probe(idx, y)[0].backward()
        opt.step()
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(h.weight.grad is not None for h in probe.heads)
    a, b = probe.features(idx), probe.features(idx)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_linear_probe_feeds_the_null_class_never_the_labels():
    """The GPT's class embedding is only looked up at the null class, so the features do not
    depend on the labels (they are the mean hidden states of the null-class pass, which differ
    from those of a class-conditioned pass); changing labels changes only the targets."""
    model, idx = tiny_gpt(), gpt_tokens()
    probe, seen = digit.LinearProbe(model, num_classes=GNC), []
    model.class_emb.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    probe(idx, LABELS)
    probe(idx, (LABELS + 1) % GNC)
    assert len(seen) == 2 and all((ids == GNC).all() for ids in seen)
    feats = probe.features(idx)
    null = [h.mean(1) for h in model.hidden_states(idx)]
    cond = [h.mean(1) for h in model.hidden_states(idx, LABELS)]
    assert all(torch.equal(f, n) for f, n in zip(feats, null))
    assert not torch.allclose(feats[-1], cond[-1])


# --- vqgan.py --------------------------------------------------------------------------------

VQGAN_KEYS = os.path.join(REPO, 'testdata', 'mage_vqgan_keys.txt')
# widths 32, 64, 64: 4x downsampling, one widening (encoder) and one narrowing (decoder) block
VQGAN_TINY = dict(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                  resolution=16)


def tiny_vqgan(seed=0):
    torch.manual_seed(seed)
    model = vqgan.VQGAN(**VQGAN_TINY).eval()
    with torch.no_grad():       # non-trivial weights: GroupNorm affines and conv biases too
        for name, p in model.named_parameters():
            if 'norm' in name or name.endswith('bias'):
                p.add_(0.2 * torch.randn_like(p))
    return model


def test_vqgan_official_key_structure():
    """VQGAN() has exactly the 168 tensors (54.5M params) of MAGE's VQModel built with its
    config/vqgan.yaml, i.e. of vqgan_jax_strongaug.ckpt: names, shapes, dtypes, no buffers."""
    with torch.device('meta'):
        model = vqgan.VQGAN()
    ours = [(k, str(tuple(v.shape)), str(v.dtype).replace('torch.', ''), 'param')
            for k, v in model.state_dict().items()]
    ref = [tuple(line.rstrip('\n').split('\t')) for line in open(VQGAN_KEYS)
           if not line.startswith('#')]
    assert sorted(ours) == sorted(ref)
    assert len(ref) == 168 and sum(p.numel() for p in model.parameters()) == 54_515_587
    assert (model.vocab_size, model.downsample, model.resolution) == (1024, 16, 256)
    assert model.config.patch_nums == (16,)     # 256 tokens, as vqvae.VQVAEConfig names it


def test_vqgan_round_trip_shapes_and_range():
    """img_to_idx: one (B, (H/16)^2) map of ids in [0, V); idx_to_img: (B, 3, H, W) in [-1, 1],
    the decoder's output clamped (and it does leave [-1, 1] here, so the clamp is exercised)."""
    model, x = tiny_vqgan(), images()
    with torch.no_grad():
        model.decoder.conv_out.weight.mul_(50)   # push the raw output beyond [-1, 1]
    (idx,) = model.img_to_idx(x)
    assert idx.dtype == torch.long and idx.shape == (4, model.config.patch_nums[0] ** 2) == (4, 16)
    assert 0 <= idx.min() and idx.max() < 64 and idx.unique().numel() > 4
    out = model.idx_to_img([idx])
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    with torch.no_grad():
        raw = model.decode(model.quantize.embed_tokens(idx, 4))
    assert raw.abs().max() > 1 and torch.equal(out, raw.clamp(-1, 1))
    prefixed = torch.cat([idx.flip(1), idx], 1)     # stage 2's [DiGIT tokens ; VQ tokens]
    assert torch.equal(model.idx_to_img([prefixed[:, 16:]]), out)   # a non-contiguous slice
    with pytest.raises(ValueError, match='15 tokens are not a square grid'):
        model.idx_to_img([idx[:, :15]])


def test_vqgan_nearest_code_is_brute_force_argmin():
    """r_ij = argmin_v ||z_ij - E_v||^2, by the direct difference, in raster order."""
    model, x = tiny_vqgan(), images()
    with torch.no_grad():
        z = model.encode(x).permute(0, 2, 3, 1).reshape(-1, 8)                # (B*h*w, C)
        E = model.quantize.embedding.weight                                  # (V, C)
        brute = (z[:, None, :] - E[None]).square().sum(-1).argmin(1)        # (B*h*w,)
    assert torch.equal(model.img_to_idx(x)[0], brute.view(4, 16))
    assert torch.equal(model.quantize.embed_tokens(brute.view(4, 16), 4),
                       E[brute].view(4, 4, 4, 8).permute(0, 3, 1, 2))       # E[r] as (B, C, h, w)


def test_vqgan_mage_range_conversion():
    """MAGE feeds x / 255 (ToTensor) and writes clip(decoder * 255); the repo reads
    x / 255 * 2 - 1: the same 8-bit image gives MAGE's tokens, and idx_to_img is MAGE's
    picture mapped to [-1, 1]."""
    model = tiny_vqgan()
    u8 = torch.randint(0, 256, (4, 3, 16, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z_mage = model.encoder(u8 / 255)                                      # (B, C, 4, 4)
        torch.testing.assert_close(model.encode(u8 / 255 * 2 - 1), z_mage, atol=1e-5, rtol=0)
        idx_mage = model.quantize.nearest_code(z_mage).flatten(1)             # (B, 16)
        assert torch.equal(model.img_to_idx(u8 / 255 * 2 - 1)[0], idx_mage)
        pic_mage = model.decoder(model.quantize.embed_tokens(idx_mage, 4)).clamp(0, 1)
    torch.testing.assert_close((model.idx_to_img([idx_mage]) + 1) / 2, pic_mage,
                               atol=1e-6, rtol=0)


def test_vqgan_resolution_path_and_maskgit_resblock():
    """Encoder: 2x2 average pools (24x16 -> 6x4 at 4x); decoder: nearest 2x + conv back to
    24x16. MaskGIT's block: h = conv(sw(GN(conv(sw(GN(x)))))), sw(x) = x sigmoid(x) exactly;
    out = x + h, or W h + h on a width change (W 1x1 without bias on h, not on x)."""
    model = tiny_vqgan()
    x = torch.rand(2, 3, 24, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def branch(b, t):
        for norm, conv in ((b.norm1, b.conv1), (b.norm2, b.conv2)):
            t = norm(t)
            t = conv(t * torch.sigmoid(t))   # the official swish, not F.silu
        return t

    with torch.no_grad():
        z = model.encode(x)
        assert z.shape == (2, 8, 6, 4) and model.decode(z).shape == (2, 3, 24, 16)
        level = model.encoder.down[0]
        h = model.encoder.conv_in((x + 1) / 2)                                # (2, 32, 24, 16)
        assert torch.equal(level.block[0](h), h + branch(level.block[0], h))  # 32 -> 32
        h = level.block[0](h)
        assert torch.equal(level.downsample(h), F.avg_pool2d(h, 2))
        h = F.avg_pool2d(h, 2)                                                # (2, 32, 12, 8)
        block = model.encoder.down[1].block[0]                               # 32 -> 64
        assert torch.equal(block(h), block.nin_shortcut(branch(block, h)) + branch(block, h))
    assert block.nin_shortcut.weight.shape == (64, 64, 1, 1) and block.nin_shortcut.bias is None
    assert block.conv1.bias is None and model.encoder.conv_in.bias is None
    assert not list(level.downsample.parameters())


def test_vqgan_from_checkpoint_official_layout(tmp_path):
    """{'state_dict': sd} (taming's layout), a bare sd, and a DiGIT stage-2 model dict with
    `vqgan.*` entries all load every tensor and give the same tokens and pixels."""
    model, x = tiny_vqgan(), images()
    sd = model.state_dict()
    torch.save({'state_dict': sd}, tmp_path / 'mage.ckpt')
    torch.save(sd, tmp_path / 'bare.ckpt')
    digit = {'decoder.layers.0.fc1.weight': torch.zeros(2),      # another module's entry
             **{f'vqgan.{k}': v for k, v in sd.items()}}
    loaded = [vqgan.VQGAN.from_checkpoint(str(tmp_path / 'mage.ckpt'), **VQGAN_TINY),
              vqgan.VQGAN.from_checkpoint(str(tmp_path / 'bare.ckpt'), **VQGAN_TINY),
              vqgan.VQGAN.from_state_dict(digit, prefix='vqgan.', **VQGAN_TINY)]
    idx = model.img_to_idx(x)
    for m in loaded:
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), sd.values()))
        assert torch.equal(m.img_to_idx(x)[0], idx[0])
        assert torch.equal(m.idx_to_img(idx), model.idx_to_img(idx))


@pytest.mark.parametrize('change, message', [
    (lambda sd: sd.pop('decoder.up.1.upsample.conv.bias'), r'1 missing \(decoder.up.1.upsample'),
    (lambda sd: sd.update({'quant_conv.weight': torch.zeros(1)}), r'1 unexpected \(quant_conv'),
    (lambda sd: sd.update({'quantize.embedding.weight': torch.zeros(32, 8)}),
     r'1 mis-shaped \(quantize.embedding.weight \(32, 8\) for \(64, 8\)\)'),
])
def test_vqgan_checkpoint_mismatch_is_one_line(tmp_path, change, message):
    sd = tiny_vqgan().state_dict()
    change(sd)
    path = str(tmp_path / 'bad.ckpt')
    torch.save({'state_dict': sd}, path)
    with pytest.raises(SystemExit, match=message) as e:
        vqgan.VQGAN.from_checkpoint(path, **VQGAN_TINY)
    assert path in str(e.value) and '\n' not in str(e.value)


# --- DiGIT's released checkpoints: fairseq stage 1 and 2 -> gpt.GPT; the foreign unpickler ---

FS_C, FS_H, FS_V, FS_VQ = 32, 4, 12, 10   # tiny fairseq decoders: width, heads, clusters, codes


def fairseq_decoder(sd, tokens, heads, normalize_before, prefix=0):
    """fairseq 0.12's TransformerDecoder without cross-attention, written from its source on
    its own key names as the reference: dictionary ids (B, T) -> logits (B, T, V_out) and the
    inner_states (the embeddings, then each layer's output). Stage 2: the first `prefix` ids
    take embed_positions_1, the rest embed_positions, both counting from row 2."""
    w = {k[len('decoder.'):]: v.float() for k, v in sd.items() if k.startswith('decoder.')}
    (B, T), C = tokens.shape, w['embed_tokens.weight'].shape[1]
    pos = [w['embed_positions_1.weight'][2:2 + prefix]] if prefix else []
    pos = torch.cat(pos + [w['embed_positions.weight'][2:2 + T - prefix]])
    x = C ** 0.5 * w['embed_tokens.weight'][tokens] + pos
    states, mask = [x], torch.full((T, T), -torch.inf).triu(1)
    lin = lambda h, n: F.linear(h, w[n + '.weight'], w[n + '.bias'])
    ln = lambda h, n: F.layer_norm(h, (C,), w[n + '.weight'], w[n + '.bias'], 1e-5)
    split = lambda h: h.view(B, T, heads, -1).transpose(1, 2)                   # (B, H, T, c)
    for i in range(sum(k.endswith('q_proj.weight') for k in w)):
        f = f'layers.{i}.'
        h = ln(x, f + 'self_attn_layer_norm') if normalize_before else x
        q = split(lin(h, f + 'self_attn.q_proj')) * (C // heads) ** -0.5
        k, v = split(lin(h, f + 'self_attn.k_proj')), split(lin(h, f + 'self_attn.v_proj'))
        a = ((q @ k.transpose(2, 3) + mask).softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
        x = x + lin(a, f + 'self_attn.out_proj')
        x = x if normalize_before else ln(x, f + 'self_attn_layer_norm')
        h = ln(x, f + 'final_layer_norm') if normalize_before else x
        x = x + lin(F.gelu(lin(h, f + 'fc1')), f + 'fc2')
        x = x if normalize_before else ln(x, f + 'final_layer_norm')
        states.append(x)
    if 'layer_norm.weight' in w:
        x = ln(x, 'layer_norm')
    return x @ w['output_projection.weight'].T, states


def fairseq_weights(stage2=False, classes=0, depth=2, seed=0):
    """Random fp16 weights with a DiGIT decoder's key names (tiny sizes), and a few of the
    other entries a released file holds (tokenizer, VQGAN)."""
    g = torch.Generator().manual_seed(seed)
    C, n = FS_C, 5
    rows = n + FS_VQ + n + FS_V if stage2 else n + FS_V + classes
    shapes = {'embed_tokens.weight': (rows, C), 'embed_positions.weight': (1026, C),
              'output_projection.weight': (n + (FS_VQ if stage2 else FS_V), C)}
    if stage2:
        shapes.update({'embed_positions_1.weight': (1026, C), 'layer_norm.weight': (C,),
                       'layer_norm.bias': (C,)})
    for i in range(depth):
        for name, shape in [(f'self_attn.{x}_proj', (C, C)) for x in 'qkv'] + [
                ('self_attn.out_proj', (C, C)), ('fc1', (4 * C, C)), ('fc2', (C, 4 * C))]:
            shapes[f'layers.{i}.{name}.weight'], shapes[f'layers.{i}.{name}.bias'] = \
                shape, shape[:1]
        for name in ('self_attn_layer_norm', 'final_layer_norm'):
            shapes[f'layers.{i}.{name}.weight'] = shapes[f'layers.{i}.{name}.bias'] = (C,)
    sd = OrderedDict((f'decoder.{k}', (torch.randn(s, generator=g) * (0.5 if len(s) > 1 else 0.2)
                                       + ('norm.weight' in k)).half()) for k, s in shapes.items())
    sd.update({'decoder.version': torch.tensor([3.0]), 'centroids': torch.randn(8, FS_V).half()})
    if stage2:
        sd['vqgan.quantize.embedding.weight'] = torch.randn(FS_VQ, 4).half()
    return sd


def fairseq_file(path, stage2=False, classes=0, seed=0):
    """A checkpoint laid out as fairseq 0.12's Trainer saves it (cfg as plain containers)."""
    model = dict(_name='st2vtlm' if stage2 else 'stlm', decoder_attention_heads=FS_H,
                 decoder_normalize_before=stage2, activation_fn='gelu', dropout=0.1)
    torch.save(dict(args=None, cfg=dict(model=model, task=dict(_name='image_generation')),
                    model=fairseq_weights(stage2, classes, seed=seed), criterion=None,
                    optimizer_history=[dict(criterion_name='LabelSmoothedCE', num_updates=7,
                                            optimizer_name='FP16Optimizer',
                                            lr_scheduler_state=dict(best=None))],
                    task_state={}, extra_state=dict(metrics={}, previous_training_time=1.5),
                    last_optimizer_state=dict(state={}, param_groups=[dict(lr=[3e-4])])), path)
    return path


def fs_ids(tokens, first):
    """Our ids (B, L) -> fairseq's [first, t_1 + 5, ..., t_L + 5] (B, L + 1); first: an id
    or one per row (B,)."""
    first = torch.as_tensor(first).expand(len(tokens))
    return torch.cat((first[:, None], tokens + 5), 1)


@pytest.mark.parametrize('classes', [0, 3])
def test_fairseq_stage1_gives_the_reference_decoders_logits_and_greedy_tokens(tmp_path, classes):
    """DiGIT's stage 1 (post-LN, no final LN, x sqrt(C) embeddings, positions from 2, exact
    GELU), unconditional (</s> first) or class-conditional (class c = id 5 + V + c first),
    loaded from a fairseq-format fp16 file: logits = the reference's on the image tokens
    (3e-4, fp32), over all 256 positions; greedy generation = the reference's argmax."""
    path = fairseq_file(tmp_path / 'checkpoint_stage1.pt', classes=classes)
    model = gpt.GPT.from_checkpoint(str(path), ['gpt'])
    c = model.config
    assert (c.post_ln, c.final_norm, c.gelu, c.vocab_size, c.num_classes, c.block_size) == \
        (True, False, 'exact', FS_V, classes, 256) and c.embed_scale == FS_C ** 0.5
    sd = checkpoint.load(str(path), foreign=True)['model']
    idx = torch.randint(0, FS_V, (2, 256), generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([2, 0]) if classes else None
    first = 5 + FS_V + labels if classes else 2   # the class id, or </s>
    ref, _ = fairseq_decoder(sd, fs_ids(idx, first), FS_H, normalize_before=False)
    assert (model(idx, labels) - ref[:, :256, 5:]).abs().max() < 3e-4
    out = model.generate(labels if classes else torch.zeros(2).long(), num_tokens=12, top_k=1)
    ref, _ = fairseq_decoder(sd, fs_ids(out, first), FS_H, normalize_before=False)
    assert torch.equal(ref[:, :12, 5:].argmax(-1), out)


def test_fairseq_stage2_gives_the_reference_decoders_logits_and_greedy_tokens(tmp_path):
    """DiGIT's stage 2 (pre-LN, a final LN, one table: its 5 + VQ ids, then stage 1's 5 + V;
    two position tables): [s + 5 + VQ + 5 ; </s>, v + 5] -> logits of the reference at the
    target positions (1e-4) and greedy VQ tokens equal to its argmax."""
    path = fairseq_file(tmp_path / 'checkpoint_stage2.pt', stage2=True)
    model = gpt.GPT.from_checkpoint(str(path), ['stage2'])
    c = model.config
    assert (c.post_ln, c.final_norm, c.vocab_size, c.source_vocab_size, c.source_len,
            c.num_classes) == (False, True, FS_VQ, FS_V, 256, 0)
    sd, g = checkpoint.load(str(path), foreign=True)['model'], torch.Generator().manual_seed(4)
    src, idx = torch.randint(0, FS_V, (2, 256), generator=g), torch.randint(0, FS_VQ, (2, 256))
    ids = lambda v: torch.cat((src + 5 + FS_VQ + 5, fs_ids(v, 2)), 1)
    ref, _ = fairseq_decoder(sd, ids(idx), FS_H, normalize_before=True, prefix=256)
    assert (model(idx, source=src) - ref[:, 256:512, 5:]).abs().max() < 1e-4
    out = model.generate(torch.zeros(2).long(), num_tokens=12, top_k=1, source=src)
    ref, _ = fairseq_decoder(sd, ids(out), FS_H, normalize_before=True, prefix=256)
    assert torch.equal(ref[:, 256:268, 5:].argmax(-1), out)


def test_fairseq_probe_features_are_inner_states_averaged_over_all_257_positions(tmp_path):
    """DiGIT's probe protocol (layers 0..depth-1, last=True) averages fairseq's inner_states
    over [BOS, x_1..x_256]; our protocol keeps the 256 target positions and every layer."""
    model = gpt.GPT.from_checkpoint(str(fairseq_file(tmp_path / 's1.pt')), ['gpt'])
    sd = checkpoint.load(str(tmp_path / 's1.pt'), foreign=True)['model']
    idx = torch.randint(0, FS_V, (2, 256), generator=torch.Generator().manual_seed(5))
    _, states = fairseq_decoder(sd, fs_ids(idx, 2), FS_H, normalize_before=False)
    probe = digit.LinearProbe(model, 3, layers=range(2), last=True)
    for ours, ref in zip(probe.features(idx), states[:2], strict=True):
        assert (ours - ref.mean(1)).abs().max() < 1e-4
    ours = digit.LinearProbe(model, 3).features(idx)
    assert len(ours) == 3 and (ours[0] - states[0][:, :256].mean(1)).abs().max() < 1e-4


@pytest.mark.parametrize('name,stage2', [('digit_stage1_keys.txt', False),
                                         ('digit_stage2_keys.txt', True)])
def test_fairseq_released_key_lists_map_onto_gpt_vqgan_and_dinov2_exactly(name, stage2):
    """The released files' keys and shapes (testdata, built by DiGIT's fairseq code) on the meta
    device: decoder.* maps onto a GPT's state dict exactly (DiGIT base: 16 layers, 1024 wide,
    8192 DiGIT tokens; stage 2: 1024 VQ codes), every decoder tensor used or named skipped;
    vqgan.* is vqgan.VQGAN() and pretrained_encoder.* DINOv2 ViT-B/14 reg4, key for key."""
    keys = _read_keys(os.path.join(REPO, 'testdata', name))
    with torch.device('meta'):
        sd = {k: torch.empty(s, dtype=torch.float16) for k, s in keys.items()}
        hp = dict(decoder_attention_heads=16, activation_fn='gelu',
                  decoder_normalize_before=stage2)
        config, weights = gpt.from_fairseq(dict(cfg=dict(model=hp), model=sd))
        ours = gpt.GPT(**config).state_dict()
        parts = {'pretrained_encoder.': DINOv2(**DINOV2_CONFIGS['vitb14_reg4']),
                 'vqgan.': vqgan.VQGAN() if stage2 else None}
    assert {k: tuple(v.shape) for k, v in ours.items()} == \
        {k: tuple(v.shape) for k, v in weights.items()}
    c = config
    assert (c['depth'], c['n_embd'], c['vocab_size'], c['post_ln'], c['final_norm']) == \
        (16, 1024, 1024 if stage2 else 8192, not stage2, stage2)
    assert c['source_vocab_size'] == (8192 if stage2 else 0)
    for prefix, model in parts.items():
        theirs = {k[len(prefix):]: s for k, s in keys.items() if k.startswith(prefix)}
        assert theirs == ({k: tuple(v.shape) for k, v in model.state_dict().items()}
                          if model else {})
    rest = {k for k in keys if not k.startswith(('decoder.', *parts))}
    assert rest == {'centroids', 'centroid_norm'} and keys['centroids'] == (768, 8192)


def test_fairseq_unknown_decoder_key_or_activation_is_a_clear_error(tmp_path):
    sd = fairseq_weights()
    sd['decoder.layers.0.self_attn.rotary.weight'] = torch.zeros(1)
    with pytest.raises(ValueError, match='decoder.layers.0.self_attn.rotary.weight'):
        gpt.from_fairseq(dict(cfg=dict(model=dict(decoder_attention_heads=4,
                                                  activation_fn='gelu')), model=sd))
    with pytest.raises(ValueError, match="activation_fn 'relu'"):
        gpt.from_fairseq(dict(cfg=dict(model=dict(activation_fn='relu')), model=sd))


def test_gpt_block_post_ln_and_pre_ln_match_their_formulas():
    """One block by hand: pre-LN x + A(LN1 x), then + M(LN2 .); post-LN LN1(x + A x), then
    LN2(. + M .), A = softmax(q k^T / sqrt(c) + causal) v W_o, M = exact-GELU MLP."""
    torch.manual_seed(0)
    x, C, H = torch.randn(2, 5, 8), 8, 2
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    for post_ln in (False, True):
        block = gpt.Block(C, H, post_ln=post_ln, gelu='exact').eval()
        block.attn.scale = (C // H) ** -0.5
        with torch.no_grad():
            for p in block.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        a = block.attn

        def attn(h):
            q, k, v = F.linear(h, a.mat_qkv.weight, torch.cat((a.q_bias, a.zero_k_bias,
                                                                a.v_bias))).chunk(3, -1)
            q, k, v = (t.view(2, 5, H, -1).transpose(1, 2) for t in (q, k, v))
            s = (q @ k.transpose(2, 3) / (C // H) ** 0.5).masked_fill(~mask, -torch.inf)
            return a.proj((s.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, C))
        mlp = lambda h: block.ffn.fc2(F.gelu(block.ffn.fc1(h)))
        if post_ln:
            h = block.ln_1(x + attn(x))
            ref = block.ln_2(h + mlp(h))
        else:
            h = x + attn(block.ln_1(x))
            ref = h + mlp(block.ln_2(h))
        assert (block(x, attn_mask=mask) - ref).abs().max() < 1e-5


def test_fairseq_top_p_rule_keeps_the_same_tokens_as_ours():
    """fairseq's _sample_topp keeps tokens while the descending cumulative sum is below p,
    plus the one crossing it; top_k_top_p_filter_ keeps the same set."""
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        probs = torch.randn(30, generator=g).mul(3).softmax(-1).double()
        p = float(torch.rand(1, generator=g)) * 0.98 + 0.01
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) < p
        keep[int(keep.sum().clamp_max(29))] = True                      # the crossing one
        ref = torch.zeros(30, dtype=torch.bool).scatter(0, order, keep)
        ours = transformer.top_k_top_p_filter_(probs.log()[None, None], top_p=p).isfinite()
        assert torch.equal(ours[0, 0], ref)


class RunsCode:
    """A pickle that would call os.system when loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_foreign_loader_never_runs_code_from_a_crafted_pickle(tmp_path):
    """A file whose pickle calls os.system is refused in one line naming the file and the
    global, and the command never ran; the same for a pickle asking for eval."""
    marker, path = tmp_path / 'ran', tmp_path / 'evil.pt'
    torch.save(dict(cfg=None, model={'decoder.x': torch.zeros(1)}, x=RunsCode(marker)), path)
    with pytest.raises(SystemExit, match=rf'{path}.*refused.*system') as e:
        checkpoint.load(str(path), 'GPT checkpoint', foreign=True)
    assert '\n' not in str(e.value) and not marker.exists()
    torch.save({'x': eval, 'model': {}}, path)
    with pytest.raises(SystemExit, match='refused.*eval'):
        gpt.GPT.from_checkpoint(str(path))


def test_foreign_loader_reads_omegaconf_and_namespace_as_plain_containers(tmp_path, monkeypatch):
    """A cfg pickled as OmegaConf DictConfig / ListConfig / nodes (older fairseq) and args as an
    argparse.Namespace load without omegaconf, as dicts, lists and values. The classes are
    fakes named like OmegaConf's, holding what OmegaConf's __getstate__ gives."""
    fake, package = {}, types.ModuleType('omegaconf')
    monkeypatch.setitem(sys.modules, 'omegaconf', package)
    for module, names in checkpoint.OMEGACONF.items():
        m = types.ModuleType(f'omegaconf.{module}')
        for name in names:
            fake[name] = type(name, (), {'__module__': m.__name__})
            setattr(m, name, fake[name])
        monkeypatch.setitem(sys.modules, m.__name__, m)
        setattr(package, module, m)

    def node(kind, **state):
        obj = fake[kind].__new__(fake[kind])
        obj.__dict__.update(state, _metadata=fake['Metadata'](), _parent=None)
        obj._metadata.__dict__.update(ref_type=typing.Any, key_type=int, object_type=dict,
                                      resolver_cache=defaultdict(dict))   # as OmegaConf 2.0
        return obj
    layers = node('ListConfig', _content=[node('AnyNode', _val=1), node('IntegerNode', _val=2)])
    cfg = node('DictConfig', _content={'model': node('DictConfig', _content={
        'decoder_attention_heads': node('IntegerNode', _val=4), 'layers': layers,
        'name': node('StringNode', _val='stlm'), 'missing': node('AnyNode', _val='???')})})
    torch.save(dict(cfg=cfg, args=argparse.Namespace(lr=[0.1], fp16=True),
                    model={'decoder.version': torch.ones(1)}), tmp_path / 'old.pt')
    state = checkpoint.load(str(tmp_path / 'old.pt'), foreign=True)
    assert state['cfg'] == {'model': {'decoder_attention_heads': 4, 'layers': [1, 2],
                                      'name': 'stlm', 'missing': '???'}}
    assert state['args'] == {'lr': [0.1], 'fp16': True}
    with pytest.raises(SystemExit, match='refused'):   # foreign names only when asked for
        checkpoint.load(str(tmp_path / 'old.pt'))


# --- sample.py ---------------------------------------------------------------------------------

def test_sample_npz_grid_and_zero_shot_edit(tmp_path):
    """The .npz is uint8 NHWC `arr_0` with labels i % classes; a mask that keeps everything
    makes the edit reproduce the input image's own reconstruction exactly."""
    model = tiny_var()
    vae = model.vae[0]
    save_vqvae(vae, tmp_path / 'vae.pt')
    checkpoint.save(dict(
        kind='var', config=vqvae.asdict(model.config), model=model.state_dict(), ema=None,
        vae=str(tmp_path / 'vae.pt'), class_names=[f'c{i}' for i in range(10)]),
        str(tmp_path / 'var.pt'))
    run = lambda *a: sample.main(sample.get_args(['--ckpt', str(tmp_path / 'var.pt'),
                                                  '--device', 'cpu', *a]))
    run('--num_samples', '7', '--batch_size', '3', '--npz', str(tmp_path / 's.npz'))
    npz = np.load(tmp_path / 's.npz')
    assert npz['arr_0'].shape == (7, 16, 16, 3) and npz['arr_0'].dtype == np.uint8
    assert npz['labels'].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert not list(tmp_path.glob('*.rank*'))                     # shards cleaned up
    img = (images(1, 16, seed=5)[0].permute(1, 2, 0).numpy() + 1) * 127.5
    Image.fromarray(img.round().astype(np.uint8)).save(tmp_path / 'in.png')
    Image.new('L', (16, 16), 0).save(tmp_path / 'keep_all.png')
    run('--classes', '1,2', '--per_class', '1', '--edit_image', str(tmp_path / 'in.png'),
        '--edit_mask', str(tmp_path / 'keep_all.png'), '--out', str(tmp_path / 'edit.png'))
    grid = np.asarray(Image.open(tmp_path / 'edit.png'))
    assert grid.shape == (68, 134, 3)             # 1 row x 2 columns of 16 px shown 4x, padding 2
    x = sample.load_image(str(tmp_path / 'in.png'), 16)[None] * 2 - 1
    expected = data.to_uint8(vae.idx_to_img(vae.img_to_idx(x)))[0]
    assert np.abs(grid[2:66:4, 2:66:4].astype(int) - expected).max() <= 1
    assert np.abs(grid[2:66:4, 68:132:4].astype(int) - expected).max() <= 1


def test_sample_dtype_bfloat16_samples_under_autocast(tmp_path):
    """--dtype bfloat16 (the default on CUDA) samples VAR under autocast: greedy tokens agree
    with fp32's at nearly every position, the cumulative f_hat stays fp32, and sample.py
    writes the same kind of .npz, from different (bf16) numbers."""
    model, labels = tiny_var(), torch.arange(8)
    tokens, f_hat = model.sample_tokens(labels, cfg=1.5, top_k=1, seed=0)
    with torch.autocast('cpu', torch.bfloat16):
        tokens_bf16, f_hat_bf16 = model.sample_tokens(labels, cfg=1.5, top_k=1, seed=0)
    same = torch.cat([a == b for a, b in zip(tokens, tokens_bf16)], 1).float().mean()
    assert 0.95 <= same < 1 and f_hat_bf16.dtype == torch.float32, same
    save_vqvae(model.vae[0], tmp_path / 'vae.pt')
    checkpoint.save(dict(kind='var', config=vqvae.asdict(model.config), model=model.state_dict(),
                         ema=None, vae=str(tmp_path / 'vae.pt')), str(tmp_path / 'var.pt'))
    out = []
    for dtype in ('float32', 'bfloat16'):
        sample.main(sample.get_args(['--ckpt', str(tmp_path / 'var.pt'), '--device', 'cpu',
                                     '--dtype', dtype, '--num_samples', '4',
                                     '--npz', str(tmp_path / f'{dtype}.npz')]))
        out.append(np.load(tmp_path / f'{dtype}.npz')['arr_0'])
    assert out[0].shape == out[1].shape == (4, 16, 16, 3) and out[1].dtype == np.uint8
    assert not np.array_equal(*out)


TINY_VQGAN = dict(vocab_size=FS_VQ, z_channels=8, ch=32, ch_mult=(1, 1, 1, 1, 1),
                  num_res_blocks=1)


def test_sample_runs_digits_released_chain_stage1_stage2_vqgan(tmp_path, monkeypatch):
    """The released chain from fairseq files (unconditional stage 1; stage 2 holding MAGE's
    VQGAN as vqgan.*): the .npz equals stage1.generate (top-k 200, DiGIT's) -> stage2.generate
    (top-p 0.8) -> VQGAN decoder with the same seeds; guidance and class ids are refused."""
    torch.manual_seed(0)
    vq = vqgan.VQGAN(**TINY_VQGAN).eval()
    s1, s2 = fairseq_file(tmp_path / 's1.pt'), tmp_path / 's2.pt'
    state = torch.load(fairseq_file(s2, stage2=True), weights_only=True)
    state['model'] = {k: v for k, v in state['model'].items() if not k.startswith('vqgan.')}
    state['model'].update({f'vqgan.{k}': v.half() for k, v in vq.state_dict().items()})
    torch.save(state, s2)
    load_vqgan = vqgan.VQGAN.from_state_dict.__func__
    monkeypatch.setattr(vqgan.VQGAN, 'from_state_dict', classmethod(
        lambda cls, sd, prefix, source: load_vqgan(cls, sd, prefix, source, **TINY_VQGAN)))
    run = lambda *a: sample.main(sample.get_args(['--ckpt', str(s1), '--stage2', str(s2),
                                                  '--device', 'cpu', *a]))
    run('--num_samples', '3', '--batch_size', '3', '--npz', str(tmp_path / 'x.npz'))
    got = np.load(tmp_path / 'x.npz')
    assert got['arr_0'].shape == (3, 256, 256, 3) and got['labels'].tolist() == [0, 0, 0]
    stage1 = gpt.GPT.from_checkpoint(str(s1), ['gpt'])
    stage2 = gpt.GPT.from_checkpoint(str(s2), ['stage2'])
    vq = vqgan.VQGAN.from_state_dict(checkpoint.load(str(s2), foreign=True)['model'], 'vqgan.',
                                     'test')
    zeros = torch.zeros(3).long()
    tokens = stage1.generate(zeros, top_k=200, seed=0)
    expected = vq.idx_to_img([stage2.generate(zeros, top_p=0.8, seed=0, source=tokens)])
    assert np.abs(got['arr_0'].astype(int) - data.to_uint8(expected)).max() <= 1
    with pytest.raises(SystemExit, match='--cfg 1.0: .*no null class'):
        run('--cfg', '1')
    with pytest.raises(SystemExit) as e:
        run('--classes', '1')
    assert e.value.code == 2


# --- train.py --------------------------------------------------------------------------------

def tiny_run(out_dir, *extra):
    """Argument list of a seconds-long tokenizer run on 16 px built-in images."""
    return ['--out_dir', str(out_dir), '--resolution', '16', '--vocab_size', '64',
            '--max_iters', '6', '--batch_size', '4', '--total_batch_size', '8',
            '--warmup_iters', '2', '--log_every', '2', '--eval_every', '3', '--eval_images', '8',
            '--sample_every', '3', '--save_every', '100', '--reseed_every', '2',
            '--train_images', '64', '--device', 'cpu', '--fid_images', '0', *extra]


def test_train_lr_schedule_warmup_then_decay():
    args = train.get_args(['--lr', '1e-3', '--warmup_iters', '10', '--max_iters', '110',
                           '--min_lr_ratio', '0.1'])
    assert train.lr_at(0, args) == pytest.approx(1e-4)         # (step + 1) / warmup * lr
    assert train.lr_at(9, args) == pytest.approx(1e-3)
    assert train.lr_at(60, args) == pytest.approx(1e-4 + 0.9e-3 * 0.5)   # cosine midpoint
    assert train.lr_at(110, args) == pytest.approx(1e-4)


def test_data_sampler_shards_cover_the_epoch_and_resume_mid_way():
    shards = [data.ShardedSampler(10, r, 2, seed=0, epoch=3).indices for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(10))
    assert data.ShardedSampler(10, 1, 2, seed=0, epoch=3, start=2).indices == shards[1][2:]
    assert shards[0] != data.ShardedSampler(10, 0, 2, seed=0, epoch=4).indices


def test_train_resume_is_exact_and_checkpoint_is_plain(tmp_path):
    """6 steps in one go == 3 steps, stop, then the same command again (accumulation 2,
    codebook re-seeding, PatchGAN from step 2, EMA and validation on the way)."""
    gan_ema = ('--disc_weight', '0.5', '--disc_start', '2', '--ema', '0.9')
    whole = train.main(train.get_args(tiny_run(tmp_path / 'a', *gan_ema)))
    split = tiny_run(tmp_path / 'b', '--stop_after', '3', *gan_ema)
    train.main(train.get_args(split))
    ckpt = torch.load(tmp_path / 'b' / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == 3 and ckpt['kind'] == 'vqvae' and ckpt['data_cursor'] == [0, 6]
    resumed = train.main(train.get_args(split))
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    log = open(tmp_path / 'b' / 'log.txt').read()
    assert 'step 6 ' in log and 'eval 6 ' in log and (tmp_path / 'b' / 'recon_000006.png').exists()
    assert ' g_weight ' in log and ' d ' in log and ckpt['disc'] and ckpt['ema']
    ckpt = torch.load(tmp_path / 'b' / 'ckpt.pt', weights_only=True)   # now at step 6
    for use_ema, weights in ((False, ckpt['model']), (True, ckpt['ema'])):
        model = vqvae.VQVAE.from_checkpoint(tmp_path / 'b' / 'ckpt.pt', use_ema=use_ema)
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_train_ssl_resumes_exactly_and_feeds_the_tokenizer(tmp_path):
    """--model ssl (the stand-in encoder): 4 steps == 2 + resume 2 (the views come from the
    per-step seed), the held-out loss is reported, and `tokenizer.py fit` takes the checkpoint:
    block depth-3, its resolution, a 4x4 grid of tokens."""
    ssl = ('--model', 'ssl', '--depth', '4', '--patch_size', '4', '--max_iters', '4')
    whole = train.main(train.get_args(tiny_run(tmp_path / 'a', *ssl)))
    split = tiny_run(tmp_path / 'b', *ssl, '--stop_after', '2')
    train.main(train.get_args(split))
    resumed = train.main(train.get_args(split))
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    log = open(tmp_path / 'b' / 'log.txt').read()
    assert 'eval 4 glob' in log and (tmp_path / 'b' / 'features_000004.png').exists()
    tok = tokenizer.main(['fit', '--encoder', str(tmp_path / 'b' / 'ckpt.pt'), '--k', '4',
                          '--images', '16', '--n_iter', '3', '--out', str(tmp_path / 't.pt')])
    assert (tok.layer, tok.resolution, tok.grid, tok.vocab_size) == (1, 16, 4, 4)
    assert torch.equal(tokenizer.Tokenizer.load(str(tmp_path / 't.pt')).encode(images(2, 16)),
                       tok.encode(images(2, 16)))


@pytest.fixture(scope='module')
def digit_run(tmp_path_factory):
    """A tiny DiGIT run on 16 px built-in images: a stand-in encoder, its K-Means tokenizer (8
    tokens, 4x4 per image) and a GPT of depth 1; their paths."""
    tmp = tmp_path_factory.mktemp('digit')
    train.main(train.get_args(tiny_run(tmp / 'ssl', '--model', 'ssl', '--depth', '4',
                                       '--patch_size', '4', '--max_iters', '2')))
    tok = str(tmp / 'tok.pt')
    tokenizer.main(['fit', '--encoder', str(tmp / 'ssl' / 'ckpt.pt'), '--k', '8', '--images',
                    '16', '--n_iter', '2', '--out', tok])
    train.main(train.get_args(tiny_run(tmp / 'gpt', '--model', 'gpt', '--depth', '1',
                                       '--tokenizer', tok, '--max_iters', '2')))
    return types.SimpleNamespace(tmp=tmp, tok=tok, gpt=str(tmp / 'gpt' / 'ckpt.pt'))


def test_pixdec_shapes_and_it_reads_centroids_not_ids():
    """Token maps (B, g*g) or (B, g, g) -> images (B, 3, g * 4, g * 4) with ch_mult (1, 2, 2);
    two ids with the same centroid render the same, and new centroids change the rendering."""
    torch.manual_seed(0)
    centroids = torch.randn(6, 10)
    centroids[5] = centroids[2]
    model = pixdec.PixelDecoder(centroids, vocab_size=6, feature_dim=10, grid=3).eval()
    tokens = torch.randint(0, 5, (2, 9))
    out = model(tokens)
    assert out.shape == (2, 3, 12, 12) and model.resolution == 12
    assert torch.equal(model(tokens.view(2, 3, 3)), out)
    assert torch.equal(model(torch.where(tokens == 2, 5, tokens)), out)     # same centroid
    assert torch.equal(model(torch.where(tokens == 2, 3, tokens)), out) is False
    model.centroids.add_(0.5)
    assert (model(tokens) - out).abs().max() > 1e-3
    with pytest.raises(SystemExit, match=r'1 mis-shaped \(centroids \(6, 10\) for \(7, 10\)'):
        checkpoint.fill(pixdec.PixelDecoder(vocab_size=7, feature_dim=10, grid=3),
                        model.state_dict(), 'x', 'PixelDecoder')


def test_pixdec_learns_resumes_exactly_and_renders_the_gpts_samples(digit_run, tmp_path,
                                                                     fid_net, monkeypatch):
    """train.py --model pixdec on a frozen tokenizer: 30 steps render held-out images from their
    tokens better than the tokens' mean patches, and log their rFID at every eval (with weights
    found); 30 == 15 + resume 15, exactly; sample.py
    --pixdec draws GPT -> decoder with the sample's seed (grid and .npz); a decoder of another
    tokenizer, or --ch_mult that misses --resolution, is one line."""
    run = lambda out, *a: tiny_run(out, '--model', 'pixdec', '--tokenizer', digit_run.tok,
                                   '--max_iters', '30', '--eval_every', '30', *a)
    monkeypatch.setenv('FID_INCEPTION_WEIGHTS', fid_net[1])
    whole = train.main(train.get_args(run(tmp_path / 'a', '--fid_images', '2')))
    log = open(tmp_path / 'a' / 'log.txt').read()
    assert log.count(' fid ') == 1, log
    psnr, means = (float(log.split(f' {k} ')[-1].split()[0]) for k in ('psnr', 'means_psnr'))
    assert psnr > means + 0.5, log
    assert (tmp_path / 'a' / 'recon_000030.png').exists()
    train.main(train.get_args(run(tmp_path / 'b', '--stop_after', '15')))
    resumed = train.main(train.get_args(run(tmp_path / 'b', '--stop_after', '15')))
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    decoder = str(tmp_path / 'a' / 'ckpt.pt')
    args = sample.get_args(['--ckpt', digit_run.gpt, '--pixdec', decoder, '--device', 'cpu'])
    generate, _, num_classes, _ = sample.load(args, 'cpu')
    labels = torch.tensor([0, 1, 2])   # the .npz's first batch: samples i of class i % 10
    stage1 = gpt.GPT.from_checkpoint(digit_run.gpt, ['gpt'])
    tokens = stage1.generate(labels, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, seed=5)
    expected = (pixdec.PixelDecoder.from_checkpoint(decoder)(tokens) + 1) / 2
    assert torch.equal(generate(labels, 5), expected) and num_classes == 10
    npz = tmp_path / 's.npz'
    sample.main(sample.get_args(['--ckpt', digit_run.gpt, '--pixdec', decoder, '--device', 'cpu',
                                 '--num_samples', '3', '--npz', str(npz), '--seed', '5']))
    assert np.array_equal(np.load(npz)['arr_0'], data.to_uint8(expected * 2 - 1))
    with pytest.raises(SystemExit, match='upsamples .* 4x4 tokens to 32 px, not --resolution 16'):
        train.main(train.get_args(run(tmp_path / 'c', '--ch_mult', '1,2,2,2')))
    other = tmp_path / 'tok2.pt'
    tokenizer.main(['fit', '--encoder', str(digit_run.tmp / 'ssl' / 'ckpt.pt'), '--k', '8',
                    '--images', '16', '--n_iter', '2', '--out', str(other), '--seed', '1'])
    train.main(train.get_args(tiny_run(tmp_path / 'd', '--model', 'pixdec', '--tokenizer',
                                       str(other), '--max_iters', '1')))
    with pytest.raises(SystemExit, match='was trained on another DiGIT tokenizer than --ckpt'):
        sample.load(sample.get_args(['--ckpt', digit_run.gpt, '--pixdec',
                                     str(tmp_path / 'd' / 'ckpt.pt')]), 'cpu')


def test_train_probe_reads_a_released_stage1_with_digits_protocol(tmp_path):
    """train.py --model probe --gpt <fairseq stage 1> --tokenizer T: the GPT is the file's, the
    heads probe layers 0..depth-1 over all 257 positions (DiGIT's model_linearprobe); a
    tokenizer of another size is one line naming both files."""
    torch.manual_seed(0)
    tok = tokenizer.Tokenizer(_tiny(), layer=2, resolution=224)   # 16 x 16 tokens
    tok.fit([images(8, 224, seed=1)], FS_V, n_iter=2).save(str(tmp_path / 'tok.pt'))
    s1 = str(fairseq_file(tmp_path / 's1.pt'))
    run = lambda *a: train.main(train.get_args(tiny_run(
        tmp_path / 'probe', '--model', 'probe', '--gpt', s1, '--max_iters', '2',
        '--train_images', '16', *a)))
    probe = run('--tokenizer', str(tmp_path / 'tok.pt'))
    assert (probe.layers, probe.last, len(probe.heads)) == ([0, 1], True, 2)
    ref = gpt.GPT.from_checkpoint(s1, ['gpt'])
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in probe.gpt.state_dict().items())
    assert 'eval 2 ce ' in open(tmp_path / 'probe' / 'log.txt').read()
    tokenizer.Tokenizer(_tiny(), layer=2, resolution=112).fit(
        [images(8, 112)], FS_V, n_iter=2).save(str(tmp_path / 'tok8.pt'))
    with pytest.raises(SystemExit, match=r'tok8.pt makes 64 tokens of 12.*s1.pt reads 256'):
        train.main(train.get_args(tiny_run(tmp_path / 'p2', '--model', 'probe', '--gpt', s1,
                                           '--tokenizer', str(tmp_path / 'tok8.pt'))))


def test_train_digit_chain_gpt_stage2_and_sample(tmp_path, fid_net, monkeypatch):
    """DiGIT end to end on 16 px built-in images: the stand-in encoder, K-Means, the GPT (4 steps
    == 2 + resume 2), a one-scale VQVAE, stage 2 (logging the FID of the chain's samples), then
    sample.py's grid and .npz of the chain."""
    train.main(train.get_args(tiny_run(tmp_path / 'ssl', '--model', 'ssl', '--depth', '4',
                                       '--patch_size', '4', '--max_iters', '2')))
    tok = str(tmp_path / 'tok.pt')
    tokenizer.main(['fit', '--encoder', str(tmp_path / 'ssl' / 'ckpt.pt'), '--k', '8',
                    '--images', '16', '--n_iter', '2', '--out', tok])
    g = ('--model', 'gpt', '--depth', '1', '--tokenizer', tok, '--max_iters', '4')
    whole = train.main(train.get_args(tiny_run(tmp_path / 'ga', *g)))
    split = tiny_run(tmp_path / 'gb', *g, '--stop_after', '2')
    train.main(train.get_args(split))
    resumed = train.main(train.get_args(split))
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    ckpt = torch.load(tmp_path / 'gb' / 'ckpt.pt', weights_only=True)
    assert ckpt['tokenizer'] == tok and ckpt['config']['block_size'] == 16
    assert 'eval 4 ce' in open(tmp_path / 'gb' / 'log.txt').read()
    assert (tmp_path / 'gb' / 'samples_000003.png').exists()
    probe = train.main(train.get_args(tiny_run(tmp_path / 'probe', '--model', 'probe', '--gpt',
                                               str(tmp_path / 'gb' / 'ckpt.pt'))))
    assert len(probe.heads) == 2 and all(torch.equal(v, resumed.state_dict()[k])
                                         for k, v in probe.gpt.state_dict().items())
    assert 'eval 6 ce ' in open(tmp_path / 'probe' / 'log.txt').read()
    train.main(train.get_args(tiny_run(tmp_path / 'vq', '--patch_nums', '4', '--max_iters', '2')))
    s2 = ('--model', 'stage2', '--depth', '1', '--tokenizer', tok, '--max_iters', '2')
    save_vqvae(tiny_vqvae(), tmp_path / 'multiscale.pt')
    with pytest.raises(SystemExit, match='stage 2 needs one'):
        train.main(train.get_args(tiny_run(tmp_path / 'bad', *s2, '--vae',
                                           str(tmp_path / 'multiscale.pt'))))
    monkeypatch.setenv('FID_INCEPTION_WEIGHTS', fid_net[1])   # FID of the chain's samples
    model = train.main(train.get_args(tiny_run(tmp_path / 's2', *s2, '--vae',
                                               str(tmp_path / 'vq' / 'ckpt.pt'), '--gpt',
                                               str(tmp_path / 'gb' / 'ckpt.pt'),
                                               '--fid_images', '2')))
    assert (model.config.source_len, model.config.source_vocab_size,
            model.config.block_size, model.config.vocab_size) == (16, 8, 16, 64)
    assert ' fid ' in open(tmp_path / 's2' / 'log.txt').read()
    chain = ['--ckpt', str(tmp_path / 'gb' / 'ckpt.pt'), '--stage2', str(tmp_path / 's2' /
             'ckpt.pt'), '--device', 'cpu', '--per_class', '1']
    sample.main(sample.get_args(chain + ['--out', str(tmp_path / 'grid.png')]))
    assert Image.open(tmp_path / 'grid.png').size == (2 + 10 * 66, 2 + 66)  # 10 classes, 16 px x 4
    args = sample.get_args(chain + ['--num_samples', '3', '--npz', str(tmp_path / 'd.npz')])
    sample.main(args)
    assert args.top_k == 1 and [sample.digit_top_k(k) for k in (8192, 512)] == [300, 19]
    npz = np.load(tmp_path / 'd.npz')
    assert npz['arr_0'].shape == (3, 16, 16, 3) and list(npz['labels']) == [0, 1, 2]
    with pytest.raises(SystemExit, match='--vqgan nope.ckpt: only DiGIT.s released stage 2'):
        sample.main(sample.get_args(chain + ['--vqgan', 'nope.ckpt']))
    vq = str(tmp_path / 'vq' / 'ckpt.pt')   # a file flag is read even where FID is off
    with pytest.raises(SystemExit, match=f'--gpt {vq} holds a train.py --model vqvae checkpoint'):
        train.main(train.get_args(tiny_run(tmp_path / 's2b', *s2, '--vae', vq, '--gpt', vq)))


def test_tokenizer_fit_and_fid_count_unreadable_files_and_stay_in_their_folder(
        tmp_path, fid_net, capsys):
    """tokenizer.py fit skips, warns about and counts the bad files it meets; fid.py counts a
    0-byte image as unreadable and never follows a link to the folder above (`..`) into a
    sibling folder."""
    folder = tmp_path / 'imgs'
    save_images(folder / 'a', 30)
    save_images(tmp_path / 'sibling', 5, start=50)
    for i in range(3):
        (folder / 'a' / f'bad{i}.png').write_bytes(b'\x89PNG not really')
    (folder / 'a' / 'empty.png').write_bytes(b'')
    os.symlink('..', folder / 'a' / 'up')
    train.main(train.get_args(tiny_run(tmp_path / 'ssl', '--model', 'ssl', '--depth', '4',
                                       '--patch_size', '4', '--max_iters', '1')))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        tokenizer.main(['fit', '--encoder', str(tmp_path / 'ssl' / 'ckpt.pt'), '--k', '4',
                        '--images', '40', '--n_iter', '1', '--data', str(folder),
                        '--out', str(tmp_path / 'tok.pt'), '--device', 'cpu'])
        assert '4 unreadable files were skipped' in capsys.readouterr().out
        base = ['--weights', fid_net[1], '--batch_size', '8', '--num_workers', '0',
                '--device', 'cpu', '--no_pr']
        fid.main([str(folder), *base])
    assert '30 images (4 unreadable skipped)' in capsys.readouterr().out


def test_resume_refuses_a_frozen_input_whose_contents_changed_and_takes_another_dtype(
        tmp_path):
    """A VAR run resumed after the file at --vae was replaced by another VQVAE (same path)
    is refused naming the flag; a tokenizer run resumed under --dtype float16 (GradScaler) or
    back under float32 trains on."""
    vae_run = tiny_run(tmp_path / 'vae', '--max_iters', '2')
    train.main(train.get_args(vae_run))
    vae = str(tmp_path / 'vae' / 'ckpt.pt')
    run = tiny_run(tmp_path / 'var', '--model', 'var', '--depth', '1', '--vae', vae,
                   '--max_iters', '4')
    train.main(train.get_args(run + ['--stop_after', '2']))
    train.main(train.get_args(vae_run + ['--max_iters', '3']))   # the tokenizer trains on
    with pytest.raises(SystemExit, match=f'--vae {vae} .its contents have changed.'):
        train.main(train.get_args(run))
    train.main(train.get_args(vae_run + ['--max_iters', '4', '--dtype', 'float16']))
    train.main(train.get_args(vae_run + ['--max_iters', '5', '--dtype', 'float32']))
    assert torch.load(vae, weights_only=True)['step'] == 5


def test_train_skips_unreadable_images_without_crashing(tmp_path):
    rng = np.random.default_rng(0)
    for c in ('cat', 'dog'):
        os.makedirs(tmp_path / 'img' / c)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
                tmp_path / 'img' / c / f'{i}.png')
    good = open(tmp_path / 'img' / 'cat' / '3.png', 'rb').read()
    open(tmp_path / 'img' / 'cat' / '3.png', 'wb').write(good[:len(good) // 2])   # truncated
    open(tmp_path / 'img' / 'dog' / 'empty.jpg', 'wb').close()
    train.main(train.get_args(tiny_run(tmp_path / 'out', '--data', str(tmp_path / 'img'),
                                       '--total_batch_size', '4', '--num_workers', '0')))
    ckpt = torch.load(tmp_path / 'out' / 'ckpt.pt', weights_only=True)
    bad = [str(tmp_path / 'img' / 'dog' / 'empty.jpg'), str(tmp_path / 'img' / 'cat' / '3.png')]
    assert ckpt['step'] == 6 and bad[0] in ckpt['skipped_files']  # counted from the start
    assert set(ckpt['skipped_files']) <= set(bad)  # a list of paths, each once
    assert ckpt['class_names'] == ['cat', 'dog']
    assert 'skipped_files' in open(tmp_path / 'out' / 'log.txt').read()


def test_train_var_resumes_exactly_and_logs_per_scale(tmp_path):
    """VAR on a frozen tiny tokenizer, from cached tokens: 6 steps == 3 + 3 steps, and the log
    and the final report carry the per-scale loss and accuracy."""
    vae = tiny_vqvae()
    save_vqvae(vae, tmp_path / 'vae.pt')
    run = lambda out, *extra: train.main(train.get_args(tiny_run(
        tmp_path / out, '--model', 'var', '--vae', str(tmp_path / 'vae.pt'), '--depth', '2',
        '--lr', '1e-3', *extra)))
    whole = run('a')
    run('b', '--stop_after', '3')
    resumed = run('b', '--stop_after', '3')
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    log = open(tmp_path / 'b' / 'log.txt').read().splitlines()
    assert [line.split()[:2] for line in log if line.startswith('eval')] == [['eval', '3'],
                                                                           ['eval', '6']]
    assert len(log[-1].split(' acc ')[1].split(' loss ')[0].split()) == 6   # one per scale
    assert (tmp_path / 'b' / 'samples_000006.png').exists()
    ckpt = torch.load(tmp_path / 'b' / 'ckpt.pt', weights_only=True)
    assert ckpt['kind'] == 'var' and ckpt['config']['num_classes'] == 10
    loaded = var.VAR.from_checkpoint(tmp_path / 'b' / 'ckpt.pt', vae)
    assert all(torch.equal(v, ckpt['model'][k]) for k, v in loaded.state_dict().items())


def test_train_var_names_a_missing_or_mismatched_tokenizer(tmp_path):
    with pytest.raises(SystemExit, match='not found: train a tokenizer first'):
        train.main(train.get_args(tiny_run(tmp_path, '--model', 'var', '--vae', 'nope.pt')))
    vae = tiny_vqvae()   # made for 16 px images
    save_vqvae(vae, tmp_path / 'vae.pt')
    with pytest.raises(SystemExit, match='made for 16 px images'):
        train.main(train.get_args(tiny_run(tmp_path, '--model', 'var', '--vae',
                                           str(tmp_path / 'vae.pt'), '--resolution', '32')))


# --- reliability: a run never loses good work; a user mistake is one line ----------------------

def ckpt_weights(path):
    return torch.load(path, weights_only=True)['model']


def test_train_divergence_skips_steps_stops_and_keeps_the_good_checkpoint(tmp_path):
    """A run resumed from a good step-3 checkpoint with a huge learning rate: the non-finite
    steps are skipped and logged, 3 in a row stop the run with a message, and the step-3
    checkpoint is neither overwritten nor made non-finite."""
    run = tiny_run(tmp_path, '--reseed_every', '0', '--log_every', '1', '--max_iters', '12')
    train.main(train.get_args(run + ['--stop_after', '3']))
    good = ckpt_weights(tmp_path / 'ckpt.pt')
    with pytest.raises(SystemExit, match='not finite in the last 3 steps'):
        train.main(train.get_args(run + ['--lr', '1e4', '--max_bad_steps', '3']))
    after = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert after['step'] == 3 and all(torch.equal(after['model'][k], v) for k, v in good.items())
    assert ' skipped_steps 1 ' in open(tmp_path / 'log.txt').read()


def test_checkpoint_refuses_to_save_non_finite_weights(tmp_path):
    model = torch.nn.Linear(2, 2)
    state = dict(raw_model=model, ema=None, optimizer=torch.optim.SGD(model.parameters(), 0.1),
                 disc=None, disc_opt=None, scaler=torch.amp.GradScaler('cpu', enabled=False),
                 step=5, cursor=(0, 5), skipped=0)
    args = train.get_args(['--out_dir', str(tmp_path)])
    keeper = checkpoint.Keeper(str(tmp_path / 'ckpt.pt'), None, dist.Run('cpu', 0, 1, None))
    keeper.save(state, {}, args, (), [])
    with torch.no_grad():
        model.weight[0, 0] = float('nan')
    with pytest.raises(SystemExit, match='weight is not finite'):
        keeper.save(state, {}, args, (), [])
    assert torch.isfinite(ckpt_weights(tmp_path / 'ckpt.pt')['weight']).all()


def test_out_dir_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path):
    run = tiny_run(tmp_path, '--max_iters', '1')
    (tmp_path / 'lock').write_text(f'{os.getpid()} {socket.gethostname()}\n')   # alive: us
    with pytest.raises(SystemExit, match='in use by another trainer'):
        train.main(train.get_args(run))
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    (tmp_path / 'lock').write_text(f'{dead.pid} {socket.gethostname()}\n')
    train.main(train.get_args(run))
    assert (tmp_path / 'ckpt.pt').exists() and not (tmp_path / 'lock').exists()


def test_failed_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / 'ckpt.pt')
    checkpoint.save({'step': 1}, path)

    def full_disk(obj, f):
        open(f, 'wb').write(b'half a checkpoint')
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(SystemExit, match='disk full while writing .*ckpt.pt'):
        checkpoint.save({'step': 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {'step': 1}
    assert os.listdir(tmp_path) == ['ckpt.pt']


def test_train_divergence_with_a_save_every_step_rolls_back_to_the_trusted_checkpoint(
        tmp_path):
    """--lr 1e6 and --save_every 1 after a good step-4 checkpoint: the step after each save
    vouches for it, so the wrecked saves that follow are undone: the run stops with one line
    naming ckpt.pt at step 4, its weights the good ones, no ckpt_prev.pt left; a rerun at a
    sane lr resumes from step 4 and ends with finite weights and held-out figures."""
    run = tiny_run(tmp_path, '--save_every', '1', '--max_iters', '10', '--max_bad_steps', '3')
    train.main(train.get_args(run + ['--stop_after', '4']))
    good = ckpt_weights(tmp_path / 'ckpt.pt')
    with pytest.raises(SystemExit) as e:
        train.main(train.get_args(run + ['--lr', '1e6']))
    msg = str(e.value.code)
    assert f"{tmp_path / 'ckpt.pt'} is back at step 4" in msg and '\n' not in msg, msg
    after = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert after['step'] == 4 and all(torch.equal(after['model'][k], v) for k, v in good.items())
    assert not (tmp_path / 'ckpt_prev.pt').exists()
    train.main(train.get_args(run + ['--lr', '1e-3']))
    final = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert final['step'] == 10 and all(v.isfinite().all() for v in final['model'].values()
                                       if v.is_floating_point())
    assert not (tmp_path / 'ckpt_prev.pt').exists()   # finite held-out figures vouch for it


def test_keeper_a_save_whose_next_loss_explodes_gives_way_to_the_one_before(tmp_path):
    """Keeper's rule on its own: the first finite loss after a save vouches for it unless it
    exceeds m + 3 (|m| + 0.05), m the median loss between saves. Vouched for, ckpt_prev.pt
    goes; refuted, ckpt.pt is rolled back to it; refuted with none before, it is set aside."""
    path, run = str(tmp_path / 'ckpt.pt'), dist.Run('cpu', 0, 1, None)
    args = train.get_args(['--out_dir', str(tmp_path)])
    model = torch.nn.Linear(2, 2)
    state = dict(raw_model=model, ema=None, optimizer=torch.optim.SGD(model.parameters(), 0.1),
                 disc=None, disc_opt=None, scaler=torch.amp.GradScaler('cpu', enabled=False),
                 step=0, cursor=(0, 0), skipped=[])
    keeper = checkpoint.Keeper(path, None, run)
    for step, loss in enumerate([1.0, 0.9, 0.8], 1):
        keeper.after_step(torch.tensor(loss))
        state['step'] = step
        keeper.save(state, {}, args, (), [])
    assert keeper.limit() == pytest.approx(0.9 + 3 * 0.95)
    keeper.after_step(torch.tensor(3.7))   # below the limit: step 3 vouched for
    assert not os.path.exists(path[:-3] + '_prev.pt')
    state['step'] = 4
    keeper.save(state, {}, args, (), [])
    assert torch.load(path[:-3] + '_prev.pt', weights_only=True)['step'] == 3
    resumed = checkpoint.Keeper(path, torch.load(path, weights_only=True), run)   # killed here
    with pytest.raises(SystemExit, match='is back at step 3'):
        resumed.after_step(torch.tensor(40.0))
    assert torch.load(path, weights_only=True)['step'] == 3
    fresh = checkpoint.Keeper(str(tmp_path / 'b.pt'), None, run)
    fresh.after_step(torch.tensor(1.0))
    fresh.save(state, {}, args, (), [])
    with pytest.raises(SystemExit, match='no checkpoint to trust'):
        fresh.after_step(torch.tensor(1e4))
    assert os.listdir(tmp_path) == sorted(os.listdir(tmp_path)) and \
        set(os.listdir(tmp_path)) == {'ckpt.pt', 'b_diverged.pt'}


def test_train_ends_non_zero_when_the_held_out_figures_are_not_finite(tmp_path, monkeypatch):
    run = tiny_run(tmp_path, '--max_iters', '2')
    monkeypatch.setattr(train, 'validate', lambda *a, **k: {'l2': float('nan'), 'psnr': 1.0})
    with pytest.raises(SystemExit, match='held-out figures are not finite: l2 nan'):
        train.main(train.get_args(run))


def test_fewer_training_images_than_a_batch_is_one_line_not_a_hang(tmp_path):
    with pytest.raises(SystemExit, match='--batch_size 4 is more than the 3 training images'):
        train.main(train.get_args(tiny_run(tmp_path, '--train_images', '3')))


@pytest.mark.parametrize('failure', ['enospc', 'torch_zip', 'read_only'])
def test_atomic_writer_full_disk_or_read_only_is_one_line_and_the_old_file_stays(
        tmp_path, monkeypatch, failure):
    """Every writer goes through checkpoint.atomic_path: a failing write (ENOSPC, torch's zip
    writer's 'unexpected pos', EACCES) is one line naming the file; the previous checkpoint,
    centroids and PNG stay byte-identical, and no temporary file is left."""
    ckpt, npy, png = (str(tmp_path / n) for n in ('ckpt.pt', 'km.npy', 'grid.png'))
    checkpoint.save({'step': 1}, ckpt)
    km = kmeans.KMeans(2)
    km.centroids = torch.ones(2, 3)
    km.save(npy)
    data.save_image_grid(torch.zeros(1, 3, 8, 8), png)
    before = {p: open(p, 'rb').read() for p in (ckpt, npy, png)}
    error = {'enospc': OSError(errno.ENOSPC, 'No space left on device'),
             'torch_zip': RuntimeError('[enforce fail at inline_container.cc:672] . unexpected '
                                       'pos 64 vs 0'),
             'read_only': PermissionError(errno.EACCES, 'Permission denied')}[failure]

    def failing_replace(src, dst):
        raise error
    monkeypatch.setattr(os, 'replace', failing_replace)
    for path, write in ((ckpt, lambda: checkpoint.save({'step': 2}, ckpt)),
                        (npy, lambda: km.save(npy)),
                        (png, lambda: data.save_image_grid(torch.ones(1, 3, 8, 8), png))):
        with pytest.raises(SystemExit) as e:
            write()
        msg = str(e.value.code)
        assert path in msg and 'previous file is intact' in msg and '\n' not in msg, msg
    monkeypatch.undo()
    assert {p: open(p, 'rb').read() for p in before} == before
    assert sorted(os.listdir(tmp_path)) == ['ckpt.pt', 'grid.png', 'km.npy']


def test_atomic_writer_and_log_refuse_symlinks_and_stale_temporaries_are_removed(tmp_path):
    target = tmp_path / 'elsewhere.txt'
    target.write_text('keep me\n')
    (tmp_path / 'run').mkdir()
    os.symlink(target, tmp_path / 'run' / 'ckpt.pt')
    with pytest.raises(SystemExit, match='symbolic link'):
        checkpoint.save({'step': 1}, str(tmp_path / 'run' / 'ckpt.pt'))
    os.symlink(target, tmp_path / 'run' / 'log.txt')
    with pytest.raises(SystemExit, match='log.txt is a symbolic link'):
        checkpoint.append_log('step 1', str(tmp_path / 'run' / 'log.txt'))
    assert target.read_text() == 'keep me\n'
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    (tmp_path / 'o').mkdir()
    for name in (f'ckpt.pt.tmp{dead.pid}', f'ckpt.pt.tmp{os.getpid()}', 'notes.tmp'):
        (tmp_path / 'o' / name).write_text('x')
    with checkpoint.OutDirLock(str(tmp_path / 'o')):
        left = sorted(os.listdir(tmp_path / 'o'))
    assert left == sorted(['lock', f'ckpt.pt.tmp{os.getpid()}', 'notes.tmp'])   # alive: kept


def test_error_boundary_one_line_for_user_and_os_errors_traceback_for_bugs(capsys):
    """cli.run: a UserError or an OSError is one line on stderr and exit status 1, Ctrl-C
    'interrupted' and 130; any other exception (a bug) propagates with its traceback."""
    def raises(e):
        def main():
            raise e
        return main
    for error, status, line in [
            (cli.UserError('--vae x.pt not found'), '--vae x.pt not found', None),
            (FileNotFoundError(errno.ENOENT, 'No such file or directory', 'data/a.png'),
             'data/a.png: No such file or directory', None),
            (OSError(errno.ENOSPC, 'No space left on device', 'out/x'),
             'out/x: No space left on device (free some space and rerun)', None),
            (KeyboardInterrupt(), 130, 'interrupted')]:
        with pytest.raises(SystemExit) as e:
            cli.run(raises(error))
        assert e.value.code == status
        if line:
            assert capsys.readouterr().err.strip() == line
    with pytest.raises(KeyError):
        cli.run(raises(KeyError('a bug in a loss')))
    assert cli.run(lambda: 7) == 7


def test_a_bug_inside_a_models_loss_keeps_its_traceback(tmp_path, monkeypatch):
    """train.py through its error boundary: a KeyError raised inside the task's loss is not
    turned into one line (it is a bug, not a user's mistake)."""
    def broken_loss(self, model, batch, step):
        return {}['l2']
    monkeypatch.setattr(vqvae_train.Training, 'loss', broken_loss)
    with pytest.raises(KeyError, match='l2'):
        cli.run(lambda: train.main(train.get_args(tiny_run(tmp_path, '--max_iters', '1'))))


class Evil:
    def __reduce__(self):   # unpickling it would create the file `pwned`
        return (open, ('pwned', 'w'))


@pytest.mark.parametrize('content', ['empty', 'truncated', 'random', 'evil', 'folder'])
def test_bad_checkpoint_files_are_one_line_naming_the_file(tmp_path, content, monkeypatch):
    """Bad files as the resumed ckpt.pt and as --vae: one SystemExit line with the path,
    never a torch traceback, and a crafted pickle never runs."""
    monkeypatch.chdir(tmp_path)
    good = tmp_path / 'good.pt'
    save_vqvae(tiny_vqvae(), good)
    for path, argv in ((tmp_path / 'run' / 'ckpt.pt', []),
                       (tmp_path / 'vae.pt', ['--model', 'var', '--vae',
                                              str(tmp_path / 'vae.pt')])):
        path.parent.mkdir(exist_ok=True)
        if content == 'folder':
            path.mkdir()
        elif content == 'evil':
            torch.save({'model': Evil()}, path)
        else:
            blob = {'empty': b'', 'random': np.random.default_rng(0).bytes(3000),
                     'truncated': good.read_bytes()[:2000]}[content]
            path.write_bytes(blob)
        with pytest.raises(SystemExit) as e:
            train.main(train.get_args(tiny_run(tmp_path / 'run', *argv)))
        assert str(path) in str(e.value) and '\n' not in str(e.value)
        assert not (tmp_path / 'pwned').exists()
        (path.rmdir() if path.is_dir() else path.unlink())


def test_checkpoint_load_of_random_bytes_is_one_line(tmp_path):
    """Random bytes, bare or behind a pickle header, make torch's weights_only unpickler raise
    UnpicklingError, IndexError, KeyError, UnicodeDecodeError or EOFError: each is one line."""
    rng, path = np.random.default_rng(0), tmp_path / 'bad.pt'
    for i in range(400):
        path.write_bytes(b'\x80\x02' * (i % 2) + rng.bytes(int(rng.choice([10, 100, 3000]))))
        with pytest.raises(SystemExit) as e:
            checkpoint.load(str(path), 'checkpoint')
        assert str(path) in str(e.value) and '\n' not in str(e.value)


def test_resume_refuses_other_data_or_another_tokenizer(tmp_path):
    train.main(train.get_args(tiny_run(tmp_path / 'vq', '--stop_after', '2')))
    with pytest.raises(SystemExit, match='--resolution 16 \\(now 32\\)'):
        train.main(train.get_args(tiny_run(tmp_path / 'vq', '--resolution', '32')))
    for name in ('a', 'b'):
        save_vqvae(tiny_vqvae(), tmp_path / f'{name}.pt')
    var_run = lambda vae, *a: train.get_args(tiny_run(
        tmp_path / 'var', '--model', 'var', '--depth', '1', '--vae', str(tmp_path / vae), *a))
    train.main(var_run('a.pt', '--stop_after', '2'))
    with pytest.raises(SystemExit, match='--vae .*a.pt \\(now .*b.pt\\)'):
        train.main(var_run('b.pt'))


BAD_TRAIN_FLAGS = [
    ['--batch_size', '0'], ['--total_batch_size', '-8'], ['--resolution', '0'],
    ['--save_every', '0'], ['--log_every', '0'], ['--eval_every', '0'], ['--depth', '0'],
    ['--vocab_size', '0'], ['--max_iters', '0'], ['--top_p', '1.5'], ['--top_k', '-1'],
    ['--lr', '-1'], ['--lr', 'nan'], ['--ema', '1'], ['--beta2', '1.0'], ['--ch', '33'],
    ['--ch_mult', '1,x'], ['--patch_nums', '1,0'], ['--num_workers', '-2'],
    ['--dropout', '1'], ['--warmup_iters', '-1'], ['--max_bad_steps', '0'],
    ['--model', 'nope'], ['--patch_size', '0'],
]

DDP_WORKER = """
import os, sys, torch
sys.path.insert(0, {repo!r})
import train
model = train.main(train.get_args({argv!r}))
torch.save(model.state_dict(), os.path.join({out!r}, 'rank%s.pt' % os.environ['RANK']))
"""


def torchrun_two_ranks(tmp_path, argv):
    """`torchrun --nproc_per_node 2` of train.main(argv) on CPU (gloo), in float32 as the
    in-process runs it is compared with; the final weights of both ranks."""
    script = tmp_path / 'worker.py'
    argv = [*argv, '--dtype', 'float32']
    script.write_text(DDP_WORKER.format(repo=REPO, argv=argv, out=str(tmp_path)))
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                    '--nproc_per_node', '2', str(script)], check=True, env=env, timeout=300,
                   cwd=tmp_path)
    return [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in (0, 1)]


def test_train_ddp_two_processes_match_each_other_and_accumulation(tmp_path):
    """torchrun, 2 gloo ranks x 4 images == 1 process x 4 images x 2 accumulation steps:
    the same 8 images per step, so the same weights; and both ranks end identical."""
    argv = tiny_run(tmp_path / 'ddp', '--reseed_every', '0', '--ch', '64', '--lr', '3e-4')
    rank0, rank1 = torchrun_two_ranks(tmp_path, argv)
    single = train.main(train.get_args(tiny_run(tmp_path / 'one', '--reseed_every', '0',
                                                '--ch', '64', '--lr', '3e-4')))
    for k, v in single.state_dict().items():
        assert torch.equal(rank0[k], rank1[k]), k
        if k != 'quantize.ema_vocab_hit_SV':   # statistics of rank 0's half of the batch
            # fp32 summation order differs; Adam turns that into ~1e-5 (lr is 3e-4)
            torch.testing.assert_close(rank0[k], v, atol=1e-4, rtol=0, msg=k)


def test_train_var_ddp_gathers_the_token_cache_and_ranks_agree(tmp_path):
    """torchrun, 2 gloo ranks: each tokenizes half the images, the gathered cache equals a
    single process's tokens in dataset order, and both ranks end with identical weights."""
    vae = tiny_vqvae()
    save_vqvae(vae, tmp_path / 'vae.pt')
    argv = tiny_run(tmp_path / 'ddp', '--model', 'var', '--vae', str(tmp_path / 'vae.pt'),
                    '--depth', '2', '--train_images', '21', '--max_iters', '3')
    rank0, rank1 = torchrun_two_ranks(tmp_path, argv)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    cache = torch.load(tmp_path / 'ddp' / 'tokens_train.pt', weights_only=True)
    ds = data.build_dataset('builtin', 16, True, size=21)
    x = torch.stack([ds[i][0] for i in range(21)])
    assert torch.equal(cache['tokens'].long(), torch.cat(vae.img_to_idx(x), 1))
    assert cache['labels'].tolist() == [ds[i][1] for i in range(21)]



def test_tokenize_crops_makes_passes_of_new_random_crops(tmp_path):
    """--token_crops K: the cache holds K passes over the training images, row i + k N the image
    i (its label) as one of its random crops, new crops in each pass; a second call reuses the
    cache; one pass keeps the key without 'crops', so older caches stay valid."""
    rng = np.random.default_rng(0)
    for c in range(2):   # 36 px files at resolution 32: no resize, crops are exact windows
        (tmp_path / 'img' / f'c{c}').mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (36, 36, 3), np.uint8)).save(
                tmp_path / 'img' / f'c{c}' / f'{i}.png')
    ds = data.build_dataset(str(tmp_path / 'img'), 32, True)
    args = argparse.Namespace(data=str(tmp_path / 'img'), resolution=32, batch_size=4,
                              num_workers=0)
    encode = lambda img: (img[:, 0, :3, :3].flatten(1) * 1000).round().long()      # (B, 9)
    torch.manual_seed(0)
    got = data.tokenize(encode, {'k': 1}, ds, str(tmp_path / 'c3.pt'), args, 'cpu', crops=3)
    n = len(ds)
    assert len(got) == 3 * n and got.labels.tolist() == [ds.samples[i][1] for i in range(n)] * 3
    for r in range(3 * n):
        full = torch.from_numpy(np.asarray(Image.open(ds.samples[r % n][0]), np.float32))
        full = (full.permute(2, 0, 1) / 255 * 2 - 1)[None]                     # (1, 3, 36, 36)
        windows = [encode(full[:, :, t:t + 32, l:l + 32])[0] for t in range(5) for l in range(5)]
        assert any(torch.equal(got.tokens[r].long(), w) for w in windows)
    assert not torch.equal(got.tokens[:n], got.tokens[n:2 * n])
    again = data.tokenize(encode, {'k': 1}, ds, str(tmp_path / 'c3.pt'), args, 'cpu', crops=3)
    assert torch.equal(again.tokens, got.tokens)
    one = data.tokenize(encode, {'k': 1}, ds, str(tmp_path / 'c1.pt'), args, 'cpu')
    keys = [torch.load(tmp_path / f, weights_only=True)['key'] for f in ('c1.pt', 'c3.pt')]
    assert len(one) == n and 'crops' not in keys[0] and keys[1]['crops'] == 3


# --- fid.py ------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def fid_net(tmp_path_factory):
    """A FIDInception with random weights whose BatchNorm statistics are calibrated on random
    images (one train-mode pass), so activations are O(1) as with the real weights; and its
    state dict saved as a checkpoint file."""
    torch.manual_seed(0)
    model = inception.FIDInception()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration pass
            m.reset_running_stats()
    smooth = F.interpolate(torch.rand(6, 3, 12, 12), size=(299, 299), mode='bilinear')
    with torch.no_grad():
        model.train()(smooth * 2 - 1)
    path = tmp_path_factory.mktemp('fid') / 'inception.pth'
    torch.save(model.state_dict(), path)
    return model.eval().requires_grad_(False), str(path)


def u8_images(n, h, w, seed=0):
    """Smooth random uint8 images (n, h, w, 3), distinct per seed."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(h, w), mode='bilinear')
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_fid_inception_keys_match_official():
    """Every key and shape of pt_inception-2015-12-05 (472 float tensors, 23,885,392 values)."""
    with torch.device('meta'):
        m = inception.FIDInception()
    ours = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    path = os.path.join(REFERENCE, 'fid_inception_keys.txt')
    if os.path.exists(path):   # the full list, when shared/ is beside the repo
        assert ours == _read_keys(path)
    listing = sorted(f'{k} {s}' for k, s in ours.items())
    assert hashlib.sha256('\n'.join(listing).encode()).hexdigest() == (
        '760681d791cb624e1bf7a2e802a68933dd17aa5e3109fcf498d9dfa521bc10d7')
    floats = [v for k, v in m.state_dict().items() if not k.endswith('num_batches_tracked')]
    assert len(floats) == 472 and sum(v.numel() for v in floats) == 23_885_392


def test_fid_load_inception_uses_every_tensor_and_names_what_is_wrong(fid_net, tmp_path,
                                                                      monkeypatch):
    model, path = fid_net
    state = {k: v for k, v in model.state_dict().items() if 'num_batches' not in k}
    torch.save(state, tmp_path / 'no_nbt.pth')   # the released file may lack num_batches_tracked
    loaded = inception.load_inception(str(tmp_path / 'no_nbt.pth'))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for k, v in loaded.state_dict().items():
        if k in state:
            assert torch.equal(v, state[k]), k
    monkeypatch.setenv('FID_INCEPTION_WEIGHTS', path)   # found through the environment
    assert torch.equal(inception.load_inception().fc.weight, model.fc.weight)
    bad = dict(state)
    del bad['Mixed_7c.branch_pool.bn.running_var']
    bad['fc.weight'] = torch.zeros(1000, 2048)
    bad['extra.weight'] = torch.zeros(1)
    torch.save(bad, tmp_path / 'bad.pth')
    with pytest.raises(SystemExit, match=r'1 missing keys \[.Mixed_7c.branch_pool.bn.running_var'
                       r".*extra.weight.*fc.weight \(1000, 2048\) != \(1008, 2048\)"):
        inception.load_inception(str(tmp_path / 'bad.pth'))
    monkeypatch.delenv('FID_INCEPTION_WEIGHTS')
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'empty_hub'))
    with pytest.raises(SystemExit, match='--weights.*--download'):
        inception.load_inception()
    with pytest.raises(SystemExit, match='nowhere.pth'):
        inception.load_inception(str(tmp_path / 'nowhere.pth'))


def _selector(conv, channel):
    """Make a Conv block output ReLU(x[channel]) on every output channel (BN ~ identity)."""
    with torch.no_grad():
        conv.conv.weight.zero_()[:, channel] = 1
        conv.bn.reset_parameters()
        conv.bn.reset_running_stats()
    conv.bn.eps = 0.0


def test_fid_pooling_quirks_of_the_tf_graph():
    """3x3 average pools do not count padding (corner = mean of 4, edge = mean of 6); Mixed_7c's
    pool branch is a 3x3 max pool (stride 1, padded), Mixed_7b's an average pool."""
    x = torch.arange(16.).view(1, 1, 4, 4) + 1
    a = inception.avg_pool(x)[0, 0]
    assert a[0, 0] == (1 + 2 + 5 + 6) / 4 and a[0, 1] == (1 + 2 + 3 + 5 + 6 + 7) / 6
    assert a[1, 1] == x[0, 0, :3, :3].mean()
    x = torch.rand(1, 8, 5, 5)
    for max_pool, pool in ((True, F.max_pool2d(x, 3, 1, 1)), (False, inception.avg_pool(x))):
        block = inception.InceptionE(8, max_pool=max_pool).eval()
        _selector(block.branch_pool, 3)
        out = block(x)[:, -192:]                        # the pool branch is concatenated last
        torch.testing.assert_close(out, pool[:, 3:4].expand(-1, 192, -1, -1))


def test_fid_features_batch_independent_and_spatial_is_mixed_6d_nhwc(fid_net):
    model, _ = fid_net
    x = inception.preprocess(u8_images(3, 64, 48), 'adm')                    # (3, 3, 299, 299)
    taps = []
    hook = model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: taps.append(o))
    with torch.no_grad():
        pool, spatial = model(x, spatial=True)
        one = torch.cat([model(x[i:i + 1]) for i in range(3)])
    hook.remove()
    assert pool.shape == (3, 2048) and spatial.shape == (3, 2023)
    assert pool.std(0).mean() > 1e-3                   # calibrated: features differ per image
    torch.testing.assert_close(one, pool, rtol=0, atol=1e-5)
    torch.testing.assert_close(spatial, taps[0][:, :7].permute(0, 2, 3, 1).reshape(3, 2023))
    assert spatial[0, 1] == taps[0][0, 1, 0, 0]        # channel fastest (NHWC), not NCHW


def test_fid_tf1_resize_hand_cases_and_modes():
    """TF1 legacy bilinear: src = dst * in / out, hi clamped to the last pixel."""
    row = torch.tensor([[[[10., 40.]]]])                                     # (1, 1, 1, 2)
    up = inception.resize_tf1_bilinear(row.expand(1, 1, 2, 2), size=3)[0, 0, 0]
    torch.testing.assert_close(up, torch.tensor([10., 10 + 2 / 3 * 30, 40.]))  # src 0, 2/3, 4/3
    x = torch.arange(16.).view(1, 1, 4, 4)
    torch.testing.assert_close(inception.resize_tf1_bilinear(x, size=2)[0, 0], x[0, 0, ::2, ::2])
    # a float32 numpy transcription of the formula, separable, on a non-square image
    img = np.random.default_rng(0).integers(0, 256, (1, 3, 37, 52)).astype(np.float32)

    def axis(n_in, n_out=299):
        src = np.arange(n_out, dtype=np.float32) * np.float32(np.float32(n_in) / n_out)
        lo = np.floor(src).astype(np.int64)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo.astype(np.float32)
    lo, hi, f = axis(52)
    t = img[..., lo] + (img[..., hi] - img[..., lo]) * f
    lo, hi, f = axis(37)
    ref = t[..., lo, :] + (t[..., hi, :] - t[..., lo, :]) * f[:, None]
    assert np.array_equal(inception.resize_tf1_bilinear(torch.from_numpy(img)).numpy(), ref)
    u8 = u8_images(2, 37, 52)
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float()
    assert torch.equal(inception.preprocess(u8, 'adm'),
                       (inception.resize_tf1_bilinear(x) - 128) / 128)
    ref = F.interpolate(x / 255, size=(299, 299), mode='bilinear', align_corners=False) * 2 - 1
    assert torch.equal(inception.preprocess(u8, 'pytorch_fid'), ref)
    assert inception.preprocess(u8, 'adm').is_contiguous()   # NCHW, pytorch-fid's kernels
    with pytest.raises(ValueError, match='uint8'):
        inception.preprocess(u8.astype(np.float32), 'adm')
    with pytest.raises(ValueError, match='unknown mode'):
        inception.preprocess(u8, 'clean')


def test_fid_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    eye = np.eye(8)
    assert fid.frechet_distance(mu1, eye, mu2, eye) == pytest.approx(((mu1 - mu2) ** 2).sum())
    a, b = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)      # diagonal: sum (a + b - 2 sqrt ab)
    closed = ((mu1 - mu2) ** 2).sum() + (a + b - 2 * np.sqrt(a * b)).sum()
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, 1e-12)
    x, y = rng.normal(size=(500, 40)), rng.normal(size=(300, 40)) @ rng.normal(size=(40, 40))
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    d12 = fid.frechet_distance(x.mean(0), s1, y.mean(0), s2)
    assert d12 == pytest.approx(fid.frechet_distance(y.mean(0), s2, x.mean(0), s1), 1e-10)
    import scipy.linalg   # pytorch-fid's formula: tr sqrtm(S1 S2)
    ref = (((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2)
           - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real))
    assert d12 == pytest.approx(ref, 1e-9)
    assert abs(fid.frechet_distance(x.mean(0), s1, x.mean(0), s1)) < 1e-8 * np.trace(s1)
    a[:3] = 0                                                   # singular: rank 5 of 8
    closed = ((mu1 - mu2) ** 2).sum() + (a + b - 2 * np.sqrt(a * b)).sum()
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, 1e-12)
    z = rng.normal(size=(10, 40)) * 3                          # rank 9 < 40: singular covariance
    d = fid.frechet_distance(z.mean(0), np.cov(z, rowvar=False), x.mean(0), s1)
    assert np.isfinite(d) and isinstance(d, float) and d > 0
    with pytest.raises(ValueError, match='do not match'):
        fid.frechet_distance(mu1, eye, mu2[:4], eye[:4, :4])


def test_fid_moments_equal_numpy_mean_and_cov():
    x = np.random.default_rng(0).normal(3, 2, size=(1000, 16))
    m = fid.Moments(16, 'cpu')
    for part in np.split(x, [1, 7, 300, 999]):                 # uneven batches
        m.update(torch.from_numpy(part).float())
    mu, cov = m.mean_cov()
    xf = x.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mu, xf.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(xf, rowvar=False), rtol=1e-10, atol=1e-12)


def test_fid_inception_score_uniform_one_hot_and_splits():
    assert fid.inception_score(np.zeros((100, 1008))) == pytest.approx(1.0)
    one_hot = np.zeros((120, 1008))
    one_hot[np.arange(120), np.arange(120) % 12] = 200.0        # 12 classes, each certain
    assert fid.inception_score(one_hot) == pytest.approx(12.0)
    # consecutive splits, each scored alone, then averaged (ADM): 12 classes, then 3 classes
    two = np.concatenate([one_hot, np.eye(1008)[np.arange(120) % 3] * 200])
    assert fid.inception_score(two, split_size=120) == pytest.approx((12 + 3) / 2)
    logits = np.random.default_rng(0).normal(size=(300, 1008)) * 3   # numpy transcription
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ref = np.mean([np.exp(np.mean(np.sum(q * (np.log(q) - np.log(q.mean(0))), 1)))
                   for q in (p[:128], p[128:256], p[256:])])
    assert fid.inception_score(logits, split_size=128) == pytest.approx(ref, 1e-10)


def test_fid_precision_recall_toy_cases():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(60, 5)).astype(np.float32)
    assert fid.precision_recall(a, a) == (1.0, 1.0)
    assert fid.precision_recall(a, a + 100) == (0.0, 0.0)
    # 1-d: refs 0, 1, 2, 10; k = 3 counts the point itself as the 0th neighbour, so each radius
    # is the squared distance to the 3rd other point: 100, 81, 64, 100
    ref = np.array([[0.], [1.], [2.], [10.]])
    samples = np.array([[-9.9], [-10.1], [20.5], [11.], [5.], [6.], [7.], [8.]])
    p, r = fid.precision_recall(ref, samples)
    assert p == 6 / 8                        # -10.1 and 20.5 fall outside every ref ball
    # sample radii: the 3rd other neighbour among the 8 samples; recall counts refs inside
    d = (samples - samples.T) ** 2
    radius = np.sort(d, 1)[:, 3]
    assert r == np.mean([((ref[j] - samples[:, 0]) ** 2 <= radius).any() for j in range(4)])
    with pytest.raises(ValueError, match='more than k=3'):
        fid.precision_recall(ref[:3], samples)


def test_fid_center_crop_is_adm_imagenet_crop():
    """Halve (BOX) while the short side >= 2 size, bicubic to short side = size, centre crop."""
    img = Image.new('RGB', (1100, 700), (200, 30, 90))
    img.paste((0, 0, 255), (0, 0, 100, 700))                 # a left band, cropped away
    out = inception.center_crop(img, 256)                          # 1100x700 -> 550x350 -> 402x256
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8
    assert (out == (200, 30, 90)).all()
    assert inception.center_crop(Image.new('RGB', (300, 256)), 256).shape == (256, 256, 3)


def test_fid_cli_npz_folder_stats_and_errors(fid_net, tmp_path, capsys):
    """The same images as an .npz and as a folder (plus one corrupt file, skipped and counted)
    give FID ~0 and P = R = 1; saved statistics reproduce the FID; mismatches are errors."""
    _, weights = fid_net
    imgs = u8_images(6, 40, 40, seed=1)
    np.savez(tmp_path / 'samples.npz', arr_0=imgs, labels=np.arange(6))
    folder = tmp_path / 'folder'
    folder.mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(folder / f'{i}.png')
    (folder / 'broken.png').write_bytes(b'\x89PNG not really')
    base = ['--weights', weights, '--batch_size', '4', '--num_workers', '0', '--device', 'cpu']
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        res = fid.main([str(tmp_path / 'samples.npz'), str(folder), *base,
                        '--save_stats', str(tmp_path / 'stats.npz')])
        # 6 images: rank-5 covariances, whose ~2000 zero eigenvalues are rounding noise that
        # the square root lifts to ~1e-7 each: ~0 relative to the trace, not to the last digit
        s = np.load(tmp_path / 'stats.npz')
        assert abs(res['FID']) < 1e-4 * np.trace(s['sigma'])
        assert abs(res['sFID']) < 1e-4 * np.trace(s['sigma_s'])
        assert res['precision'] == 1.0 and res['recall'] == 1.0 and res['IS'] > 1.0
        assert '6 images (1 unreadable skipped)' in capsys.readouterr().out
        other = u8_images(6, 40, 40, seed=2)
        np.savez(tmp_path / 'other.npz', arr_0=other)
        res2 = fid.main([str(tmp_path / 'other.npz'), str(tmp_path / 'stats.npz'), *base])
        res3 = fid.main([str(tmp_path / 'other.npz'), str(tmp_path / 'samples.npz'), *base])
        assert res2['FID'] == pytest.approx(res3['FID'], rel=1e-9) and res2['FID'] > 1e-3
        assert 'precision' not in res2                 # statistics alone: no P/R
        with pytest.raises(SystemExit, match='mode adm, not pytorch_fid'):
            fid.main([str(tmp_path / 'other.npz'), str(tmp_path / 'stats.npz'), *base,
                      '--mode', 'pytorch_fid'])
    assert s['mu'].shape == (2048,) and s['sigma_s'].shape == (2023, 2023) and s['n'] == 6
    np.savez(tmp_path / 'floats.npz', arr_0=imgs.astype(np.float32))
    with pytest.raises(SystemExit, match='expected uint8 .N, H, W, 3.'):
        fid.main([str(tmp_path / 'floats.npz'), *base])
    np.savez(tmp_path / 'nothing.npz', labels=np.arange(3))
    with pytest.raises(SystemExit, match='neither images'):
        fid.main([str(tmp_path / 'nothing.npz'), *base])


def test_fid_two_ranks_equal_one_process(fid_net, tmp_path):
    """torchrun, 2 gloo ranks each reading half of an .npz (7 images, uneven): the statistics
    and the IS (order-dependent splits) equal those of one process."""
    _, weights = fid_net
    np.savez(tmp_path / 'samples.npz', arr_0=u8_images(7, 32, 32, seed=3))
    argv = [str(tmp_path / 'samples.npz'), '--weights', weights, '--batch_size', '2',
            '--split_size', '3', '--device', 'cpu']
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
    out = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                          '--nproc_per_node', '2', os.path.join(REPO, 'fid.py'), *argv,
                          '--save_stats', str(tmp_path / 'two.npz')], check=True, env=env,
                         timeout=300, cwd=tmp_path, capture_output=True, text=True).stdout
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        one = fid.main(argv + ['--save_stats', str(tmp_path / 'one.npz')])
    assert f"IS {one['IS']:.4f}" in out
    a, b = np.load(tmp_path / 'one.npz'), np.load(tmp_path / 'two.npz')
    assert a['n'] == b['n'] == 7
    # equal up to float rounding: torchrun ranks run 1 thread and other batch splits, which
    # moves features by ~1e-5; dropping one of the 7 images moves the mean by up to 0.8
    for k in ('mu', 'sigma', 'mu_s', 'sigma_s'):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-3, atol=1e-4)


# --- NVIDIA's TorchScript port, and FID inside train.py ----------------------------------------

NVIDIA_KEYS = os.path.join(REPO, 'testdata', 'nvidia_inception_keys.txt')


class ScriptNode(torch.nn.Module):
    """A module of a test TorchScript archive: tensors and submodules under NVIDIA's names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def nvidia_archive(path, drop=(), extra=()):
    """A TorchScript archive with the tensor names and shapes of NVIDIA's Inception port
    (testdata), distinct random values (var > 0); `drop` / `extra` names removed / added."""
    g, root = torch.Generator().manual_seed(0), ScriptNode()
    keys = {k: s for k, s in _read_keys(NVIDIA_KEYS).items() if k not in drop}
    for name, shape in {**keys, **{k: (3,) for k in extra}}.items():
        *modules, param = name.split('.')
        node = root
        for m in modules:
            if not hasattr(node, m):
                node.add_module(m, ScriptNode())
            node = getattr(node, m)
        value = torch.rand(shape, generator=g) + 0.5 if param == 'var' else \
            torch.randn(shape, generator=g)
        node.register_parameter(param, torch.nn.Parameter(value))
    torch.jit.script(root).save(str(path))
    return keys


def test_fid_nvidia_torchscript_port_converts_every_tensor(tmp_path):
    """NVIDIA's names and shapes (read off the released archive) load into FIDInception: each
    of their 378 tensors lands in exactly one of ours, BN scales are 1, output -> fc; TF's
    names pair with pytorch-fid's (spot checks written by hand); without `output` there is no
    fc (no IS); an unknown tensor is one line naming it."""
    path = tmp_path / 'inception-2015-12-05.pt'
    keys = nvidia_archive(path)
    theirs = inception.read_torchscript(str(path))
    assert set(theirs) == set(keys) and len(keys) == 378
    model = inception.load_inception(str(path))
    ours = {k: v for k, v in model.state_dict().items() if 'num_batches' not in k}
    fingerprint = lambda t: (tuple(t.shape), round(t.double().sum().item(), 6))
    bn_scales = [k for k in ours if k.endswith('bn.weight')]
    assert all(torch.equal(ours[k], torch.ones_like(ours[k])) for k in bn_scales)
    assert sorted(fingerprint(v) for k, v in ours.items() if k not in bn_scales) == \
        sorted(fingerprint(v) for v in theirs.values())
    for nv, pt in [('layers.conv_4.beta', 'Conv2d_4a_3x3.bn.bias'),
                   ('layers.mixed_4.tower_1.conv_4.weight', 'Mixed_6b.branch7x7dbl_5.conv.weight'),
                   ('layers.mixed_10.tower_1_mixed_conv.var',
                    'Mixed_7c.branch3x3dbl_3a.bn.running_var'),
                   ('layers.mixed_8.tower_1.conv_3.mean', 'Mixed_7a.branch7x7x3_4.bn.running_mean'),
                   ('output.weight', 'fc.weight')]:
        assert torch.equal(ours[pt], theirs[nv]), (nv, pt)
    assert model.weights.startswith('a TorchScript port, converted')
    nvidia_archive(tmp_path / 'no_fc.pt', drop=('output.weight', 'output.bias'))
    assert inception.load_inception(str(tmp_path / 'no_fc.pt')).fc is None
    nvidia_archive(tmp_path / 'extra.pt', extra=('layers.mixed_3.tower.gamma',))
    with pytest.raises(SystemExit, match=r'extra.pt: not NVIDIA.*layers.mixed_3.tower.gamma'):
        inception.load_inception(str(tmp_path / 'extra.pt'))


def test_fid_torchscript_reader_never_runs_code(tmp_path):
    """An archive whose data.pkl would call os.system is refused in one line; nothing ran."""
    marker, path = tmp_path / 'ran', tmp_path / 'evil.pt'
    with zipfile.ZipFile(path, 'w') as z:
        z.writestr('evil/data.pkl', pickle.dumps(RunsCode(marker), protocol=2))
        z.writestr('evil/constants.pkl', pickle.dumps((), protocol=2))
    with pytest.raises(SystemExit, match=r'evil.pt: not NVIDIA.*refused global posix.system'):
        inception.load_inception(str(path))
    assert not marker.exists()


class Images(torch.utils.data.Dataset):
    """(image in [-1, 1], label) pairs, as data.py's datasets give them."""

    def __init__(self, n, size=16, seed=0):
        self.x = torch.from_numpy(u8_images(n, size, size, seed)).permute(0, 3, 1, 2) / 127.5 - 1

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], 0


def test_fid_held_out_statistics_are_cached_by_data_and_count_and_reused(fid_net, tmp_path,
                                                                         monkeypatch):
    """The held-out statistics are computed once per (data key, n, weights) and read back
    after; a tokenizer that returns its input has FID ~0, another image set clearly more;
    without weights FID is off with one line."""
    monkeypatch.setenv('FID_INCEPTION_WEIGHTS', fid_net[1])
    val, lines = Images(3), []
    start = lambda n, key: fid.HeldOut.start(n, key, str(tmp_path), val, 'cpu', lines.append)
    first = start(3, ('data', 16))
    assert not first.cached and os.path.exists(first.cache) and 'cached in' in lines[-1]
    again = start(3, ('data', 16))
    assert again.cached and again.cache == first.cache and 'read from' in lines[-1]
    np.testing.assert_array_equal(again.ref['mu'], first.ref['mu'])
    assert len({first.cache, start(2, ('data', 16)).cache, start(3, ('data', 32)).cache}) == 3
    identity = first(lambda idx: torch.stack([val[i][0] for i in idx]))
    other = Images(3, seed=7)
    assert abs(identity) < 1e-3 < first(lambda idx: torch.stack([other[i][0] for i in idx]))
    monkeypatch.delenv('FID_INCEPTION_WEIGHTS')
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'empty_hub'))
    assert start(3, ('data', 16)) is None and lines[-1].startswith('FID off: no Inception')
    assert start(0, ('data', 16)) is None


def test_train_logs_fid_of_the_tokenizer_at_every_eval(fid_net, tmp_path, monkeypatch, capsys):
    """--fid_images 2: the VQVAE's rFID is in every eval line, its held-out statistics cached
    beside --out_dir; the final report names it with the number of images it used."""
    monkeypatch.setenv('FID_INCEPTION_WEIGHTS', fid_net[1])
    train.main(train.get_args(tiny_run(tmp_path / 'vq', '--max_iters', '4', '--fid_images', '2')))
    assert '(2 images vs 2 held-out ones)' in capsys.readouterr().out
    evals = [ln for ln in open(tmp_path / 'vq' / 'log.txt') if ln.startswith('eval')]
    assert len(evals) == 2 and all(' fid ' in ln for ln in evals)
    assert len(list((tmp_path / 'fid_stats').glob('fid_stats_*.npz'))) == 1


# --- bad command lines and files of every CLI: one line naming the flag or the file ------------

MODULES = {'sample': sample, 'fid': fid, 'tokenizer': tokenizer, 'kmeans': kmeans, 'train': train}


# --- the files the bad command lines point at, made once -------------------------------------

@pytest.fixture(scope='module')
def cli_files(tmp_path_factory):
    """make_cli_files, once per module."""
    return make_cli_files(tmp_path_factory.mktemp('cli'))


def make_cli_files(d):
    """{name: path} in the folder d: a tiny VAR run (10 classes) and its VQVAE, a DINOv2-layout
    ViT, FID Inception weights (random), and broken or foreign files of each kind."""
    p = {k: str(d / v) for k, v in dict(
        vae='vae.pt', var='var.pt', gpt='gpt.pt', garbage='garbage.pt', dino='dino.pth',
        weights='inception.pth', keys='keys.pth', png='in.png', broken='broken.png',
        good='good.npz', noarr='noarr.npz', cut='cut.npz', npy='feats.npy', zero='zero.npz',
        floats='floats.npz', badmu='badmu.npz', nanmu='nanmu.npz', empty='empty_dir',
        unreadable='unreadable_dir', c16='c16.npy', cutnpy='cut.npy', nan='nan.npy', d8='d8.npy',
        ints='ints.npy', missing='missing.npy', vae1='vae1.pt', bomb='bomb.png',
        flat='flat', listrun='listrun', badimgs='badimgs').items()}
    torch.manual_seed(0)
    vae = vqvae.VQVAE(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                      patch_nums=(1, 2, 3, 4, 6, 8), using_sa=True).eval()
    checkpoint.save(dict(kind='vqvae', config=vqvae.asdict(vae.config), model=vae.state_dict(),
                         ema=None), p['vae'])
    model = var.VAR(vae, depth=2, num_classes=10, patch_nums=vae.config.patch_nums)
    checkpoint.save(dict(kind='var', config=vqvae.asdict(model.config), model=model.state_dict(),
                         ema=None, vae=p['vae']), p['var'])
    vae1 = vqvae.VQVAE(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                       patch_nums=(8,))
    checkpoint.save(dict(kind='vqvae', config=vqvae.asdict(vae1.config), model=vae1.state_dict(),
                         ema=None), p['vae1'])
    stage1 = gpt.GPT(vocab_size=8, block_size=4, depth=1, num_classes=10)
    checkpoint.save(dict(kind='gpt', config=vqvae.asdict(stage1.config),
                         model=stage1.state_dict(), ema=None), p['gpt'])
    png = io.BytesIO()
    Image.new('RGB', (1, 1)).save(png, format='PNG')
    ihdr = b'IHDR' + (30000).to_bytes(4, 'big') * 2 + png.getvalue()[24:29]   # 30000 x 30000
    with open(p['bomb'], 'wb') as f:
        f.write(png.getvalue()[:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, 'big')
                + png.getvalue()[33:])
    save_images(p['flat'], 60)
    os.makedirs(p['listrun'])
    torch.save([1, 2, 3], os.path.join(p['listrun'], 'ckpt.pt'))   # a resume file of no run
    os.makedirs(os.path.join(p['badimgs'], 'c'))
    for i in range(60):
        with open(os.path.join(p['badimgs'], 'c', f'{i}.png'), 'wb') as f:
            f.write(b'\x89PNG not really')
    with open(p['garbage'], 'wb') as f:
        f.write(b'not a torch file at all')
    vit = DINOv2(embed_dim=32, depth=4, num_heads=2, img_size=56)
    torch.save(vit.state_dict(), p['dino'])
    torch.save(inception.FIDInception().state_dict(), p['weights'])
    torch.save({'fc.weight': torch.zeros(3)}, p['keys'])
    Image.new('RGB', (16, 16), (200, 30, 90)).save(p['png'])
    with open(p['broken'], 'wb') as f:
        f.write(b'\x89PNG not really')
    np.savez(p['good'], arr_0=np.full((2, 32, 32, 3), 128, np.uint8))
    np.savez(p['noarr'], labels=np.arange(3))
    np.savez(p['zero'], arr_0=np.zeros((0, 32, 32, 3), np.uint8))
    np.savez(p['floats'], arr_0=np.zeros((2, 32, 32, 3), np.float32))
    np.savez(p['cut'], arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    with open(p['cut'], 'r+b') as f:
        f.truncate(os.path.getsize(p['cut']) // 2)
    np.savez(p['badmu'], mu=np.zeros(10), sigma=np.eye(10))
    np.savez_compressed(p['nanmu'], mu=np.full(2048, np.nan), sigma=np.zeros((2048, 2048)))
    os.makedirs(p['empty'])
    os.makedirs(p['unreadable'])
    with open(os.path.join(p['unreadable'], 'a.png'), 'wb') as f:
        f.write(b'\x89PNG not really')
    rng = np.random.default_rng(0)
    np.save(p['npy'], rng.standard_normal((20, 4)).astype(np.float32))
    np.save(p['c16'], rng.standard_normal((10, 16)).astype(np.float32))
    np.save(p['d8'], rng.standard_normal((5, 8)).astype(np.float32))
    np.save(p['ints'], np.zeros((20, 4), np.int64))
    nan = rng.standard_normal((20, 4)).astype(np.float32)
    nan[13, 2] = np.nan
    np.save(p['nan'], nan)
    np.save(p['cutnpy'], rng.standard_normal((1000, 4)).astype(np.float32))
    with open(p['cutnpy'], 'r+b') as f:
        f.truncate(1000)
    return p


def _run_cli(module, argv):
    """The command line in-process, through its error boundary as `python X.py` runs it:
    main(argv), sample.py and train.py as main(get_args(argv))."""
    if module in ('sample', 'train'):
        return cli.run(lambda: MODULES[module].main(MODULES[module].get_args(argv)))
    return cli.run(lambda: MODULES[module].main(argv))


# the common tails of the argv of sample.py, fid.py, tokenizer.py fit and kmeans.py
SA = ['--device', 'cpu', '--out', '{tmp}/grid.png', '--npz', '{tmp}/s.npz']
FA = ['--weights', '{weights}', '--device', 'cpu', '--num_workers', '0']
TA = ['--device', 'cpu', '--out', '{tmp}/tok.pt']
KA = ['--device', 'cpu', '--out', '{tmp}/km.npy']

# (module, argv, what the error must name, exit status: 2 = argparse's usage + error, 1 = a file)
BAD_COMMAND_LINES = [
    ('sample', ['--ckpt', '{var}', '--classes', '99', *SA], '--classes', 2),
    ('sample', ['--ckpt', '{var}', '--classes', 'abc', *SA], '--classes', 2),
    ('sample', ['--ckpt', '{var}', '--classes', '1,-1', *SA], '--classes', 2),
    ('sample', ['--ckpt', '{var}', '--top_p', '1.5', *SA], '--top_p', 2),
    ('sample', ['--ckpt', '{var}', '--top_k', '-1', *SA], '--top_k', 2),
    ('sample', ['--ckpt', '{var}', '--num_samples', '-5', *SA], '--num_samples', 2),
    ('sample', ['--ckpt', '{var}', '--batch_size', '0', *SA], '--batch_size', 2),
    ('sample', ['--ckpt', '{var}', '--per_class', '0', *SA], '--per_class', 2),
    ('sample', ['--ckpt', '{var}', '--temperature', '0', *SA], '--temperature', 2),
    ('sample', ['--ckpt', '{var}', '--cfg', '-1', *SA], '--cfg', 2),
    ('sample', ['--ckpt', '{var}', '--cfg', 'nan', *SA], '--cfg', 2),
    ('sample', ['--ckpt', '{var}', '--seed', '-1', *SA], '--seed', 2),
    ('sample', ['--ckpt', '{gpt}', '--stage2_top_p', '2', *SA], '--stage2_top_p', 2),
    ('sample', ['--ckpt', '{var}', '--edit_image', '{png}', *SA], '--edit_mask', 2),
    ('sample', ['--ckpt', '{tmp}/nowhere.pt', *SA], 'nowhere.pt', 1),
    ('sample', ['--ckpt', '{garbage}', *SA], 'garbage.pt', 1),
    ('sample', ['--ckpt', '{vae}', '--vae', '{vae}', *SA], '--ckpt', 1),
    ('sample', ['--ckpt', '{gpt}', '--stage2', '{var}', *SA], '--stage2', 1),
    ('sample', ['--ckpt', '{gpt}', '--stage2', '{garbage}', *SA], 'garbage.pt', 1),
    ('sample', ['--ckpt', '{var}', '--classes', '1', '--edit_image', '{broken}', '--edit_mask',
                '{png}', *SA], 'broken.png', 1),
    ('fid', ['{noarr}', '--batch_size', '0', *FA], '--batch_size', 2),
    ('fid', ['{noarr}', '--num_workers', '-1', *FA], '--num_workers', 2),
    ('fid', ['{noarr}', '--split_size', '0', *FA], '--split_size', 2),
    ('fid', ['{noarr}', '--center_crop', '-1', *FA], '--center_crop', 2),
    ('fid', ['{noarr}', *FA], 'noarr.npz', 1),
    ('fid', ['{cut}', *FA], 'cut.npz', 1),
    ('fid', ['{npy}', *FA], 'feats.npy', 1),
    ('fid', ['{zero}', *FA], 'zero.npz', 1),
    ('fid', ['{floats}', *FA], 'floats.npz', 1),
    ('fid', ['{badmu}', *FA], 'badmu.npz', 1),
    ('fid', ['{nanmu}', *FA], 'nanmu.npz', 1),
    ('fid', ['{empty}', *FA], 'empty_dir', 1),
    ('fid', ['{unreadable}', *FA], 'unreadable_dir', 1),
    ('fid', ['{tmp}/nowhere.npz', *FA], 'nowhere.npz', 1),
    ('fid', ['{good}', '--weights', '{tmp}/nowhere.pth'], 'nowhere.pth', 1),
    ('fid', ['{good}', '--weights', '{keys}'], 'keys.pth', 1),
    ('fid', ['{good}', '--weights', '{garbage}'], 'garbage.pt', 1),
    ('tokenizer', ['fit', '--images', '-1', *TA], '--images', 2),
    ('tokenizer', ['fit', '--k', '0', *TA], '--k', 2),
    ('tokenizer', ['fit', '--batch_size', '0', *TA], '--batch_size', 2),
    ('tokenizer', ['fit', '--n_iter', '-1', *TA], '--n_iter', 2),
    ('tokenizer', ['fit', '--layer', '-1', *TA], '--layer', 2),
    ('tokenizer', ['fit', '--resolution', '0', *TA], '--resolution', 2),
    ('tokenizer', ['fit', '--num_workers', '-1', *TA], '--num_workers', 2),
    ('tokenizer', ['fit', '--seed', '-1', *TA], '--seed', 2),
    ('tokenizer', ['stability', '--images', '0', '--device', 'cpu'], '--images', 2),
    ('tokenizer', ['stability', '--batch_size', '0', '--device', 'cpu'], '--batch_size', 2),
    ('tokenizer', ['fit', '--encoder', '{dino}', '--layer', '4', *TA], '--layer', 2),
    ('tokenizer', ['fit', '--encoder', '{dino}', '--resolution', '50', *TA], '--resolution', 2),
    ('tokenizer', ['fit', '--encoder', '{dino}', '--k', '100000', '--images', '1', *TA], '--k',
     2),
    ('tokenizer', ['fit', '--encoder', '{tmp}/nowhere.pth', *TA], 'nowhere.pth', 1),
    ('tokenizer', ['fit', '--encoder', '{garbage}', *TA], 'garbage.pt', 1),
    ('tokenizer', ['fit', '--encoder', '{var}', *TA], 'var.pt', 1),
    ('tokenizer', ['fit', '--encoder', '{dino}', '--centroids', '{missing}', *TA], 'missing.npy',
     1),
    ('tokenizer', ['fit', '--encoder', '{dino}', '--centroids', '{c16}', *TA], 'c16.npy', 1),
    ('tokenizer', ['stability', '--tokenizer', '{tmp}/nowhere.pt', '--device', 'cpu'],
     'nowhere.pt', 1),
    ('tokenizer', ['stability', '--tokenizer', '{var}', '--device', 'cpu'], 'var.pt', 1),
    ('kmeans', ['{npy}', '--k', '0', *KA], '--k', 2),
    ('kmeans', ['{npy}', '--n_iter', '-1', *KA], '--n_iter', 2),
    ('kmeans', ['{npy}', '--tol', '-0.5', *KA], '--tol', 2),
    ('kmeans', ['{npy}', '--max_points_per_centroid', '-1', *KA], '--max_points_per_centroid',
     2),
    ('kmeans', ['{npy}', '--seed', '-1', *KA], '--seed', 2),
    ('kmeans', ['{npy}', '--k', '21', *KA], '--k', 2),
    ('kmeans', ['{missing}', '--k', '2', *KA], 'missing.npy', 1),
    ('kmeans', ['{cutnpy}', '--k', '2', *KA], 'cut.npy', 1),
    ('kmeans', ['{noarr}', '--k', '2', *KA], 'noarr.npz', 1),
    ('kmeans', ['{ints}', '--k', '2', *KA], 'ints.npy', 1),
    ('kmeans', ['{nan}', '--k', '2', *KA], 'nan.npy', 1),
    ('kmeans', ['{npy}', '{d8}', '--k', '2', *KA], 'd8.npy', 1),
    *[('train', argv, argv[0], 2) for argv in BAD_TRAIN_FLAGS],
    ('train', ['--total_batch_size', '6', '--batch_size', '4', '--out_dir', '{tmp}/o'],
     '--total_batch_size', 1),
    ('train', ['--resolution', '24', '--out_dir', '{tmp}/o'], 'resolution 24', 1),
    ('train', ['--model', 'var', '--vae', '{garbage}', '--out_dir', '{tmp}/o'], 'garbage.pt', 1),
    ('train', ['--data', '{tmp}/nowhere', '--out_dir', '{tmp}/o'], 'nowhere', 1),
    ('train', ['--model', 'var', '--attn', 'flex', '--device', 'cpu', '--out_dir', '{tmp}/o'],
     '--attn flex', 1),
    ('tokenizer', ['fit', '--encoder', '{dino}', '--data', '{tmp}/nowhere', *TA], 'nowhere', 1),
    ('train', ['--seed', '-1'], '--seed', 2),
    ('train', ['--seed', str(10 ** 15)], '--seed', 2),
    ('sample', ['--ckpt', '{var}', '--seed', '1e15', *SA], '--seed', 2),
    ('train', ['--device', 'foo', '--out_dir', '{tmp}/o'], '--device', 1),
    ('train', ['--device', 'cuda:7' if torch.cuda.is_available() else 'cuda',
               '--out_dir', '{tmp}/o'], '--device', 1),
    ('sample', ['--ckpt', '{var}', *SA, '--device', 'tpu'], '--device', 1),
    ('train', ['--patch_nums', '1,2,4', '--out_dir', '{tmp}/o'], '--patch_nums', 1),
    ('train', ['--model', 'ssl', '--patch_size', '5', '--out_dir', '{tmp}/o'], '--patch_size', 1),
    ('train', ['--model', 'ssl', '--depth', '400', '--out_dir', '{tmp}/o'], '--depth 400', 1),
    ('train', ['--train_images', '3', '--batch_size', '4', '--total_batch_size', '4',
               '--out_dir', '{tmp}/o'], '--batch_size 4', 1),
    ('train', ['--data', '{flat}', '--out_dir', '{flat}/run'], '--out_dir', 1),
    ('train', ['--out_dir', '{png}'], '--out_dir', 1),
    ('train', ['--out_dir', '{listrun}', '--max_iters', '1'], 'listrun', 1),
    ('train', ['--data', '{badimgs}', '--out_dir', '{tmp}/o'], 'badimgs', 1),
    ('train', ['--model', 'var', '--vae', '{var}', '--out_dir', '{tmp}/o'], 'var.pt', 1),
    ('train', ['--model', 'var', '--vae', '{gpt}', '--out_dir', '{tmp}/o'], 'gpt.pt', 1),
    ('train', ['--model', 'var', '--vae', '{npy}', '--out_dir', '{tmp}/o'], 'feats.npy', 1),
    ('train', ['--model', 'stage2', '--vae', '{vae}', '--tokenizer', '{tmp}/nowhere.pt',
               '--out_dir', '{tmp}/o'], 'nowhere.pt', 1),
    ('sample', ['--ckpt', '{var}', '--vae', '{vae1}', *SA], 'VQVAE given has (8,)', 1),
    ('sample', ['--ckpt', '{var}', '--vae', '{var}', *SA], 'var.pt', 1),
    ('sample', ['--ckpt', '{var}', '--pixdec', '{gpt}', *SA], '--pixdec', 1),
    ('sample', ['--ckpt', '{gpt}', '--pixdec', '{var}', *SA], '--pixdec', 1),
    ('sample', ['--ckpt', '{gpt}', '--pixdec', '{tmp}/nowhere.pt', *SA], 'nowhere.pt', 1),
    ('sample', ['--ckpt', '{var}', '--num_samples', '2', '--npz', '{empty}', *SA[:-2]], '--npz',
     2),
    ('sample', ['--ckpt', '{var}', '--classes', '1', '--edit_image', '{bomb}', '--edit_mask',
                '{png}', *SA], 'bomb.png', 1),
]


def test_help_prints_the_docstring_as_written():
    """`--help` prints a file's docstring: a backslash line continuation in a shell example must
    stay in it (a raw docstring), not join the two lines with a run of spaces."""
    here = os.path.dirname(os.path.abspath(__file__))
    for path in sorted(f for f in os.listdir(here) if f.endswith('.py')):
        src = open(os.path.join(here, path)).read()
        doc = src.split('"""')[1]   # every file opens with its docstring
        assert '\\\n' not in doc or src.startswith('r"""'), f'{path}: make its docstring raw'


@pytest.mark.parametrize('module, argv, named, status', BAD_COMMAND_LINES,
                         ids=[f'{m}:{" ".join(a[:4])}' for m, a, _, _ in BAD_COMMAND_LINES])
def test_cli_bad_flag_or_file_is_one_line_naming_it(cli_files, tmp_path, monkeypatch, capsys,
                                                    module, argv, named, status):
    """A bad flag is argparse's usage line and one error naming it, exit status 2; a bad file is
    one line naming it, status 1 (SystemExit(message)); no traceback, no stray output file, and
    every file the command line names is byte-identical afterwards."""
    monkeypatch.chdir(tmp_path)   # whatever a wrong run would write lands here
    argv = [a.format(tmp=tmp_path, **cli_files) for a in argv]
    named_files = [a for a in argv if os.path.isfile(a)]
    before = [open(a, 'rb').read() for a in named_files]
    with pytest.raises(SystemExit) as e:
        _run_cli(module, argv)
    assert [open(a, 'rb').read() for a in named_files] == before
    code, err = e.value.code, capsys.readouterr().err
    if status == 2:
        assert code == 2 and err.startswith('usage:'), (code, err)
        assert f'error: argument {named}' in err.splitlines()[-1], err
    else:
        assert isinstance(code, str) and '\n' not in code, code   # printed as is, exit 1
        assert named in code, code
        err = code
    assert 'Traceback' not in err
    assert not list(tmp_path.glob('*.rank*'))                      # sample.py's shards


_SUBPROCESS_CASES = [
    ('sample', ['--ckpt', '{garbage}', '--device', 'cpu'], 'garbage.pt', 1),
    ('fid', ['{good}', '--weights', '{tmp}/nowhere.pth'], 'nowhere.pth', 1),
    ('tokenizer', ['fit', '--k', '0'], '--k', 2),
    ('kmeans', ['{nan}', '--k', '2', *KA], 'nan.npy', 1),
    ('train', ['--batch_size', '0'], '--batch_size', 2),
]


@pytest.mark.parametrize('module, argv, named, status', _SUBPROCESS_CASES,
                         ids=[m for m, *_ in _SUBPROCESS_CASES])
def test_cli_bad_input_reaches_a_terminal_without_traceback(cli_files, tmp_path, module, argv,
                                                             named, status):
    """The same through a real interpreter: the exit status, the name, no traceback."""
    script = os.path.join(os.path.dirname(os.path.abspath(sample.__file__)), f'{module}.py')
    argv = [a.format(tmp=tmp_path, **cli_files) for a in argv]
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
    out = subprocess.run([sys.executable, script, *argv], cwd=tmp_path, env=env, timeout=300,
                         capture_output=True, text=True)
    assert out.returncode == status, out.stderr
    assert named in out.stderr and 'Traceback' not in out.stderr + out.stdout, out.stderr


# --- fid.py: which weights, and NaN guards ----------------------------------------------------

@pytest.fixture(scope='module')
def calibrated_inception(fid_net):
    """fid_net's weights as a state dict."""
    return fid_net[0].state_dict()


def _fid_images(tmp_path, n=4):
    g = torch.Generator().manual_seed(1)
    x = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(32, 32), mode='bilinear')
    path = str(tmp_path / 'samples.npz')
    np.savez(path, arr_0=(x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return path


def test_fid_reports_weights_by_sha256_not_by_file_name(calibrated_inception, tmp_path, capsys,
                                                         monkeypatch):
    """A file named pt_inception-2015-12-05-6726825d.pth whose sha256 does not start with
    6726825d is 'unofficial weights <path>', never the standard name; one that does is."""
    named = str(tmp_path / inception.WEIGHTS_NAME)
    torch.save(calibrated_inception, named)
    argv = [_fid_images(tmp_path), '--weights', named, '--device', 'cpu', '--no_pr']
    res = fid.main(argv)
    out = capsys.readouterr().out
    assert np.isfinite(res['IS'])
    assert f'Inception {inception.WEIGHTS_NAME},' not in out
    assert f'unofficial weights {named}' in out
    with open(named, 'rb') as f:
        monkeypatch.setattr(inception, 'WEIGHTS_SHA256', hashlib.sha256(f.read()).hexdigest()[:8])
    fid.main(argv)
    assert f'Inception {inception.WEIGHTS_NAME},' in capsys.readouterr().out


@pytest.mark.parametrize('broken', ['nan_weight', 'overflowing_fc'])
def test_fid_non_finite_weights_or_features_are_an_error(calibrated_inception, tmp_path,
                                                         broken):
    """NaN weights are refused at load time, naming the file; finite weights whose outputs
    overflow (inf logits) stop fid.py before it prints 'IS nan'."""
    state = dict(calibrated_inception)
    if broken == 'nan_weight':
        state['Mixed_6b.branch1x1.conv.weight'] = state['Mixed_6b.branch1x1.conv.weight'].clone()
        state['Mixed_6b.branch1x1.conv.weight'][0, 0] = float('nan')
    else:
        state['fc.weight'] = torch.full_like(state['fc.weight'], 1e38)
    path = str(tmp_path / f'{broken}.pth')
    torch.save(state, path)
    with pytest.raises(SystemExit) as e:
        fid.main([_fid_images(tmp_path), '--weights', path, '--device', 'cpu', '--no_pr'])
    msg = str(e.value.code)
    assert 'NaN or inf' in msg and path in msg and '\n' not in msg
    assert ('Mixed_6b' if broken == 'nan_weight' else 'logits') in msg


# --- README.md and RESULTS.md: every command line they show parses, every picture is there ---

CLI_MODULES = {'train.py': train, 'sample.py': sample, 'fid.py': fid, 'tokenizer.py': tokenizer,
               'kmeans.py': kmeans, 'bench.py': bench}


def doc_commands(text):
    """The command lines of a markdown text: its code blocks (continuation lines joined,
    comments dropped, `NAME="..."` variables expanded, split at && ; |) and its inline code
    spans, each as (script, argv) for the scripts of CLI_MODULES run by python or torchrun."""
    lines, vars_ = [], {}
    for i, block in enumerate(text.split('```')):
        if i % 2 == 0:   # prose: the inline code spans
            lines += [span for span in block.replace('\n', ' ').split('`')[1::2]]
            continue
        for line in block.replace('\\\n', ' ').splitlines()[1:]:
            line = line.split(' #')[0].strip()
            name, eq, value = line.partition('=')
            if eq and name.isidentifier() and value[:1] == '"':
                vars_[name] = value.strip('"')
            else:
                lines.append(line)
    for line in lines:
        for name, value in vars_.items():
            line = line.replace(f'${name}', value)
        for part in line.replace('&&', ';').replace('|', ';').split(';'):
            words = part.split()
            if words[:1] in (['python'], ['torchrun']):
                script = next((w for w in words if w.endswith('.py')), None)
                if script in CLI_MODULES:
                    yield script, words[words.index(script) + 1:]


@pytest.mark.parametrize('doc', ['README.md', 'RESULTS.md'])
def test_docs_show_only_flags_their_scripts_have(doc, capsys):
    """Every `python X.py ...` and `torchrun ... X.py ...` in the doc parses with X.py's own
    parser (a renamed or removed flag, or a value of the wrong type, fails here)."""
    with open(os.path.join(REPO, doc)) as f:
        commands = list(doc_commands(f.read()))
    assert len(commands) >= (20 if doc == 'README.md' else 5)
    for script, argv in commands:
        try:
            CLI_MODULES[script].build_parser().parse_args(argv)
        except SystemExit as e:
            err = capsys.readouterr().err.strip().splitlines()
            assert e.code == 0, f'{doc}: python {script} {" ".join(argv)}: {err[-1:]}'


def test_doc_command_parser_sees_flags_it_should_refuse():
    """The check above can fail: a made-up flag in a code block, a spliced variable or an
    inline span is found and refused by the script's parser."""
    text = ('run `python train.py --modle var` or\n```bash\nD="--no_such 1"\n'
            'pip install x && python sample.py --ckpt a \\\n    --topk 3  # comment\n'
            'torchrun --nproc_per_node=2 fid.py a b $D\n```\n')
    commands = list(doc_commands(text))
    assert commands == [('train.py', ['--modle', 'var']),
                        ('sample.py', ['--ckpt', 'a', '--topk', '3']),
                        ('fid.py', ['a', 'b', '--no_such', '1'])]
    for script, argv in commands:
        with pytest.raises(SystemExit) as e:
            CLI_MODULES[script].build_parser().parse_args(argv)
        assert e.value.code == 2


def test_readme_pictures_exist_small_and_big_enough_to_see():
    """Each picture the README shows is a committed PNG under 150 KB, at least 256 px wide."""
    with open(os.path.join(REPO, 'README.md')) as f:
        pictures = [line.split('](')[1].split(')')[0] for line in f if line.startswith('![')]
    assert 3 <= len(pictures) <= 6
    for path in pictures:
        full = os.path.join(REPO, path)
        assert os.path.isfile(full), f'README.md shows {path}, which is missing'
        assert os.path.getsize(full) < 150_000, path
        with Image.open(full) as im:
            assert im.format == 'PNG' and im.width >= 256, (path, im.size)
