"""Engine-level behaviour of training, in one process (one gloo rank)."""

import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ROOT, clean_env, tiny_config, tiny_raw
from mose_ds.checkpoint import CheckpointError
from mose_ds.train import train
from mose_ds.widths import UniformPolicy


def run(tmp_path, corpus, name, **sections):
    sections.setdefault("data", {})["path"] = corpus
    sections.setdefault("logging", {}).update(out_dir=str(tmp_path / name))
    cfg = tiny_config(**sections)
    return cfg, train(cfg, quiet=True)


def weights(summary):
    return {k: v.detach().clone() for k, v in summary["engine"].module.named_parameters()}


def losses(summary):
    return [(h["loss_full"], h["loss_width"]) for h in summary["history"]]


def test_zero_stages_give_the_same_loss_trajectory(tmp_path, corpus):
    runs = {stage: losses(run(tmp_path, corpus, f"z{stage}", engine={"zero_stage": stage})[1])
            for stage in (0, 1, 2)}
    assert len(runs[0]) == 5
    for stage in (1, 2):
        torch.testing.assert_close(torch.tensor(runs[stage]), torch.tensor(runs[0]), rtol=1e-5, atol=1e-6)


def test_two_pass_joint_and_sequential_give_the_same_gradients(tmp_path, corpus):
    """Same gradient norm (ZeRO-1 reports it; a scale error would show here, Adam hides it)
    and same weights after three steps."""
    common = dict(train={"max_iters": 3}, engine={"zero_stage": 1})
    joint_run = run(tmp_path, corpus, "joint", mose={"two_pass": "joint"}, **common)[1]
    seq_run = run(tmp_path, corpus, "seq", mose={"two_pass": "sequential"}, **common)[1]
    norms = [r["engine"].get_global_grad_norm() for r in (joint_run, seq_run)]
    assert norms[0] > 0
    torch.testing.assert_close(torch.tensor(float(norms[1])), torch.tensor(float(norms[0])), rtol=1e-5, atol=0)
    joint, seq = weights(joint_run), weights(seq_run)
    for name in joint:
        torch.testing.assert_close(seq[name], joint[name], rtol=1e-5, atol=1e-6, msg=name)


def test_resume_continues_exactly(tmp_path, corpus):
    common = dict(train={"max_iters": 6, "grad_accum_steps": 2}, checkpoint={"interval": 100})
    straight = run(tmp_path, corpus, "straight", **common)[1]
    _, first = run(tmp_path, corpus, "resumed", train={**common["train"], "stop_at": 4},
                   checkpoint=common["checkpoint"])
    assert first["state"].iteration == 4
    _, second = run(tmp_path, corpus, "resumed", **common)
    assert second["state"].iteration == 6 and second["state"].data_position == straight["state"].data_position
    assert [h["iteration"] for h in second["history"]] == [5, 6]
    assert losses(second) == losses(straight)[4:]
    a, b = weights(straight), weights(second)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    opt_a = straight["engine"].optimizer.state_dict()
    opt_b = second["engine"].optimizer.state_dict()
    assert str(opt_a["state"].keys()) == str(opt_b["state"].keys())


def test_checkpoint_holds_config_rng_and_expert_files(tmp_path, corpus):
    cfg, _ = run(tmp_path, corpus, "files", train={"max_iters": 2})
    folder = os.path.join(cfg.checkpoint_dir, "iter_00000002")
    files = os.listdir(folder)
    assert "config.yaml" in files and "rng_state_rank0.pt" in files
    assert sum(f.startswith("layer_") and "_expert_" in f for f in files) == 4   # 1 MoE layer x 4 experts
    assert open(os.path.join(cfg.checkpoint_dir, "latest")).read() == "iter_00000002"
    assert yaml.safe_load(open(os.path.join(folder, "config.yaml")))["model"]["hidden_size"] == 32
    assert os.path.exists(os.path.join(cfg.logging.out_dir, "config.yaml"))


def test_resume_with_a_different_architecture_is_refused(tmp_path, corpus):
    run(tmp_path, corpus, "arch", train={"max_iters": 1})
    with pytest.raises(CheckpointError, match=r"different architecture \(hidden_size: checkpoint 32 vs config 64\)"):
        run(tmp_path, corpus, "arch", train={"max_iters": 2}, model={"hidden_size": 64})


