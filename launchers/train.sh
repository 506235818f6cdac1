#!/usr/bin/env bash
# Train on one node, on the nodes of a hostfile, or on a SLURM allocation (see mose_ds/launch.py):
#   bash launchers/train.sh [--nproc N] -- --config ds_configs/<recipe>.yaml [key=value ...]
#   bash launchers/train.sh --hostfile hostfile -- --config ...        # deepspeed runner (pdsh)
#   bash launchers/train.sh --slurm -- --config ...                    # inside sbatch (launchers/slurm/)
#   add --dry-run to print each node's command without starting anything.
# Environment variables NCCL_*, UCX_*, FI_*, TORCH_NCCL_* and PYTHONPATH are forwarded to every node.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launchers/setup_env.sh"
cd "$ROOT"
exec "$PY" -m mose_ds.launch "$@"
