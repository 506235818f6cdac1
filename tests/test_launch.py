"""The launcher (mose_ds/launch.py): hostfile launches over DeepSpeed's pdsh runner and the
environment each node receives, --no-ssh launches, SLURM allocations and node lists, and the
trainer refusing a bare `srun`."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import types

import pytest

from conftest import ROOT, clean_env

from mose_ds import launch

VENV_BIN = os.path.dirname(sys.executable)
CUDA_LIKE = ("MLFLOW", "PYTHON", "MV2", "UCX", "NCCL")      # DeepSpeed's prefixes on a CUDA machine
CPU_LIKE = ("MLFLOW", "PYTHON", "MV2", "UCX")


def write_script(folder, name: str, body: str) -> str:
    """An executable `name` in `folder` (a fake command put first on PATH)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(body)
    os.chmod(path, 0o755)
    return path


# Records how it was started (argv, DS_ENV_FILE and that file's text) to $FAKE_RECORD.
FAKE_DEEPSPEED = f"""#!{sys.executable}
import json, os, sys
env_file = os.environ.get("DS_ENV_FILE")
record = {{"argv": sys.argv[1:], "DS_ENV_FILE": env_file,
          "env_file_text": open(env_file).read() if env_file else None}}
json.dump(record, open(os.environ["FAKE_RECORD"], "w"))
"""


def launch_env(tmp_path, **extra) -> dict:
    """A small, ordered environment for a launcher subprocess: fake commands first on PATH,
    a home of its own."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {"PATH": f"{tmp_path / 'bin'}:{VENV_BIN}:/usr/bin:/bin", "HOME": str(home),
            "FAKE_RECORD": str(tmp_path / "record.json"), "MOSE_DS_DEVICE": "cpu", **extra}


def node_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("[node ")]


def hostfile(tmp_path, text="node-a slots=8\nnode-b slots=8\n") -> str:
    path = tmp_path / "hostfile"
    path.write_text(text)
    return str(path)


# --------------------------------------------------------------------------- hostfile over pdsh

def test_dry_run_for_a_four_node_hostfile(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(launch, "ds_exported_prefixes", lambda: CUDA_LIKE)
    path = hostfile(tmp_path, "# four nodes\nnode-a slots=8\nnode-b slots=8\n\nnode-c slots=8  # spare\nnode-d slots=8\n")
    env = {"NCCL_IB_HCA": "mlx5", "HOME": str(tmp_path)}
    assert launch.main(["--hostfile", path, "--master-port", "6000", "--dry-run", "--",
                        "--config", "r.yaml", "train.max_iters=5"], env=env) == 0
    out = capsys.readouterr().out
    lines, nodes = out.splitlines(), node_lines(out)
    assert len(nodes) == 4 and "4 node(s), 32 rank(s), master node-a:6000" in lines[0]
    info = launch.world_info([(h, 8) for h in ("node-a", "node-b", "node-c", "node-d")])
    for i, (line, host) in enumerate(zip(nodes, "abcd")):
        assert line == (f"[node {i}: node-{host}, 8 rank(s)] export NCCL_IB_HCA=mlx5; export PYTHONPATH={tmp_path}; "
                        f"cd {tmp_path}; {sys.executable} -u -m deepspeed.launcher.launch --world_info={info} "
                        f"--node_rank={i} --master_addr=node-a --master_port=6000 --module --no_local_rank "
                        f"--enable_each_rank_log=None mose_ds.guard mose_ds.train --config r.yaml train.max_iters=5 "
                        f"engine.device=cuda")
    env_file = f"{tmp_path}/runs/launch/deepspeed_env."
    assert f"not written on a dry run: {env_file}" in out and not (tmp_path / "runs").exists()
    assert lines[-1].startswith(f"[started by] env DS_ENV_FILE={env_file}")
    assert f" deepspeed --hostfile={path} --force_multi --master_addr=node-a --master_port=6000 --no_local_rank " \
        in lines[-1]


@pytest.mark.parametrize("prefixes, exports", [
    (CUDA_LIKE, 'export NCCL_IB_HCA=mlx5; export PYTHONPATH={cwd}:/opt/lib; export NCCL_SOCKET_IFNAME="^lo,docker"; '
                'export UCX_TLS=rc; export OMP_NUM_THREADS=4; export GLOO_SOCKET_IFNAME=eth0; export NCCL_DEBUG=INFO; '
                'export MY_FLAG=1; '),
    (CPU_LIKE, 'export PYTHONPATH={cwd}:/opt/lib; export UCX_TLS=rc; export NCCL_IB_HCA=mlx5; '
               'export NCCL_SOCKET_IFNAME="^lo,docker"; export OMP_NUM_THREADS=4; export GLOO_SOCKET_IFNAME=eth0; '
               'export NCCL_DEBUG=INFO; export MY_FLAG=1; '),
], ids=["cuda", "cpu"])
def test_dry_run_prints_what_each_node_receives(tmp_path, capsys, monkeypatch, prefixes, exports):
    """DeepSpeed's own exports (in environment order, PYTHONPATH with the working directory in
    front) then the env file's lines: ours, then those of the user's ~/.deepspeed_env."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(launch, "ds_exported_prefixes", lambda: prefixes)
    (tmp_path / ".deepspeed_env").write_text("NCCL_DEBUG=INFO\nMY_FLAG=1\n")
    env = {"HOME": str(tmp_path), "NCCL_IB_HCA": "mlx5", "PYTHONPATH": "/opt/lib", "NCCL_SOCKET_IFNAME": "^lo,docker",
           "UCX_TLS": "rc", "OMP_NUM_THREADS": "4", "SECRET_TOKEN": "x", "GLOO_SOCKET_IFNAME": "eth0"}
    assert launch.main(["--hostfile", hostfile(tmp_path), "--dry-run", "--", "--config", "r.yaml"], env=env) == 0
    out = capsys.readouterr().out
    for i, line in enumerate(node_lines(out)):
        assert line.startswith(f"[node {i}: node-{'ab'[i]}, 8 rank(s)] {exports.format(cwd=tmp_path)}cd {tmp_path}; ")
    assert "SECRET_TOKEN" not in out
    added = [name for name in env if name.startswith(launch.FORWARD_PREFIXES) and not name.startswith(prefixes)]
    assert f"the env file adds {', '.join(added + ['NCCL_DEBUG', 'MY_FLAG'])}\n" in out


