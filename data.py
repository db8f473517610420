"""
Images in, (image, label, bad) out: an ImageNet-style folder reader and a built-in procedural
dataset, so every stage also runs offline. image is float32 (3, H, W) in [-1, 1] (x/255*2-1, VAR's
normalize_01_into_pm1); bad = (index, n): the n files from the sample's own on were unreadable and
skipped, which BadFiles counts once per file across epochs, DataLoader workers and ranks.

ImageFolder reproduces official VAR's transform (utils/data.py) with PIL only: shorter side to
round(mid_reso * resolution) with LANCZOS, random (train) or center (eval) crop, optional flip.
Unlike torchvision's ImageFolder, every PIL mode becomes RGB (alpha onto white, 16-bit and float
rescaled); hidden, empty and non-image files are skipped with one warning; files are listed once
(links, loops); a corrupt file never crashes an epoch (the next file is used instead).
ProceduralDataset (--data builtin): class-conditional images with structure at three scales
(background, shape, texture), rendered from (seed, index). ShardedSampler / endless_batches:
each rank's share of a per-epoch permutation, resumable mid-epoch from a saved cursor.

    python data.py    # writes procedural_grid.png: 4 samples of each of the 10 classes
"""
import colorsys
import heapq
import math
import os
import warnings
from contextlib import suppress

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import checkpoint
import dist
from cli import UserError

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm',
                  '.pgm')
HOLDOUT_EVERY = 50  # a folder without train/ and val/ gives every 50th file (2%) to val


# ---- image folders ----------------------------------------------------------------------------

def load_rgb(path):
    """Decode one file into an 8-bit RGB PIL image; raises on corrupt or truncated files."""
    with Image.open(path) as img:
        img.load()  # PIL's LOAD_TRUNCATED_IMAGES stays False: raises on truncated data
        if img.mode in ('I', 'F') or img.mode.startswith('I;16'):
            a = np.asarray(img, dtype=np.float64)  # (H, W)
            if img.mode.startswith('I;16') or a.max() > 255:
                a = a / 257  # 16-bit: 65535 -> 255 (also 32-bit 'I' holding 16-bit PNG data)
            elif img.mode == 'F' and a.max() <= 1:
                a = a * 255  # float images in [0, 1]
            return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert('RGB')
        if img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in img.info:
            rgba = img.convert('RGBA')  # alpha (or a P/L/RGB transparent colour) onto white
            white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert('RGB')
        return img.convert('RGB')  # L, P, 1, CMYK, YCbCr, ...


def _class_folders(root):
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))


def list_images(folder, exclude=()):
    """Each image file under folder once (each folder entered once), by its path with the fewest
    symlinks, then folders, then the first in sorted order: loops end, links never shadow real
    paths; files of `exclude` are left out; one warning names the skips. -> (sorted image paths,
    sorted other files: wrong extension or 0 bytes, {(inode, device): (path, top folder)})."""
    heap, entered, other, repeats = [(0, 0, folder, '')], {}, [], []
    root = os.path.realpath(folder)   # a link to it or above it (`..`): not entered
    images = dict.fromkeys(exclude, ((-1,), ''))  # always the better path: left out below
    while heap:  # (symlinks on the path, depth, path, top): the smallest first
        links, depth, path, top = heapq.heappop(heap)
        if entered.setdefault(os.stat(path)[1:3], path) != path:  # (inode, device): entered
            repeats.append(path)  # a symlink loop, or a second link to a folder
            continue
        for e in (e for e in os.scandir(path) if not e.name.startswith('.')):  # hidden: not data
            key = (links + e.is_symlink(), depth + 1, e.path)
            if e.is_symlink() and e.is_dir() and contains(os.path.realpath(e.path), root):
                repeats.append(e.path)
            elif e.is_dir():
                heapq.heappush(heap, (*key, top or e.name))
            elif e.name.lower().endswith(IMG_EXTENSIONS) and e.is_file() and e.stat().st_size:
                fid = os.stat(e.path)[1:3]  # (inode, device); e.stat() has none on Windows
                new, old = (key, top), images.get(fid)
                images[fid] = min(new, old or new)  # a second path to a file: the better one
                repeats += [max(new, old)[0][2]] if old else []
            else:
                other.append(e.path)
    if repeats:  # symlink loops, links to folders or files listed already (or held out)
        warnings.warn(f'{folder}: skipped {len(repeats)} repeats (loops, links): {repeats[:3]}')
    images = {fid: (key[2], top) for fid, (key, top) in images.items() if fid not in exclude}
    return sorted(p for p, _ in images.values()), sorted(other), images


