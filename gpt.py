"""
DiGIT's GPT (Zhu et al., NeurIPS 2024, Sec. 3 and 4.3): the raster-order GPT of stage 1, the
prefix GPT of stage 2, and the loading of DiGIT's released fairseq checkpoints into them.
The blocks are transformer.py's; what DiGIT trains with them is in digit.py.

    model = GPT(vocab_size=8192, depth=16)                        # ours, GPT-2 style
    model = GPT.from_checkpoint('checkpoint_stage1.pt')           # DiGIT's released stage 1
    tokens = model.generate(labels, top_k=300)                    # (B, 256)

Letters: B batch, L tokens, S source tokens, C width, V vocabulary.
Test: `python -m pytest test_all.py -k "gpt or digit or fairseq"`.
"""
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
from transformer import AdaLNBeforeHead, AdaLNBlock, Attention, MLP, sample


# DiGIT's GPT (Zhu et al., NeurIPS 2024, Sec. 3): raster-order next-token prediction over the
# K-Means tokens of an image, p(x_1..x_L | y) = prod_t p(x_t | y, x_<t). Input = [start, x_1..
# x_{L-1}], start = the class embedding of y (DiGIT's class id in place of BOS), so position t
# predicts x_{t+1} (0-based: logits[:, t] -> idx[:, t]). Class num_classes is the CFG null class;
# with num_classes = 0 it is the only one, a learnt BOS. cond='adaln' also feeds the class to
# every block through VAR's AdaLNBlock (dropout then on the embeddings only). Our defaults are
# GPT-2's (pre-LN, a final LN, as the paper says), ids 0..V-1, positions from 0, labels dropped
# to the null class in training (CFG; DiGIT has none). post_ln, final_norm, embed_scale, gelu
# and positions give fairseq's TransformerDecoder as DiGIT's official stage 1 builds it
# (fairseq_user/image_generation_stage1/model.py): from_fairseq loads DiGIT's released
# checkpoints into this class.
#
# DiGIT's stage 2 (Sec. 4.3; official fairseq_user/image_generation_stage2/model.py) is the
# same GPT with a source prefix (source_vocab_size > 0): it renders pixels by predicting the VQ
# tokens x of a single-scale VQVAE from the DiGIT token map s, p(x | s) = prod_t p(x_t | s, x_<t),
# over the sequence [s_1..s_S, start, x_1..x_{L-1}] under ONE causal mask: as in the official code
# the prefix is causal too (s_j sees s_<=j only, never a target). s has its own embedding table
# and its own learnt positions (DiGIT's two position tables, both starting at 0); logits come only
# from the L target positions. Official stage 2 is unconditional (num_classes = 0: start = BOS).

@dataclass
class GPTConfig:
    vocab_size: int = 8192           # tokenizer ids 0..V-1 (DiGIT base: 8192 clusters)
    block_size: int = 256            # tokens per image, h * w in raster order
    depth: int = 16                  # the one dial: n_embd 64 * depth, n_head = depth
    n_embd: int = 0                  # width; 0: 64 * depth
    n_head: int = 0                  # heads; 0: depth
    num_classes: int = 1000          # 0: unconditional; id num_classes is the null class
    cond: str = 'token'              # 'token': class token at position 0; 'adaln': and AdaLN
    cond_drop_rate: float = 0.1      # label -> null class probability in training (CFG)
    dropout: float = 0.1             # fairseq's: on embeddings and both residual branches
    mlp_ratio: float = 4.0           # MLP hidden width / width
    norm_eps: float = 1e-5           # LayerNorm epsilon (fairseq's)
    source_vocab_size: int = 0       # stage 2: DiGIT ids 0..V_s-1 of the prefix; 0: no prefix
    source_len: int = 0              # stage 2: prefix tokens S (DiGIT: 16 x 16 = 256)
    post_ln: bool = False            # blocks LN(x + f(x)) (DiGIT's stage 1), not x + f(LN(x))
    final_norm: bool = True          # LN before the head (DiGIT's stage 1 has none)
    embed_scale: float = 1.0         # token and class embeddings times this (fairseq: sqrt(C))
    gelu: str = 'tanh'               # 'tanh' approximation (GPT-2) or 'exact' (erf, fairseq)
    positions: int = 0               # learnt positions; 0: block_size (released: block_size + 1)


