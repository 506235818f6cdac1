#!/usr/bin/env bash
# NCCL environment for InfiniBand clusters; sourced by train.sbatch (srun carries it to every node)
# or before a hostfile launch (the launcher forwards NCCL_* and TORCH_NCCL_* through DeepSpeed's env
# file; with --no-ssh source it on every node).
# Values already set in the environment win. Check the names against your fabric (ibv_devinfo,
# ip link) and see docs/scale_out.md.
export NCCL_IB_DISABLE="${NCCL_IB_DISABLE:-0}"           # use InfiniBand / RoCE verbs
export NCCL_IB_HCA="${NCCL_IB_HCA:-mlx5}"                # HCAs to use (prefix match: mlx5_0..mlx5_N)
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker}"  # bootstrap/out-of-band interface
export NCCL_NET_GDR_LEVEL="${NCCL_NET_GDR_LEVEL:-PHB}"   # GPUDirect RDMA when NIC and GPU share a host bridge
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"          # IB retry timeout (4.096 us * 2^22): ride out fabric blips
export NCCL_IB_RETRY_CNT="${NCCL_IB_RETRY_CNT:-7}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"                  # INFO to see the chosen transports at start-up
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"  # a dead peer aborts, no hang
# CUDA_DEVICE_MAX_CONNECTIONS is left unset on purpose: 1 is a tensor-parallel setting that
# would serialise DeepSpeed's gradient-reduction stream behind the backward kernels (docs/config.md).
