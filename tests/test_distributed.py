"""Real multi-rank runs: two gloo CPU ranks started by torchrun and by the deepspeed launcher."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ROOT, clean_env, free_port, run_ranks, tiny_raw

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
