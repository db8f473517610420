"""
Value types for the command lines of train.py, sample.py, fid.py, tokenizer.py and kmeans.py:
each checks its range, so a mistyped flag is argparse's usage line and one error naming the flag
(exit status 2), never a traceback deep in the code.

    p.add_argument('--batch_size', type=cli.positive_int)      # error: argument --batch_size:
    p.add_argument('--top_p', type=cli.fraction)               #   0 is not a positive integer
"""
import argparse
import math


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
