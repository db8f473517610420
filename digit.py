"""
Training DiGIT's two stages and its linear probe (Zhu et al., NeurIPS 2024) on the tokens of a
frozen DiGIT tokenizer (tokenizer.py): the tasks of `train.py --model gpt / stage2 / probe`.
The models are gpt.py's; this file is what DiGIT does with them.

    stage 1  --model gpt     p(s_1..s_L | class) = prod_l p(s_l | class, s_<l), raster order over
                             the tokenizer's L = grid^2 tokens s (next-token prediction)
    stage 2  --model stage2  p(v | s): the VQ tokens v of a single-scale VQVAE from the DiGIT
                             tokens s of the same image, a causal transformer over [s ; v]
    probe    --model probe   a linear classifier per layer of a frozen stage-1 GPT, on its
                             position-averaged hidden states (DiGIT Table 2, Fig. 3b)

DiGIT's fairseq recipe: Adam (0.9, 0.98), weight decay 0.01, inverse-square-root schedule after
a 10% warmup, label smoothing 0.1, dropout 0.1, gradient clipping 1. The data is tokenized once
(eval crops) and cached in the run's folder. Before stage 2 exists, stage 1's samples are shown
with each token's mean image patch (patch_means).

    python train.py --model gpt --depth 4                 # after: python tokenizer.py fit
    python train.py --model vqvae --patch_nums 8 --out_dir out/vqvae_1scale
    python train.py --model stage2 --depth 4              # then: python sample.py --ckpt ...
    python train.py --model probe --gpt out/gpt/ckpt.pt
Test: `python -m pytest test_all.py -k digit`.
"""
import math
import os
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import data
import gpt
import tokenizer
import vqvae
from cli import UserError

# DiGIT's fairseq recipe; stage 2 is trained the same way
RECIPE = dict(weight_decay=0.01, beta1=0.9, beta2=0.98, lr_schedule='inverse_sqrt',
              label_smooth=0.1, grad_clip=1.0, dropout=0.1)


def recipe_schedule(args, lr):
    """The defaults that depend on other flags: the peak lr, a warmup of 10% of the steps."""
    args.lr = lr if args.lr is None else args.lr
    if args.warmup_iters is None:
        args.warmup_iters = args.max_iters // 10


def add_args(parser):
    g = parser.add_argument_group('DiGIT: gpt, stage2, probe (also --depth, --vae, --dropout, '
                                  '--label_smooth, --cfg, --top_k, --top_p)')
    g.add_argument('--tokenizer', default='out/tokenizer/tokenizer.pt',
                   help='gpt, stage2: the frozen DiGIT tokenizer (python tokenizer.py fit)')
    g.add_argument('--gpt', default='out/gpt/ckpt.pt', help='probe: the GPT to probe (its '
                   'tokenizer comes with it); stage2: its samples make the FID images')
    g.add_argument('--cond', choices=['token', 'adaln'], default='token',
                   help='gpt: class as the start token, or also AdaLN in every block')


def load_tokenizer(path, device):
    if not os.path.exists(path):
        raise UserError(f'--tokenizer {path} not found: make one first (python '
                        'train.py --model ssl; python tokenizer.py fit)')
    return tokenizer.Tokenizer.load(path).to(device)


def token_key(tok):
    """What the cached tokens depend on: the encoder, its block, the resolution, the weights."""
    return data.tokenizer_key(dict(encoder=asdict(tok.encoder.config), layer=tok.layer,
                                   resolution=tok.resolution), [tok.centroids, *tok.parameters()])


def cache_tokens(task, encode, key, args, run):
    """task.train_set and task.val_set become the tokens of its images (data.tokenize)."""
    path = lambda split: os.path.join(args.out_dir, f'tokens_{split}.pt')
    task.train_set = data.tokenize(encode, key, task.train_set, path('train'), args, run.device,
                                    crops=args.token_crops)
    task.val_set = data.tokenize(encode, key, task.val_set, path('val'), args, run.device,
                                  limit=args.eval_images)