def test_bf16_training_follows_fp32_training(tmp_path, corpus):
    """Six steps on the same batches: both branches' bf16 losses stay within a tenth of what
    fp32 training gains over them (measured: within 5e-4 nats of a 0.27 gain), so bf16 that
    does not learn, or learns markedly slower or faster, fails."""
    common = dict(train={"max_iters": 6}, optim={"lr": 3e-3}, mose={"eval_widths": [1.0]},
                  checkpoint={"save_final": False})                     # what is compared is the training
    runs = {p: run(tmp_path, corpus, p, engine={"precision": p, "zero_stage": 2}, **common)[1]
            for p in ("fp32", "bf16")}
    assert runs["bf16"]["engine"].module.wte.weight.dtype == torch.bfloat16
    fp32, bf16 = (torch.tensor(losses(runs[p])) for p in ("fp32", "bf16"))   # [iteration, branch]
    gain = fp32[0, 0] - fp32[-1, 0]
    assert gain > 0.15
    assert (bf16 - fp32).abs().max() < 0.1 * gain, (bf16 - fp32).abs().max()


def test_plain_moe_baseline_trains_at_full_width_only(tmp_path, corpus):
    _, summary = run(tmp_path, corpus, "moe", mose={"enabled": False}, train={"max_iters": 2})
    assert [h["width"] for h in summary["history"]] == [None, None]
    assert all(h["loss_width"] == 0.0 and h["loss_full"] > 0 for h in summary["history"])


def test_tensorboard_has_width_curves_layout_and_routing(tmp_path, corpus):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg, _ = run(tmp_path, corpus, "tb", train={"max_iters": 2, "eval_interval": 1, "log_interval": 1},
                 logging={"tensorboard": True}, engine={"zero_stage": 1})
    root = os.path.join(cfg.logging.out_dir, "tensorboard")
    acc = EventAccumulator(root)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert not any(t.startswith("val/") for t in tags)       # widths are runs of their own, not tags
    val = {}
    for w in ("0.25", "0.50", "0.75", "1.00"):                # one run per width: one colour each
        run_acc = EventAccumulator(os.path.join(root, f"w{w}"))
        run_acc.Reload()
        assert set(run_acc.Tags()["scalars"]) == {"val/ppl", "val/loss"}
        ppl, loss = ([e.value for e in run_acc.Scalars(t)] for t in ("val/ppl", "val/loss"))
        assert len(ppl) == 2 and loss == pytest.approx([math.log(p) for p in ppl], rel=1e-5)
        val[w] = ppl
    assert len({tuple(v) for v in val.values()}) == 4          # each run holds its own width's curve
    for tag in ("train/loss_full", "train/loss_width", "train/width", "train/lr", "train/grad_norm",
                "train/tokens_per_s", "routing/full/layer0/load_cv", "routing/width/layer0/entropy",
                "routing/width/layer0/aux_loss", "routing/full/layer0/z_loss", "routing/full/layer0/dropped_frac"):
        assert tag in tags, tag
    from tensorboard.plugins.custom_scalar import layout_pb2
    layout = layout_pb2.Layout.FromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts["validation perplexity by width"] == ["^val/ppl$"]
    assert charts["validation loss by width"] == ["^val/loss$"]


def test_each_iteration_trains_the_width_sample_width_draws_for_it(tmp_path, corpus, world, monkeypatch):
    """The widths reaching the MoE layer in training forwards, seen by a hook: per iteration
    it, full width then sample_width(grid, it, seed) for each of its micro-batches."""
    from mose_ds import engine
    from mose_ds.widths import sample_width
    seen, build = [], engine.build_model

    def build_and_watch(cfg):
        model = build(cfg)
        model.moe_layers()[0].register_forward_pre_hook(
            lambda layer, args: seen.append(args[1].width) if layer.training else None)
        return model

    monkeypatch.setattr(engine, "build_model", build_and_watch)
    cfg, summary = run(tmp_path, corpus, "widths", train={"max_iters": 5, "grad_accum_steps": 2, "seed": 7},
                       mose={"eval_widths": [1.0]}, checkpoint={"save_final": False})
    drawn = [sample_width(cfg.mose.grid, it, 7) for it in range(5)]
    assert len(set(drawn)) > 2                                   # the draws do change with it
    assert seen == [w for d in drawn for w in (1.0, d, 1.0, d)]
    assert [h["width"] for h in summary["history"]] == drawn

