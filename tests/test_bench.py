"""mose-bench moe end to end at small shapes: every variant is reported with the figures
the performance targets are read from, and the ones fixed by construction are right."""

import pytest

from conftest import load_tool


@pytest.fixture(scope="module")
def bench():
    return load_tool("bench_moe")


def test_layer_and_step_report_every_variant(world, bench):
    args = bench.parse_args(["--hidden", "64", "--tokens", "1024", "--repeats", "1", "--widths", "0.25",
                             "--budgets", "1.0", "--skip", "memory,counters,exchange", "--seq-len", "32", "--micro-batch", "2",
                             "--step-widths", "0.5"])
    result = bench.run(args)
    rows = {r["variant"]: r for r in result["layer"]}
    assert set(rows) == {"deepspeed", "full", "uniform_0.25", "normprob_1", "masked_1", "ranges8_normprob_1",
                         "grouped_full", "grouped_normprob_1"}           # (f): the other expert kernel
    assert result["kernels"] == {"kernel": "loop", "other": "grouped"}
    assert all(r["seconds"] > 0 for r in rows.values())
    assert rows["grouped_full"]["executed_width"] == 1.0 and rows["grouped_full"]["flops_ratio"] == 1.0
    assert rows["grouped_normprob_1"]["nominal_width"] == rows["normprob_1"]["nominal_width"]
    assert rows["grouped_normprob_1"]["vs_kernel"] > 0 and "target" not in rows["grouped_normprob_1"]
    # counted FLOPs follow the executed widths (the router adds a little); masking runs everything
    assert rows["uniform_0.25"]["executed_width"] == 0.25
    assert 0.25 < rows["uniform_0.25"]["flops_ratio"] < 0.27
    assert rows["normprob_1"]["executed_width"] < 0.9
    # grid-rounded widths: 16 ranges execute exactly the nominal units, 8 may round rows up
    assert rows["normprob_1"]["executed_width"] == pytest.approx(rows["normprob_1"]["nominal_width"], abs=1e-12)
    assert "vs_kernel" in rows["ranges8_normprob_1"]          # (g): 8 ranges against 16 (tests/test_widths.py)
    assert rows["normprob_1"]["flops_ratio"] == pytest.approx(rows["normprob_1"]["executed_width"], abs=0.02)
    assert rows["masked_1"]["flops_ratio"] == 1.0 and rows["masked_1"]["executed_width"] == 1.0
    assert rows["deepspeed"]["flops_ratio"] > 1.0     # its dense dispatch einsums count too
    assert all(r["syncs"] == 1 for n, r in rows.items() if n != "deepspeed") and rows["deepspeed"]["syncs"] > 1
    assert rows["grouped_full"]["ops"] < rows["full"]["ops"]
    (step,) = result["two_pass_steps"]
    assert step["width"] == 0.5 and 1.0 < step["predicted"] < 2.0 and step["measured"] > 0


def test_peak_memory_grows_linearly_and_stays_below_deepspeed(world, bench):
    args = bench.parse_args(["--hidden", "128", "--tokens", "2048", "--memory-tokens", "2048,8192",
                             "--widths", "", "--budgets", ""])
    result = bench.memory_benchmark(args)
    assert [(r["variant"], r["tokens"]) for r in result["memory"]] == [
        ("deepspeed", 2048), ("full", 2048), ("grouped_full", 2048), ("full", 8192)]
    growth = result["memory_growth"]
    assert 3.0 < growth["peak_ratio"] <= growth["limit"] == 4.5
    assert result["full_vs_deepspeed_memory"]["ok"]


def test_counters_and_exchanges_meet_their_targets(world, bench):
    """One host sync per MoE layer forward + backward at 8 and 64 experts with either kernel,
    at most 3 per layer pass in a training iteration with the loop's own, the grouped
    kernel's operations independent of the number of experts, and all-to-alls of exactly the
    kept rows on 2 ranks (capacity and dropless)."""
    args = bench.parse_args(["--hidden", "32", "--tokens", "512", "--budgets", "1.0", "--skip", "layer,memory,step"])
    result = bench.run(args)
    c = result["counters"]
    assert {(r["experts"], r["kernel"]) for r in c["layer"]} == {(8, "loop"), (8, "grouped"), (64, "loop"), (64, "grouped")}
    assert all(r["syncs"] == 1 for r in c["layer"])
    assert c["syncs_ok"] and c["grouped_ops_independent_of_experts"]
    for row in c["step"]:     # 2 MoE layers x 2 branches, one sync each; the loop's finiteness check
        assert (row["moe_layer"], row["training_loop"]) == (4, 1), row
    ops = {(r["experts"], r["kernel"], r["policy"]): r["ops"] for r in c["layer"]}
    assert ops[(64, "loop", "cycled")] > 4 * ops[(8, "loop", "cycled")]     # the loop's launches grow with E
    for row in result["exchange"]:
        assert row["kept_slots"] <= row["routed_slots"] and row["largest_over_payload"] == 1.0, row
    assert result["exchange"][1]["kept_slots"] == result["exchange"][1]["routed_slots"]   # dropless


def test_bad_arguments_are_named(bench, capsys):
    for argv, words in ((["--budgets", "2.5"], "--budgets"), (["--widths", "1.5"], "--widths"),
                        (["--skip", "layers"], "--skip layers"), (["--tokens", "1000"], "multiple of 16"),
                        (["--kernel", "grouped", "--hidden", "36"], "--hidden 36")):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert words in capsys.readouterr().err


def test_ratios_pair_each_round_with_the_reference_of_the_same_round():
    from mose_ds.measure import medians, paired_ratios
    samples = {"ref": [1.0, 2.0, 3.0], "v": [0.5, 3.0, 1.5]}     # round 2 hit v by a slow spell
    assert paired_ratios(samples, "ref") == {"ref": 1.0, "v": 0.5}
    assert medians(samples) == {"ref": 2.0, "v": 1.5}


def test_the_step_model_of_a_paper_recipe_takes_the_asked_micro_batch(world, bench):
    """The documented GPU step measurement passes a paper recipe (a global batch of 288) with its
    own micro-batch: one micro-batch per step, whatever the recipe's global batch."""
    import os
    from conftest import ROOT
    args = bench.parse_args(["--micro-batch", "2", "--seq-len", "32"])
    cfg, engine, _, _ = bench.step_model(args, os.path.join(ROOT, "ds_configs", "gpt2_small_e8a2.yaml"), 64)
    assert engine.gradient_accumulation_steps() == 1 and cfg.train.micro_batch_size == 2
