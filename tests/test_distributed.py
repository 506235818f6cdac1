"""Real multi-rank runs: two gloo CPU ranks started by torchrun and by the deepspeed launcher."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ROOT, clean_env, free_port, load_tool, read_universal, run_ranks, tiny_raw

HERE = os.path.dirname(os.path.abspath(__file__))


def torchrun(nproc, *args):
    run_ranks(nproc, "dist_worker.py", *args)


@pytest.mark.parametrize("zero,kernel", [(0, "grouped"), (2, "loop")])
def test_two_ranks_with_expert_parallelism_match_one_rank(tmp_path, zero, kernel):
    """EP=2 over 2 ranks (with either expert kernel) vs 1 rank (the per-expert kernel) on the
    same global batch, no token dropped: same LM losses and gradients, with uniform and with
    per-token widths (each slot's width crosses the all-to-all with it; the 1-rank layer
    equals a per-token loop in test_moe_layer). The load-balancing loss is off here: it is a
    product of per-rank means (as in DeepSpeed and the paper's code), so it is not invariant
    to how a batch is split."""
    torchrun(1, tmp_path / "one.pt", 1, zero, "loop")
    torchrun(2, tmp_path / "two.pt", 2, zero, kernel)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    torch.testing.assert_close(torch.tensor(two["lm"]), torch.tensor(one["lm"]), rtol=0, atol=1e-5)
    assert one["grads"].keys() == two["grads"].keys()
    assert sum("deepspeed_experts.3." in k for k in two["grads"]) == 2
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=0, atol=1e-5, msg=name)
    # every rank sampled the same width at every step
    assert two["widths"][0] == two["widths"][1] and len(set(two["widths"][0])) > 5


def test_expert_parallel_layer_equals_one_rank_and_sends_only_kept_rows(tmp_path):
    """EP=2 against the one-rank layer (tests/ep_layer_worker.py) for both kernels, GELU and
    SwiGLU, no / full-width / slimmable shared experts, dropless and capacity 1.25, uniform,
    per-token and relaxed widths: outputs and every gradient equal. Every all-to-all but the
    counts exchange carries exactly the kept rows, summed over ranks (bytes = kept slots x D x
    4 in fp32; the relaxed forward adds the widths, 4 bytes a row)."""
    run_ranks(2, "ep_layer_worker.py", tmp_path / "ep.json")
    ranks = json.loads((tmp_path / "ep.json").read_text())
    counts_bytes = 4 * (4 * 32 + 1) * 4                       # E x (H + 1) int32 counts
    assert len(ranks[0]) == 2 * 2 * 3 * 2 * 3
    for cases in zip(*ranks):
        name = cases[0]["case"]
        assert all(c["worst"] < 1e-5 for c in cases), (name, [c["worst"] for c in cases])
        assert all(c["sent"][0] == counts_bytes for c in cases), name
        sent = [sum(c["sent"][i] for c in cases) for i in range(1, len(cases[0]["sent"]))]   # per exchange
        kept = sum(c["kept_bytes"] for c in cases)
        widths = kept // 32                                    # one fp32 per row
        assert max(sent) == kept and set(sent) <= {kept, widths}, (name, sent, kept)
        assert sent.count(kept) == 4 and sent.count(widths) == (2 if name.endswith("relaxed") else 0), name


def launch(tmp_path, corpus, name, **train):
    """`deepspeed --num_gpus 2 --module mose_ds.train` on CPU, EP=2, ZeRO-2."""
    raw = tiny_raw(data={"path": corpus}, logging={"out_dir": str(tmp_path / name)},
                   train={"max_iters": 3, **train}, moe={"expert_parallel_size": 2}, engine={"zero_stage": 2})
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    result = subprocess.run([launcher, "--num_gpus", "2", f"--master_port={free_port()}", "--module",
                             "mose_ds.train", "--config", str(recipe)],
                            capture_output=True, text=True, cwd=ROOT, timeout=600, env=clean_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def model_tensors(folder):
    """Every weight in a checkpoint: non-expert states plus one file per expert."""
    out = {}
    for path in sorted(folder.glob("*model_states.pt")):
        state = torch.load(path, map_location="cpu", weights_only=False)
        for key, value in state.get("module", state).items():
            if torch.is_tensor(value):
                out[f"{path.name}:{key}"] = value
    return out


def test_deepspeed_launcher_trains_and_resumes_exactly_with_expert_parallelism(tmp_path, corpus):
    straight = launch(tmp_path, corpus, "straight")
    assert "w=1.00" in straight.stdout
    launch(tmp_path, corpus, "resumed", stop_at=2)
    resumed = launch(tmp_path, corpus, "resumed")
    assert "at iteration 2" in resumed.stdout and "iter 3/3" in resumed.stdout   # really resumed

    final = tmp_path / "straight" / "checkpoints" / "iter_00000003"
    files = {f.name for f in final.iterdir()}
    assert sum("_expert_" in f for f in files) == 4 and {"rng_state_rank0.pt", "rng_state_rank1.pt"} <= files
    a = model_tensors(final)
    b = model_tensors(tmp_path / "resumed" / "checkpoints" / "iter_00000003")
    assert a.keys() == b.keys() and sum("_expert_" in k for k in a) >= 8
    for key in a:
        assert torch.equal(a[key], b[key]), key

    # the EP=2, ZeRO-2 checkpoint loads on one process (expert files hold global indices)
    from mose_ds.inference import load_model
    loaded = load_model(str(tmp_path / "straight"))
    state = loaded.model.state_dict()
    assert loaded.iteration == 3 and loaded.cfg.moe.expert_parallel_size == 1
    for key, value in a.items():
        name = key.split(":", 1)[1]
        assert torch.equal(state[name], value.to(state[name].dtype)), name
    assert {n for n in state if "deepspeed_experts" in n} == {k.split(":", 1)[1] for k in a if "_expert_" in k}


# --------------------------------------------------------------------------- bf16 under ZeRO-1

@pytest.fixture(scope="module")
def bf16_zero1(corpus, tmp_path_factory):
    """The engine of the bf16 GPT-2 recipes (engine.precision bf16, ZeRO-1: DeepSpeed's
    BF16_Optimizer, fp32 gradient accumulation) on 2 ranks with EP=2, two micro-batches per
    iteration, trained 4 iterations with checkpoints after 2 and 4. Returns the folder with
    the recipe and `straight.pt` (tests/train_worker.py: the optimizer wrapper, the losses,
    DeepSpeed's own assembly of the fp32 masters and Adam moments at the end)."""
    folder = tmp_path_factory.mktemp("bf16_zero1")
    raw = tiny_raw(data={"path": corpus}, moe={"expert_parallel_size": 2},
                   engine={"zero_stage": 1, "precision": "bf16"}, optim={"lr": 3e-3},
                   train={"max_iters": 4, "micro_batch_size": 2, "grad_accum_steps": 2}, checkpoint={"interval": 2})
    (folder / "recipe.yaml").write_text(yaml.safe_dump(raw))
    run_ranks(2, "train_worker.py", folder / "straight.pt", folder / "recipe.yaml",
              f"logging.out_dir={folder / 'straight'}")
    return folder


def test_bf16_zero1_trains_through_the_bf16_optimizer_with_expert_parallelism(bf16_zero1):
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    straight = torch.load(bf16_zero1 / "straight.pt")
    assert straight["optimizer"] == f"{BF16_Optimizer.__module__}.{BF16_Optimizer.__qualname__}"
    losses = straight["losses"]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses

    ckpts = bf16_zero1 / "straight" / "checkpoints"
    files = {f.name for f in (ckpts / "iter_00000004").iterdir()}
    assert {"bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= files
    assert sum("_expert_" in f for f in files) == 4
    before, after = model_tensors(ckpts / "iter_00000002"), model_tensors(ckpts / "iter_00000004")
    assert before.keys() == after.keys() and sum("_expert_" in k for k in after) >= 8
    for key, value in after.items():          # the model is bf16, every matrix (experts of both ranks) moved
        assert value.dtype == torch.bfloat16, key
        assert value.dim() < 2 or not torch.equal(value, before[key]), key
    # the masters are fp32 (not bf16 values upcast) and the moments are live
    masters = straight["weights"]
    assert sum(not torch.equal(w, w.bfloat16().float()) for w in masters.values()) == len(masters)
    assert all(straight["exp_avg_sq"][n].count_nonzero() > 0 for n in masters)


def test_bf16_zero1_resumed_in_a_new_process_group_equals_the_uninterrupted_run(bf16_zero1):
    """Stop after 2 iterations, resume from that checkpoint in new processes, and the next 2
    iterations are the uninterrupted run's, bit for bit: losses, fp32 masters, Adam moments,
    bf16 weights. Bitwise, not within bf16 precision: resuming restores every bit the step
    reads (bf16 weights; fp32 masters and moments from the bf16_ shards; step, schedule, data
    position, RNG) and gloo reduces in a fixed order. A bf16 tolerance would also pass a
    resume that rebuilds the masters from the bf16 weights (`refresh_fp32_params`): measured,
    that moves iteration 4's loss by 5e-4 and the masters by 0.5% of their largest value."""
    ckpts = bf16_zero1 / "straight" / "checkpoints"
    run_ranks(2, "train_worker.py", bf16_zero1 / "resumed.pt", bf16_zero1 / "recipe.yaml",
              f"logging.out_dir={bf16_zero1 / 'resumed'}", f"checkpoint.resume={ckpts / 'iter_00000002'}")
    straight, resumed = torch.load(bf16_zero1 / "straight.pt"), torch.load(bf16_zero1 / "resumed.pt")
    assert resumed["iteration"] == 4 and resumed["losses"] == straight["losses"][2:]
    for kind in ("weights", "exp_avg", "exp_avg_sq"):
        assert resumed[kind].keys() == straight[kind].keys()
        for name, value in straight[kind].items():
            assert torch.equal(resumed[kind][name], value), (kind, name)
    a = model_tensors(ckpts / "iter_00000004")
    b = model_tensors(bf16_zero1 / "resumed" / "checkpoints" / "iter_00000004")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_bf16_zero1_checkpoint_converts_and_resumes_on_one_rank_with_masters_and_moments(world, bf16_zero1, tmp_path):
    """The 2-rank EP=2 checkpoint's bf16_ shards become a universal checkpoint holding
    exactly the fp32 masters and Adam moments DeepSpeed assembles itself; one rank with EP=1
    resumes from it (re-saving it at once in its own layout, bf16_ shards again), converting
    that back gives the same tensors bit for bit, and training goes on."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    from mose_ds.config import load_config
    from mose_ds.train import train
    convert = load_tool("convert_checkpoint").main
    source = bf16_zero1 / "straight" / "checkpoints" / "iter_00000004"
    assert convert(["--ckpt", str(source), "--out", str(tmp_path / "ua")]) == 0
    ua = read_universal(tmp_path / "ua")
    straight = torch.load(bf16_zero1 / "straight.pt")
    assert ua.keys() == {f"{kind}/{name}" for kind in ("weights", "exp_avg", "exp_avg_sq") for name in straight[kind]}
    for key, value in ua.items():
        kind, name = key.split("/", 1)
        assert torch.equal(value, straight[kind][name]), key
    bf16 = {k.split(":", 1)[1]: v for k, v in model_tensors(source).items()}
    for name, value in bf16.items():      # the bf16 weights are the masters rounded
        assert torch.equal(ua[f"weights/{name}"].bfloat16(), value), name

    cfg = load_config(str(bf16_zero1 / "recipe.yaml"),
                      [f"checkpoint.resume={tmp_path / 'ua'}", f"logging.out_dir={tmp_path / 'one'}",
                       "moe.expert_parallel_size=1", "train.max_iters=5"])
    summary = train(cfg, quiet=True)
    assert isinstance(summary["engine"].optimizer, BF16_Optimizer)
    assert [h["iteration"] for h in summary["history"]] == [5] and math.isfinite(summary["history"][0]["loss_full"])
    resaved = tmp_path / "one" / "checkpoints" / "iter_00000004"
    assert (resaved / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    assert convert(["--ckpt", str(resaved), "--out", str(tmp_path / "ub")]) == 0
    ub = read_universal(tmp_path / "ub")
    assert ub.keys() == ua.keys()
    for key, value in ua.items():
        assert torch.equal(ub[key], value), key
    resaved_bf16 = {k.split(":", 1)[1]: v for k, v in model_tensors(resaved).items()}
    assert resaved_bf16.keys() == bf16.keys()
    for name, value in bf16.items():
        assert torch.equal(resaved_bf16[name], value), name
