"""
VAR: Visual AutoRegressive modeling by next-scale prediction (Tian et al., NeurIPS 2024,
arXiv 2404.02905). A GPT-2-like transformer with AdaLN (transformer.py) predicts each whole
token map r_k of the multi-scale VQVAE (vqvae.py) from all coarser ones (paper Eq. 6):

    p(r_1, ..., r_K) = prod_k p(r_k | r_1, ..., r_{k-1})

Sequence layout (L = sum_k pn_k^2 tokens): position 0 holds the start token (class embedding +
pos_start); positions of scale k+1 hold word_embed(area_down(f_hat_k, pn_{k+1})), the VQVAE's
cumulative reconstruction after k scales seen at the next resolution. Every position also gets a
level embedding (its scale) and a learnt absolute position embedding. A block-causal mask lets a
token see its own scale and all coarser ones; logits at the positions of scale k predict r_k.
The class embedding is both the start token and the AdaLN condition; class `num_classes` is the
null class of classifier-free guidance (labels are dropped to it with prob. cond_drop_rate).

One dial: depth. Width 64 * depth, heads = depth, drop-path 0.1 * depth / 24 (the official
build_vae_var). Module names match the released var_d16.pth ... var_d36.pth, which load with
every tensor used: `VAR.from_checkpoint('var_d16.pth', vae)`.
Deviations: labels are dropped only in training mode; attention is torch SDPA or FlexAttention
(attn_impl 'flex'), never flash_attn / xformers. On CPU in fp32, logits, gradients and samples
(same seed) are bit-identical to the official code.
Test: `python -m pytest test_all.py -k var`; train: `python train.py --model var --depth 16`.
"""
import argparse
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask

import checkpoint
import data
import transformer
import vqvae
from cli import UserError


@dataclass
class VARConfig:
    depth: int = 16                  # the one dial: width 64*depth, heads = depth
    num_classes: int = 1000          # classes; id num_classes is the CFG null class
    patch_nums: tuple = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # must equal the VQVAE's
    attn_l2_norm: bool = True        # cosine attention with a learnt temperature
    shared_aln: bool = False         # one AdaLN projection shared by all blocks (d36)
    mlp_ratio: float = 4.0           # MLP hidden width / width
    drop_path_rate: float = -1.0     # max stochastic depth; -1: 0.1 * depth / 24
    cond_drop_rate: float = 0.1      # label -> null class probability in training (CFG)
    norm_eps: float = 1e-6           # LayerNorm epsilon
    init_std: float = -1.0           # init of linears/embeddings; -1: sqrt(1 / (3 * width))
    init_head: float = 0.02          # head weight scale at init
    init_adaln: float = 0.5          # AdaLN scale/shift rows scale at init
    init_adaln_gamma: float = 1e-5   # AdaLN gate rows scale at init (near-identity blocks)