def test_hostfile_launch_writes_the_env_file_and_points_deepspeed_at_it(tmp_path):
    """The real launch path with a fake `deepspeed`: the env file is new, under the run's
    runs/launch/, carries the forwarded variables and the user's own env files' lines, and
    DeepSpeed is pointed at it by DS_ENV_FILE; the user's files are left as they were."""
    write_script(tmp_path / "bin", "deepspeed", FAKE_DEEPSPEED)
    work = tmp_path / "work"
    work.mkdir()
    (work / ".deepspeed_env").write_text("LOCAL_FLAG=2\n")
    env = launch_env(tmp_path, DS_ACCELERATOR="cpu", NCCL_IB_HCA="mlx5", OMP_NUM_THREADS="4", FI_PROVIDER="efa",
                     UNRELATED="1")
    (tmp_path / "home" / ".deepspeed_env").write_text("MY_FLAG=1\n")
    path = hostfile(tmp_path)
    done = subprocess.run([sys.executable, "-m", "mose_ds.launch", "--hostfile", path, "--master-port", "6001", "--",
                           "--config", "r.yaml"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "record.json").read_text())
    env_file = record["DS_ENV_FILE"]
    assert os.path.isabs(env_file) and os.path.dirname(env_file) == str(work / "runs" / "launch")
    assert record["env_file_text"] == "NCCL_IB_HCA=mlx5\nOMP_NUM_THREADS=4\nFI_PROVIDER=efa\nMY_FLAG=1\nLOCAL_FLAG=2\n"
    assert stat.S_IMODE(os.stat(env_file).st_mode) == 0o600
    assert f"(DS_ENV_FILE) -> {env_file}" in done.stdout
    assert record["argv"] == [f"--hostfile={path}", "--force_multi", "--master_addr=node-a", "--master_port=6001",
                              "--no_local_rank", "--module", "mose_ds.guard", "mose_ds.train", "--config", "r.yaml",
                              "engine.device=cuda"]
    assert (tmp_path / "home" / ".deepspeed_env").read_text() == "MY_FLAG=1\n"
    assert (work / ".deepspeed_env").read_text() == "LOCAL_FLAG=2\n"


