"""One convention for every command-line entry point: expected errors are one line on stderr and exit code 2.

    from engine.cli import run_cli
    if __name__ == "__main__":
        run_cli(main)          # main(argv) -> int

Expected errors are ``UserError`` (ConfigError, RunError, RegistryError and friends derive from it), OS
errors (missing file, permission, full disk, a folder where a file is expected) and value errors (JSON that
does not parse, a number out of range). Anything else is a bug and keeps its traceback. ``--debug`` on the
command line or ``LTPL_DEBUG=1`` in the environment re-raises expected errors too, with their traceback.
"""
import os
import sys

DEBUG_ENV = "LTPL_DEBUG"


class UserError(Exception):
    """An input the user can fix (config, data, checkpoint, path, value)."""


EXPECTED_ERRORS = (UserError, OSError, ValueError)


def require_at_least(args, **lows):
    """Raise a one-line ``UserError`` naming the option when a parsed argparse value is below its minimum:
    ``require_at_least(args, eval_every=1, threads=1)`` checks ``--eval-every`` and ``--threads``; a list value
    (``nargs``) is checked item by item."""
    for name, low in lows.items():
        value = getattr(args, name)
        for item in (value if isinstance(value, (list, tuple)) else [value]):
            if item is not None and item < low:
                raise UserError(f"--{name.replace('_', '-')} must be >= {low}, got {item}")
    return args


def debug_requested(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def one_line(err):
    text = str(err).strip() or type(err).__name__
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: keep the worker's own message
        last = text.rstrip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return " ".join(text.split())


def call_cli(main, argv=None):
    """Call ``main(argv)`` (``--debug`` removed) and return its exit code; expected errors are printed as
    one line and give 2 (in-process callers and tests use this; ``run_cli`` exits with the code)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
        code = main(argv)
    except EXPECTED_ERRORS as err:
        if debug:
            raise
        print(f"error: {one_line(err)}  (rerun with --debug or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        code = 2
    return code or 0


def run_cli(main, argv=None):
    """Call ``main(argv)`` (``--debug`` removed) and exit with its code; expected errors -> one line, exit 2."""
    try:
        code = call_cli(main, argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
