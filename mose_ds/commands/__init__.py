"""The installed commands (`mose-*`, setup.py): argument parsing and reporting; the work is
done by the library modules they call. A command parses its flags before it imports torch,
so `--help` is quick."""

from __future__ import annotations

import contextlib
import sys
import warnings


@contextlib.contextmanager
def library_output():
    """Library chatter (megatron's import-time warnings, DeepSpeed's accelerator notes, which
    print to stdout) goes to stderr or nowhere, so that stdout carries only the command's
    own output. Yields the real stdout."""
    out = sys.stdout
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        with contextlib.redirect_stdout(sys.stderr):
            from ..train import quiet_libraries
            quiet_libraries()
            yield out