def contains(folder, path):   # of real paths: path is folder or inside it
    return os.path.commonpath([folder, path]) == folder


class ImageFolder(torch.utils.data.Dataset):
    """Class sub-folders of root give the labels (sorted names); a flat folder is unlabeled."""

    def __init__(self, root, resolution, train=True, hflip=False, mid_reso=1.125, exclude=()):
        if not os.path.isdir(root):
            raise UserError(f'image folder not found: {root}')
        assert mid_reso >= 1, 'the resized image must cover the crop'
        self.root, self.resolution, self.train, self.hflip = root, resolution, train, hflip
        self.mid_size = round(mid_reso * resolution)  # shorter side before cropping (288 for 256)
        classes = _class_folders(root)
        self.class_names = classes or ['unlabeled']
        self.num_classes = len(self.class_names)
        labels = {name: i for i, name in enumerate(classes)} if classes else {'': 0}
        _, skipped, images = list_images(root, exclude)  # exclude: the held-out split's files
        self.empty_files = sorted(p for p in skipped if p.lower().endswith(IMG_EXTENSIONS))
        skipped += [p for p, top in images.values() if top not in labels]  # loose files
        self.samples = sorted(((p, labels[top]) for p, top in images.values() if top in labels),
                              key=lambda s: (s[1], s[0]))  # (path, label) by label, then path
        self.num_skipped_at_scan = len(skipped)
        if skipped:
            warnings.warn(f'{root}: skipped {len(skipped)} empty or non-image files '
                          f'(e.g. {min(skipped)}); image extensions are {IMG_EXTENSIONS}')
        empty = sorted(set(classes) - {self.class_names[y] for _, y in self.samples})
        if empty:  # kept as classes: the labels follow the sorted folder names
            warnings.warn(f'{root}: class folders without images (still classes): {empty}')
        if not self.samples:
            raise UserError(f'no images found in {root} (looked for {IMG_EXTENSIONS})')
        self.first_readable(0)   # one file at least decodes (it stops at the first)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        """(image (3, H, W), label, bad = (index, n)): n unreadable files from index on skipped."""
        img, label, n = self.first_readable(index)
        return self.transform(img), label, torch.tensor([index, n])

    def first_readable(self, index):
        """(PIL image, label, n): the first file from index on that decodes, n files skipped."""
        for n in range(len(self.samples)):
            path, label = self.samples[(index + n) % len(self.samples)]
            with suppress(Exception):  # PIL raises OSError, SyntaxError, ValueError, zlib.error...
                return load_rgb(path), label, n
        raise UserError(f'{self.root}: none of its {len(self.samples)} image files can be read')

    def transform(self, img):
        """VAR's transform: resize (shorter side, LANCZOS), crop, flip, to (3, H, W) in [-1, 1]."""
        w, h = img.size
        s, r = self.mid_size, self.resolution
        size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)  # torchvision's rounding
        if size != img.size:
            img = img.resize(size, Image.Resampling.LANCZOS)
        w, h = img.size
        if self.train:  # torch's RNG: reproducible under manual_seed and DataLoader worker seeds
            top, left = torch.randint(h - r + 1, ()).item(), torch.randint(w - r + 1, ()).item()
        else:
            top, left = round((h - r) / 2), round((w - r) / 2)
        img = img.crop((left, top, left + r, top + r))
        if self.train and self.hflip and torch.rand(()).item() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32))  # (H, W, 3) in [0, 255]
        return (x.permute(2, 0, 1) / 255 * 2 - 1).contiguous()  # (3, H, W) in [-1, 1]


