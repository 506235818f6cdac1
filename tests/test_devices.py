"""Device choice: what was asked for, a one-line refusal of a GPU job without CUDA, the
launcher's GPU slots, and the environment banner every run records."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ROOT, clean_env, tiny_raw
from mose_ds import devices, launch

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for hosts without CUDA")


def test_choose_follows_the_request_then_the_environment(monkeypatch):
    monkeypatch.setenv(devices.ENV_DEVICE, "cpu")
    assert devices.choose("auto") == devices.choose("cpu") == torch.device("cpu")
    with pytest.raises(devices.DeviceError, match="'tpu': expected cpu, cuda or cuda:N"):
        devices.choose("tpu")


def test_auto_on_a_gpu_host_takes_cuda_and_a_missing_gpu_names_what_is_available(monkeypatch):
    """What tests/fake_cuda makes torch report: two CUDA devices."""
    monkeypatch.delenv(devices.ENV_DEVICE, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices.choose(None) == devices.choose("auto") == torch.device("cuda")
    assert devices.choose("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(devices.DeviceError) as error:
        devices.choose("cuda:2")
    assert str(error.value) == "device 'cuda:2': torch sees 2 CUDA device(s); available: cpu, cuda, cuda:0, cuda:1"


@no_cuda
def test_cuda_without_cuda_names_torch_build_and_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(devices.DeviceError) as error:
        devices.choose("cuda", why="training")
    message = str(error.value)
    assert "\n" not in message and f"torch {torch.__version__}" in message and "sees no CUDA device" in message
    assert "(device cuda; available here: cpu)" in message
    assert "CUDA_VISIBLE_DEVICES='0,1'" in message and "engine.device=cpu" in message


@no_cuda
@pytest.mark.parametrize("engine", [{"precision": "bf16", "zero_stage": 1, "device": "auto"},
                                    {"precision": "fp32", "device": "cuda"}])
def test_a_gpu_run_without_cuda_is_refused_before_writing_anything(tmp_path, corpus, engine):
    out = tmp_path / "run"
    recipe = tmp_path / "gpu.yaml"
    recipe.write_text(yaml.safe_dump(tiny_raw(data={"path": corpus}, logging={"out_dir": str(out)}, engine=engine)))
    env = clean_env()
    env.pop(devices.ENV_DEVICE, None)
    result = subprocess.run([sys.executable, "-m", "mose_ds.train", "--config", str(recipe)], capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "needs CUDA" in errors[0] and "sees no CUDA device" in errors[0]
    assert "Traceback" not in result.stderr and not out.exists()


def test_launches_onto_gpu_slots_ask_for_cuda(tmp_path, capsys):
    from mose_ds.train import parse_args
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("a slots=8\nb slots=8\n")
    argv = ["--config", "r.yaml", "--debug", "train.max_iters=5"]
    assert launch.main(["--hostfile", str(hostfile), "--dry-run", "--", *argv], env={}) == 0
    lines = capsys.readouterr().out.splitlines()
    nodes = [line for line in lines if line.startswith(("[node ", "[started by]"))]
    assert len(nodes) == 3 and all("--config r.yaml --debug train.max_iters=5 engine.device=cuda" in n for n in nodes)
    ranks = parse_args([*argv, "engine.device=cuda"])          # what each rank parses
    assert ranks.overrides == ["train.max_iters=5", "engine.device=cuda"] and ranks.debug
    slurm = {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_GPUS_ON_NODE": "4"}
    assert launch.main(["--slurm", "--dry-run", "--hostfile-out", str(tmp_path / "h"), "--", "--config=r.yaml"],
                       env=slurm) == 0
    assert "--config=r.yaml engine.device=cuda" in capsys.readouterr().out
    # a device the user names, on the command line or in the recipe, wins
    cpu_recipe = tmp_path / "cpu.yaml"
    cpu_recipe.write_text("engine:\n  device: cpu\n")
    for named in (["--config", "r.yaml", "engine.device=cpu"], ["--config", str(cpu_recipe)]):
        assert launch.main(["--hostfile", str(hostfile), "--dry-run", "--", *named], env={}) == 0
        assert "engine.device=cuda" not in capsys.readouterr().out
    # CPU ranks asked for by --nproc stay as they are
    assert launch.main(["--nproc", "2", "--dry-run", "--", "--config", "r.yaml"], env={}) == 0
    assert "engine.device" not in capsys.readouterr().out


def test_every_run_prints_and_records_its_environment(tmp_path, corpus, world, capsys):
    from mose_ds.train import train
    from conftest import tiny_config
    out = tmp_path / "run"
    train(tiny_config(data={"path": corpus}, logging={"out_dir": str(out)}, train={"max_iters": 1}))
    info = json.loads((out / "environment.json").read_text())
    import deepspeed
    assert info["torch"] == torch.__version__ and info["deepspeed"] == deepspeed.__version__
    assert info["device"] == "cpu" and info["attention"] == "flash (CPU)" and info["expert_kernel"] == "LoopKernel"
    assert {"megatron_core", "cuda", "precision", "grad_comm_dtype"} <= set(info)
    assert devices.banner(info) in capsys.readouterr().out


def test_megatron_state_has_no_gloo_groups(world):
    """megatron's gloo groups would span the whole world over TCP; nothing here uses them."""
    from megatron.core import parallel_state
    assert parallel_state.model_parallel_is_initialized()
    assert parallel_state._DATA_PARALLEL_GROUP_GLOO is None and parallel_state._EXPERT_DATA_PARALLEL_GROUP_GLOO is None
