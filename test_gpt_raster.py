"""
Tests of gpt.GPT, DiGIT's raster-order GPT (to be merged into test_all.py's gpt.py section):
CPU, tiny configs, seconds. Each test checks an equation or an invariant and is named after it.

    python -m pytest test_gpt_raster.py -q
"""
import pytest
import torch
import torch.nn.functional as F

import gpt

V, L, NC = 16, 10, 5   # vocabulary, tokens per image, classes


def tiny_gpt(**kw):
    """A depth-2 GPT, its weights perturbed so no block is near the identity (tests can fail)."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, block_size=L, depth=2, n_embd=32, n_head=2, num_classes=NC)
    model = gpt.GPT(**{**cfg, **kw}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def tokens(B=4, seed=1):
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


LABELS = torch.tensor([0, 2, 4, 1])
CONDS = ['token', 'adaln']


def test_gpt_config_depth_dial_and_official_size():
    """Width 64 * depth and heads = depth unless overridden; the default (DiGIT base: d16,
    1024 wide, V 8192, 1000 classes) has ~219M parameters like the released 219M model."""
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
    model, idx = tiny_gpt(cond=cond), tokens()
    ref = model(idx, LABELS)
    assert ref.shape == (4, L, V) and ref.dtype == torch.float32
    for t in range(L - 1):
        idx2 = idx.clone()
        idx2[:, t] = (idx2[:, t] + 1) % V
        out = model(idx2, LABELS)
        assert torch.equal(out[:, :t + 1], ref[:, :t + 1]), t
        assert ((out[:, t + 1:] - ref[:, t + 1:]).abs().amax(-1) > 1e-6).all(), t


@pytest.mark.parametrize('cond', CONDS)
def test_gpt_kv_cache_greedy_equals_argmax_of_full_recompute_with_cfg(cond):
    """Greedy tokens generated one at a time with the kv cache equal the argmax of the
    teacher-forced logits recomputed from scratch, guided as (1 + cfg) c - cfg u with u the
    null-class logits; cfg 0 is the conditional model alone."""
    model, null = tiny_gpt(cond=cond), torch.full((4,), NC)
    for cfg in (0.0, 3.0):
        out = model.generate(LABELS, cfg=cfg, top_k=1)
        assert out.shape == (4, L) and out.dtype == torch.long
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
    for P in (1, 4, L):
        assert torch.equal(model.generate(LABELS, cfg=cfg, top_k=1, prefix=full[:, :P]), full)
    prefix = tokens()[:, :3]
    out = model.generate(LABELS, cfg=cfg, top_k=1, prefix=prefix)
    guided = (1 + cfg) * model(out, LABELS) - cfg * model(out, torch.full((4,), NC))
    assert torch.equal(out[:, :3], prefix) and torch.equal(guided.argmax(-1)[:, 3:], out[:, 3:])
    short = model.generate(LABELS, num_tokens=6, cfg=cfg, top_k=1, prefix=prefix)
    assert torch.equal(short, out[:, :6])
    with pytest.raises(ValueError, match='num_tokens'):
        model.generate(LABELS, num_tokens=L + 1)


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
    assert a.min() >= 0 and a.max() < V


def test_gpt_label_dropping_uses_null_class_only_in_training():
    """Training forward with cond_drop_rate 1 equals the null-class forward; in eval mode the
    labels are kept; labels=None means the null class."""
    model, idx = tiny_gpt(cond_drop_rate=1.0, dropout=0.0), tokens()
    null = model(idx, torch.full((4,), NC))
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
    model, idx = tiny_gpt(cond=cond), tokens()
    a, b = model(idx, LABELS), model(idx, (LABELS + 1) % NC)
    assert ((a - b).abs().amax(-1) > 1e-6).all()
    gpt.loss(model(idx, LABELS), idx).backward()
    assert model.class_emb.weight.grad[LABELS].abs().sum(-1).gt(0).all()
    if cond == 'adaln':
        assert all(blk.ada_lin[-1].weight.grad.abs().sum() > 0 for blk in model.blocks)


def test_gpt_unconditional_has_one_learnt_bos_and_ignores_cfg():
    """num_classes 0: the only class row is the BOS; cfg changes nothing (cond = uncond);
    greedy decoding gives one image, the argmax of its own recompute."""
    model, idx = tiny_gpt(num_classes=0, dropout=0.0), tokens()
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
    logits, targets = torch.randn(3, L, V), torch.randint(0, V, (3, L))
    logp = F.log_softmax(logits, -1)
    nll = -logp.gather(-1, targets[..., None]).squeeze(-1)
    for eps in (0.0, 0.1):
        ref = ((1 - eps) * nll - eps * logp.mean(-1)).mean()
        assert torch.allclose(gpt.loss(logits, targets, eps), ref, atol=1e-6)


# --- DiGIT stage 2: [source ; start, x_1..x_{L-1}] under one causal mask ---------------------

VS, S = 12, 6   # source (DiGIT) vocabulary and tokens
STAGE2 = [('token', 0), ('adaln', NC)]   # official (unconditional), and with classes + AdaLN


def tiny_stage2(cond='token', num_classes=0):
    return tiny_gpt(cond=cond, num_classes=num_classes, source_vocab_size=VS, source_len=S)


def source(B=4, seed=2):
    return torch.randint(0, VS, (B, S), generator=torch.Generator().manual_seed(seed))


def run_with_hidden(model, idx, labels, src):
    """-> target logits (B, L, V) and the final hidden states of all S + L positions, the
    input of ln_f (B, S+L, C)."""
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
    model, idx, src = tiny_stage2(cond, num_classes), tokens(), source()
    assert model.src_wte.weight.shape[0] == VS and model.src_wpe.weight.shape[0] == S
    labels = LABELS if num_classes else None
    ref, hid = run_with_hidden(model, idx, labels, src)
    assert ref.shape == (4, L, V) and hid.shape == (4, S + L, 32)
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
    model, idx, src = tiny_stage2(cond, num_classes), tokens(), source()
    labels = LABELS if num_classes else None
    ref, hid = run_with_hidden(model, idx, labels, src)
    for t in range(L - 1):
        idx2 = idx.clone()
        idx2[:, t] = (idx2[:, t] + 1) % V
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
    model, src = tiny_stage2(cond, num_classes), source()
    labels, null = (LABELS, torch.full((4,), NC)) if num_classes else (torch.zeros(4).long(),) * 2
    for cfg in (0.0, 2.0):
        out = model.generate(labels, cfg=cfg, top_k=1, source=src)
        assert out.shape == (4, L)
        c, u = model(out, labels, source=src), model(out, null, source=src)
        assert torch.equal(((1 + cfg) * c - cfg * u).argmax(-1), out), cfg
        prefix = tokens()[:, :3]
        done = model.generate(labels, cfg=cfg, top_k=1, prefix=prefix, source=src)
        c, u = model(done, labels, source=src), model(done, null, source=src)
        assert torch.equal(done[:, :3], prefix)
        assert torch.equal(((1 + cfg) * c - cfg * u).argmax(-1)[:, 3:], done[:, 3:]), cfg
    assert not torch.equal(model.generate(labels, top_k=1, source=source(seed=5)),
                           model.generate(labels, top_k=1, source=src))
    assert all(b.attn.kv_cache is None for b in model.blocks)


def test_stage2_missing_or_wrong_source_raises():
    """A stage-2 model needs source ids of shape (B, source_len) in [0, source_vocab_size), in
    forward and generate; a model without a source refuses one; the two sizes come together."""
    model, idx, src, zeros = tiny_stage2(), tokens(), source(), torch.zeros(4).long()
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
    """depth + 1 states (B, L, C) at the target positions: [0] = class_emb(y) + wpe[0] at the
    start and wte(x_t) + wpe[t+1] after it; head(ln_f(states[-1])) = forward's logits."""
    model = tiny_stage2(cond) if stage2 else tiny_gpt(cond=cond)
    idx, labels = tokens(), None if stage2 else LABELS
    src = source() if stage2 else None
    states = model.hidden_states(idx, labels, src)
    assert len(states) == 3 and all(h.shape == (4, L, 32) for h in states)
    y = torch.full((4,), 0 if stage2 else NC) if labels is None else labels
    emb = torch.cat((model.class_emb(y)[:, None], model.wte(idx[:, :-1])), 1) + model.wpe.weight
    assert torch.allclose(states[0], emb)
    cond_args = (model.class_emb(y),) if cond == 'adaln' else ()
    final = model.ln_f(states[-1], *cond_args)
    assert torch.allclose(model.head(final), model(idx, labels, source=src), atol=1e-5)


