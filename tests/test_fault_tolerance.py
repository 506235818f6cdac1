"""Launchers, crash-safe checkpoints, non-finite losses, dead ranks and activation checkpointing."""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml

from conftest import ROOT, clean_env, free_port, read_universal, tiny_config, tiny_raw

from mose_ds import checkpoint


def write_recipe(tmp_path, raw) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def tensors(obj, prefix=""):
    """Every tensor inside a nested checkpoint object, by path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return {}
    out = {}
    for key, value in items:
        out.update(tensors(value, f"{prefix}/{key}"))
    return out


def checkpoint_tensors(folder) -> dict:
    """All tensors of a checkpoint's model, expert and optimizer files (not RNG states)."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".pt") and not name.startswith("rng_state"):
            out.update(tensors(torch.load(os.path.join(folder, name), weights_only=False), name))
    return out


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------- launchers

def test_two_rank_launch_and_a_killed_rank_ends_the_job(tmp_path, corpus):
    """A real launch through launchers/train.sh on 2 CPU ranks (EP=2, ZeRO-2); then a job whose
    rank 1 is killed with SIGKILL ends within the bound with a message naming rank 1."""
    raw = tiny_raw(data={"path": corpus}, logging={"out_dir": str(tmp_path / "run")},
                   moe={"expert_parallel_size": 2}, engine={"zero_stage": 2},
                   train={"max_iters": 3, "log_interval": 1}, checkpoint={"interval": 3})
    recipe = write_recipe(tmp_path, raw)
    cmd = ["bash", os.path.join(ROOT, "launchers", "train.sh"), "--nproc", "2", "--master-port", str(free_port()),
           "--", "--config", recipe]
    done = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 rank(s)" in done.stdout and "EP=2" in done.stdout
    assert not checkpoint.verify(str(tmp_path / "run" / "checkpoints" / "iter_00000003"))

    long = cmd[:6] + ["--", "--config", recipe, "train.max_iters=100000", f"logging.out_dir={tmp_path / 'long'}",
                      "engine.comm_timeout_s=30"]
    long[5] = str(free_port())
    job = subprocess.Popen(long, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    for line in job.stdout:
        if line.startswith("iter 5/"):
            break
    victim = rank_process(job.pid, rank=1)
    killed = time.time()
    os.kill(victim, signal.SIGKILL)
    job.wait(timeout=120)
    elapsed = time.time() - killed
    err = job.stderr.read()
    assert job.returncode != 0
    assert elapsed < 30, elapsed          # the bound we state: well under engine.comm_timeout_s
    assert f"error: rank 1 (local rank 1 on " in err and f"pid {victim}) was killed by SIGKILL" in err


def rank_process(root_pid: int, rank: int) -> int:
    """The pid of the training process of `rank` among the descendants of `root_pid`."""
    import psutil
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            if "mose_ds.train" in proc.cmdline() and "mose_ds.guard" not in proc.cmdline() \
                    and proc.environ().get("RANK") == str(rank):
                return proc.pid
        except psutil.Error:
            continue
    raise AssertionError(f"no training process of rank {rank}")


# --------------------------------------------------------------------------- checkpoints

def test_truncated_checkpoint_is_detected_and_skipped(world, corpus, tmp_path, capsys):
    from mose_ds.train import train
    cfg = tiny_config(data={"path": corpus}, logging={"out_dir": str(tmp_path)},
                      train={"max_iters": 6}, checkpoint={"interval": 2, "keep_last": 2})
    train(cfg, quiet=True)
    root = cfg.checkpoint_dir
    assert checkpoint.tags(root) == ["iter_00000006", "iter_00000004"]     # keep_last=2 pruned iter_2
    newest = os.path.join(root, "iter_00000006")
    victim = os.path.join(newest, "mp_rank_00_model_states.pt")
    size = os.path.getsize(victim)
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    found = checkpoint.find_resume(cfg, report=print)
    assert found == os.path.abspath(os.path.join(root, "iter_00000004"))
    assert f"skipping checkpoint {newest}: {victim} has {size // 2} bytes" in capsys.readouterr().out
    # a flipped byte (same size) is caught by the CRC
    other = os.path.join(root, "iter_00000004", "mp_rank_00_model_states.pt")
    data = bytearray(open(other, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(other, "wb").write(bytes(data))
    assert "fails its CRC-32 check" in checkpoint.problems(os.path.dirname(other))[0]
    with pytest.raises(checkpoint.CheckpointError, match="every iter_\\* folder failed verification"):
        checkpoint.find_resume(cfg, report=lambda *a: None)


def test_the_manifest_lists_every_file_that_any_rank_sees(monkeypatch, tmp_path):
    """On a shared filesystem a node's listing can lag behind the files other nodes just wrote:
    the manifest lists the union of every rank's view, the same on every rank."""
    monkeypatch.setattr(checkpoint.dist, "get_world_size", lambda: 3)
    monkeypatch.setattr(checkpoint.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(checkpoint.os, "listdir", lambda folder: ["mp_rank_00_model_states.pt"])   # this rank: stale
    views = [["mp_rank_00_model_states.pt", "rng_state_rank0.pt"], ["mp_rank_00_model_states.pt"],
             ["layer_0_expert_1_mp_rank_00_model_states.pt", "rng_state_rank2.pt"]]

    def all_gather_object(out, mine):
        assert mine == {1: ["mp_rank_00_model_states.pt"]} and len(out) == 3
        out[:] = [{r: view} for r, view in enumerate(views)]
    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    assert checkpoint._listing(str(tmp_path)) == sorted(set(views[0] + views[2]))


def test_an_error_exit_destroys_the_process_group_before_the_interpreter_ends():
    # a group left alive at interpreter teardown can abort the process (SIGABRT instead of exit 2)
    code = ("import atexit, sys, torch.distributed as d\n"
            "atexit.register(lambda: print('alive at exit:', d.is_initialized()))\n"
            "from mose_ds import engine\n"
            "engine.init_distributed()\n"
            "sys.exit(2)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env=clean_env())
    assert result.returncode == 2, result.stderr[-2000:]
    assert "alive at exit: False" in result.stdout


@pytest.mark.chaos      # tests/test_cluster.py runs the same chaos on two ranks; both: `launchers/test.sh -m chaos`
def test_kill9_at_random_moments_then_resume_gives_the_uninterrupted_weights(tmp_path, corpus):
    """CPU, fp32: ten or more SIGKILLs at random moments (some while a checkpoint is being
    written), each followed by a resume, end with the uninterrupted run's weights and Adam state."""
    max_iters = 24
    raw = tiny_raw(data={"path": corpus}, engine={"zero_stage": 1},
                   train={"max_iters": max_iters, "log_interval": 1, "grad_accum_steps": 2},
                   checkpoint={"interval": 2, "keep_last": 3})
    recipe = write_recipe(tmp_path, raw)

    log = tmp_path / "stderr.log"

    def start(out):
        with open(log, "a") as err:
            return subprocess.Popen([sys.executable, "-m", "mose_ds.train", "--config", recipe,
                                     f"logging.out_dir={out}"], cwd=ROOT, env=clean_env(), text=True,
                                    stdout=subprocess.PIPE, stderr=err)

    reference = start(tmp_path / "reference")
    reference.communicate(timeout=300)
    assert reference.returncode == 0

    out = tmp_path / "killed"
    ckpts = out / "checkpoints"
    rng = random.Random(0)
    kills = partial_saves = 0
    while True:
        job = start(out)
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(l) for l in job.stdout], daemon=True).start()
        during_save = kills % 3 == 0
        target = rng.randint(1, max_iters)
        before = set(checkpoint.tags(str(ckpts)))
        while job.poll() is None and kills < 12:
            if during_save:       # a tag folder being written: it exists, its manifest not yet
                new = [t for t in checkpoint.tags(str(ckpts)) if t not in before
                       and not os.path.exists(ckpts / t / checkpoint.MANIFEST)]
                if new:
                    job.kill()
                    break
                time.sleep(0.0005)
                continue
            try:
                line = lines.get(timeout=0.05)
            except queue.Empty:
                continue
            if line.startswith("iter ") and int(line.split()[1].split("/")[0]) >= target:
                time.sleep(rng.uniform(0, 0.05))
                job.kill()
                break
        code = job.wait(timeout=300)
        if code == 0:
            break
        assert code == -signal.SIGKILL, f"the job failed by itself (exit {code}): {log.read_text()[-2000:]}"
        kills += 1
        newest = checkpoint.tags(str(ckpts))[:1]
        partial_saves += bool(newest) and not os.path.exists(ckpts / newest[0] / checkpoint.MANIFEST)
    print(f"{kills} kills, {partial_saves} during a checkpoint write")
    assert kills >= 10 and partial_saves >= 1, (kills, partial_saves)
    final = f"iter_{max_iters:08d}"
    assert_same_tensors(checkpoint_tensors(ckpts / final),
                        checkpoint_tensors(tmp_path / "reference" / "checkpoints" / final))


# --------------------------------------------------------------------------- non-finite losses

@pytest.fixture
def inject_nan(monkeypatch):
    """Make the first branch loss of the given (1-based) iterations NaN."""
    from mose_ds import train as train_mod
    original, calls, bad = train_mod.branch_loss, [0], set()

    def branch_loss(engine, x, y, policy):
        loss, lm, routing = original(engine, x, y, policy)
        calls[0] += 1
        if calls[0] % 2 == 1 and (calls[0] + 1) // 2 in bad:     # two branches per iteration
            loss = loss + float("nan")
        return loss, lm, routing
    monkeypatch.setattr(train_mod, "branch_loss", branch_loss)
    return bad


@pytest.mark.parametrize("zero", [0, 2])
def test_a_nan_loss_skips_its_update(world, corpus, tmp_path, inject_nan, zero):
    from mose_ds.train import train
    inject_nan.add(3)
    cfg = tiny_config(data={"path": corpus}, logging={"out_dir": str(tmp_path)}, engine={"zero_stage": zero},
                      train={"max_iters": 4}, checkpoint={"interval": 1})
    history = train(cfg, quiet=True)["history"]
    assert [h["skipped"] for h in history] == [False, False, True, False]
    folder = lambda i: os.path.join(cfg.checkpoint_dir, f"iter_{i:08d}")      # noqa: E731
    after_2, after_3 = checkpoint_tensors(folder(2)), checkpoint_tensors(folder(3))
    for key in after_2:
        if "optimizer_state_dict" in key or "module" in key:   # weights, fp32 master, Adam moments
            assert torch.equal(after_2[key], after_3[key]), key
    module = [k for k in after_2 if "/module/" in k]
    assert module and any(not torch.equal(after_3[k], checkpoint_tensors(folder(4))[k]) for k in module)


def test_a_run_of_nan_losses_stops_training_with_a_good_checkpoint(world, corpus, tmp_path, inject_nan):
    from mose_ds.train import TrainingHalted, train
    inject_nan.update(range(3, 100))
    cfg = tiny_config(data={"path": corpus}, logging={"out_dir": str(tmp_path)},
                      train={"max_iters": 8, "max_nonfinite_in_a_row": 2}, checkpoint={"interval": 2})
    with pytest.raises(TrainingHalted, match=r"not finite in 2 iterations in a row \(3\.\.4") as halted:
        train(cfg, quiet=True)
    saved = os.path.join(cfg.checkpoint_dir, "iter_00000004")
    assert f"weights are those after iteration 2 and were saved to {saved}" in str(halted.value)
    assert not checkpoint.verify(saved)
    after_2 = checkpoint_tensors(os.path.join(cfg.checkpoint_dir, "iter_00000002"))
    after_4 = checkpoint_tensors(saved)
    assert all(torch.equal(after_2[k], after_4[k]) for k in after_2 if "/module/" in k)


# --------------------------------------------------------------------------- activation checkpointing

@pytest.mark.parametrize("two_pass", [False, True])
def test_activation_checkpointing_leaves_gradients_unchanged(world, two_pass):
    from mose_ds import engine as engine_lib
    from mose_ds.model import lm_loss
    from mose_ds.widths import FULL_WIDTH, UniformPolicy
    tokens = torch.randint(0, 4096, (4, 33), generator=torch.Generator().manual_seed(1))
    grads = []
    for recompute in (False, True):
        cfg = tiny_config(model={"num_layers": 4}, train={"activation_checkpointing": recompute})
        model = engine_lib.build_model(cfg).train()
        torch.manual_seed(5)
        policies = [FULL_WIDTH, UniformPolicy(0.4)] if two_pass else [FULL_WIDTH]
        loss = 0
        for policy in policies:
            logits, routing = model(tokens[:, :-1], policy)
            loss = loss + lm_loss(logits, tokens[:, 1:]) + sum(r.aux_loss for r in routing)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


# --------------------------------------------------------------------------- another cluster shape

def test_resume_across_ep2_ep1_ep2_keeps_weights_and_adam_state(tmp_path, corpus):
    from conftest import load_tool
    convert = load_tool("convert_checkpoint").main
    raw = tiny_raw(data={"path": corpus}, moe={"expert_parallel_size": 2}, engine={"zero_stage": 2},
                   train={"max_iters": 4}, checkpoint={"interval": 2})
    recipe = write_recipe(tmp_path, raw)

    def run(nproc, out, *overrides):
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                    f"--master_port={free_port()}"] if nproc > 1 else [sys.executable]
        done = subprocess.run(launcher + ["-m", "mose_ds.train", "--config", recipe, f"logging.out_dir={out}",
                                          *overrides], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    run(2, tmp_path / "a")                                                         # EP=2 on 2 ranks
    tag = "iter_00000004"
    assert convert(["--ckpt", str(tmp_path / "a"), "--out", str(tmp_path / "ua")]) == 0
    ua = read_universal(tmp_path / "ua")
    native = checkpoint_tensors(tmp_path / "a" / "checkpoints" / tag)
    experts = {k.split("/")[-1]: v for k, v in native.items() if k.startswith("layer_")}
    for name, value in experts.items():
        assert torch.equal(ua[f"weights/{name}"], value), name

    # the same checkpoint on 1 rank (EP=1): re-saved at once in that layout, then trained on
    done = run(1, tmp_path / "b", f"checkpoint.resume={tmp_path / 'ua'}", "moe.expert_parallel_size=1",
               "train.max_iters=6")
    assert "re-laid out iter_00000004 for 1 rank(s), EP=1" in done.stdout
    assert convert(["--ckpt", str(tmp_path / "b" / "checkpoints" / tag), "--out", str(tmp_path / "ub")]) == 0
    assert_same_tensors(read_universal(tmp_path / "ub"), ua)
    assert os.path.isdir(tmp_path / "b" / "checkpoints" / "iter_00000006")

    # and back to EP=2 on 2 ranks
    run(2, tmp_path / "c", f"checkpoint.resume={tmp_path / 'ub'}")
    assert convert(["--ckpt", str(tmp_path / "c" / "checkpoints" / tag), "--out", str(tmp_path / "uc")]) == 0
    assert_same_tensors(read_universal(tmp_path / "uc"), ua)


def test_resuming_another_layout_without_conversion_is_refused(world, corpus, tmp_path, capsys):
    from conftest import load_tool
    from mose_ds.train import train
    cfg = tiny_config(data={"path": corpus}, logging={"out_dir": str(tmp_path / "run")}, train={"max_iters": 2})
    train(cfg, quiet=True)
    folder = os.path.join(cfg.checkpoint_dir, "iter_00000002")
    with pytest.raises(checkpoint.CheckpointError, match="written by 1 rank.* this job has 2 .*convert.checkpoint"):
        checkpoint.check_layout(folder, 2, 1)
    convert = load_tool("convert_checkpoint").main
    for bad in (tmp_path / "nothing", tmp_path):
        assert convert(["--ckpt", str(bad), "--out", str(tmp_path / "u")]) == 2
        assert not os.path.exists(tmp_path / "u") and not os.path.exists(tmp_path / "u.partial")
        assert capsys.readouterr().err.count("error:") == 1
    # ZeRO-0 checkpoints have no ZeRO shards: weights only, said loudly
    assert convert(["--ckpt", folder, "--out", str(tmp_path / "u")]) == 0
    assert "weights only" in capsys.readouterr().out
