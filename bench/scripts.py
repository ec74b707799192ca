"""What the benchmarks share: the method scripts, in the README's order (the one list the tests and the benchmarks
use), and the command-line pieces every tool repeats (one-line errors, positive values, --scripts checks)."""

import argparse
import contextlib
import fcntl
import os
import signal
import sys
import tempfile
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = [
    "supervised.py",
    "pseudo_label.py",
    "pi_model.py",
    "mean_teacher.py",
    "temporal_ensembling.py",
    "uda.py",
    "fixmatch.py",
    "flexmatch.py",
    "dst.py",
    "mpl.py",
    "maxl.py",
]


def fail(message):
    """Bad input: one line on stderr naming the tool, exit code 2, nothing written."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    sys.exit(2)


def parser(doc):
    """An argparse parser titled by the docstring's first paragraph, whose errors are one line (fail)."""
    p = argparse.ArgumentParser(description=" ".join(doc.split("\n\n")[0].split()))
    p.error = fail
    return p


def positive(text):
    """An argparse type: a positive integer."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


positive.__name__ = "int"  # argparse's message for a non-number: "invalid int value"


def nonnegative(text):
    """An argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


nonnegative.__name__ = "int"


def path(text):
    """An argparse type: a path, never empty (`--out-dir "$OUT"` with OUT unset would write over the default's
    committed results)."""
    if not text:
        raise argparse.ArgumentTypeError("is empty (an unset shell variable?): give a path")
    return text


def check_writable(flag, path, folder=False):
    """Before the work: the folder that will hold `path` (`path` itself where folder) can be made and written in, or
    one line: a result found unwritable at the end is lost. Nothing is left behind."""
    target = Path(path).resolve() if folder else Path(path).resolve().parent
    there = next(d for d in (target, *target.parents) if d.exists())
    if not there.is_dir():
        fail(f"{flag} {path}: {there} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=there).close()
    except OSError as e:
        fail(f"{flag} {path}: cannot write in {there} ({e.strerror})")


def check_scripts(names, known, files=True, flag="--scripts"):
    """--scripts (or `flag`): every name known and named once and, with files, each script present in the repository."""
    unknown = [s for s in names if s not in known]
    if unknown:
        fail(f"{flag}: unknown {' '.join(unknown)}; choose from {' '.join(known)}")
    once(flag, names)
    missing = sorted({known[s] if isinstance(known, dict) else s for s in names} - {p.name for p in ROOT.glob("*.py")})
    if files and missing:
        fail(f"{flag}: {' '.join(missing)} not found in {ROOT}")


def once(flag, values):
    """A list flag's values each given once, or one line: a repeat is a slip (a row run twice, a mean over a seed
    counted twice)."""
    twice = list(dict.fromkeys(v for i, v in enumerate(values) if v in values[:i]))
    if twice:
        fail(f"{flag}: {' '.join(map(str, twice))} given more than once")


def flat(state, prefix=""):
    """Every leaf of a checkpoint (weights, optimizer, RNG, method state) as {dotted.key: value}."""
    if isinstance(state, dict):
        return {k: v for key, sub in state.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
    if isinstance(state, (list, tuple)):
        return {k: v for i, sub in enumerate(state) for k, v in flat(sub, f"{prefix}{i}.").items()}
    return {prefix[:-1]: state}


@contextlib.contextmanager
def as_its_own_process():
    """A script run in this process (runpy) leaves behind what its own process's end would take away: the signal
    handlers and the excepthook it installs (Ctrl-C, SIGTERM, out of memory) are put back, and the run dir it holds
    (an flock, dropped at a process's end) is let go, so that a later run in this process, or another process, can
    take it."""
    handlers, excepthook = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}, sys.excepthook
    held, flock = [], fcntl.flock

    def hold(fd, operation):
        flock(fd, operation)
        held.append(fd)

    try:
        with mock.patch.object(fcntl, "flock", hold):
            yield
    finally:
        for fd in held:
            os.close(fd)
        for s, handler in handlers.items():
            signal.signal(s, handler)
        sys.excepthook = excepthook