# ----------------------------------------------------------------- bad input through the CLI

def cli(tmp_path, raw, *overrides):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return subprocess.run([sys.executable, "-m", "mose_ds.train", "--config", str(path), *overrides],
                          capture_output=True, text=True, cwd=ROOT, env=clean_env())


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [l for l in result.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_global_batch_size_sets_the_accumulation_and_the_data_consumed(tmp_path, corpus, capsys):
    cfg = tiny_config(data={"path": corpus}, logging={"out_dir": str(tmp_path)},
                      train={"max_iters": 2, "micro_batch_size": 4, "grad_accum_steps": None, "global_batch_size": 12})
    summary = train(cfg)
    assert "batch: micro-batch 4 x accumulation 3 x data-parallel 1 = global batch 12 sequences" in capsys.readouterr().out
    assert summary["engine"].gradient_accumulation_steps() == 3
    assert summary["state"].data_position == 2 * 12


def test_cli_bad_inputs_give_one_line_errors_and_touch_nothing(tmp_path, corpus):
    out = tmp_path / "run"
    raw = tiny_raw(data={"path": corpus}, logging={"out_dir": str(out), "tensorboard": False},
                   train={"max_iters": 1})
    assert cli(tmp_path, raw).returncode == 0
    snapshot = {p: os.path.getmtime(p) for p in out.rglob("*")}

    assert_one_line_error(cli(tmp_path, raw, "moe.topk=2"), "unknown key 'moe.topk'", "recipe.yaml")
    assert_one_line_error(cli(tmp_path, raw, "moe.top_k=5"), "moe.top_k=5 exceeds moe.num_experts=4")
    assert_one_line_error(cli(tmp_path, raw, "mose.width_min=0"), "mose.width_min", "outside (0, 1]")
    assert_one_line_error(cli(tmp_path, raw, "moe.capacity_factor=-1"), "moe.capacity_factor=-1.0 must be positive")
    assert_one_line_error(cli(tmp_path, raw, "moe.expert_parallel_size=3"), "not divisible by moe.expert_parallel_size=3")
    assert_one_line_error(cli(tmp_path, raw, f"data.path={tmp_path / 'nodata'}"), "nodata")
    assert_one_line_error(cli(tmp_path, raw, "model.num_layers=4", "train.max_iters=2"), "different architecture",
                          "num_layers")
    assert_one_line_error(cli(tmp_path, raw, "moe.expert_parallel_size=2"), "expert_parallel_size=2",
                          "world size 1")
    assert_one_line_error(cli(tmp_path, raw, f"checkpoint.resume={tmp_path / 'nockpt'}"), "nockpt")
    assert_one_line_error(cli(tmp_path, raw, "train.global_batch_size=7"), "train.global_batch_size=7 but train."
                          "micro_batch_size=4 x train.grad_accum_steps=1 x 1 data-parallel rank(s) = 4")
    # a damaged checkpoint file
    model_states = next(out.rglob("mp_rank_00_model_states.pt"))
    model_states.write_bytes(b"not a checkpoint")
    snapshot[model_states] = os.path.getmtime(model_states)
    assert_one_line_error(cli(tmp_path, raw, "train.max_iters=2"), "no complete checkpoint", "failed verification")
    assert {p: os.path.getmtime(p) for p in out.rglob("*")} == snapshot


def test_bf16_gradients_cross_ranks_in_fp32_unless_asked(world):
    """DeepSpeed's own default reduces bf16 runs' gradients in bf16, though they accumulate in fp32."""
    from mose_ds.engine import build_model, create_engine
    cfg = tiny_config(engine={"precision": "bf16", "zero_stage": 1})
    engine = create_engine(cfg, build_model(cfg))
    assert engine.communication_data_type == torch.float32
    chosen = tiny_config(engine={"precision": "bf16", "zero_stage": 2, "grad_comm_dtype": "bf16"})
    engine = create_engine(chosen, build_model(chosen))
    assert engine.communication_data_type == torch.bfloat16 and engine.zero_overlap_comm()


# ------------------------------------------- one step on the engine: two-pass gradient, bf16 router

def branch_gradients(world, cfg, x, y, policy):
    """Gradients of LM + aux loss at one width, on a freshly built (identically initialised)
    model: cross-entropy written out here, not the training code's."""
    model = world.build_model(cfg)
    logits, routing = model(x, policy)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()) + sum(r.aux_loss for r in routing)
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