@pytest.mark.parametrize("hosts", ["node-a slots=8\nnode-b slots=8\n", "node-a slots=8\n"], ids=["2 nodes", "1 node"])
def test_deepspeed_runner_sends_each_node_what_the_dry_run_prints(tmp_path, monkeypatch, hosts):
    """DeepSpeed's real runner, started as the launcher starts it (fake `ssh` and `pdsh` on
    PATH): the command pdsh gets for node i (pdsh's %n being i) is the dry run's line for node i,
    also for a one-node hostfile (which the runner would otherwise start here, not on that node)."""
    write_script(tmp_path / "bin", "ssh", "#!/bin/sh\nexit 0\n")
    write_script(tmp_path / "bin", "pdsh", f"#!{sys.executable}\nimport json, os, sys\n"
                                           "json.dump(sys.argv[1:], open(os.environ['FAKE_RECORD'], 'w'))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(launch, "ds_exported_prefixes", lambda: CPU_LIKE)
    env = launch_env(tmp_path, PYTHONPATH="/opt/lib", NCCL_SOCKET_IFNAME="^lo,docker", OMP_NUM_THREADS="4",
                     UCX_TLS="rc", DS_ACCELERATOR="cpu")
    (tmp_path / "home" / ".deepspeed_env").write_text("MY_FLAG=1\n")
    args = launch.parse_args(["--hostfile", hostfile(tmp_path, hosts), "--", "--config", "r.yaml", "tag=two words"])
    job = launch.plan(args, env)
    launch.write_env_file(job.env_file, job.env_lines)
    done = subprocess.run(job.runner, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    pdsh = json.loads((tmp_path / "record.json").read_text())
    assert pdsh[:5] == ["-S", "-f", "1024", "-w", ",".join(host for host, _ in job.hosts)]
    lines = job.nodes
    assert len(lines) == len(job.hosts) and "export MY_FLAG=1; " in lines[0] and 'export NCCL_SOCKET_IFNAME="^lo,docker"; ' in lines[0]
    for i, line in enumerate(lines):
        sent = " ".join(pdsh[5:]).replace("%n", str(i))
        assert " ".join(sent.split()) == line.split("] ", 1)[1]


@pytest.mark.parametrize("value, bad", [('a"b', '"'), ("$HOME/x", "$"), ("a`b`", "`"), ("a\\b", "\\"),
                                        ("a\nb", "\n"), ("/tmp/nccl.%h.log", "%h")])
def test_values_the_runner_cannot_carry_are_refused(tmp_path, capsys, monkeypatch, value, bad):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(launch, "ds_exported_prefixes", lambda: CPU_LIKE)
    for name in ("NCCL_DEBUG_FILE", "PYTHONSTARTUP"):           # one written to our file, one DeepSpeed's own
        for dry in (["--dry-run"], []):
            assert launch.main(["--hostfile", hostfile(tmp_path), *dry, "--", "--config", "r.yaml"],
                               env={"HOME": str(tmp_path), name: value}) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith(f"error: environment variable {name}: its value contains {bad!r}")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("content, fragment", [("node1 slots=x\n", "hostfile:1"), ("", "no hosts"),
                                               ("a slots=2\na slots=2\n", "listed twice")])
def test_bad_hostfile_is_one_line_error(tmp_path, capsys, content, fragment):
    path = hostfile(tmp_path, content)
    assert launch.main(["--hostfile", path, "--dry-run", "--", "--config", "r.yaml"], env={}) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1
    assert launch.main(["--slurm", "--dry-run", "--", "--config", "r.yaml"], env={}) == 2
    assert "SLURM_JOB_NODELIST" in capsys.readouterr().err


# --------------------------------------------------------------------------- --no-ssh

NO_SSH = ["--node-rank", "1", "--no-ssh", "--master-addr", "127.0.0.1", "--master-port", "6002"]


def test_no_ssh_dry_run_prints_this_nodes_command(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = hostfile(tmp_path, "node0 slots=2\nnode1 slots=2\n")
    assert launch.main(["--hostfile", path, *NO_SSH, "--dry-run", "--", "--config", "r.yaml", "engine.device=cpu"],
                       env={"NCCL_IB_HCA": "mlx5"}) == 0
    out = capsys.readouterr().out
    info = launch.world_info([("node0", 2), ("node1", 2)])
    assert node_lines(out) == [f"[node 1: node1, 2 rank(s)] {sys.executable} -u -m deepspeed.launcher.launch "
                               f"--world_info={info} --node_rank=1 --master_addr=127.0.0.1 --master_port=6002 "
                               "--no_local_rank --module mose_ds.guard mose_ds.train --config r.yaml engine.device=cpu"]
    assert f"[started by] deepspeed --hostfile={path} --no_ssh --node_rank=1 --master_addr=127.0.0.1 " \
           "--master_port=6002 --no_local_rank --module mose_ds.guard mose_ds.train --config r.yaml engine.device=cpu" in out
    assert "nothing is forwarded" in out and "every node must reach 127.0.0.1:6002" in out
    assert "NCCL_IB_HCA" not in out and "DS_ENV_FILE" not in out and not (tmp_path / "runs").exists()


def test_no_ssh_launch_runs_deepspeed_with_no_ssh_and_no_env_file(tmp_path):
    write_script(tmp_path / "bin", "deepspeed", FAKE_DEEPSPEED)
    path = hostfile(tmp_path, "node0 slots=2\nnode1 slots=2\n")
    # (launchers/train.sh puts .venv/bin first on PATH, which would hide the fake)
    done = subprocess.run([sys.executable, "-m", "mose_ds.launch", "--hostfile", path, *NO_SSH, "--",
                           "--config", "r.yaml"], cwd=tmp_path, env=launch_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["argv"] == [f"--hostfile={path}", "--no_ssh", "--node_rank=1", "--master_addr=127.0.0.1",
                              "--master_port=6002", "--no_local_rank", "--module", "mose_ds.guard", "mose_ds.train",
                              "--config", "r.yaml", "engine.device=cuda"]
    assert record["DS_ENV_FILE"] is None


def test_deepspeed_runner_takes_no_ssh_without_ssh(tmp_path, monkeypatch):
    """DeepSpeed's runner, given the command line the launcher builds for --no-ssh, runs the
    per-node launcher of node 1 here and never calls ssh."""
    from deepspeed.launcher import runner
    path = hostfile(tmp_path, "node0 slots=2\nnode1 slots=2\n")
    started = []

    class Done:
        returncode = 0

        def wait(self):
            return 0

    def no_ssh(*a, **k):
        raise AssertionError(f"ssh called: {a}")
    fake = types.SimpleNamespace(Popen=lambda cmd, env=None: started.append(cmd) or Done(), check_call=no_ssh,
                                 check_output=no_ssh, CalledProcessError=subprocess.CalledProcessError)
    monkeypatch.setattr(runner, "subprocess", fake)
    args = launch.parse_args(["--hostfile", path, *NO_SSH, "--", "--config", "r.yaml"])
    job = launch.plan(args, {})
    runner.main(job.runner[1:])
    (cmd,) = started
    ours = launch.node_command(job.hosts, 1, "127.0.0.1", 6002, args.train_args)
    assert cmd[:4] == ours[:4] and set(ours[:ours.index("mose_ds.guard")]) <= set(cmd)
    assert cmd[cmd.index("mose_ds.guard"):] == ours[ours.index("mose_ds.guard"):]


@pytest.mark.parametrize("argv, message", [
    (["--node-rank", "1"], "--node-rank is only for --no-ssh"),
    (["--no-ssh", "--node-rank", "0"], "--no-ssh needs --hostfile"),
    (["--hostfile", "{hostfile}", "--no-ssh"], "--no-ssh needs --node-rank"),
    (["--hostfile", "{hostfile}", "--no-ssh", "--node-rank", "2"], "--node-rank 2: {hostfile} lists 2 node(s), ranks 0..1"),
    (["--hostfile", "{hostfile}", "--no-ssh", "--node-rank", "-1"], "--node-rank -1: {hostfile} lists 2 node(s)"),
])
def test_no_ssh_mistakes_are_one_line_errors(tmp_path, capsys, argv, message):
    path = hostfile(tmp_path)
    argv = [a.format(hostfile=path) for a in argv]
    assert launch.main([*argv, "--dry-run", "--", "--config", "r.yaml"], env={}) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message.format(hostfile=path)}") and err.count("\n") == 1


# --------------------------------------------------------------------------- SLURM

def test_dry_run_for_a_slurm_allocation(tmp_path, capsys):
    env = {"SLURM_JOB_NODELIST": "gpu[009-010,017],dgx1", "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_ID": "77",
           "SLURM_CPUS_PER_TASK": "64"}
    out = tmp_path / "hostfile.77"
    assert launch.main(["--slurm", "--dry-run", "--hostfile-out", str(out), "--", "--config", "r.yaml"], env=env) == 0
    text = capsys.readouterr().out
    assert out.read_text() == "gpu009 slots=4\ngpu010 slots=4\ngpu017 slots=4\ndgx1 slots=4\n"
    assert "4 node(s), 16 rank(s), master gpu009:" in text
    for i, host in enumerate(("gpu009", "gpu010", "gpu017", "dgx1")):
        assert f"[node {i}: {host}, 4 rank(s)] trap \"\" USR1; cd " in text
        assert f"--node_rank={i} --master_addr=gpu009" in text
    started = text.splitlines()[-1]
    assert started.startswith("[started by] srun --nodes=4 --ntasks-per-node=1 --cpus-per-task=64 --cpu-bind=none "
                              "--kill-on-bad-exit=1 bash -c 'trap \"\" USR1; ")
    assert "--node_rank=$SLURM_NODEID" in started
    del env["SLURM_CPUS_PER_TASK"]                  # not set by the allocation: srun's own default
    assert launch.main(["--slurm", "--dry-run", "--hostfile-out", str(out), "--", "--config", "r.yaml"], env=env) == 0
    assert "--ntasks-per-node=1 --cpu-bind=none " in capsys.readouterr().out


def test_slurm_task_shell_ignores_usr1(tmp_path):
    """The per-node line under srun: a SIGUSR1 to its shell leaves it running, and what the
    shell starts inherits the ignored signal."""
    line = (f'trap "" USR1; kill -USR1 $$; {sys.executable} -c '
            '"import signal; print(signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN)"')
    done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == "True"
    assert launch.plan(launch.parse_args(["--slurm", "--nproc", "1", "--", "--config", "r.yaml"]),
                       {"SLURM_JOB_NODELIST": "n1"}).runner[-1].startswith('trap "" USR1; ')


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[01-02]-ib", ["gpu01-ib", "gpu02-ib"]),
    ("r[1-2]-n[01-04]", ["r1-n01", "r1-n02", "r1-n03", "r1-n04", "r2-n01", "r2-n02", "r2-n03", "r2-n04"]),
    ("node[001-003,010]", ["node001", "node002", "node003", "node010"]),
    ("a100-[1-3]", ["a100-1", "a100-2", "a100-3"]),
    ("dgx-a[1,3]-b[2-3],login1", ["dgx-a1-b2", "dgx-a1-b3", "dgx-a3-b2", "dgx-a3-b3", "login1"]),
    ("nid[00008-00010]", ["nid00008", "nid00009", "nid00010"]),
    ("hostA,hostB", ["hostA", "hostB"]),
    ("cn[9-11]", ["cn9", "cn10", "cn11"]),
    ("cn[09-11]", ["cn09", "cn10", "cn11"]),
    ("gpu[1,3-4],cpu[7],gpu9", ["gpu1", "gpu3", "gpu4", "cpu7", "gpu9"]),      # commas inside vs between
    ("single", ["single"]),
    ("x[3]y[5]", ["x3y5"]),
])
def test_node_lists_expand_as_slurm_does(nodelist, hosts):
    assert launch.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist, why", [("gpu[01-", "'[' without ']'"), ("gpu[a-b]", "cannot read range 'a-b'"),
                                           ("gpu[3-1]", "range '3-1' runs backwards"), ("gpu01]", "']' without '['"),
                                           ("gpu[1-[2]]", "'[' inside a bracket group"), ("a,,b", "empty host name"),
                                           ("gpu[]", "cannot read range ''")])
