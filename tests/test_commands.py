"""The installed commands: every console script of setup.py answers --help with its defaults,
without a third-party warning, and without importing torch (what makes --help slow)."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from conftest import ROOT, clean_env

COMMANDS = {"mose-train", "mose-launch", "mose-prepare", "mose-calibrate", "mose-eval", "mose-generate",
            "mose-convert-hf", "mose-export-hf", "mose-convert-checkpoint", "mose-plan-memory", "mose-info",
            "mose-bench"}
# Commands whose --help is a list of subcommands; their subcommands' help shows the defaults.
SUBCOMMANDS = {"mose-eval": "ppl", "mose-bench": None}

PROBE = """
import sys
from importlib.metadata import entry_points
(ep,) = [e for e in entry_points(group="console_scripts") if e.name == sys.argv[1]]
sys.argv = [sys.argv[1], *sys.argv[2:]]
try:
    ep.load()()
except SystemExit as e:
    code = e.code
else:
    code = 0
print(f"\\nEXIT {code} TORCH {'torch' in sys.modules}")
"""


def test_setup_declares_every_command():
    installed = {e.name for e in entry_points(group="console_scripts") if e.name.startswith("mose-")}
    assert installed == COMMANDS
    scripts = os.path.dirname(sys.executable)
    assert all(os.path.exists(os.path.join(scripts, name)) for name in COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_is_quick_quiet_and_shows_defaults(command):
    sub = SUBCOMMANDS.get(command, "")
    args = [sub, "--help"] if sub else ["--help"]
    done = subprocess.run([sys.executable, "-c", PROBE, command, *args], capture_output=True, text=True, cwd=ROOT,
                          env=clean_env(), timeout=120)
    out = done.stdout
    assert out.rstrip().endswith("EXIT 0 TORCH False"), (out[-500:], done.stderr[-2000:])
    assert done.stderr == "", done.stderr[-2000:]
    assert "usage:" in out or command == "mose-bench"
    if command in SUBCOMMANDS and SUBCOMMANDS[command] is None:
        assert "moe" in out and "generation" in out
    else:
        assert "(default:" in out, out


@pytest.mark.parametrize("sub", [["generation"], ["generation", "compare"], ["generation", "report"], ["convert"]])
def test_bench_subcommand_help_imports_no_torch(sub):
    """`mose-bench generation ... --help` and `mose-bench convert --help` (`mose-bench moe`
    builds its argument defaults from torch and still imports it)."""
    done = subprocess.run([sys.executable, "-c", PROBE, "mose-bench", *sub, "--help"], capture_output=True, text=True,
                          cwd=ROOT, env=clean_env(), timeout=120)
    assert done.stdout.rstrip().endswith("EXIT 0 TORCH False"), (done.stdout[-500:], done.stderr[-2000:])
    assert done.stderr == "" and "usage:" in done.stdout, done.stderr[-2000:]
    assert sub == ["generation"] or "(default:" in done.stdout, done.stdout[-500:]    # a leaf shows defaults
