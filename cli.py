"""What the command lines (oreo.py, search.py, agent.py, data.py) share: errors a user can cause,
printed as one line with exit status 2 and no traceback; argparse that shows every default; and the --device /
--dtype flags. Imports nothing of ours; data.py re-exports it all (data.UserError, data.cli, ...).
"""
import argparse
import contextlib
import os
import sys
import time

import torch

# ----------------------------------------------------------------------------------------------------------
# Errors a user can cause: one line and exit status 2 at the command line, no traceback

class UserError(ValueError):
    """A mistake in what the user gave (a file, a folder, an option) that they can fix. A command line run through
    cli() prints it as one line, 'prog: error: ...', and exits with status 2; every other exception is a bug and
    keeps its traceback."""


@contextlib.contextmanager
def as_user_error():
    """Errors raised inside are the user's: model.py, hf.py and tokenizer.py do not know UserError, so reading a
    checkpoint or tokenizer folder raises ValueError / OSError (with the file named); wrap such reads of user input
    only."""
    try:
        yield
    except UserError:
        raise
    except (ValueError, OSError) as e:
        raise UserError(str(e)) from e


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's line breaks and shows each option's default; an option whose default is None
    explains its own in its help text."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes (unknown option, bad value) are UserErrors, so they print the same one line; --help
    shows the defaults (also of sub-commands, which argparse makes with this class)."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def add_device_flags(group, dtype_help="the models' weights", dtypes=("float32", "bfloat16", "float16")):
    """--device and --dtype, the same in oreo.py, search.py and agent.py (device_and_dtype reads them)."""
    group.add_argument("--device", default="auto", help="auto (this process's GPU if there is one, else the CPU), "
                       "cpu, cuda or cuda:N; under torchrun auto and cuda mean cuda:LOCAL_RANK")
    group.add_argument("--dtype", default="auto", choices=("auto",) + tuple(dtypes),
                       help=f"{dtype_help}; auto: bfloat16 on a GPU, float32 on a CPU")


def device_and_dtype(args):
    """The torch.device and torch.dtype of add_device_flags' --device and --dtype."""
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {args.device}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: this machine has no GPU that torch can use")
    if args.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, args.dtype)


def cli(prog, main, argv=None):
    """Run a command line's main(argv): a UserError stops it with 'prog: error: ...' on stderr and exit status 2.
    Under torchrun every rank usually meets the same error (they read the same options and files): the others wait
    a few seconds, so that rank 0 prints it and exits first, and torchrun stops them before they print it again; an
    error that only another rank met is still printed, by that rank, after the wait."""
    try:
        return main(argv)
    except UserError as e:
        if os.environ.get("RANK", "0") != "0":
            time.sleep(5)
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
