"""Inference-time width control end to end: checkpoint loading, gamma calibration (weights
untouched), evaluation and the sweep, routing diagnostics, and refusals of bad input."""

import json
import math
import os

import pytest
import torch
import yaml

from conftest import load_tool
from mose_ds.calibrate import PolicySettings, SearchMethod, SGDMethod, calibrate, freeze
from mose_ds.checkpoint import CheckpointError
from mose_ds.inference import evaluate_policy, load_model, split_batches
from mose_ds.policies import PolicyError, PolicySpec, build_policy
from mose_ds.tokenizer import TextCodec

calibrate_gamma = load_tool("calibrate")
evaluate = load_tool("evaluate")


def test_load_model_reads_the_trained_weights(trained):
    loaded = load_model(trained)
    assert loaded.identity["moe_layers"] == 2 and loaded.iteration == 8
    folder = loaded.folder
    expert = torch.load(os.path.join(folder, "layer_1_expert_3_mp_rank_00_model_states.pt"))
    name = "layers.2.mlp.deepspeed_moe.experts.deepspeed_experts.3.w_up"
    assert torch.equal(loaded.model.state_dict()[name], expert[name])
    assert load_model(folder).digest == loaded.digest                   # run folder == tag folder
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(os.path.join(trained, "nope"))


def test_search_finds_the_minimum_of_a_known_loss_shared_and_per_layer():
    # A separable loss with its minimum at log gamma = (0.9, -0.4): layer-wise search must find
    # each coordinate, shared search the minimum along the diagonal (their mean, 0.25).
    target = [0.9, -0.4]
    calls = []

    def loss(log_gammas):
        calls.append(list(log_gammas))
        return sum((t - c) ** 2 for t, c in zip(log_gammas, target))

    precise = SearchMethod(refine=10, layer_refine=10)
    layerwise = precise.search(loss, 2, "layerwise")
    assert layerwise == pytest.approx(target, abs=0.02)
    assert len(calls) == len({tuple(c) for c in calls}) <= 6 + 10 + 2 * 10      # each point once
    assert precise.search(loss, 2, "shared") == pytest.approx([0.25, 0.25], abs=0.02)
    # the default's coarser refinement; a minimum near the scan's end (gamma = 6)
    assert SearchMethod().search(loss, 2, "layerwise") == pytest.approx(target, abs=0.15)
    assert SearchMethod().search(lambda t: (t[0] - math.log(6)) ** 2, 1, "shared")[0] == \
        pytest.approx(math.log(6), abs=0.1)
    # past the scan's ends (gamma = 20 > 8, gamma = 0.1 < 0.25): the scan extends outwards
    for target_gamma in (20.0, 0.1):
        assert SearchMethod().search(lambda t: (t[0] - math.log(target_gamma)) ** 2, 1, "shared")[0] == \
            pytest.approx(math.log(target_gamma), abs=0.1)
    # layer-wise search from a given start evaluates no shared scan
    calls.clear()
    assert SearchMethod(layer_refine=10).search(loss, 2, "layerwise", start=[0.5, 0.0]) == \
        pytest.approx(target, abs=0.02) and len(calls) <= 1 + 2 * 10


def test_calibration_leaves_every_weight_bit_identical_and_reports_what_it_deploys(trained):
    loaded = load_model(trained)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items() if isinstance(v, torch.Tensor)}
    freeze(loaded.model)
    batches = split_batches(loaded.cfg.data.path, "train", loaded.cfg, 2, 4)
    settings = PolicySettings(grid=loaded.cfg.mose.grid)
    result = calibrate(loaded.model, batches, 1.0, "layerwise", settings,
                       SearchMethod(scan=(-2, 0, 2), refine=3))
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the reported losses are those of the deployed policies, evaluated independently here
    hard = evaluate_policy(loaded.model, batches, settings.policy(1.0, result.gamma)).loss
    at_1 = evaluate_policy(loaded.model, batches, settings.policy(1.0, 1.0)).loss
    assert result.loss_hard == pytest.approx(hard, rel=1e-6) and result.loss_hard_at_1 == pytest.approx(at_1, rel=1e-6)
    assert result.loss_hard == pytest.approx(min(result.trajectory), rel=1e-6)     # the best point seen
    assert len(result.gamma) == 2 and result.evaluations == len(result.trajectory)