def token_loss(model, batch, device, label_smooth, source_len=0):
    """DiGIT's label-smoothed cross-entropy over the L tokens; also the plain cross-entropy
    and the top-1 token accuracy. batch: cached tokens (B, L) and labels (B,); stage 2:
    (B, S + L), the S DiGIT tokens its source, unconditional."""
    tokens, labels = batch[0].to(device, non_blocking=True), batch[1].to(device)
    source, tokens = tokens[:, :source_len], tokens[:, source_len:]              # (B, S), (B, L)
    if source_len:
        logits = model(tokens, source=source)                                     # (B, L, V)
    else:
        logits = model(tokens, labels)                                            # (B, L, V)
    loss = gpt.loss(logits, tokens, label_smooth)
    ce = F.cross_entropy(logits.detach().flatten(0, 1), tokens.flatten())
    return loss, dict(ce=ce, acc=(logits.detach().argmax(-1) == tokens).float().mean() * 100)


def token_summary(r, step):
    return (f'held-out cross-entropy {r["ce"]:.3f} (label-smoothed loss {r["loss"]:.3f}) '
            f'after {step} steps; token accuracy {r["acc"]:.1f}%')


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


class GPTTraining:
    """--model gpt: stage 1 on the tokens of --tokenizer; sample grids of mean patches."""
    defaults = RECIPE
    no_decay = ('class_emb', 'wpe')
    picture_name = 'samples'
    frozen = ('tokenizer',)
    add_args = staticmethod(add_args)

    @staticmethod
    def finish_args(args):
        recipe_schedule(args, lr=3e-4)

    def __init__(self, args, train_set, val_set, run):
        self.args, self.run = args, run
        self.train_set, self.val_set = train_set, val_set
        tok = load_tokenizer(args.tokenizer, run.device)
        cache_tokens(self, tok.encode, token_key(tok), args, run)
        n = min(len(self.val_set), 1000)
        images = torch.stack([val_set[i][0] for i in range(n)])                   # (n, 3, H, W)
        self.means = patch_means(self.val_set.tokens[:n].long(), images, tok.vocab_size)
        self.num_classes = train_set.num_classes
        self.config = asdict(gpt.GPTConfig(
            vocab_size=tok.vocab_size, block_size=tok.grid ** 2, depth=args.depth,
            num_classes=self.num_classes, cond=args.cond, dropout=args.dropout))

    def build(self):
        return gpt.GPT(**self.config)

    def loss(self, model, batch, step):
        return token_loss(model, batch, self.run.device, self.args.label_smooth)

    @torch.no_grad()
    def picture(self, model, path, per_class=4):
        """Generated token maps, rendered with the tokens' mean patches: one column per class."""
        model.eval()
        a, columns = self.args, min(self.num_classes, 10)
        labels = torch.arange(columns, device=self.run.device).repeat(per_class)    # row-major
        tokens = model.generate(labels, cfg=a.cfg, top_k=a.top_k, top_p=a.top_p,
                                seed=a.seed)                                          # (B, L)
        data.save_image_grid(render_tokens(tokens, self.means).cpu(), path, nrow=columns)
        model.train()

    def summary(self, r, step):
        return token_summary(r, step)


