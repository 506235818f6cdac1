"""Checkpoints are read as data, never as code (mose_ds.safe_load): a checkpoint file that
carries a pickled call is refused by every reader (resume, evaluation, gamma calibration,
export, conversion) with a one-line error naming the file and the type, and the call never
runs; every file of a real checkpoint loads."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil

import pytest
import torch
import yaml

from conftest import load_tool, tiny_raw

from mose_ds import checkpoint, safe_load

TAG = "iter_00000002"
SYSTEM = f"{os.system.__module__}.system"      # posix.system on Linux


class RunsCode:
    """Pickles as a call of os.system that creates `marker`: what a hostile checkpoint carries."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def recipe(corpus, out, zero=2, precision="fp32") -> dict:
    return tiny_raw(data={"path": corpus}, logging={"out_dir": str(out)},
                    engine={"zero_stage": zero, "precision": precision},
                    train={"max_iters": 2}, checkpoint={"interval": 2})


@pytest.fixture(scope="module")
def trained(world, corpus, tmp_path_factory):
    """Run folders of tiny one-rank runs (a checkpoint after 2 iterations), trained on first
    use, by (ZeRO stage, precision); fp32 ZeRO-2 is the one the crafted files are made from."""
    from mose_ds.config import from_dict
    from mose_ds.train import train
    runs = {}

    def get(zero=2, precision="fp32"):
        if (zero, precision) not in runs:
            out = tmp_path_factory.mktemp(f"zero{zero}_{precision}")
            train(from_dict(recipe(corpus, out, zero, precision)), quiet=True)
            runs[zero, precision] = out
        return runs[zero, precision]
    return get


def crafted(run, tmp_path, name: str):
    """A copy of the run folder `run` whose checkpoint file `name` also carries a RunsCode,
    the manifest re-stamped so that the file verifies and only the pickle check can refuse it:
    (run folder, the crafted file, the marker file the code would create)."""
    copy, marker = tmp_path / "shared", tmp_path / "pwned"
    shutil.copytree(run, copy)
    folder = copy / "checkpoints" / TAG
    path = folder / name
    state = torch.load(path, map_location="cpu", weights_only=False)      # our own file
    state["payload"] = RunsCode(marker)
    torch.save(state, path)
    manifest = json.loads((folder / checkpoint.MANIFEST).read_text())
    manifest["files"][name] = checkpoint._file_record(str(path))
    (folder / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    assert checkpoint.verify(str(folder)) == []
    return copy, path, marker


def assert_refused(err: str, path, marker) -> None:
    """One error line (after the tool's prefix) that names the file and the type; no code ran."""
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1, err
    assert lines[0].split("error: ", 1)[1].startswith(
        f"checkpoint {path} carries a pickled object of type {SYSTEM} that is not allowed"), lines[0]
    assert lines[0].endswith("refusing to load it")
    assert not marker.exists()


def test_a_file_carrying_code_is_refused_by_name_and_a_truncated_one_is_unreadable(trained, tmp_path):
    _, path, marker = crafted(trained(), tmp_path, "mp_rank_00_model_states.pt")
    with pytest.raises(checkpoint.CheckpointError) as refused:
        safe_load.load(str(path))
    assert_refused(f"error: {refused.value}", path, marker)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(checkpoint.CheckpointError, match=f"^{re.escape(str(truncated))}: unreadable \\(RuntimeError"):
        safe_load.load(str(truncated))


def test_the_allow_list_is_lent_to_one_load_and_nothing_registered_is_taken_away(trained):
    folder = trained() / "checkpoints" / TAG
    registered = set(torch.serialization.get_safe_globals())       # megatron-core's, from its import
    for name in ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_state_rank0.pt"):
        safe_load.load(str(folder / name))
    assert set(torch.serialization.get_safe_globals()) == registered
    with pytest.raises(pickle.UnpicklingError, match="deepspeed"):   # a plain weights-only load still refuses
        torch.load(folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=True)


@pytest.fixture
def only_our_allow_list():
    """torch's process-wide allow-list emptied for the test (megatron-core registers numpy's
    types in it at import), so that a file loads through `safe_load.ALLOWED` alone."""
    registered = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    yield
    torch.serialization.add_safe_globals(registered)


@pytest.mark.parametrize("zero, precision", [(2, "fp32"), (0, "fp32"), (1, "bf16")])
def test_every_file_of_a_real_checkpoint_loads(trained, zero, precision, only_our_allow_list):
    folder = trained(zero, precision) / "checkpoints" / TAG
    names = sorted(n for n in os.listdir(folder) if n.endswith(".pt"))
    shards = {2: "zero_pp_rank_0_mp_rank_00_optim_states.pt", 0: "expp_rank_0_mp_rank_00_optim_states.pt",
              1: "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"}
    assert {"mp_rank_00_model_states.pt", "layer_0_expert_0_mp_rank_00_model_states.pt", "rng_state_rank0.pt",
            shards[zero]} <= set(names)
    for name in names:
        assert isinstance(safe_load.load(str(folder / name)), dict), name


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "layer_0_expert_1_mp_rank_00_model_states.pt",
                                  "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_state_rank0.pt"])
def test_resume_refuses_a_file_carrying_code(trained, corpus, tmp_path, capsys, name):
    """Auto resume of a shared run folder: DeepSpeed's reads (model states, expert files,
    ZeRO shards) and our RNG state read all go through the safe loader."""
    from mose_ds.train import main
    run, path, marker = crafted(trained(), tmp_path, name)
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe(corpus, run)))
    capsys.readouterr()
    assert main(["--config", str(config), "train.max_iters=3"]) == 2
    assert_refused(capsys.readouterr().err, path, marker)


@pytest.mark.parametrize("tool, name", [
    ("evaluate", "mp_rank_00_model_states.pt"),
    ("evaluate", "layer_0_expert_1_mp_rank_00_model_states.pt"),
    ("calibrate", "mp_rank_00_model_states.pt"),
    ("export_hf", "mp_rank_00_model_states.pt"),
    ("convert_checkpoint", "zero_pp_rank_0_mp_rank_00_optim_states.pt")])
def test_tools_refuse_a_file_carrying_code(trained, tmp_path, capsys, tool, name):
    run, path, marker = crafted(trained(), tmp_path, name)
    argv = {"evaluate": ["ppl", "--ckpt", str(run), "--device", "cpu"],
            "calibrate": ["--ckpt", str(run), "--device", "cpu"],
            "export_hf": ["--ckpt", str(run), "--out", str(tmp_path / "hf")],
            "convert_checkpoint": ["--ckpt", str(run), "--out", str(tmp_path / "universal")]}[tool]
    capsys.readouterr()
    assert load_tool(tool).main(argv) == 2
    assert_refused(capsys.readouterr().err, path, marker)