class VAR(nn.Module):
    """Next-scale prediction transformer over the token maps of a frozen multi-scale VQVAE."""

    def __init__(self, vae, **kwargs):
        super().__init__()
        self.config = cfg = VARConfig(**kwargs)
        cfg.patch_nums = tuple(cfg.patch_nums)
        if cfg.patch_nums != tuple(vae.config.patch_nums):
            raise ValueError(f'VAR patch_nums {cfg.patch_nums} != VQVAE {vae.config.patch_nums}')
        # a tuple, so the frozen tokenizer is no submodule: not in state_dict, not in DDP
        self.vae = (vae,)
        C = self.width = 64 * cfg.depth
        self.num_classes, self.Cvae = cfg.num_classes, vae.config.z_channels
        self.V = vae.config.vocab_size
        self.patch_nums = cfg.patch_nums
        self.L = sum(pn * pn for pn in cfg.patch_nums)
        self.first_l = cfg.patch_nums[0] ** 2
        self.begin_ends = []
        for pn in cfg.patch_nums:
            start = self.begin_ends[-1][1] if self.begin_ends else 0
            self.begin_ends.append((start, start + pn * pn))

        # embeddings: class (start token and condition), word, position, level
        std = math.sqrt(1 / C / 3)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)
        self.word_embed = nn.Linear(self.Cvae, C)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, C))
        self.lvl_embed = nn.Embedding(len(cfg.patch_nums), C)
        for p in (self.class_emb.weight, self.pos_start, self.pos_1LC, self.lvl_embed.weight):
            nn.init.trunc_normal_(p, std=std)

        # blocks
        dpr = cfg.drop_path_rate if cfg.drop_path_rate >= 0 else 0.1 * cfg.depth / 24
        dprs = torch.linspace(0, dpr, cfg.depth, device='cpu').tolist()   # linear in depth
        self.shared_ada_lin = (nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C)) if cfg.shared_aln
                               else nn.Identity())
        self.blocks = nn.ModuleList([
            transformer.AdaLNBlock(C, cfg.depth, C, cfg.mlp_ratio, cfg.attn_l2_norm, p,
                           cfg.norm_eps, cfg.shared_aln)
            for p in dprs])
        self.head_nm = transformer.AdaLNBeforeHead(C, C, cfg.norm_eps)
        self.head = nn.Linear(C, self.V)

        # the scale of every position, and the block-causal mask of Eq. 6 (additive, 0 / -inf);
        # persistent buffers because the official checkpoints contain them
        lvl = torch.cat([torch.full((pn * pn,), k) for k, pn in enumerate(cfg.patch_nums)])
        self.register_buffer('lvl_1L', lvl.view(1, self.L))
        mask = torch.where(lvl[:, None] >= lvl[None, :], 0.0, -torch.inf)           # (L, L)
        self.register_buffer('attn_bias_for_masking', mask.view(1, 1, self.L, self.L))
        self.attn_impl, self.block_masks = 'sdpa', {}   # 'flex': FlexAttention (GPU speed)
        self.init_weights()

    def init_weights(self):
        """The official init: truncated normal linears/embeddings, the head scaled down, the
        residual projections divided by sqrt(2 depth), AdaLN gates near zero."""
        cfg, C = self.config, self.width
        std = cfg.init_std if cfg.init_std >= 0 else math.sqrt(1 / C / 3)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, 'bias', None) is not None:
                    nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.head.weight.mul_(cfg.init_head)
            self.head_nm.ada_lin[-1].weight.mul_(cfg.init_adaln)
            for block in self.blocks:
                block.attn.proj.weight.div_(math.sqrt(2 * cfg.depth))
                block.ffn.fc2.weight.div_(math.sqrt(2 * cfg.depth))
                if cfg.shared_aln:   # rows: gamma1, gamma2 | scale1, scale2, shift1, shift2
                    block.ada_gss[:, :, 2:].mul_(cfg.init_adaln)
                    block.ada_gss[:, :, :2].mul_(cfg.init_adaln_gamma)
                else:
                    block.ada_lin[-1].weight[2 * C:].mul_(cfg.init_adaln)
                    block.ada_lin[-1].weight[:2 * C].mul_(cfg.init_adaln_gamma)

    def block_mask(self, n, device):
        """Eq. 6's mask over the first n positions as a FlexAttention BlockMask (cached): a
        position attends to its own scale and the coarser ones."""
        if (n, str(device)) not in self.block_masks:
            lvl = self.lvl_1L[0, :n].to(device)                                       # (n,)
            self.block_masks[n, str(device)] = create_block_mask(
                lambda b, h, q, kv: lvl[q] >= lvl[kv], None, None, n, n, device=device)
        return self.block_masks[n, str(device)]

    def logits(self, h, cond):
        """AdaLN before head, then the head, in fp32: (B, l, C) -> (B, l, V)."""
        return self.head(self.head_nm(h.float(), cond).float()).float()

    def forward(self, labels, x):
        """Teacher forcing. labels (B,), x = vae.idx_to_var_input(idx) (B, L - 1, Cvae)
        -> logits (B, L, V); position l predicts token l of cat(idx, 1). A prefix of x
        (the first scales only) gives the logits of that prefix."""
        B, n = x.shape[0], x.shape[1] + self.first_l
        if self.training and self.config.cond_drop_rate > 0:   # CFG: learn p(x) too
            drop = torch.rand(B, device=labels.device) < self.config.cond_drop_rate
            labels = torch.where(drop, self.num_classes, labels)
        with torch.autocast(x.device.type, enabled=False):     # embeddings in fp32
            cond = self.class_emb(labels)                                          # (B, C)
            sos = cond[:, None].expand(B, self.first_l, -1) + self.pos_start        # (B, 1, C)
            h = torch.cat((sos, self.word_embed(x.float())), dim=1)               # (B, L, C)
            h = h + (self.lvl_embed(self.lvl_1L[:, :n].expand(B, -1)) + self.pos_1LC[:, :n])
        cond_blocks = self.shared_ada_lin(cond)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(
            x.device.type) else torch.float32
        h, mask = h.to(dtype), self.attn_bias_for_masking[:, :, :n, :n].to(dtype)
        if self.attn_impl == 'flex':   # the same mask as blocks: fully masked blocks skipped
            mask = self.block_mask(n, x.device)
        for block in self.blocks:
            h = block(h, cond_blocks, mask)
        return self.logits(h, cond)

    @torch.no_grad()
    def sample_tokens(self, labels, cfg=1.5, top_k=0, top_p=0.0, seed=None, more_smooth=False,
                      edit_idx=None, edit_mask=None, temperature=1.0):
        """Generate scale by scale with the kv cache; returns (K token maps (B, pn^2), f_hat).

        Classifier-free guidance on a linear ramp: at scale k of K the logits are
        (1 + t) cond - t uncond with t = cfg * k / (K - 1), so the 1x1 map is unguided and
        the last gets the full cfg. Zero-shot editing: the tokens edit_idx (K x (B, pn^2), from
        vae.img_to_idx) are kept where edit_mask (B, H_img, W_img) says so (kept_positions).
        more_smooth: soft codes (smooth_codes), for looks."""
        B, K, vae = len(labels), len(self.patch_nums), self.vae[0]
        quant, H = vae.quantize, self.patch_nums[-1]
        rng = None if seed is None else torch.Generator(labels.device).manual_seed(seed)
        cond = self.class_emb(torch.cat((labels, torch.full_like(labels, self.num_classes))))
        cond_blocks = self.shared_ada_lin(cond)                                   # (2B, C)
        lvl_pos = self.lvl_embed(self.lvl_1L) + self.pos_1LC                       # (1, L, C)
        x = (cond[:, None].expand(2 * B, self.first_l, -1) + self.pos_start.expand(
            2 * B, self.first_l, -1) + lvl_pos[:, :self.first_l])                 # (2B, 1, C)
        f_hat, idx_list = cond.new_zeros(B, self.Cvae, H, H), []
        for block in self.blocks:
            block.attn.kv_cache = []                 # each scale attends to all earlier ones
        for k, pn in enumerate(self.patch_nums):
            ratio = k / (K - 1) if K > 1 else 1.0
            for block in self.blocks:
                x = block(x, cond_blocks)            # no mask: the cache holds only the past
            logits = self.logits(x, cond)                                          # (2B, l, V)
            t = cfg * ratio
            logits = (1 + t) * logits[:B] - t * logits[B:]                         # (B, l, V)
            idx = transformer.sample(logits, top_k, top_p, rng, temperature)   # in place on logits
            kept = None if edit_idx is None else kept_positions(edit_mask, pn)     # (B, l)
            if kept is not None:
                idx = torch.where(kept, edit_idx[k], idx)
            idx_list.append(idx)
            h = quant.embedding(idx)                                               # (B, l, Cvae)
            if more_smooth:
                h = self.smooth_codes(logits, ratio, rng, h, kept)
            h = h.transpose(1, 2).reshape(B, self.Cvae, pn, pn)
            f_hat, nxt = quant.next_var_input(k, f_hat, h)
            if k < K - 1:
                start, end = self.begin_ends[k + 1]
                x = self.word_embed(nxt.flatten(2).transpose(1, 2)) + lvl_pos[:, start:end]
                x = x.repeat(2, 1, 1)                                              # (2B, l', C)
        for block in self.blocks:
            block.attn.kv_cache = None
        return idx_list, f_hat

    def smooth_codes(self, logits, ratio, rng, h, kept=None):
        """more_smooth (the official sampler's option): instead of the sampled codes h (B, l, C),
        a Gumbel-softmax mix of all codes, from the filtered logits (B, l, V) sharpened by
        (1 + ratio), at temperature max(0.27 (1 - 0.95 ratio), 0.005); kept (edited) positions
        keep their code."""
        tau = max(0.27 * (1 - 0.95 * ratio), 0.005)
        soft = transformer.gumbel_softmax(logits * (1 + ratio), tau, rng)         # (B, l, V)
        soft = soft @ self.vae[0].quantize.embedding.weight                        # (B, l, C)
        return soft if kept is None else torch.where(kept[..., None], h, soft)

    @torch.no_grad()
    def generate(self, labels, cfg=1.5, top_k=0, top_p=0.0, seed=None, more_smooth=False,
                 edit_idx=None, edit_mask=None, temperature=1.0):
        """labels (B,) -> images (B, 3, H, W) in [0, 1]; see sample_tokens for the options.
        VAR's README: cfg 1.5, top_k 900, top_p 0.96 for FID; cfg 4-5 to look at."""
        _, f_hat = self.sample_tokens(labels, cfg, top_k, top_p, seed, more_smooth,
                                      edit_idx, edit_mask, temperature)
        return self.vae[0].fhat_to_img(f_hat).add(1).mul(0.5)

    @classmethod
    def from_checkpoint(cls, path, vae, use_ema=True):
        """Load an official var_d{16,20,24,30,36}.pth (a bare state dict; the architecture is
        read off its shapes) or a `train.py --model var` checkpoint, on top of `vae`."""
        ckpt = checkpoint.load(path, 'VAR checkpoint')
        if isinstance(ckpt, dict) and 'kind' in ckpt:
            checkpoint.check_run(ckpt, path, 'VAR checkpoint', ['var'])
            state, config = (ckpt['ema'] if use_ema and ckpt.get('ema') else ckpt['model'],
                             ckpt['config'])
        else:
            state = ckpt
            if not isinstance(state, dict) or 'pos_1LC' not in state:
                raise UserError(f'{path} holds {checkpoint.describe(state)}, not a VAR '
                                'checkpoint (no pos_1LC)')
            width = state['pos_1LC'].shape[-1]
            config = dict(depth=width // 64, num_classes=state['class_emb.weight'].shape[0] - 1,
                          patch_nums=vae.config.patch_nums,
                          attn_l2_norm='blocks.0.attn.scale_mul_1H11' in state,
                          shared_aln='blocks.0.ada_gss' in state)
        if tuple(config['patch_nums']) != tuple(vae.config.patch_nums):
            raise UserError(f'{path} predicts the scales {tuple(config["patch_nums"])}, the '
                            f'VQVAE given has {tuple(vae.config.patch_nums)}: pass the tokenizer '
                            'it was trained on (--vae)')
        return checkpoint.fill(cls(vae, **config), state, path, f'VAR({config})')