class Stage2Training:
    """--model stage2: VQ tokens of a single-scale --vae from DiGIT tokens of --tokenizer."""
    defaults = dict(RECIPE, vae='out/vqvae_1scale/ckpt.pt')
    no_decay = ('class_emb', 'wpe')
    picture_name = 'samples'
    frozen = ('tokenizer', 'vae')
    add_args = staticmethod(lambda parser: None)   # DiGIT's flags come with GPTTraining

    @staticmethod
    def finish_args(args):
        recipe_schedule(args, lr=5e-4)

    def __init__(self, args, train_set, val_set, run):
        self.args, self.run = args, run
        self.train_set, self.val_set, self.images = train_set, val_set, val_set
        tok = load_tokenizer(args.tokenizer, run.device)
        self.vae = vae = vqvae.VQVAE.frozen(args.vae, args.resolution, run.device)
        if len(vae.config.patch_nums) != 1:
            raise UserError(f'--vae {args.vae} has {len(vae.config.patch_nums)} scales; '
                            'stage 2 needs one: python train.py --model vqvae --patch_nums '
                            '8 --out_dir out/vqvae_1scale')
        key = dict(token_key(tok), vae=data.tokenizer_key(asdict(vae.config), vae.parameters()))
        encode = lambda img: torch.cat((tok.encode(img), vae.img_to_idx(img)[0]), 1)  # (B, S+L)
        cache_tokens(self, encode, key, args, run)
        self.config = asdict(gpt.GPTConfig(
            vocab_size=vae.config.vocab_size, block_size=vae.config.patch_nums[0] ** 2,
            depth=args.depth, num_classes=0, dropout=args.dropout,
            source_vocab_size=tok.vocab_size, source_len=tok.grid ** 2))
        self.stage1 = None   # with --gpt of this tokenizer: FID of the whole chain's samples
        if os.path.exists(args.gpt):   # read even with FID off: a wrong file is an error
            s1 = gpt.GPT.from_checkpoint(args.gpt, ['gpt'], source=f'--gpt {args.gpt}')
            if (s1.config.vocab_size, s1.config.block_size) == (tok.vocab_size, tok.grid ** 2):
                self.stage1 = s1.to(run.device) if args.fid_images else None

    def build(self):
        return gpt.GPT(**self.config)

    def loss(self, model, batch, step):
        return token_loss(model, batch, self.run.device, self.args.label_smooth,
                          self.config['source_len'])

    @torch.no_grad()
    def picture(self, model, path, n=8):
        """n held-out images; their VQVAE reconstruction (stage 2's ceiling); two stage-2
        renderings of their DiGIT tokens (top-p 0.8, DiGIT's), decoded by the VQVAE."""
        model.eval()
        S, device = self.config['source_len'], self.run.device
        tokens = torch.stack([self.val_set[i][0] for i in range(n)]).to(device)   # (n, S + L)
        rows = [torch.stack([self.images[i][0] for i in range(n)]).to(device),
                self.vae.idx_to_img([tokens[:, S:]])]
        for seed in (self.args.seed, self.args.seed + 1):
            vq = model.generate(torch.zeros(n, dtype=torch.long, device=device),
                                top_k=self.args.top_k, top_p=self.args.top_p or 0.8, seed=seed,
                                source=tokens[:, :S])                                # (n, L)
            rows.append(self.vae.idx_to_img([vq]))
        data.save_image_grid(torch.cat(rows).float().cpu(), path, nrow=n)
        model.train()

    def fid_images(self, model, indices):
        """The chain's samples: --gpt's tokens of the classes indices % classes (the grids' cfg
        and top-k), rendered by stage 2 (top-p 0.8) and the VQVAE; without a --gpt of this
        tokenizer, stage 2's renderings of the DiGIT tokens of held-out images `indices`."""
        a, device, seed = self.args, self.run.device, self.args.seed + indices[0]
        if self.stage1 is not None:
            labels = torch.tensor(indices, device=device) % max(self.stage1.num_classes, 1)
            source = self.stage1.generate(labels, cfg=a.cfg, top_k=a.top_k, seed=seed)
        else:
            tokens = torch.stack([self.val_set[i][0] for i in indices]).to(device)
            source = tokens[:, :self.config['source_len']]                         # (b, S)
        vq = model.generate(torch.zeros(len(indices), dtype=torch.long, device=device),
                            top_p=a.top_p or 0.8, seed=seed, source=source)       # (b, L)
        return self.vae.idx_to_img([vq]).float()

    def summary(self, r, step):
        return token_summary(r, step)