def test_bad_node_lists_are_one_line_errors(nodelist, why):
    with pytest.raises(launch.LaunchError) as error:
        launch.expand_nodelist(nodelist)
    assert str(error.value) == f"SLURM node list {nodelist!r}: {why}"


def test_scontrol_expands_the_node_list_when_on_path(tmp_path):
    record = tmp_path / "scontrol_args"
    write_script(tmp_path / "bin", "scontrol",
                 f'#!/bin/sh\necho "$@" > {record}\n[ "$3" = "bad[" ] && {{ echo "scontrol: error: bad list" >&2; exit 1; }}\n'
                 'printf "alpha\\nbeta\\n"\n')
    env = {"PATH": str(tmp_path / "bin"), "SLURM_JOB_NODELIST": "odd[1-2]", "SLURM_GPUS_ON_NODE": "2"}
    assert launch.slurm_hosts(env, None) == [("alpha", 2), ("beta", 2)]          # scontrol's answer, not ours
    assert record.read_text().split() == ["show", "hostnames", "odd[1-2]"]
    with pytest.raises(launch.LaunchError, match=r"SLURM node list 'bad\[': scontrol show hostnames failed: "
                                                 r"scontrol: error: bad list"):
        launch.slurm_hosts({**env, "SLURM_JOB_NODELIST": "bad["}, None)
    assert launch.slurm_hosts({**env, "PATH": str(tmp_path)}, None) == [("odd1", 2), ("odd2", 2)]    # no scontrol


