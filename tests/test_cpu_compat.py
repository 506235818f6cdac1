"""Each CPU workaround, tested on its own (they apply only when CUDA is absent)."""

import importlib

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU patches are not applied on GPU")


def test_global_memory_buffer_allocates_on_cpu(world):
    from megatron.core import parallel_state
    buf = parallel_state.get_global_memory_buffer().get_tensor((3, 4), torch.float32, "test")
    assert buf.device.type == "cpu" and buf.shape == (3, 4)
    again = parallel_state.get_global_memory_buffer().get_tensor((2, 2), torch.float32, "test")
    assert again.data_ptr() == buf.data_ptr()       # reused, as megatron intends


def test_rng_tracker_forks_the_cpu_generator_and_restores_it(world):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    torch.manual_seed(0)
    outside_before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outside_before)
    with get_cuda_rng_tracker().fork():
        second = torch.rand(3)
    assert not torch.equal(first, second)           # the tracked stream advanced


def test_shared_memory_comm_op_is_not_built(world):
    assert importlib.import_module("deepspeed.comm.torch").build_shm_op() is None


def test_megatron_attention_runs_on_cpu(world):
    from mose_ds.model import MoSEGPT
    from conftest import tiny_config
    cfg = tiny_config()
    model = MoSEGPT(cfg.model, cfg.moe)
    model.init_weights(0)
    logits, _ = model(torch.randint(0, 4096, (2, 8)))
    assert logits.shape == (2, 8, 4096) and torch.isfinite(logits).all()