class ProbeTraining:
    """--model probe: a linear head per layer of the frozen GPT of --gpt, on its tokens."""
    defaults = dict(weight_decay=0.0, beta1=0.9, beta2=0.999, lr_schedule='cosine',
                    warmup_iters=0, max_iters=300, total_batch_size=64, batch_size=64)
    no_decay = ()
    picture_name = None
    frozen = ('gpt',)
    add_args = staticmethod(lambda parser: None)   # --gpt comes with GPTTraining

    @staticmethod
    def finish_args(args):
        args.lr = 3e-3 if args.lr is None else args.lr

    def __init__(self, args, train_set, val_set, run):
        self.args, self.run = args, run
        self.train_set, self.val_set = train_set, val_set
        if not os.path.exists(args.gpt):
            raise UserError(f'--gpt {args.gpt} not found: train one (python train.py '
                            '--model gpt)')
        state = checkpoint.load(args.gpt, '--gpt', foreign=True)
        self.released = checkpoint.is_fairseq(state)   # DiGIT's stage 1: its own protocol
        if self.released:
            config, weights = gpt.from_fairseq(state)
            state = dict(kind='gpt', config=config, model=weights, ema=None)
        elif state.get('kind') != 'gpt':
            raise UserError(f"--gpt {args.gpt} holds a {state.get('kind')} run, not a gpt")
        else:
            args.tokenizer = state['tokenizer']   # the GPT's own tokenizer
        self.probed, c = state, state['config']
        tok = load_tokenizer(args.tokenizer, run.device)
        if (tok.vocab_size, tok.grid ** 2) != (c['vocab_size'], c['block_size']):
            raise UserError(f'--tokenizer {args.tokenizer} makes {tok.grid ** 2} tokens of '
                            f'{tok.vocab_size}, --gpt {args.gpt} reads {c["block_size"]} of '
                            f'{c["vocab_size"]}')
        cache_tokens(self, tok.encode, token_key(tok), args, run)
        depth = c['depth']
        self.config = dict(gpt=c, num_classes=train_set.num_classes,
                           layers=list(range(depth if self.released else depth + 1)),
                           last=self.released)

    def build(self):
        c = self.config
        return LinearProbe(gpt.GPT.from_checkpoint(self.probed, ['gpt']), c['num_classes'],
                           c['layers'], c['last'])

    def loss(self, model, batch, step):
        return model(batch[0].to(self.run.device), batch[1].to(self.run.device))

    def summary(self, r, step):
        accs = {i: r[f'acc_{i}'] for i in self.config['layers']}
        best = max(accs, key=accs.get)
        return (f'linear probe of {self.args.gpt}, held-out top-1 per layer (0 = embeddings) '
                f'after {step} steps:\n' + ' '.join(f'{i}: {a:.1f}%' for i, a in accs.items())
                + f'\nbest: layer {best}')


class LinearProbe(nn.Module):
    """DiGIT's linear probe (Table 2, Fig. 3b; iGPT's protocol): a frozen GPT, and one linear
    classifier per hidden state on its mean over positions. idx (B, L), labels (B,) -> sum
    over layers of the cross-entropies, and parts {'ce_i', 'acc_i' (top-1 %)} for every probed
    state i (0: the embeddings, i: block i's output, before ln_f). important! The GPT sees the
    null class (BOS), never the labels (they are only the targets); it stays in eval mode and
    gets no gradient. Optimise only the heads (probe.heads.parameters()).
    layers: the states probed (default 0..depth); last: the mean over all L + 1 positions
    [start, x_1..x_L], not the L target positions [start, x_1..x_{L-1}]. DiGIT's protocol (official
    fairseq_user/image_generation_stage1/model_linearprobe.py), used for its released stage 1:
    layers 0..depth-1 and last, fairseq's inner_states over the 257 positions [BOS, x_1..x_256].
    DiGIT trains with SGD lr 0.4, momentum 0.9, RandomResizedCrop + flip; we train on cached
    tokens."""

    def __init__(self, model, num_classes, layers=None, last=False):
        super().__init__()
        self.gpt = model.eval().requires_grad_(False)
        self.layers = list(range(model.config.depth + 1)) if layers is None else list(layers)
        self.last = last
        self.heads = nn.ModuleList([nn.Linear(model.config.n_embd, num_classes)
                                    for _ in self.layers])
        for head in self.heads:   # DiGIT's init
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)

    def train(self, mode=True):
        super().train(mode)
        self.gpt.eval()   # important! frozen: no dropout, no label dropping
        return self

    @torch.no_grad()
    def features(self, idx):
        """idx (B, L) -> the position-averaged hidden states (B, C) of the probed layers."""
        states = self.gpt.hidden_states(idx, last=self.last)
        return [states[i].mean(1) for i in self.layers]

    def forward(self, idx, labels):
        loss, parts = 0.0, {}
        for i, head, f in zip(self.layers, self.heads, self.features(idx)):
            logits = head(f).float()                                              # (B, classes)
            ce = F.cross_entropy(logits, labels)
            loss = loss + ce
            parts[f'ce_{i}'] = ce.detach()
            parts[f'acc_{i}'] = (logits.argmax(-1) == labels).float().mean().detach() * 100
        return loss, parts