def lower_upper_halves(B, seed):
    """Toy set: class 1 iff the tokens come from the upper half of the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (B,), generator=g)
    return torch.randint(0, V // 2, (B, L), generator=g) + y[:, None] * (V // 2), y


def test_linear_probe_separates_lower_vs_upper_half_of_the_vocabulary():
    """40 Adam steps on the heads: some layer classifies held-out data ~perfectly; the loss is
    the sum of the per-layer cross-entropies; parts are acc_0..acc_D, ce_0..ce_D."""
    probe = gpt.LinearProbe(tiny_gpt(), num_classes=2).train()
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
    probe = gpt.LinearProbe(model, num_classes=2).train()
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
    model, idx = tiny_gpt(), tokens()
    probe, seen = gpt.LinearProbe(model, num_classes=NC), []
    model.class_emb.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    probe(idx, LABELS)
    probe(idx, (LABELS + 1) % NC)
    assert len(seen) == 2 and all((ids == NC).all() for ids in seen)
    feats = probe.features(idx)
    null = [h.mean(1) for h in model.hidden_states(idx)]
    cond = [h.mean(1) for h in model.hidden_states(idx, LABELS)]
    assert all(torch.equal(f, n) for f, n in zip(feats, null))
    assert not torch.allclose(feats[-1], cond[-1])
