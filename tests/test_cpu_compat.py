"""CPU ranks and CPU models on any host: the CPU ranks' DeepSpeed workarounds, and training,
evaluation and calibration on the CPU of a host whose torch reports GPUs (tests/fake_cuda)."""

import importlib
import os
import subprocess
import sys

import yaml

from conftest import ROOT, clean_env, tiny_raw


def test_cpu_rank_takes_deepspeed_cpu_accelerator_and_skips_the_shm_build(world):
    from deepspeed.accelerator import get_accelerator
    assert get_accelerator().device_name() == "cpu"
    assert importlib.import_module("deepspeed.comm.torch").build_shm_op() is None


def fake_gpu_host(*argv, timeout=600) -> subprocess.CompletedProcess:
    """Run `python argv` where torch reports two CUDA devices and no device is preset."""
    env = clean_env()
    env.pop("MOSE_DS_DEVICE", None)
    env.update(MOSE_DS_FAKE_CUDA="1",
               PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests", "fake_cuda"), ROOT]))
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


def test_train_evaluate_and_calibrate_on_the_cpu_of_a_gpu_host(tmp_path, corpus):
    probe = fake_gpu_host("-c", "import torch; from deepspeed.accelerator import get_accelerator; "
                                "print(torch.cuda.is_available(), get_accelerator().device_name())")
    assert probe.stdout.split() == ["True", "cuda"], probe.stderr[-2000:]     # it looks like a GPU host
    out = tmp_path / "run"
    recipe = tmp_path / "cpu.yaml"
    recipe.write_text(yaml.safe_dump(tiny_raw(data={"path": corpus}, logging={"out_dir": str(out)},
                                              engine={"zero_stage": 1, "device": "cpu"},
                                              train={"max_iters": 2})))
    steps = [("-m", "mose_ds.train", "--config", str(recipe)),
             ("-m", "mose_ds.commands.evaluate", "ppl", "--device", "cpu", "--ckpt", str(out), "--batches", "2"),
             ("-m", "mose_ds.commands.calibrate", "--device", "cpu", "--ckpt", str(out), "--budgets", "1.5",
              "--batches", "2", "--batch-size", "2", "--out", str(tmp_path / "gamma.yaml"))]
    for argv in steps:
        result = fake_gpu_host(*argv)
        assert result.returncode == 0, (argv, result.stderr[-3000:])
    assert '"device": "cpu"' in (out / "environment.json").read_text()