def kept_positions(mask, pn):
    """Zero-shot editing (VAR Appendix B: in-, out-painting, class-conditional editing): which
    tokens of a pn x pn map are teacher-forced from the input image instead of sampled. mask
    (B, H_img, W_img), 1 = keep, resized bilinearly to pn x pn, > 0.5; maps of at most 3 tokens
    are always kept (the official notebook). -> (B, pn*pn) bool."""
    keep = F.interpolate(mask[:, None].float(), size=(pn, pn), mode='bilinear')    # (B,1,pn,pn)
    return (keep.flatten(1) > 0.5) | (pn * pn <= 3)


# ----------------------------------------------------------------------------------------------
# The task of train.py: --model var

class Training:
    """--model var: VAR on the tokens of a frozen VQVAE (--vae), tokenized once and cached;
    cross-entropy over all L tokens with the per-scale loss and accuracy; sample grids."""
    # VAR's recipe: AdamW (0.9, 0.95), wd 0.05, lr 1e-4 per 256 images, warmup 2%, linear decay
    defaults = dict(weight_decay=0.05, beta1=0.9, beta2=0.95, lr_schedule='linear',
                    vae='out/vqvae/ckpt.pt')
    no_decay = ('class_emb', 'lvl_embed', 'pos_start', 'pos_1LC', 'scale_mul', 'ada_gss')
    picture_name = 'samples'
    frozen = ('vae',)

    @staticmethod
    def add_args(parser):
        g = parser.add_argument_group('var (--model var; also --depth, --vae, --cfg, ...)')
        g.add_argument('--cache_tokens', action=argparse.BooleanOptionalAction, default=True,
                       help='tokenize the data once (eval crops) instead of every batch')
        g.add_argument('--attn', choices=['sdpa', 'flex'], default='sdpa', help="the block-causal "
                       "mask as SDPA's dense mask, or FlexAttention's block mask (CUDA, compiled)")

    @staticmethod
    def finish_args(args):
        if args.lr is None:
            args.lr = 1e-4 * args.total_batch_size / 256
        if args.warmup_iters is None:
            args.warmup_iters = args.max_iters // 50

    def __init__(self, args, train_set, val_set, run):
        self.args, self.run = args, run
        if args.attn == 'flex' and not run.device.startswith('cuda'):
            raise UserError('--attn flex needs a CUDA device (FlexAttention trains on GPUs only)')
        self.vae = vae = vqvae.VQVAE.frozen(args.vae, args.resolution, run.device)
        self.train_set, self.val_set = train_set, val_set
        if args.cache_tokens:   # the frozen tokenizer off the training step's path
            encode = lambda img: torch.cat(vae.img_to_idx(img), 1)                   # (B, L)
            key = data.tokenizer_key(asdict(vae.config), vae.parameters())
            self.train_set = data.tokenize(encode, key, train_set, os.path.join(
                args.out_dir, 'tokens_train.pt'), args, run.device, crops=args.token_crops)
            self.val_set = data.tokenize(encode, key, val_set, os.path.join(
                args.out_dir, 'tokens_val.pt'), args, run.device, limit=args.eval_images)
        self.num_classes = train_set.num_classes
        self.config = asdict(VARConfig(depth=args.depth, num_classes=self.num_classes,
                                       patch_nums=vae.config.patch_nums))

    def build(self):
        model = VAR(self.vae, **self.config)
        model.attn_impl = self.args.attn
        return model

    def loss(self, model, batch, step):
        """Cross-entropy over all L tokens (mean, as the official trainer), and per scale the
        loss and the accuracy. batch: cached tokens (B, L) or images (tokenized here)."""
        tokens = batch[0].to(self.run.device, non_blocking=True)
        labels = batch[1].to(self.run.device)
        vae, patch_nums = self.vae, self.vae.config.patch_nums
        if tokens.ndim == 4:    # images, not cached tokens: tokenize now (random crops included)
            tokens = torch.cat(vae.img_to_idx(tokens), 1)                            # (B, L)
        idx = tokens.split([pn * pn for pn in patch_nums], dim=1)                  # K x (B, l)
        logits = model(labels, vae.idx_to_var_input(idx))                          # (B, L, V)
        ce = F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction='none',
                             label_smoothing=self.args.label_smooth).view(tokens.shape)  # (B, L)
        hit = (logits.detach().argmax(-1) == tokens).float()                       # (B, L)
        parts, start = {}, 0
        for k, pn in enumerate(patch_nums):
            parts[f'ce_{k}'] = ce[:, start:start + pn * pn].detach().mean()
            parts[f'acc_{k}'] = hit[:, start:start + pn * pn].mean() * 100
            start += pn * pn
        return ce.mean(), parts

    @torch.no_grad()
    def picture(self, model, path, per_class=4):
        """Generated images: one column per class (at most 10), per_class rows."""
        model.eval()
        classes = torch.arange(min(self.num_classes, 10), device=self.run.device)
        a = self.args
        img = model.generate(classes.repeat(per_class), cfg=a.cfg, top_k=a.top_k, top_p=a.top_p,
                             seed=a.seed)                            # (B, 3, H, W), row-major
        data.save_image_grid(img.float().cpu() * 2 - 1, path, nrow=len(classes))
        model.train()

    def fid_images(self, model, indices):
        """Generated images of the classes indices % classes, the grids' sampling settings."""
        a = self.args
        labels = torch.tensor(indices, device=self.run.device) % self.num_classes
        with self.run.autocast:
            img = model.generate(labels, cfg=a.cfg, top_k=a.top_k, top_p=a.top_p,
                                 seed=a.seed + indices[0])                  # (b, 3, H, W)
        return img.float() * 2 - 1

    def summary(self, r, step):
        patch_nums = self.config['patch_nums']
        accs = ', '.join(f'{pn}x{pn}: {r[f"acc_{k}"]:.1f}%' for k, pn in enumerate(patch_nums))
        return (f'held-out cross-entropy {r["loss"]:.3f} after {step} steps; token accuracy '
                f'per scale: {accs}')