class Block(nn.Module):
    """GPT-2's pre-LN block, x = x + Drop(Attn(LN1(x))); x = x + Drop(MLP(LN2(x))), or with
    post_ln the original Transformer's, x = LN1(x + Drop(Attn(x))); x = LN2(x + Drop(MLP(x)))."""

    def __init__(self, dim, n_head, mlp_ratio=4.0, dropout=0.0, norm_eps=1e-5, post_ln=False,
                 gelu='tanh'):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(dim, eps=norm_eps), nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, n_head, attn_l2_norm=False)
        self.ffn = MLP(dim, round(dim * mlp_ratio), 'none' if gelu == 'exact' else 'tanh')
        self.drop, self.post_ln = nn.Dropout(dropout), post_ln

    def forward(self, x, cond=None, attn_mask=None):
        """x (B, L, C) -> (B, L, C); cond is unused (the AdaLNBlock signature)."""
        if self.post_ln:
            x = self.ln_1(x + self.drop(self.attn(x, attn_mask)))
            return self.ln_2(x + self.drop(self.ffn(x)))
        x = x + self.drop(self.attn(self.ln_1(x), attn_mask))
        return x + self.drop(self.ffn(self.ln_2(x)))


def loss(logits, targets, label_smoothing=0.1):
    """Token cross-entropy with label smoothing eps (DiGIT's recipe: 0.1), the mean over tokens
    of (1 - eps) * (-log p_target) + eps * mean_v(-log p_v). logits (B, L, V), targets (B, L)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                           label_smoothing=label_smoothing)


class GPT(nn.Module):
    """Raster-order, class-conditional (or unconditional) GPT over discrete image tokens;
    with source_vocab_size > 0, conditioned on a causal prefix of source tokens (stage 2)."""

    def __init__(self, **kwargs):
        super().__init__()
        self.config = cfg = GPTConfig(**kwargs)
        cfg.n_embd, cfg.n_head = cfg.n_embd or 64 * cfg.depth, cfg.n_head or cfg.depth
        if (cfg.cond not in ('token', 'adaln') or cfg.n_embd % cfg.n_head
                or (cfg.source_vocab_size > 0) != (cfg.source_len > 0)
                or cfg.gelu not in ('tanh', 'exact') or (cfg.post_ln and cfg.cond == 'adaln')
                or 0 < cfg.positions < cfg.block_size):
            raise ValueError(f'bad GPT config: cond {cfg.cond!r} (token|adaln; adaln is pre-LN), '
                             f'n_embd {cfg.n_embd} must be a multiple of n_head {cfg.n_head}, '
                             f'source_vocab_size and source_len both > 0 or both 0, gelu '
                             f'{cfg.gelu!r} (tanh|exact), positions 0 or >= block_size')
        C, self.num_classes, self.adaln = cfg.n_embd, cfg.num_classes, cfg.cond == 'adaln'
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)   # last row: null class / BOS
        self.wte = nn.Embedding(cfg.vocab_size, C)
        self.wpe = nn.Embedding(cfg.positions or cfg.block_size, C)
        if cfg.source_vocab_size:   # stage 2: the source's own tokens and positions
            self.src_wte = nn.Embedding(cfg.source_vocab_size, C)
            self.src_wpe = nn.Embedding(cfg.source_len, C)
        self.drop = nn.Dropout(cfg.dropout)
        if self.adaln:
            self.blocks = nn.ModuleList([
                AdaLNBlock(C, cfg.n_head, C, cfg.mlp_ratio, False, 0.0, cfg.norm_eps)
                for _ in range(cfg.depth)])
            self.ln_f = AdaLNBeforeHead(C, C, cfg.norm_eps)
        else:
            self.blocks = nn.ModuleList([
                Block(C, cfg.n_head, cfg.mlp_ratio, cfg.dropout, cfg.norm_eps, cfg.post_ln,
                      cfg.gelu) for _ in range(cfg.depth)])
            self.ln_f = nn.LayerNorm(C, eps=cfg.norm_eps) if cfg.final_norm else nn.Identity()
        self.head = nn.Linear(C, cfg.vocab_size, bias=False)   # untied from wte
        T = cfg.source_len + self.wpe.num_embeddings
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        self.register_buffer('causal', causal, persistent=False)                 # (S+P, S+P)
        self.init_weights()

    def init_weights(self):
        """GPT-2's init: N(0, 0.02) linears and embeddings, zero biases, residual projections
        divided by sqrt(2 depth); the standard 1/sqrt(c) attention scale (Attention's default
        0.25/sqrt(c) is VAR's); AdaLN gates start at 1, scales and shifts near 0."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, 'bias', None) is not None:
                    nn.init.zeros_(m.bias)
        with torch.no_grad():
            for block in self.blocks:
                block.attn.scale = block.attn.head_dim ** -0.5
                block.attn.proj.weight.div_(math.sqrt(2 * self.config.depth))
                block.ffn.fc2.weight.div_(math.sqrt(2 * self.config.depth))
                if self.adaln:   # rows: gamma1, gamma2 | scale1, scale2, shift1, shift2
                    block.ada_lin[-1].bias[:2 * self.config.n_embd].fill_(1.0)

    def trunk(self, h, cond, attn_mask=None, states=None):
        """Input embeddings h (B, l, C), class embedding cond (B, C) -> final hidden (B, l, C),
        after ln_f. states: a list that receives the embeddings after dropout and the output of
        every block, depth + 1 tensors (B, l, C) (hidden_states)."""
        states = [] if states is None else states
        states.append(self.drop(h))
        for block in self.blocks:
            states.append(block(states[-1], cond, attn_mask))
        return self.ln_f(states[-1], cond) if self.adaln else self.ln_f(states[-1])

    def source_prefix(self, source, B):
        """Stage 2's prefix: source ids (B, S) -> their embeddings plus the source positions
        (B, S, C); an empty (B, 0, C) when the model has no source (source_vocab_size 0)."""
        cfg = self.config
        if not cfg.source_vocab_size:
            if source is not None:
                raise ValueError('source given, but this GPT has source_vocab_size 0')
            return self.wpe.weight.new_empty(B, 0, cfg.n_embd)                    # (B, 0, C)
        if source is None or tuple(source.shape) != (B, cfg.source_len):
            got = None if source is None else tuple(source.shape)
            raise ValueError(f'need source ids (B, source_len) = {(B, cfg.source_len)}, '
                             f'got {got}')
        if ((source < 0) | (source >= cfg.source_vocab_size)).any():   # a sync; clear errors
            raise ValueError(f'source ids must lie in [0, {cfg.source_vocab_size})')
        return self.src_wte(source) * cfg.embed_scale + self.src_wpe.weight       # (B, S, C)

    def inputs(self, idx, labels=None, source=None, last=False):
        """Teacher-forcing inputs: idx (B, L), labels (B,) or None, source (B, S) or None ->
        the embeddings of [source; start, idx_1..idx_{L-1}] (B, S+L, C), the class embedding
        cond (B, C) and the causal mask (S+L, S+L). Labels dropped as in forward. last: also
        idx_L, one more position (fairseq's sequences end with </s>, so its models have one)."""
        B, L = idx.shape[0], idx.shape[1] + last
        if L > self.wpe.num_embeddings:
            raise ValueError(f'{L} inputs, but this GPT has {self.wpe.num_embeddings} positions')
        src = self.source_prefix(source, B)                                        # (B, S, C)
        if labels is None:
            labels = torch.full((B,), self.num_classes, device=idx.device)
        if self.training and self.config.cond_drop_rate > 0:   # CFG: learn p(x) too
            drop = torch.rand(B, device=idx.device) < self.config.cond_drop_rate
            labels = torch.where(drop, self.num_classes, labels)
        cond = self.class_emb(labels)                                              # (B, C)
        h = torch.cat((cond[:, None], self.wte(idx[:, :L - 1])), dim=1)           # (B, L, C)
        h = torch.cat((src, h * self.config.embed_scale + self.wpe.weight[:L]), 1)  # (B, S+L, C)
        return h, cond, self.causal[:h.shape[1], :h.shape[1]]

    def forward(self, idx, labels=None, source=None):
        """Teacher forcing. idx (B, L) token ids, labels (B,) class ids or None (null class),
        source (B, S) ids (stage 2 only) -> logits (B, L, V) in fp32; position t predicts
        idx[:, t] from the source, the class and idx[:, :t].
        important! In training mode labels become the null class with prob. cond_drop_rate."""
        h = self.trunk(*self.inputs(idx, labels, source))[:, -idx.shape[1]:]     # (B, L, C)
        return self.head(h).float()                                                # (B, L, V)

    def hidden_states(self, idx, labels=None, source=None, last=False):
        """The residual stream at the L target positions (inputs start, idx_1..idx_{L-1}; the
        source prefix is cut off): depth + 1 tensors (B, L, C), the input embeddings and every
        block's output, before ln_f: head(ln_f(states[-1])) = forward (AdaLN: ln_f(., cond)).
        last: L + 1 positions, idx_L an input too (fairseq's inner_states, DiGIT's probe)."""
        states = []
        self.trunk(*self.inputs(idx, labels, source, last), states=states)
        return [h[:, -idx.shape[1] - last:] for h in states]

    @torch.no_grad()
    def generate(self, labels, num_tokens=None, cfg=0.0, temperature=1.0, top_k=0, top_p=0.0,
                 seed=None, prefix=None, source=None):
        """labels (B,) class ids (num_classes: p(x); 0 if unconditional), source (B, S) ids
        (stage 2 only) -> ids (B, num_tokens or block_size). The prompt, source + start token +
        prefix (B, P) (kept; DiGIT Fig. 4b completes the lower rows of an image), runs as one
        causal pass, then one token per step with the kv cache. CFG as VAR's with a constant
        t = cfg: logits = (1 + cfg) c - cfg u, u from the null class in a doubled batch (same
        source). gpt.sample draws (top_k=1: greedy) from a Generator seeded with seed (None:
        the global RNG). important! .eval() first (dropout)."""
        config = self.config
        B, L = len(labels), num_tokens or config.block_size
        out = labels.new_zeros(B, 0) if prefix is None else prefix                 # (B, P)
        src = self.source_prefix(source, B)                                        # (B, S, C)
        if not out.shape[1] <= L <= self.config.block_size:
            raise ValueError(f'need prefix {out.shape[1]} <= num_tokens {L} <= block_size')
        if out.shape[1] == L:   # nothing left to generate
            return out
        rng = None if seed is None else torch.Generator(labels.device).manual_seed(seed)
        guided = cfg != 0 and self.num_classes > 0      # without classes, cond = uncond
        n = 2 if guided else 1                          # CFG: a second half, null class
        labels = torch.cat((labels, torch.full_like(labels, self.num_classes)))[:n * B]
        cond = self.class_emb(labels)                                             # (nB, C)
        h = torch.cat((cond[:, None], self.wte(out.repeat(n, 1))), 1) * config.embed_scale
        h = torch.cat((src.repeat(n, 1, 1), h + self.wpe.weight[:h.shape[1]]), 1)  # (nB, S+P+1, C)
        mask = self.causal[:h.shape[1], :h.shape[1]]                              # (S+P+1, S+P+1)
        for block in self.blocks:
            block.attn.kv_cache = []
        try:
            for t in range(out.shape[1], L):
                logits = self.head(self.trunk(h, cond, mask)[:, -1:]).float()     # (nB, 1, V)
                if guided:
                    logits = (1 + cfg) * logits[:B] - cfg * logits[B:]            # (B, 1, V)
                nxt = sample(logits, top_k, top_p, rng, temperature)              # (B, 1)
                out = torch.cat((out, nxt), dim=1)                                 # (B, t+1)
                if t + 1 < L:   # the next input: the new token at position t + 1
                    h = self.wte(nxt.repeat(n, 1)) * config.embed_scale                # (nB, 1, C)
                    h, mask = h + self.wpe.weight[t + 1:t + 2], None
        finally:
            for block in self.blocks:
                block.attn.kv_cache = None
        return out

    @classmethod
    def from_checkpoint(cls, ckpt, kinds=('gpt', 'stage2'), use_ema=True, source=None):
        """A GPT from a train.py checkpoint of one of `kinds` (its EMA weights if it has them
        and use_ema) or from DiGIT's released fairseq stage 1 ('gpt') or stage 2 ('stage2'),
        a path or its loaded dict (checkpoint.load(path, foreign=True)), in eval mode. Errors
        name `source` (default: the path)."""
        state = checkpoint.load(ckpt, 'GPT checkpoint', foreign=True) if isinstance(
            ckpt, (str, os.PathLike)) else ckpt
        if checkpoint.is_fairseq(state):
            config, weights = from_fairseq(state)
            kind, state = 'stage2' if config['source_len'] else 'gpt', dict(config=config)
            state.update(kind=kind, model=weights, ema=None)
        source = source or (ckpt if isinstance(ckpt, (str, os.PathLike)) else 'the checkpoint')
        checkpoint.check_run(state, source, 'GPT checkpoint', kinds)
        model = cls(**state['config'])
        weights = state['ema'] if use_ema and state.get('ema') else state['model']
        return checkpoint.fill(model, weights, source, f'GPT({state["config"]})').eval()


# DiGIT's released checkpoints are fairseq TransformerDecoders (DiGIT's official code: the models
# and dictionaries of fairseq_user/image_generation_stage{1,2}/model.py and task.py). Their
# dictionaries start with fairseq's specials <s> <pad> </s> <unk> <n>, so image token k is id
# k + 5; </s> (2) starts every sequence; stage 1's class c is id 8197 + c; stage 2's one table
# holds its own dictionary (5 + 1024 VQ codes) then stage 1's (5 + 8192). Positions start at 2
# (fairseq's padding_idx + 1) in both of stage 2's position tables.
SPECIALS, EOS, FIRST_POSITION = 5, 2, 2


def from_fairseq(state, block_size=256):
    """A fairseq checkpoint {'cfg' or 'args', 'model'} of DiGIT's stage 1 (post-LN, no final
    LN) or stage 2 (pre-LN, a final LN, a source prefix) -> (GPT config, GPT state dict).
    Every decoder tensor is placed, or skipped where fairseq's model never reads it:
    - the k projection's bias: it adds q . b_k to every key's score, softmax ignores that;
    - special symbols other than </s> (<s> <pad> <unk> <n>): never an input, never sampled
      (DiGIT's generator masks them; </s> is barred before the 256th token). The head keeps the
      image tokens only, so top-p's kept set is fairseq's rule on probabilities renormalised
      over them; fairseq applies it before renormalising, to probabilities that still count
      the masked mass m (its threshold is in effect p / (1 - m); m is small once trained);
    - positions 0 and 1 (padding) and past block_size + 1 (never reached); decoder.version.
    The rest of the file is the tokenizer (pretrained_encoder.*, centroids, centroid_norm) and,
    in stage 2, the VQGAN (vqgan.*, vqgan.py). fairseq saves fp32 even from fp16 training;
    fp16 files load too, as fp32."""
    hp = state['cfg']['model'] if state.get('cfg') else state['args']
    sd = {k[len('decoder.'):]: v.float() for k, v in state['model'].items()
          if k.startswith('decoder.')}
    emb, head = sd.pop('embed_tokens.weight'), sd.pop('output_projection.weight')
    V, C = head.shape[0] - SPECIALS, emb.shape[1]
    depth = sum(k.endswith('self_attn.q_proj.weight') for k in sd)
    if hp.get('activation_fn') not in ('gelu', 'gelu_accurate'):
        raise ValueError(f"activation_fn {hp.get('activation_fn')!r}: GPT has gelu only")
    stage2 = 'embed_positions_1.weight' in sd
    config = dict(vocab_size=V, block_size=block_size, depth=depth, n_embd=C,
                  n_head=hp['decoder_attention_heads'], cond_drop_rate=0.0,
                  dropout=hp.get('dropout', 0.1), mlp_ratio=sd['layers.0.fc1.weight'].shape[0] / C,
                  post_ln=not hp.get('decoder_normalize_before', False),
                  final_norm='layer_norm.weight' in sd, positions=block_size + 1,
                  embed_scale=1.0 if hp.get('no_scale_embedding') else C ** 0.5,
                  gelu='exact' if hp['activation_fn'] == 'gelu' else 'tanh',
                  num_classes=0 if stage2 else emb.shape[0] - SPECIALS - V,
                  source_vocab_size=emb.shape[0] - 2 * SPECIALS - V if stage2 else 0,
                  source_len=block_size if stage2 else 0)
    positions = lambda name, n: sd.pop(name)[FIRST_POSITION:FIRST_POSITION + n]
    out = {'wte.weight': emb[SPECIALS:SPECIALS + V], 'head.weight': head[SPECIALS:],
           'class_emb.weight': torch.cat((emb[SPECIALS + V:], emb[EOS:EOS + 1])),  # BOS last
           'wpe.weight': positions('embed_positions.weight', block_size + 1)}
    if stage2:   # the prefix: stage 1's dictionary after stage 2's, its own positions
        out.update({'class_emb.weight': emb[EOS:EOS + 1],
                    'src_wte.weight': emb[2 * SPECIALS + V:],
                    'src_wpe.weight': positions('embed_positions_1.weight', block_size)})
    if config['final_norm']:
        out.update({'ln_f.weight': sd.pop('layer_norm.weight'),
                    'ln_f.bias': sd.pop('layer_norm.bias')})
    for i in range(depth):
        f, g = f'layers.{i}.', f'blocks.{i}.'
        out.update({g + 'attn.mat_qkv.weight': torch.cat(
            [sd.pop(f'{f}self_attn.{x}_proj.weight') for x in 'qkv']),
            g + 'attn.q_bias': sd.pop(f + 'self_attn.q_proj.bias'),
            g + 'attn.v_bias': sd.pop(f + 'self_attn.v_proj.bias'),
            g + 'attn.zero_k_bias': torch.zeros(C)})
        sd.pop(f + 'self_attn.k_proj.bias')   # softmax cannot see it (above)
        for ours, theirs in (('attn.proj', 'self_attn.out_proj'), ('ffn.fc1', 'fc1'),
                             ('ffn.fc2', 'fc2'), ('ln_1', 'self_attn_layer_norm'),
                             ('ln_2', 'final_layer_norm')):
            for p in ('weight', 'bias'):
                out[f'{g}{ours}.{p}'] = sd.pop(f'{f}{theirs}.{p}')
    sd.pop('version', None)
    if sd:
        raise ValueError(f'decoder.{next(iter(sd))}: not in a DiGIT stage 1 or stage 2 decoder')
    return config, out
