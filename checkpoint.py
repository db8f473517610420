"""
Files a run cannot afford to lose or to misread: checkpoints, token caches, tokenizers.

    atomic_path(path)      every file the project writes goes through it: a temporary file of
                           this process, then an atomic rename; a crash, a full disk or a
                           second writer never leaves a half-written file under `path`
    save(obj, path)        torch.save through atomic_path
    load(path, what)       torch.load(weights_only=True): no pickle can run code; a missing,
                           empty, truncated or foreign file is one line naming it, never a
                           torch traceback. foreign=True also reads DiGIT's released fairseq
                           files: the few classes their pickles name become inert stand-ins
    check_run, fill        a train.py checkpoint of the expected kind, and weights that fit a
                           model, or one line saying what the file holds and what does not fit
    append_log(line, path) a line of the run's log.txt, printed too
    OutDirLock(out_dir)    one trainer per output folder: a lock file holding the owner's pid
                           and host; a lock whose process has died is taken over
    Keeper                 train.py's saves, only from states the run can trust (divergence)

Errors a user can fix are raised as cli.UserError(message): the command prints the message
and exits with status 1, without a traceback.
"""
import collections
import errno
import hashlib
import math
import os
import pickle
import re
import socket
from contextlib import contextmanager, suppress

import torch
import torch.distributed

import cli
from cli import UserError


@contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path` for the caller to write; renamed over `path` when
    the block ends well, removed when it does not. A symbolic link at `path` is refused, and a
    full disk or a folder that cannot be written is a UserError naming `path`: the previous file
    is intact either way."""
    if os.path.islink(path):
        raise UserError(f'{path} is a symbolic link: refused (write to a real file)')
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        os.makedirs(folder, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with suppress(OSError):
            os.remove(tmp)
        if _is_disk_full(e):
            raise UserError(f'disk full while writing {path}: the previous file is intact; '
                            'free some space and rerun') from None
        if isinstance(e, OSError):
            raise UserError(f'cannot write {cli.os_error_line(e, path)}; the previous file '
                            'is intact') from None
        raise


def save(obj, path):
    """torch.save to `path` atomically (atomic_path)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def remove_stale_temporaries(folder):
    """Remove the temporary files atomic_path left in `folder` when its process was killed
    (`NAME.tmp<pid>` of a pid that is no longer running on this host)."""
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        pid = re.fullmatch(r'.+\.tmp(\d+)', name)
        if pid and not _alive(int(pid.group(1))):
            with suppress(OSError):
                os.remove(os.path.join(folder, name))


def _alive(pid):
    """Whether a process of this host has that pid (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid < 2 ** 31
    return True


def append_log(line, path):
    """Print a log line and append it to path (never through a symbolic link); path None
    (ranks > 0): nothing."""
    if path is not None:
        print(line)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UserError(f'{path} is a symbolic link: refused (the log is written to a '
                                'real file)') from None
            raise UserError(f'cannot write the log {cli.os_error_line(e, path)}') from None
        with os.fdopen(fd, 'a') as f:
            print(line, file=f)


def _is_disk_full(e):
    """ENOSPC / EDQUOT, or torch.save's messages for them (its zip writer's failed writes)."""
    text = str(e)
    return getattr(e, 'errno', None) in (errno.ENOSPC, errno.EDQUOT) or 'No space left' in text \
        or 'file write failed' in text or ('inline_container' in text and 'unexpected pos' in text)


def load(path, what='checkpoint', foreign=False):
    """torch.load(path, weights_only=True) on the CPU, or a UserError with one line that names
    the file and says what is wrong with it. foreign: also allow FOREIGN's names (fairseq's
    cfg and args), and a fairseq file's cfg and args come back as plain dicts."""
    if not os.path.exists(path):
        raise UserError(f'{what} {path} not found')
    if os.path.isdir(path):
        raise UserError(f'{what} {path} is a folder, not a file')
    if os.path.getsize(path) == 0:
        raise UserError(f'{what} {path} is empty (0 bytes): an interrupted copy or save?')
    try:
        with torch.serialization.safe_globals(FOREIGN if foreign else []):
            obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        found = [ln.strip() for ln in str(e).splitlines() if 'GLOBAL' in ln]
        if found:   # a class or function outside weights_only's allow-list: never run
            raise UserError(f'{what} {path} holds objects other than tensors and plain '
                            f'containers, refused for safety ({found[0][:150]})') from None
        raise UserError(f'{what} {path} is not a torch file (not a zip archive nor a '
                        'pickle of tensors)') from None
    except Exception as e:  # weights_only runs no code: any other failure is a corrupt file
        raise UserError(f'{what} {path} is not a readable torch file (truncated or corrupt?): '
                        f'{_first_line(e)}') from None
    if foreign and is_fairseq(obj):
        obj.update({k: plain(obj[k]) for k in ('cfg', 'args') if k in obj})
    return obj


def describe(obj):
    """What a loaded file holds, in a few words, for the one-line errors."""
    if isinstance(obj, dict) and isinstance(obj.get('kind'), str):
        whole = all(isinstance(obj.get(k), dict) for k in ('config', 'model'))
        return f"a{'' if whole else 'n incomplete'} train.py --model {obj['kind']} checkpoint"
    if is_fairseq(obj):
        return "a fairseq checkpoint (DiGIT's released stage 1 or 2)"
    if isinstance(obj, dict):
        n = sum(isinstance(v, torch.Tensor) for v in obj.values())
        return f'a dict of {len(obj)} entries ({n} tensors; keys {", ".join(map(str, obj))[:60]})'
    return f'a {type(obj).__name__}'


def load_run(path, what, kinds):
    """A train.py checkpoint of one of `kinds` (a dict with kind, config, model), or one
    UserError line naming the file, what it holds and what `what` expected."""
    return check_run(load(path, what), path, what, kinds)


def check_run(obj, path, what, kinds):
    """obj, loaded from path, if it is a train.py checkpoint of one of `kinds` (load_run)."""
    if not (isinstance(obj, dict) and obj.get('kind') in kinds
            and all(isinstance(obj.get(k), dict) for k in ('config', 'model'))):
        raise UserError(f'{what} {path} holds {describe(obj)}, not a train.py --model '
                        f'{" or ".join(kinds)} checkpoint')
    return obj


def fill(model, state, source, what):
    """model.load_state_dict(state, strict=True) when every key and shape fits, else one
    UserError line naming `source`: how many keys are missing, unexpected or mis-shaped, and
    the first two of each."""
    if not isinstance(state, dict):
        raise UserError(f'{source} holds {describe(state)}, not the weights of {what}')
    want = model.state_dict()
    shape = lambda t: tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
    problems = {'missing': [k for k in want if k not in state],
                'unexpected': [str(k) for k in state if k not in want],
                'mis-shaped': [f'{k} {shape(state[k])} for {shape(v)}' for k, v in want.items()
                               if k in state and shape(state[k]) != shape(v)]}
    found = [f'{len(keys)} {name} ({", ".join(keys[:2])}{", ..." if len(keys) > 2 else ""})'
             for name, keys in problems.items() if keys]
    if found:
        raise UserError(f'{source} does not fit {what}: ' + '; '.join(found))
    model.load_state_dict(state, strict=True)
    return model


def _first_line(e):
    text = str(e).strip()
    return f'{type(e).__name__}: {text.splitlines()[0][:200]}' if text else type(e).__name__


# Foreign files. DiGIT's released checkpoints are fairseq's: a dict {'cfg' or 'args', 'model',
# 'optimizer_history', 'extra_state', ...}. fairseq 0.12 stores cfg as plain containers, older
# releases as OmegaConf objects or an argparse.Namespace. Those names map to Stand-ins that
# keep the state the pickle hands them and run nothing; plain() reads that state back as dicts,
# lists and values. weights_only stays on: every other global is still refused.

class StandIn:
    """An allowed foreign object: its pickled state, kept, nothing called."""

    def __new__(cls, *args):
        return super().__new__(cls)

    def __setstate__(self, state):
        self.state = state


OMEGACONF = {'dictconfig': ['DictConfig'], 'listconfig': ['ListConfig'],
             'base': ['ContainerMetadata', 'Metadata'],
             'nodes': ['AnyNode', 'StringNode', 'IntegerNode', 'FloatNode', 'BooleanNode',
                       'BytesNode', 'PathNode']}
FOREIGN = [(type(name, (StandIn,), {}), f'omegaconf.{module}.{name}')
           for module, names in OMEGACONF.items() for name in names] + [
    (type('Namespace', (StandIn,), {}), 'argparse.Namespace'),
    (type('Any', (StandIn,), {}), 'typing.Any'),   # OmegaConf's metadata names types:
    dict, list, int, collections.defaultdict]       # ref_type, key_type, resolver_cache


def plain(obj):
    """Stand-ins inside obj -> plain values: a DictConfig or ListConfig -> its _content (a dict
    or list of nodes; None or a '???' / '${...}' string as stored), a node -> its _val, an
    argparse.Namespace -> a dict of its attributes. Containers are rebuilt, the rest kept."""
    if isinstance(obj, StandIn):
        state = getattr(obj, 'state', None)
        state = state if isinstance(state, dict) else {}
        return plain(state.get('_content', state.get('_val', state)))
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(plain(v) for v in obj)
    return obj


def is_fairseq(obj):
    """A fairseq checkpoint: a dict whose 'model' holds a decoder's weights, not train.py's."""
    return isinstance(obj, dict) and 'kind' not in obj and isinstance(obj.get('model'), dict) \
        and any(k.startswith('decoder.') for k in obj['model'])


class OutDirLock:
    """Holds `<out_dir>/lock` while a trainer writes there. Another live process holding it is
    an error that names it; a lock left by a process that has died (same host) is taken over."""

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, 'lock')
        self.mine = f'{os.getpid()} {socket.gethostname()}'

    def __enter__(self):
        try:
            return self._take()
        except OSError as e:   # out_dir is a file, read-only, or on a full disk
            with suppress(OSError):
                self.__exit__()
            raise UserError(f'--out_dir {os.path.dirname(self.path)}: cannot write its lock '
                            f'({cli.os_error_line(e, self.path)})') from None

    def _take(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW)
            except FileExistsError:
                if not self._stale():
                    raise UserError(f'{os.path.dirname(self.path)} is in use by another trainer '
                                    f'(pid and host in {self.path}: {self._owner()}); choose '
                                    'another --out_dir, or delete the lock if that run is gone')
                os.remove(self.path)
                continue
            with os.fdopen(fd, 'w') as f:
                f.write(self.mine + '\n')
            remove_stale_temporaries(os.path.dirname(self.path))   # the folder is ours now
            return self
        raise UserError(f'could not take the lock {self.path}')

    def __exit__(self, *exc):
        if self._owner() == self.mine:
            os.remove(self.path)

    def _owner(self):
        try:
            with open(self.path) as f:
                return f.read().strip()
        except OSError:
            return ''

    def _stale(self):
        """The owner is a process of this host that has exited."""
        pid, _, host = self._owner().partition(' ')
        if not pid:   # empty: its writer died between creating and writing it
            return True
        return host == socket.gethostname() and pid.isdigit() and not _alive(int(pid))


# ----------------------------------------------------------------------------------------------
# train.py's checkpoint: one dict of plain types and tensors (`kind`, `config`, `model`, `ema`,
# `optimizer`, `step`, `data_cursor`, `args`, the frozen inputs' flags, ...). The run's state
# (train.build) holds raw_model, ema, optimizer, disc, disc_opt, scaler, step, cursor, skipped.

# flags that choose the data: a run cannot resume with others
DATA_FLAGS = ('data', 'resolution', 'train_images')


def to_resume(path, args, frozen, master_print):
    """The checkpoint of this --out_dir, if --resume auto finds one of this --model, made from
    the same data and the same frozen inputs, by path and by content (args.frozen_sha256, saved
    with the args): a resume must not train on other tokens."""
    files = {k: getattr(args, k) for k in frozen if isinstance(getattr(args, k), str)}
    args.frozen_sha256 = {k: sha256(f) for k, f in files.items() if os.path.isfile(f)}
    if args.resume != 'auto' or not os.path.exists(path):
        return None
    ckpt = load(path)
    keys = ('config', 'model', 'optimizer', 'step', 'data_cursor', 'args', 'scaler')
    if not (isinstance(ckpt, dict) and ckpt.get('kind') == args.model
            and all(k in ckpt for k in keys)):
        raise UserError(f'{path} holds {describe(ckpt)}, not a {args.model} run to resume: '
                        'choose another --out_dir or pass --resume never')
    before = ckpt['args']
    changed = [f'--{k} {before[k]} (now {getattr(args, k)})' for k in (*DATA_FLAGS, *frozen)
               if k in before and before[k] != getattr(args, k)]
    changed += [f'--{k} {getattr(args, k)} (its contents have changed)'
                for k, digest in before.get('frozen_sha256', {}).items()
                if args.frozen_sha256.get(k, digest) != digest]
    if changed:
        raise UserError(f"{path} was trained with {', '.join(changed)}: resuming would train "
                        'on other data; rerun with the same flags, or pass --resume never or '
                        'another --out_dir')
    master_print(f'resuming from {path} at step {ckpt["step"]}')
    return ckpt


def sha256(path):
    """The SHA-256 of a file's bytes, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 24), b''):
            digest.update(block)
    return digest.hexdigest()


def save_run(path, state, config, args, frozen, class_names, **extra):
    """Everything a resume needs, as plain types and tensors (weights_only loading)."""
    model, disc = state['raw_model'], state['disc']
    save(dict(
        kind=args.model, config=config, model=model.state_dict(),
        **{k: getattr(args, k) for k in frozen},
        ema=state['ema'].state_dict() if state['ema'] is not None else None,
        optimizer=state['optimizer'].state_dict(), step=state['step'],
        data_cursor=list(state['cursor']),
        skipped_files=state['skipped'], args=vars(args), class_names=class_names,
        disc=disc.state_dict() if disc is not None else None,
        disc_optimizer=state['disc_opt'].state_dict() if disc is not None else None,
        scaler=state['scaler'].state_dict(), **extra), path)


class Keeper:
    """Writes train.py's checkpoint only from states the run can trust: divergence never costs
    the last good one. The first finite step after a save computes its loss on exactly the saved
    weights, so that loss vouches for the save unless it explodes, above m + 3 (|m| + 0.05) with
    m the median of the mean losses between the last 20 saves. Until then the save before it
    stays, as ckpt_prev.pt. A save its next step refutes, or a run whose steps stop being
    finite before vouching for its last save, rolls ckpt.pt back to ckpt_prev.pt, and the run
    stops with one line naming the checkpoint and its step."""

    def __init__(self, path, ckpt, run):
        self.path, self.prev, self.run = path, path[:-3] + '_prev.pt', run
        ckpt = ckpt or {}
        self.history = list(ckpt.get('loss_history', []))   # mean loss between saves
        self.step, self.prev_step = ckpt.get('step'), ckpt.get('prev_step')
        self.pending = ckpt.get('step') is not None   # the last save is not yet vouched for
        self.mine = False   # whether this run wrote the last save (refuted, it is set aside)
        self.sum, self.n = 0.0, 0   # the finite steps' losses since the last save

    def after_step(self, loss):
        """loss: the step's loss (a tensor), or None if the step was skipped (not finite)."""
        if loss is None:
            return
        self.sum, self.n = self.sum + loss.detach().float(), self.n + 1
        if self.pending:   # the loss of the weights the last save holds
            value, limit = self.mean_over_ranks(loss), self.limit()
            if value > limit:
                self.diverged(f'the loss of the weights saved at step {self.step} is '
                              f'{value:.4g}, above {limit:.4g} (the recent saves\' losses)',
                              refuted=True)
            self.vouched()

    def vouched(self):
        """The last save is trusted (its next step, or its finite held-out figures at the end
        of the run): the one before it goes."""
        self.pending = False
        if self.run.rank == 0 and os.path.exists(self.prev):
            os.remove(self.prev)

    def limit(self):
        """The loss above which a saved state is not trusted: m + 3 (|m| + 0.05)."""
        if not self.history:
            return math.inf
        m = sorted(self.history[-20:])[len(self.history[-20:]) // 2]
        return m + 3 * (abs(m) + 0.05)

    def save(self, state, *args):
        """save_run(path, state, *args) of a state with finite weights, keeping the last
        vouched-for save as ckpt_prev.pt until a step vouches for this one."""
        for name, t in state['raw_model'].named_parameters():   # buffers may hold -inf
            if not torch.isfinite(t).all():
                self.diverged(f'{name} is not finite at step {state["step"]}')
        if self.n:
            self.history = self.history[-19:] + [self.mean_over_ranks(self.sum / self.n)]
        if self.run.rank == 0:
            if not self.pending and os.path.exists(self.path):
                os.replace(self.path, self.prev)
                self.prev_step = self.step
            save_run(self.path, state, *args, loss_history=self.history,
                     prev_step=self.prev_step)
        self.step, self.pending, self.mine, self.sum, self.n = state['step'], True, True, 0.0, 0

    def mean_over_ranks(self, t):
        t = t.detach().float().clone()
        if self.run.world > 1:   # every rank decides alike
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.AVG)
        return t.item()

    def diverged(self, why, refuted=False):
        """Stop, naming the checkpoint to rerun from. The last save, not yet vouched for,
        gives way to the one before it; this run's, refuted (its own weights' loss exploded or
        its held-out figures are not finite) with none before it, is set aside."""
        where = f'{self.path} holds step {self.step}' if self.step is not None else \
            'no checkpoint was written'
        if self.pending and os.path.exists(self.prev):   # ckpt_prev.pt was vouched for
            where = f'{self.path} is back at step {self.prev_step}, the last trusted state'
            if self.run.rank == 0:
                os.replace(self.prev, self.path)
        elif self.pending and self.mine and refuted:   # a rerun starts afresh
            where = f'no checkpoint to trust ({self.path} set aside as *_diverged.pt)'
            if self.run.rank == 0 and os.path.exists(self.path):
                os.replace(self.path, self.path[:-3] + '_diverged.pt')
        raise UserError(f'stopping: {why}; {where}. Lower --lr, then rerun the same command')


def restore(state, ckpt):
    """Put a train.py checkpoint into the run's state (what save_run wrote)."""
    state['raw_model'].load_state_dict(ckpt['model'])
    state['optimizer'].load_state_dict(ckpt['optimizer'])
    if state['ema'] is not None:
        state['ema'].load_state_dict(ckpt['ema'] or ckpt['model'])
    if state['disc'] is not None and ckpt.get('disc'):
        state['disc'].load_state_dict(ckpt['disc'])
        state['disc_opt'].load_state_dict(ckpt['disc_optimizer'])
    if ckpt['scaler'] and state['scaler'].is_enabled():   # fp16 runs only; --dtype may change
        state['scaler'].load_state_dict(ckpt['scaler'])
    state.update(step=ckpt['step'], cursor=tuple(ckpt['data_cursor']),
                 skipped=ckpt['skipped_files'])
