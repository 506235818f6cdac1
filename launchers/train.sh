#!/usr/bin/env bash
# Train on one node, on the nodes of a hostfile, or on a SLURM allocation (see mose_ds/launch.py):
#   bash launchers/train.sh [--nproc N] -- --config ds_configs/<recipe>.yaml [key=value ...]
#   bash launchers/train.sh --hostfile hostfile -- --config ...     # deepspeed runner over pdsh (ssh)
#   bash launchers/train.sh --hostfile hostfile --node-rank I --no-ssh [--master-addr A] -- --config ...
#                          # no ssh: run this on every node, each with its own I (its hostfile line, from 0);
#                          # A (default: the hostfile's first host) must be reachable from every node
#   bash launchers/train.sh --slurm -- --config ...                 # inside an allocation (launchers/slurm/)
#   add --dry-run to print what each node runs, with its environment, without starting anything.
# Hostfile over pdsh: NCCL_*, UCX_*, FI_*, TORCH_NCCL_*, GLOO_*, OMP_NUM_THREADS and PYTHONPATH reach
# every node: DeepSpeed's runner exports some itself (PYTHON*, UCX*, NCCL* on CUDA), the launcher
# writes the rest to an env file in runs/launch/ that it names in DS_ENV_FILE. --no-ssh forwards
# nothing (each node's own environment); under SLURM srun carries the environment.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launchers/setup_env.sh"
cd "$ROOT"
exec "$PY" -m mose_ds.launch "$@"