def test_sgd_sum_reduction_steps_tokens_times_the_mean(trained):
    # The paper's optimiser: one SGD step per batch on log gamma. Summing the batch's token
    # losses must make the step exactly (tokens per batch) times the mean's.
    loaded = load_model(trained)
    freeze(loaded.model)
    batches = split_batches(loaded.cfg.data.path, "train", loaded.cfg, 2, 1)
    settings = PolicySettings()
    tokens = batches[0][1].numel()
    mean, _, _ = SGDMethod(lr=0.01).learn(loaded.model, batches, 1.0, "layerwise", settings)
    summed, _, _ = SGDMethod(lr=0.01 / tokens, reduction="sum").learn(loaded.model, batches, 1.0, "layerwise", settings)
    moved_mean, moved_sum = (torch.tensor(g).log() for g in (mean, summed))
    assert moved_mean.abs().min() > 1e-7                      # the step is seen in float32
    assert moved_sum.tolist() == pytest.approx(moved_mean.tolist(), rel=1e-3)


def test_calibrate_cli_writes_a_gamma_table_that_evaluate_deploys(trained, tmp_path, capsys):
    table = tmp_path / "gamma.yaml"
    argv = ["--ckpt", trained, "--budgets", "0.75", "1.5", "--mode", "both", "--batches", "3", "--batch-size", "2",
            "--out", str(table)]
    assert calibrate_gamma.main(argv) == 0
    data = yaml.safe_load(table.read_text())
    assert data["checkpoint"]["weights_sha256"] == load_model(trained).digest
    assert [e["budget"] for e in data["modes"]["layerwise"]] == [0.75, 1.5]
    assert len(data["modes"]["layerwise"][0]["gamma"]) == 2 and len(data["modes"]["shared"][0]["gamma"]) == 2
    entry = data["modes"]["shared"][1]
    assert {"loss_relaxed", "loss_hard", "loss_hard_at_gamma_1", "loss_relaxed_at_gamma_1", "mflops_per_token",
            "mflops_per_token_executed", "mean_width"} <= set(entry)
    assert entry["loss_hard"] <= entry["loss_hard_at_gamma_1"]
    assert "weights unchanged" in capsys.readouterr().out
    # refuses to overwrite; refuses budgets outside (0, k]
    assert calibrate_gamma.main(argv) == 2
    assert calibrate_gamma.main(argv[:2] + ["--budgets", "2.5", "--out", str(tmp_path / "x.yaml")]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "outside (0, k=2]" in err and not (tmp_path / "x.yaml").exists()

    capsys.readouterr()
    assert evaluate.main(["ppl", "--ckpt", trained, "--policy", "gamma", "--table", str(table), "--budget",
                          "0.75", "--batches", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["policy"] == "gamma-layerwise Gamma=0.75" and out["mflops_paper"] > 0 and out["ppl"] > 1

    # the lm-eval adapter deploys the same table on the same checkpoint
    from lm_eval.api.instance import Instance
    from mose_ds.lm_eval_adapter import MoSELM
    lm = MoSELM(checkpoint=trained, policy="gamma", budget="0.75", table=str(table), gamma_mode="shared")
    loaded = load_model(trained)
    policy = build_policy(PolicySpec("gamma", budget=0.75, table=str(table), gamma_mode="shared"),
                          loaded.cfg, loaded.identity)
    pairs = [("To be, or not to be: that is", " the question"), ("", "Friends, Romans, countrymen")]
    requests = [Instance(request_type="loglikelihood", arguments=p, doc={}, idx=0) for p in pairs]
    codec = TextCodec.for_checkpoint(loaded.folder)

    def direct(context, continuation, policy):
        """Sum of log-softmax of the continuation's ids from one forward of the model under
        `policy` (an empty context starts from end-of-text), computed here."""
        c = codec.encode(context)
        x = codec.encode(context + continuation)[len(c):]
        inputs = (c or [codec.eot]) + x[:-1]
        with torch.no_grad():
            logits = loaded.model(torch.tensor([inputs]), policy)[0][0, -len(x):]
        return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(x)[:, None]).sum().item()

    want = [direct(c, x, policy) for c, x in pairs]
    got = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    assert got == pytest.approx(want, rel=1e-5)
    assert got != pytest.approx([direct(c, x, build_policy(PolicySpec("full"), loaded.cfg)) for c, x in pairs],
                                rel=1e-6)                          # the table's widths matter
    assert lm.get_model_info()["mose_checkpoint"]["weights_sha256"] == loaded.digest


def test_gamma_table_for_another_checkpoint_or_layer_count_is_refused(trained, tmp_path):
    loaded = load_model(trained)
    good = {"checkpoint": loaded.identity, "policy": {}, "modes": {"layerwise": [{"budget": 1.0, "gamma": [1, 2]}]}}
    path = tmp_path / "t.yaml"
    spec = PolicySpec(kind="gamma", budget=1.0, table=str(path))
    path.write_text(yaml.safe_dump(good))
    build_policy(spec, loaded.cfg, loaded.identity)
    other = dict(good, checkpoint=dict(loaded.identity, weights_sha256="0" * 64))
    path.write_text(yaml.safe_dump(other))
    with pytest.raises(PolicyError, match="another checkpoint"):
        build_policy(spec, loaded.cfg, loaded.identity)
    layers = dict(good, checkpoint=dict(loaded.identity, moe_layers=6))
    path.write_text(yaml.safe_dump(layers))
    with pytest.raises(PolicyError, match="6 MoE layers"):
        build_policy(spec, loaded.cfg, loaded.identity)
    path.write_text(yaml.safe_dump(good))
    with pytest.raises(PolicyError, match="no budget 1.5"):
        build_policy(PolicySpec(kind="gamma", budget=1.5, table=str(path)), loaded.cfg, loaded.identity)
    with pytest.raises(PolicyError, match="unknown policy 'topk'"):
        build_policy(PolicySpec(kind="topk"), loaded.cfg)
    with pytest.raises(PolicyError, match=r"outside \(0, k=2\]"):
        build_policy(PolicySpec(kind="normprob", budget=0.0), loaded.cfg)


def test_sweep_writes_csv_plots_and_tensorboard(trained, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert evaluate.main(["sweep", "--ckpt", trained, "--budgets", "0.6", "1.2", "--batches", "2",
                          "--baseline", trained, "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    modes = {r["mode"] for r in summary["rows"]}
    assert modes == {"full", "uniform", "normprob", "moe"}
    # the baseline runs on the same batches: here it is the same checkpoint, so its points
    # are the same model's at full width and uniform 0.25 / 0.5 / 0.75
    moe = {r["budget"]: r for r in summary["rows"] if r["mode"] == "moe"}
    same = {r["budget"]: r for r in summary["rows"] if r["mode"] in ("full", "uniform")}
    assert sorted(moe) == [0.5, 1.0, 1.5, 2.0]
    assert all(moe[b]["ppl"] == same[b]["ppl"] for b in moe)
    assert summary["table1"]["moe_full_width"]["ppl"] == summary["table1"]["mose_full_width"]["ppl"]
    # executed and nominal compute are both reported; uniform widths execute their nominal units
    assert all(r["mflops_paper_executed"] >= r["mflops_paper"] - 1e-9 for r in summary["rows"])
    assert all(r["mflops_paper_executed"] == r["mflops_paper"] for r in summary["rows"] if r["mode"] == "uniform")
    assert set(summary["vs_uniform"]) == {"normprob"} and set(summary["vs_uniform_executed"]) == {"normprob"}
    for name in ("sweep.csv", "pareto.png", "reduction.png", "summary.json"):
        assert (out / name).stat().st_size > 0
    assert os.listdir(out / "tensorboard")
    full = next(r for r in summary["rows"] if r["mode"] == "full")
    quarter = next(r for r in summary["rows"] if r["mode"] == "uniform" and r["budget"] == 0.5)
    assert quarter["mflops_paper"] < full["mflops_paper"] and quarter["mean_width"] == pytest.approx(0.25)
    # a second sweep into the same folder is refused, and leaves the files alone
    before = (out / "sweep.csv").read_text()
    assert evaluate.main(["sweep", "--ckpt", trained, "--out", str(out)]) == 2
    assert "already holds" in capsys.readouterr().err and (out / "sweep.csv").read_text() == before


def test_js_divergence_on_hand_cases():
    js = evaluate.js_divergence
    assert js([1, 0], [0, 1]) == pytest.approx(math.log(2))                 # disjoint: ln 2
    # p = (1/2, 1/2), q = (1, 0), m = (3/4, 1/4): KL(p, m) = ln(4/3) / 2, KL(q, m) = ln(4/3)
    assert js([2, 2], [3, 0]) == pytest.approx(0.75 * math.log(4 / 3))     # counts are normalised
    assert js([3, 0], [2, 2]) == pytest.approx(0.75 * math.log(4 / 3))     # symmetric
    assert js([1, 2, 3], [2, 4, 6]) == 0.0


def test_routing_transfer_and_diagnostics(trained, tmp_path, capsys):
    """k' = 1 < k = 2 without retraining: less expert compute; histograms per width (every
    routed choice counted once), their JS divergences (scipy's, squared, as the reference),
    one heatmap per width."""
    import numpy as np
    from scipy.spatial.distance import jensenshannon
    two, one = load_model(trained), load_model(trained, top_k=1)
    batches = split_batches(two.cfg.data.path, "val", two.cfg, 2, 2)
    r2 = evaluate_policy(two.model, batches, build_policy(PolicySpec(), two.cfg))
    r1 = evaluate_policy(one.model, batches, build_policy(PolicySpec(), one.cfg))
    assert r1.breakdown["moe"] < r2.breakdown["moe"] and r1.ppl > 1
    out = tmp_path / "routing"
    assert evaluate.main(["routing", "--ckpt", trained, "--widths", "0.25", "1.0", "--batches", "2",
                          "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    narrow, full = (np.array(report["histograms"][w]) for w in ("0.25", "1.00"))   # [layer, expert]
    assert narrow.shape == full.shape == (2, 4)
    # every routed choice once: 2 batches x 4 sequences x 32 tokens x k = 2
    assert narrow.sum(1).tolist() == full.sum(1).tolist() == [512, 512]
    js = report["js_divergence"]["0.25-1.00"]
    # layer 0 routes before any width acts: the same histogram, divergence exactly 0
    assert (narrow[0] == full[0]).all() and js["per_layer"][0] == 0.0
    assert (narrow[1] != full[1]).any() and js["per_layer"][1] > 0
    for layer in range(2):
        assert js["per_layer"][layer] == pytest.approx(jensenshannon(narrow[layer], full[layer]) ** 2, abs=1e-12)
    assert js["global"] == pytest.approx(jensenshannon(narrow.sum(0), full.sum(0)) ** 2, abs=1e-12)
    assert (out / "experts_w0.25.png").stat().st_size > 0


def test_evaluate_bad_inputs_are_one_line_errors(trained, tmp_path, capsys):
    cases = [
        (["ppl", "--ckpt", trained, "--policy", "sparse"], "unknown policy 'sparse'"),
        (["ppl", "--ckpt", trained, "--policy", "normprob", "--budget", "3"], "budget(s) [3.0] outside (0, k=2]"),
        (["ppl", "--ckpt", trained, "--policy", "gamma", "--budget", "1", "--table", str(tmp_path / "no.yaml")],
         "no such file"),
        (["ppl", "--ckpt", str(tmp_path / "missing")], "no such checkpoint"),
        (["tasks", "--ckpt", trained, "--task", "lambada", "--files", str(tmp_path / "none.jsonl")], "none.jsonl"),
    ]
    for argv, message in cases:
        assert evaluate.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
