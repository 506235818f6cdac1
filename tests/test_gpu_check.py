"""python -m mose_ds.commands.gpu_check: `--smoke` runs every check on the CPU and passes, and what the GPU checks
rest on (the tensor comparison, a check's isolation) fails when it should."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, clean_env, load_tool


@pytest.fixture(scope="module")
def gpu_check():
    return load_tool("gpu_check")


def test_smoke_run_passes_every_check_and_records_it(tmp_path, gpu_check):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "-m", "mose_ds.commands.gpu_check", "--smoke", "--out", str(out)],
                          cwd=ROOT, env={**clean_env(), "MOSE_DS_DEVICE": "cpu"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    *checks, total = done.stdout.splitlines()
    assert [line.split()[1] for line in checks] == list(gpu_check.CHECKS), done.stdout
    assert all(line.split()[0] in ("PASS", "INFO") for line in checks), done.stdout
    assert total.startswith("total ") and f"0 of {len(gpu_check.CHECKS)} checks failed" in total
    report = json.loads(out.read_text())
    assert list(report["checks"]) == list(gpu_check.CHECKS) and report["failed"] == []
    # the checks with a verdict ran to it on the CPU (not skipped)
    for name in ("grouped_mm", "moe_vs_cpu", "host_syncs", "train_resume", "deepseek"):
        assert report["checks"][name]["status"] == "PASS", name
    assert report["checks"]["train_resume"]["resumed"] == [9, 10]
    assert len(report["checks"]["moe_vs_cpu"]["cases"]) == 8          # 2 kernels x capacity/dropless x 2 policies


def test_comparison_fails_on_a_perturbed_tensor_and_passes_within_tolerance(gpu_check):
    gen = torch.Generator().manual_seed(0)
    want = {"output": torch.randn(64, 32, generator=gen), "grad": torch.randn(16, generator=gen)}
    noise = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in want.items()}
    assert gpu_check.compare(noise, want, 2e-2)["ok"]
    wrong = gpu_check.compare({**want, "grad": want["grad"] * 1.05}, want, 2e-2)
    assert not wrong["ok"] and wrong["worst"] == "grad" and wrong["error"] == pytest.approx(0.05)
    nan = want["output"].clone()
    nan[3, 4] = float("nan")
    assert not gpu_check.compare({**want, "output": nan}, want, 2e-2)["ok"]
    assert not gpu_check.compare({"output": want["output"]}, want, 2e-2)["ok"]             # a gradient missing
    assert not gpu_check.compare({**want, "grad": want["grad"][:8]}, want, 2e-2)["ok"]     # another shape
    assert gpu_check.compare({"zero": torch.zeros(4)}, {"zero": torch.zeros(4)}, 1e-4)["ok"]


def test_moe_check_fails_when_an_expert_kernel_is_five_percent_off(world, gpu_check, monkeypatch, tmp_path):
    from mose_ds.moe_layer import SlimmableMoE
    choose = SlimmableMoE.expert_kernel

    def off(self, x, relaxed):
        kernel = choose(self, x, relaxed)

        def scaled(experts, rows):
            y, units, order = kernel(experts, rows)
            return y * 1.05, units, order
        return scaled
    monkeypatch.setattr(SlimmableMoE, "expert_kernel", off)
    result = gpu_check.check_moe_vs_cpu(gpu_check.context(smoke=True, tmp=str(tmp_path)))
    assert result["status"] == "FAIL"
    assert not any(case["ok"] for case in result["cases"].values())


def test_a_check_that_raises_is_a_fail_line_with_its_reason(gpu_check):
    def broken(ctx):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nCompile with TORCH_USE_CUDA_DSA")
    result = gpu_check.run_check(broken, None)
    assert result["status"] == "FAIL"
    assert result["summary"] == "RuntimeError: CUDA error: an illegal memory access was encountered"


def test_the_gpu_sizes_resolve_against_the_recipes_global_batch(gpu_check):
    """The GPU form (not run here) trains the paper recipes with overrides of their batch: the
    overrides must make a batch a one-GPU job can run (a recipe's global batch meets them)."""
    from mose_ds.config import load_config
    gpu = gpu_check.SIZES["gpu"]
    train = load_config(os.path.join(ROOT, gpu.recipe), gpu.overrides).train
    assert (train.geometry(1).micro, train.geometry(1).accum) == (12, 6)
    lite = os.path.join(ROOT, "..", "shared", "data", "deepseek", "deepseek_v2_lite_config.json")
    deepseek = load_config(os.path.join(ROOT, "ds_configs", "deepseek_v2_lite_cpt.yaml"),
                           [*gpu_check.DEEPSEEK_OVERRIDES, f"model.hf_config={lite}"]).train
    assert deepseek.geometry(1).global_batch == 1
