"""
What every command line (train.py, sample.py, fid.py, tokenizer.py, kmeans.py, bench.py) shares:
value types that check their range, so a mistyped flag is argparse's usage line and one error
naming the flag (exit status 2), and the error boundary, so a user's mistake is one line naming
the flag or the file (exit status 1), never a traceback deep in the code.

    p.add_argument('--batch_size', type=cli.positive_int)      # error: argument --batch_size:
    p.add_argument('--top_p', type=cli.fraction)               #   0 is not a positive integer
    raise cli.UserError(f'--vae {path} not found: ...')         # anywhere below main()
    if __name__ == '__main__':
        cli.run(lambda: main(get_args()))                       # the boundary, once per command
"""
import argparse
import errno
import math
import sys


class UserError(SystemExit):
    """A mistake the user can fix, raised with one line that names the flag or the file. As a
    SystemExit it ends the command with that line on stderr and exit status 1 wherever it is
    raised; nothing between the raise and the top catches it."""


def run(main):
    """The error boundary of a command: main() runs; a UserError, an OSError (a file that
    cannot be read or written: it names the file), running out of memory or Ctrl-C ends the
    command with one line on stderr, exit status 1 (130 for Ctrl-C). Any other exception keeps
    its traceback: a bug."""
    try:
        return main()
    except KeyboardInterrupt:
        print('\ninterrupted', file=sys.stderr)   # below a progress bar's line
        sys.exit(130)
    except OSError as e:
        sys.exit(os_error_line(e))
    except (MemoryError, RuntimeError) as e:   # torch: 'can't allocate memory', 'out of memory'
        text = str(e).strip().splitlines()[-1:] or [type(e).__name__]
        if not isinstance(e, MemoryError) and 'allocate' not in text[0] \
                and 'out of memory' not in text[0]:
            raise
        sys.exit(f'out of memory ({text[0][:160]}): lower --batch_size, --resolution or '
                 '--depth')


def os_error_line(e, path=None):
    """'PATH: No space left on device (free some space and rerun)'-like line of an OSError."""
    path = path or e.filename
    hint = {errno.ENOSPC: ' (free some space and rerun)', errno.EDQUOT: ' (over the disk quota)',
            errno.EROFS: ' (a read-only file system)'}.get(e.errno, '')
    return f'{path}: {e.strerror or e}{hint}' if path else f'{e.strerror or e}{hint}'


def number(kind, check, what):
    """An argparse type: text -> kind(text), which must pass check; `what` names the range."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not {what}') from None
        if not check(value):
            raise argparse.ArgumentTypeError(f'{text} is not {what}')
        return value
    parse.__name__ = what   # argparse names the type in some messages
    return parse


positive_int = number(int, lambda v: v > 0, 'a positive integer')
nonneg_int = number(int, lambda v: v >= 0, 'an integer >= 0')
positive_float = number(float, lambda v: math.isfinite(v) and v > 0, 'a positive number')
nonneg_float = number(float, lambda v: math.isfinite(v) and v >= 0, 'a number >= 0')
fraction = number(float, lambda v: 0 <= v <= 1, 'a number in [0, 1]')
below_one = number(float, lambda v: 0 <= v < 1, 'a number in [0, 1)')
seed = number(int, lambda v: 0 <= v < 2 ** 31, 'an integer in [0, 2^31)')


def positive_ints(text):
    """'1,2,4' -> (1, 2, 4), each a positive integer."""
    try:
        values = tuple(int(v) for v in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a comma-separated list of '
                                         'integers') from None
    if not all(v > 0 for v in values):
        raise argparse.ArgumentTypeError(f'{text} has a value <= 0')
    return values
