"""Shared fixtures: a one-rank world, tiny configs (hidden 32, 2-4 layers, 4 experts) and a
small prepared corpus made from the shipped text."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The suite runs its models and ranks on the CPU, on any host, unless asked otherwise
# (MOSE_DS_DEVICE=cuda). MOSE_DS_FAKE_CUDA=1 makes torch report CUDA devices in this process
# and every child (tests/fake_cuda), so the suite exercises the GPU-host branch of each
# device choice on a CPU-only machine.
os.environ.setdefault("MOSE_DS_DEVICE", "cpu")
if os.environ.get("MOSE_DS_FAKE_CUDA") == "1":
    FAKE_CUDA = os.path.join(ROOT, "tests", "fake_cuda")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (FAKE_CUDA, os.environ.get("PYTHONPATH")) if p)
    runpy.run_path(os.path.join(FAKE_CUDA, "sitecustomize.py"))   # this process, like its children

from mose_ds.config import from_dict  # noqa: E402
from mose_ds.engine import free_port  # noqa: E402,F401  (re-exported to the tests)
from mose_ds.train import quiet_libraries  # noqa: E402

quiet_libraries()

TINY = {
    "model": {"name": "test-tiny", "num_layers": 2, "num_heads": 2, "hidden_size": 32,
              "vocab_size": 4096, "seq_len": 32},
    "moe": {"num_experts": 4, "top_k": 2},
    "optim": {"warmup_iters": 2},
    "train": {"micro_batch_size": 4, "grad_accum_steps": 1, "max_iters": 5, "eval_interval": 1000,
              "eval_batches": 2, "log_interval": 1000},
    "engine": {"zero_stage": 0, "precision": "fp32"},
    "logging": {"tensorboard": False},
}


def clean_env() -> dict:
    """The environment for a child process, without the one-rank world of this process."""
    from mose_ds.engine import child_env
    return child_env()


def sliced_ffn(expert, x_ND, m: int):
    """The expert at hidden size m in plain autograd ops on weight slices: the reference the
    hand-written expert forward and backward are checked against."""
    import torch.nn.functional as F
    up_NM = x_ND @ expert.w_up[:m].t()
    h_NM = F.silu(x_ND @ expert.w_gate[:m].t()) * up_NM if expert.activation == "swiglu" else F.gelu(up_NM)
    return h_NM @ expert.w_down[:m]


def run_ranks(nproc: int, script: str, *args) -> None:
    """Run tests/`script` on `nproc` gloo CPU ranks under torchrun; fail with its stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", os.path.join(ROOT, "tests", script), *map(str, args)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=clean_env())
    assert result.returncode == 0, result.stderr[-4000:]


def read_universal(folder) -> dict:
    """Every tensor of a universal checkpoint folder (mose-convert-checkpoint), by
    "kind/name": fp32 weights and, when carried, both Adam moments."""
    from mose_ds.shards import read_header, read_tensor
    out = {}
    for kind in ("weights", "exp_avg", "exp_avg_sq"):
        path = os.path.join(folder, f"{kind}.safetensors")
        if os.path.exists(path):
            for name, entry in read_header(path).items():
                out[f"{kind}/{name}"] = read_tensor(entry)
    return out


def tiny_raw(**sections) -> dict:
    """The tiny recipe as a raw dict, with per-section overrides merged in."""
    raw = {k: dict(v) for k, v in TINY.items()}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def tiny_config(**sections):
    return from_dict(tiny_raw(**sections))


@pytest.fixture(scope="session")
def world():
    """A one-rank gloo world with megatron's model-parallel state, shared by in-process tests."""
    from mose_ds import engine
    engine.init_distributed()
    return engine


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """The first ~80 KB of the shipped corpus, prepared with a compact vocabulary (< 4096)."""
    folder = tmp_path_factory.mktemp("corpus")
    text = folder / "text.txt"
    with open(os.path.join(ROOT, "corpus", "tinyshakespeare.txt")) as f:
        text.write_text(f.read(80_000))
    out = folder / "prepared"
    subprocess.run([sys.executable, "-m", "mose_ds.commands.prepare", "--input", str(text),
                    "--out", str(out), "--compact-vocab"], check=True, capture_output=True, env=clean_env())
    return str(out)


GPT2_FILES = os.path.join(ROOT, "..", "shared", "data", "tokenizer", "gpt2")


def gpt2_model_dir(folder) -> str:
    """A model directory whose tokenizer.json is GPT-2's (built from the shared vocab/merges)
    and whose config.json names GPT-2's end-of-text id: what an HF model directory holds."""
    import json
    from tokenizers import ByteLevelBPETokenizer
    from mose_ds.tokenizer import EOT_ID
    os.makedirs(folder, exist_ok=True)
    tok = ByteLevelBPETokenizer(os.path.join(GPT2_FILES, "vocab.json"), os.path.join(GPT2_FILES, "merges.txt"))
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"eos_token_id": EOT_ID}, f)
    return str(folder)


def load_tool(name: str):
    """A command's module (mose_ds/commands/), so tests call its main(argv) in this process."""
    import importlib
    return importlib.import_module(f"mose_ds.commands.{name}")


@pytest.fixture(scope="session")
def trained(world, corpus, tmp_path_factory) -> str:
    """A run folder holding a checkpoint of a 4-block tiny model (MoE blocks 0 and 2) trained a
    few steps under ZeRO-2: the subject of the inference-time tests."""
    from mose_ds.train import train
    out = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(model={"num_layers": 4}, data={"path": corpus}, logging={"out_dir": str(out)},
                      engine={"zero_stage": 2}, train={"max_iters": 8},
                      optim={"lr": 3e-3})
    train(cfg, quiet=True)
    return str(out)
