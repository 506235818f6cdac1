"""Inference-time width control end to end: checkpoint loading, gamma calibration (weights
untouched), evaluation and the sweep, routing diagnostics, and refusals of bad input."""

import json
import os

import pytest
import torch
import yaml

from conftest import load_tool
from mose_ds.calibrate import PolicySettings, calibrate, freeze
from mose_ds.checkpoint import CheckpointError
from mose_ds.inference import evaluate_policy, load_model, split_batches
from mose_ds.policies import PolicyError, PolicySpec, build_policy
from mose_ds.scoring import Scorer
from mose_ds.tokenizer import TextCodec

calibrate_gamma = load_tool("calibrate_gamma")
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


def test_calibration_leaves_every_weight_bit_identical_and_moves_gamma(trained):
    loaded = load_model(trained)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items() if isinstance(v, torch.Tensor)}
    freeze(loaded.model)
    batches = split_batches(loaded.cfg.data.path, "train", loaded.cfg, 2, 4)
    result = calibrate(loaded.model, batches, 1.0, "layerwise", PolicySettings(), lr=5.0)
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(result.gamma) == 2 and all(g != 1.0 for g in result.gamma)
    assert len(result.trajectory) == 4 and result.hard.mflops["paper"] > 0


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
    assert {"loss_relaxed", "loss_hard", "mflops_per_token", "mean_width"} <= set(entry)
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
    want = Scorer(loaded.model, TextCodec.for_data(loaded.cfg.data.path), policy).loglikelihood(pairs)
    assert lm.loglikelihood(requests, disable_tqdm=True) == want
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
                          "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    modes = {r["mode"] for r in summary["rows"]}
    assert modes == {"full", "uniform", "normprob"}
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


def test_routing_transfer_and_diagnostics(trained, tmp_path, capsys):
    """k' = 1 < k = 2 without retraining: half the expert compute; histograms per width, JS
    divergence, one heatmap per width."""
    two, one = load_model(trained), load_model(trained, top_k=1)
    batches = split_batches(two.cfg.data.path, "val", two.cfg, 2, 2)
    r2 = evaluate_policy(two.model, batches, build_policy(PolicySpec(), two.cfg))
    r1 = evaluate_policy(one.model, batches, build_policy(PolicySpec(), one.cfg))
    assert r1.breakdown["moe"] < r2.breakdown["moe"] and r1.ppl > 1
    out = tmp_path / "routing"
    assert evaluate.main(["routing", "--ckpt", trained, "--widths", "0.25", "1.0", "--batches", "2",
                          "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    js = report["js_divergence"]["0.25-1.00"]
    assert 0 <= js["global"] <= 0.6932 and len(js["per_layer"]) == 2
    assert js["per_layer"][0] == pytest.approx(0.0, abs=1e-12)   # layer 0 routes before any width acts
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
