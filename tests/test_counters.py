"""The host-sync and operation counters on hand-made cases: what blocks the host on a GPU is
counted on device tensors and what is computed from them, and nothing else is."""

import torch

from mose_ds.counters import AllToAllLog, HostSyncCounter


def counter_for(*device):
    counter = HostSyncCounter()
    counter.device(*device)
    return counter


def test_reads_of_device_values_are_syncs():
    x = torch.arange(6.0)
    counter = counter_for(x)
    with counter:
        y = x * 2                                   # computed from a device tensor: on the device
        float(y.sum())
        y.tolist()
        (y > 3).nonzero()
        y[y > 3]                                    # boolean mask: a nonzero inside
        torch.bincount(y.long())
        torch.repeat_interleave(y.long())           # output size read from the device
        torch.unique(y)
    assert counter.syncs == 7
    assert counter.by_kind["_local_scalar_dense"] == 1 and counter.by_kind["tolist (device to host)"] == 1


def test_work_without_host_reads_is_free_and_host_copies_are_host_tensors():
    x = torch.arange(6.0)
    counter = counter_for(x)
    with counter:
        y = (x * 2).cumsum(0)
        counts = torch.zeros(3, dtype=torch.long).index_add_(0, torch.tensor([0, 1, 1]), y[:3].long())
        torch.repeat_interleave(torch.arange(3), counts, output_size=8)    # sized on the host
        y = y.to(x.device)                          # a move to the device it is on
        host = counts.cpu()                         # the one copy: counted
        host.tolist(), int(host.sum()), host.nonzero()                    # host tensors: free
        torch.arange(4).tolist()                    # never on the device
    assert counter.syncs == 1 and counter.by_kind["cpu (device to host)"] == 1


def test_blocking_copies_to_the_device_are_syncs():
    """torch waits for the stream after a blocking host-to-device copy; a non_blocking one is
    queued, and a tensor already on the device does not move."""
    x = torch.arange(6.0)
    counter = counter_for(x)
    with counter:
        g = torch.tensor([1.0, 2.0])                # host data, staying on the host: free
        a = g.to(x.device)                          # blocking copy: counted
        b = g.to(x.device, non_blocking=True)       # queued: free
        c = torch.tensor([3.0], device=x.device)    # Python data onto the device: counted
        (a * b + c).to(x.device)                    # computed on the device, already there
    assert counter.syncs == 2
    assert counter.by_kind["to (host to device, blocking)"] == 1 and counter.by_kind["tensor (host to device)"] == 1


def test_operations_count_launches_on_device_tensors_only():
    x = torch.randn(4, 4)
    counter = counter_for(x)
    with counter:
        y = x.t().reshape(-1).view(4, 4)           # views, and the copy reshape makes of a transpose
        z = y @ y + 1                               # two launches
        host = z.cpu()
        host.sum(), host.exp()                      # on the host: no launch
    assert dict(counter.ops) == {"clone": 1, "mm": 1, "add": 1}


def test_all_to_all_log_records_bytes_sent(world):
    from deepspeed import comm as dist
    x = torch.arange(12, dtype=torch.float32)
    with AllToAllLog() as log:
        dist.all_to_all_single(torch.empty_like(x), x)
    assert log.sent == [48]