def record_stepped_gradients(engine) -> dict:
    """Make the engine's optimizer (ZeRO-0, fp32: it steps the model's own parameters) record
    the gradients it steps with, by parameter name, into the returned dict."""
    from mose_ds.engine import base_optimizer
    names = {id(p): name for name, p in engine.module.named_parameters()}
    optimizer, seen = base_optimizer(engine), {}
    step = optimizer.step

    def recording_step(closure=None):
        seen.update({names[id(p)]: p.grad.clone() for g in optimizer.param_groups for p in g["params"]})
        return step(closure)

    optimizer.step = recording_step
    return seen


def test_training_step_gradient_is_the_mean_of_the_two_branch_gradients(world):
    """paper eq. 6 through the real step (`train_micro_batch` on the engine), joint and
    sequential: the gradient the optimizer steps with is the mean of the full-width and
    width-w gradients, each computed on its own copy of the model."""
    from mose_ds.train import train_micro_batch
    cfg = tiny_config(optim={"grad_clip": 0.0})          # clipping would rescale the gradient
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 4096, (cfg.train.micro_batch_size, 33), generator=gen)
    x, y = tokens[:, :-1], tokens[:, 1:]
    full = branch_gradients(world, cfg, x, y, UniformPolicy(1.0))
    narrow = branch_gradients(world, cfg, x, y, UniformPolicy(0.4))
    # the branches differ, so a missing branch or a sum in place of the mean shows
    assert not torch.allclose(full["wte.weight"], narrow["wte.weight"], rtol=0.05)

    for two_pass in ("joint", "sequential"):
        cfg = tiny_config(mose={"two_pass": two_pass}, optim={"grad_clip": 0.0})
        engine = world.create_engine(cfg, world.build_model(cfg))
        stepped = record_stepped_gradients(engine)
        _, skipped = train_micro_batch(engine, cfg, x, y, 0.4)
        assert skipped is False and stepped.keys() == full.keys(), two_pass
        for name, grad in stepped.items():
            want = (full[name] + narrow[name]) / 2
            torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()),
                                       msg=f"{two_pass}: {name}")


def test_router_computes_in_fp32_under_bf16(world):
    """In a bf16 engine the router's logits are the fp32 product of its upcast input and
    weight (not a bf16 product), and its weight, stored in bf16 inside ZeRO's flat buffer,
    has an fp32 master copy in the optimizer."""
    from mose_ds.engine import build_model, create_engine
    cfg = tiny_config(engine={"precision": "bf16", "zero_stage": 2})
    engine = create_engine(cfg, build_model(cfg))
    router = engine.module.moe_layers()[0].router
    seen = []
    router.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    engine(torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(0)), UniformPolicy(0.5))
    ((x, logits),) = seen
    assert x.dtype == torch.bfloat16 and logits.dtype == torch.float32
    assert torch.equal(logits, torch.nn.functional.linear(x.float(), router.weight.float()))
    assert not torch.equal(logits, torch.nn.functional.linear(x, router.weight).float())   # bf16 rounding shows
    optimizer = engine.optimizer                 # ZeRO-2's: bf16 parameters, fp32 partitions
    assert router.weight.dtype == torch.bfloat16
    assert any(p is router.weight for group in optimizer.bit16_groups for p in group)
    assert {t.dtype for t in optimizer.single_partition_of_fp32_groups} == {torch.float32}