class BadFiles:
    """The unreadable files met, by path: each counted and warned about (by rank 0) once, however
    many epochs, DataLoader workers and ranks meet it. Feed it each batch's bad; 0-byte image files
    count from the start. state: the list sync() returned; other values (an int) start empty."""

    def __init__(self, dataset, state=()):
        self.dataset, self.rank = dataset, dist.rank_world()[0]
        self.paths = set(state) if isinstance(state, (list, tuple)) else set()
        self.add(getattr(dataset, 'empty_files', []))

    def update(self, bad):
        """Add the files of bad (B, 2): rows (i, n), the n samples from i on (wrapping around)."""
        s = getattr(self.dataset, 'samples', None)  # None: no files, n is always 0
        self.add(s[(i + k) % len(s)][0] for i, n in bad.reshape(-1, 2).tolist() for k in range(n))

    def sync(self):
        """All ranks' files, a sorted list (a collective call: all ranks, at the same point)."""
        everyone = [None] * dist.rank_world()[1]
        if len(everyone) > 1:
            torch.distributed.all_gather_object(everyone, sorted(self.paths))
            self.add(p for paths in everyone for p in paths)
        return sorted(self.paths)

    def add(self, paths):
        for path in sorted(set(paths) - self.paths):
            self.paths.add(path)
            if self.rank == 0:  # the reason, read once more here: the workers skip silently
                try:
                    load_rgb(path)
                    why = 'it failed once and reads now (an I/O error?)'
                except Exception as e:
                    why = f'{type(e).__name__}: {e}'
                warnings.warn(f'skipping unreadable image {path}: {why}')


# ---- built-in procedural dataset --------------------------------------------------------------

def _frac(a):
    return a - np.floor(a)


SHAPES = {  # the class shapes, of local coordinates (u, v): d <= 1 inside, d ~ 1 on the edge
    'disc': lambda u, v: np.sqrt(u * u + v * v),
    'square': lambda u, v: np.maximum(abs(u), abs(v)) * 1.15,
    'triangle': lambda u, v: np.maximum(v, 0.866 * abs(u) - 0.5 * v) / 0.58,  # apex up (y down)
    'ring': lambda u, v: abs(np.sqrt(u * u + v * v) - 0.72) / 0.3,
    'cross': lambda u, v: np.minimum(np.maximum(abs(u), 2.8 * abs(v)),
                                     np.maximum(2.8 * abs(u), abs(v))),
    'diamond': lambda u, v: abs(u) * 1.15 + abs(v) * 0.8,  # taller than wide: not a tilted square
    'star': lambda u, v: np.sqrt(u * u + v * v) / (  # radius 1 at the 5 tips, 0.45 between
        0.45 + 0.55 * (2 * _frac(np.arctan2(u, -v) * (5 / (2 * np.pi))) - 1) ** 2),
    'bars': lambda u, v: np.maximum(abs(v), np.minimum(abs(u), abs(abs(u) - 0.68)) / 0.2),
    'crescent': lambda u, v: np.maximum(np.sqrt(u * u + v * v),  # a disc minus a shifted disc
                                        0.78 / np.sqrt((u - 0.42) ** 2 + v * v + 1e-12)),
    'hexagon': lambda u, v: np.maximum(abs(u), 0.5 * abs(u) + 0.866 * abs(v)) / 0.9,
}
TEXTURES = {  # the class textures: binary patterns of coordinates p, q in pattern periods
    'stripes': lambda p, q: _frac(p) < 0.5,
    'checks': lambda p, q: (_frac(p) < 0.5) ^ (_frac(q) < 0.5),
    'dots': lambda p, q: (_frac(p) - 0.5) ** 2 + (_frac(q) - 0.5) ** 2 < 0.35 ** 2,
    'waves': lambda p, q: _frac(p + 0.3 * np.sin(np.pi * q)) < 0.5,
}
LAYOUTS = ('gradient', 'split', 'radial')
HUES = ('red', 'orange', 'yellow', 'lime', 'green', 'mint', 'cyan', 'azure', 'blue', 'violet',
        'magenta', 'pink')  # names of hue bins 30 degrees apart