# --------------------------------------------------------------------------- a bare srun

@pytest.mark.parametrize("env, refused", [
    ({}, False),                                                                       # no SLURM
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}, True),           # srun -n 2 python -m ...
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "3", "SLURM_STEP_NUM_TASKS": "8"}, True),
    ({"SLURM_PROCID": "1"}, True),                                                     # any task but the first
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"}, False),          # srun -n 1: one rank
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "1"}, False),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "9"}, False),            # the batch script itself
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "RANK": "9", "LOCAL_RANK": "1",
      "WORLD_SIZE": "16", "CROSS_RANK": "1"}, False),                                   # launch.py --slurm's ranks
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "RANK": "1", "LOCAL_RANK": "0",
      "WORLD_SIZE": "2"}, True),                                                        # not DeepSpeed's launcher
])
def test_bare_srun_is_refused(env, refused):
    if not refused:
        launch.check_not_bare_srun(env)
        return
    with pytest.raises(launch.LaunchError) as error:
        launch.check_not_bare_srun(env)
    message = str(error.value)
    assert "\n" not in message and "sbatch launchers/slurm/train.sbatch <recipe>" in message
    assert "bash launchers/train.sh --slurm -- --config <recipe>" in message


def test_trainer_started_by_bare_srun_exits_2_and_writes_nothing(tmp_path):
    env = {**clean_env(), "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}
    done = subprocess.run([sys.executable, "-m", "mose_ds.train", "--config", os.path.join(ROOT, "ds_configs", "tiny_cpu.yaml")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "task 0 of 2 that srun started without the launcher" in errors[0]
    assert "Traceback" not in done.stderr and os.listdir(tmp_path) == []


@pytest.mark.parametrize("text, fragment", [("#NCCL_DEBUG=INFO\n", "'#NCCL_DEBUG' is not a variable name"),
                                            ("NCCL DEBUG=INFO\n", "'NCCL DEBUG' is not a variable name"),
                                            ("NCCL_DEBUG\n", "expected KEY=VALUE")])
def test_a_user_env_file_line_that_is_no_assignment_is_refused_by_file_and_line(tmp_path, text, fragment):
    path = tmp_path / ".deepspeed_env"
    path.write_text("OMP_NUM_THREADS=4\n" + text)
    with pytest.raises(launch.LaunchError, match=f"{path}:2: .*{fragment}"):
        launch.read_env_file(str(path))