class ProceduralDataset(torch.utils.data.Dataset):
    """Offline class-conditional images (background layout, shape, texture) from (seed, index)."""

    def __init__(self, size=10000, resolution=32, num_classes=10, seed=0):
        assert 1 <= num_classes <= len(SHAPES) * len(TEXTURES), 'at most 40 classes'
        self.size, self.resolution, self.num_classes = size, resolution, num_classes
        self.seed = seed
        # class c: hue c/num_classes; shape c%10 and texture (c + c//10)%4, a distinct pair for
        # every c < 40; layout c%3; background and texture directions spread by the golden angle
        self.specs = [dict(hue=c / num_classes, shape=list(SHAPES)[c % 10],
                           texture=list(TEXTURES)[(c + c // 10) % 4], layout=LAYOUTS[c % 3],
                           angle=2.4 * c, tex_angle=1 + 7.2 * c, freq=3 + 0.5 * (c % 3))
                      for c in range(num_classes)]
        self.class_names = ['-'.join((HUES[round(s['hue'] * 12) % 12], s['shape'],
                                      s['texture'])) for s in self.specs]
        self.ss = max(2, min(4, 96 // resolution))  # k: masks supersampled k x k, box-filtered
        grid = lambda n: (np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1  # pixel centres
        self.y, self.x = np.meshgrid(grid(resolution * self.ss), grid(resolution * self.ss),
                                     indexing='ij')  # (S, S) each, S = k * resolution, y down
        self.y_lo, self.x_lo = np.meshgrid(grid(resolution), grid(resolution), indexing='ij')

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        rng = np.random.default_rng((self.seed, index))  # deterministic per sample, worker-safe
        label = index % self.num_classes  # exactly balanced classes
        img = self.render(self.specs[label], rng)  # (H, W, 3) in [0, 1]
        x = torch.from_numpy(img).permute(2, 0, 1)  # (3, H, W)
        return (x * 2 - 1).contiguous(), label, torch.tensor([index, 0])  # no bad files

    def render(self, spec, rng):
        """One image (H, W, 3) float32 in [0, 1], quantised to 8 bits like a decoded PNG."""
        n, k = self.resolution, self.ss
        # coverage (H, W) of a supersampled mask: this is what anti-aliases every edge
        cover = lambda m: m.reshape(n, k, n * k).sum(1, np.float32).reshape(n, n, k).sum(2) / k**2
        hsv = lambda h, s, v: np.array(colorsys.hsv_to_rgb(h % 1, s, v), dtype=np.float32)
        hue = spec['hue'] + rng.uniform(-0.02, 0.02)
        # coarse scale: two complementary background tones along a class-specific direction
        a = spec['angle'] + rng.uniform(-0.3, 0.3)
        ca, sa = math.cos(a), math.sin(a)
        if spec['layout'] == 'gradient':
            t = np.clip(0.5 + 0.4 * (self.x_lo * ca + self.y_lo * sa), 0, 1)  # (H, W)
        elif spec['layout'] == 'split':  # a hard edge, so drawn supersampled
            t = cover(self.x * ca + self.y * sa > rng.uniform(-0.3, 0.3))  # (H, W)
        else:  # radial glow from a point outside the image
            t = np.clip(np.hypot(self.x_lo + 1.3 * ca, self.y_lo + 1.3 * sa) / 2.6, 0, 1)
        dark, light = hsv(hue + 0.5, 0.6, 0.25), hsv(hue + 0.56, 0.35, 0.75)
        bg = dark + t[..., None] * (light - dark)  # (H, W, 3)
        # mid scale: the class shape with jittered position, size, rotation and colour
        cx, cy = rng.uniform(-0.3, 0.3, size=2)
        scale, rot = rng.uniform(0.5, 0.68), rng.uniform(-0.2, 0.2)  # a small tilt: upright shapes
        cr, sr = math.cos(rot) / scale, math.sin(rot) / scale
        x, y = self.x - cx, self.y - cy  # (S, S)
        d = SHAPES[spec['shape']](cr * x + sr * y, cr * y - sr * x)  # (S, S)
        inside = d <= 1
        edge = inside & (d > 1 - 0.06 / scale)  # a thin dark outline, ~1 px at 32 px
        # fine scale: a class-specific texture (direction, frequency) with a random phase
        ta = spec['tex_angle'] + rng.uniform(-0.15, 0.15)
        ct, st = spec['freq'] * math.cos(ta), spec['freq'] * math.sin(ta)
        p0, q0 = rng.uniform(0, 1, size=2)
        tex = TEXTURES[spec['texture']](ct * x + st * y + p0, ct * y - st * x + q0)  # (S, S)
        # composite by coverage: background, plain shape, textured shape (darker), outline
        c_in, c_tex, c_edge = cover(inside), cover(inside & tex & ~edge), cover(edge)
        color = hsv(hue, rng.uniform(0.7, 0.9), rng.uniform(0.85, 1.0))
        shade = (c_in - 0.45 * c_tex - 0.9 * c_edge)[..., None]  # (H, W, 1)
        img = bg * (1 - c_in)[..., None] + color * shade  # (H, W, 3)
        return (np.rint(img * 255) / 255).astype(np.float32)


# ---- building datasets, saving images ---------------------------------------------------------

def build_dataset(data, resolution, train, hflip=False, seed=0, size=None):
    """data='builtin': ProceduralDataset with seed (train) or seed+1 (val), size 10000 / 1000.
    Otherwise a folder: data/train and data/val if both exist (same class folders), else data
    itself, whose every HOLDOUT_EVERY-th file (sorted by class then path: 2%, stratified) is the
    val split, never trained on (nor is a train/ file also in val/; files count once, before
    splitting). size, if given, keeps that many evenly spaced files; seed: for 'builtin' only."""
    if data == 'builtin':
        size = size or (10000 if train else 1000)
        return ProceduralDataset(size, resolution, seed=seed if train else seed + 1)
    if not os.path.isdir(data):
        raise UserError(f"--data {data!r} is not a folder (or use 'builtin')")
    if os.path.isdir(os.path.join(data, 'train')) and os.path.isdir(os.path.join(data, 'val')):
        ds = ImageFolder(os.path.join(data, 'train' if train else 'val'), resolution, train, hflip,
                         exclude=list_images(os.path.join(data, 'val'))[2] if train else ())
        if ds.class_names != (_class_folders(os.path.join(data, 'train')) or ['unlabeled']):
            raise UserError(f'{data}/val must have the same class folders as {data}/train')
    else:
        ds = ImageFolder(data, resolution, train, hflip)
        ds.samples = [s for i, s in enumerate(ds.samples) if (i % HOLDOUT_EVERY == 0) != train]
        if not ds.samples:
            raise UserError(f'{data}: too few images to hold out a validation split')
    if size:
        ds.samples = ds.samples[::max(1, len(ds.samples) // size)][:size]
    return ds


# ---- data order for (distributed) training ----------------------------------------------------

class ShardedSampler(torch.utils.data.Sampler):
    """This rank's share of a permutation fixed by (seed, epoch), from position `start` on:
    resuming mid-epoch continues exactly where the interrupted run was."""

    def __init__(self, n, rank, world, seed, epoch, start=0, shuffle=True):
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
        self.indices = order[rank::world][start:].tolist()

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def endless_batches(dataset, batch_size, num_workers, rank, world, seed, epoch=0,
                    batch_in_epoch=0, pin_memory=False):
    """Endless training batches of this rank, each with its data cursor (epoch, batches done
    in that epoch): start from a saved cursor and the order continues exactly."""
    while True:
        sampler = ShardedSampler(len(dataset), rank, world, seed, epoch,
                                 batch_in_epoch * batch_size)
        loader = torch.utils.data.DataLoader(  # own generator: global RNG untouched (resume)
            dataset, batch_size, sampler=sampler, num_workers=num_workers, drop_last=True,
            pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed + epoch))
        for batch in loader:
            batch_in_epoch += 1
            yield (epoch, batch_in_epoch), batch
        epoch, batch_in_epoch = epoch + 1, 0


# ---- the data as the tokens of a frozen tokenizer ---------------------------------------------

class TokenDataset(torch.utils.data.Dataset):
    """Cached token sequences (N, L) with labels, served like images: (tokens, label, (i, 0))."""

    def __init__(self, tokens, labels):
        self.tokens, self.labels = tokens, labels

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return self.tokens[i].long(), self.labels[i], torch.tensor([i, 0])


def tokenizer_key(config, tensors):
    """What a token cache depends on: the tokenizer's config and a checksum of its weights."""
    return dict(config=config, weights=sum(t.double().sum().item() for t in tensors))


@torch.no_grad()
def tokenize(encode, key, dataset, path, args, device, limit=None, crops=1):
    """Tokenize a dataset once with a frozen tokenizer, encode(img (B, 3, H, W)) -> ids (B, L),
    each rank a slice, gathered on every rank, cached in `path` under `key` (+ data, size,
    resolution): a TokenDataset of (crops * N, L) ids, row i + k N image i as the dataset gives it
    in pass k (train: random crops and flips, so crops > 1 keeps augmenting; held-out: centre)."""
    rank, world = dist.rank_world()
    n = min(len(dataset), limit or len(dataset))
    key = dict(key, n=n, data=args.data, resolution=args.resolution, **(
        {'crops': crops} if crops > 1 else {}))   # one pass: no 'crops' entry in the key
    if os.path.exists(path):   # reused only if made by the same tokenizer from the same data
        try:
            cache = checkpoint.load(path, 'token cache')
        except UserError as e:   # unreadable: made again
            warnings.warn(f'{e}; tokenizing again')
            cache = {}
        if cache.get('key') == key:
            return TokenDataset(cache['tokens'], cache['labels'])
    n_all = n * crops                                  # row r: image r % n
    mine = [r % n for r in range(rank, n_all, world)]  # this rank: rows rank, rank + world, ...
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), args.batch_size,
                                         num_workers=args.num_workers)
    tokens, labels, bad_files = [], [], BadFiles(dataset)
    for img, label, bad in tqdm(loader, desc=f'tokenizing {n_all} images', disable=rank != 0):
        tokens.append(encode(img.to(device)).cpu())                                 # (B, L)
        labels.append(label)
        bad_files.update(bad)
    bad_files.sync()   # each unreadable file warned about once, by rank 0
    tokens, labels = torch.cat(tokens), torch.cat(labels)
    if world > 1:   # every rank's items, in rank order, each put back at its index
        order = torch.cat([torch.arange(r, n_all, world) for r in range(world)])  # (n_all,)
        gathered = [dist.all_gather_rows(t.to(device)).cpu() for t in (tokens, labels)]
        tokens, labels = [torch.empty_like(g).index_copy_(0, order, g) for g in gathered]
    dtype = torch.int16 if tokens.max() <= 32767 else torch.int32
    if rank == 0:
        checkpoint.save(dict(tokens=tokens.to(dtype), labels=labels, key=key), path)
    return TokenDataset(tokens.to(dtype), labels)


# ---- saving -----------------------------------------------------------------------------------

def to_uint8(images):
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 numpy, rounding: inverse of x/255*2-1."""
    x = (images.detach().float().cpu() + 1) * 127.5 + 0.5  # +0.5 then truncation = rounding
    return x.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_image_grid(images, path, nrow=8, padding=2, min_side=64):
    """Save (B, 3, H, W) in [-1, 1] as one PNG grid, nrow images per row, black padding; images
    under min_side pixels are enlarged by a whole factor (nearest), so 32 px ones stay visible."""
    zoom = -(-min_side // min(images.shape[-2:]))                     # ceil: 32 px -> 2
    u8 = to_uint8(images).repeat(zoom, 1).repeat(zoom, 2)  # (B, H zoom, W zoom, 3)
    (b, h, w, _), ncol = u8.shape, min(nrow, len(u8))
    nrows = math.ceil(b / ncol)
    grid = np.zeros((nrows * (h + padding) + padding, ncol * (w + padding) + padding, 3), np.uint8)
    for i in range(b):
        top, left = padding + (i // ncol) * (h + padding), padding + (i % ncol) * (w + padding)
        grid[top:top + h, left:left + w] = u8[i]
    with checkpoint.atomic_path(path) as tmp:   # readers never see half a file
        Image.fromarray(grid).save(tmp, format='PNG')


if __name__ == '__main__':
    ds = ProceduralDataset(size=40, resolution=32)  # label = index % 10: one class per column
    save_image_grid(torch.stack([ds[i][0] for i in range(40)]), 'procedural_grid.png', nrow=10)
    print('wrote procedural_grid.png:', ', '.join(ds.class_names))
