"""Attention contexts: the whole sequence at once, or one decoding step against a KV cache.

Every attention module of the model (megatron's GPT-2 self-attention through its
`core_attention` slot, DeepSeek-V2's multi-latent attention) receives a context object in
the `attention_mask` argument and asks it three things:

* `positions(S, device)`: the positions of the chunk's tokens (learned or rotary);
* `extend(*new)`: what to attend to, given this chunk's new per-token tensors (keys and
  values; MLA's compressed latent and rotary key). The full-sequence context returns them as
  they are; a cache step writes them into the layer's store and returns every slot so far;
* `attend(q, k, v, scale)`: causal attention over what `extend` returned.

So the full forward (training, evaluation: `attention.FULL_SEQUENCE`) and incremental
decoding (a `CacheStep` of this module) run the same module code; only the context differs.

A `KVCache` holds one `LayerStore` per block for B rows of up to `capacity` slots, laid
out `[B, L, ...]`. Row b's chunk of q tokens goes to slots `start_b .. start_b + q - 1`
(its positions are its slots) and each of them attends to the slots up to its own: rows of
different lengths need no padding on the left, and the slots past a row's committed length
(a right-padded prompt's tail, a rejected draft) are simply overwritten later. Rolling a
row back is therefore lowering its start: the caller owns the lengths, on the host, where
generation needs them anyway.

Self-speculative decoding builds the draft's cache with `shared_layers`: the stores of the
first blocks (those whose inputs come before the first MoE output, hence agree at any
width) are the target's own tensors, not copies.

Shape legend: B rows, q chunk tokens, L slots, N heads, H q/k head dim, V value head dim.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .attention import causal_attention


class LayerStore:
    """One block's cached tensors, allocated at the first write (their trailing shapes and
    dtype are the attention module's business): a list of [B, capacity, ...] tensors."""

    def __init__(self, batch: int, capacity: int):
        self.batch, self.capacity = batch, capacity
        self.tensors: list[torch.Tensor] | None = None

    def write(self, slots_Bq: torch.Tensor, contiguous_start: int | None, new_BqX: Sequence[torch.Tensor]):
        if self.tensors is None:
            self.tensors = [t.new_zeros((self.batch, self.capacity) + t.shape[2:]) for t in new_BqX]
        for store_BLX, t_BqX in zip(self.tensors, new_BqX):
            if contiguous_start is not None:             # every row writes the same slots
                store_BLX[:, contiguous_start:contiguous_start + t_BqX.shape[1]] = t_BqX
            else:
                index = slots_Bq.view(slots_Bq.shape + (1,) * (t_BqX.dim() - 2)).expand_as(t_BqX)
                store_BLX.scatter_(1, index, t_BqX)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors or [])


class KVCache:
    """Per-block stores for `batch` rows of up to `capacity` slots. `shared_from` and
    `shared_layers`: the first blocks use that cache's stores (self-speculative drafting)."""

    def __init__(self, num_layers: int, batch: int, capacity: int, device="cpu",
                 shared_from: "KVCache | None" = None, shared_layers: int = 0):
        if shared_layers and (shared_from is None or shared_from.batch != batch
                              or shared_from.capacity != capacity):
            raise ValueError("a cache sharing layers needs a cache of the same rows and capacity to share with")
        self.batch, self.capacity, self.device = batch, capacity, torch.device(device)
        self.stores = [shared_from.stores[i] if i < shared_layers else LayerStore(batch, capacity)
                       for i in range(num_layers)]

    def step(self, starts: Sequence[int], chunk: int) -> "CacheStep":
        """The context of a forward of `chunk` tokens per row, row b's written from slot
        starts[b] on."""
        return CacheStep(self, starts, chunk)

    def nbytes(self) -> int:
        """Bytes held (a store shared with another cache counts in both)."""
        return sum(s.nbytes() for s in self.stores)


class CacheStep:
    """One forward's context against a `KVCache`: where each row's chunk goes, and the mask
    that lets each of its tokens see the slots up to its own."""

    def __init__(self, cache: KVCache, starts: Sequence[int], chunk: int):
        starts = [int(s) for s in starts]
        if len(starts) != cache.batch:
            raise ValueError(f"{len(starts)} row starts for a cache of {cache.batch} rows")
        self.end = max(starts) + chunk              # slots any row can see in this forward
        if min(starts) < 0 or self.end > cache.capacity:
            raise ValueError(f"decoding past the cache: slots up to {self.end} of {cache.capacity}")
        self.cache = cache
        self.contiguous_start = starts[0] if len(set(starts)) == 1 else None
        device = cache.device
        start_B1 = torch.tensor(starts, device=device).unsqueeze(1)
        self.slots_Bq = start_B1 + torch.arange(chunk, device=device)
        keys_L = torch.arange(self.end, device=device)
        self.visible_B1qL = (keys_L <= self.slots_Bq.unsqueeze(-1)).unsqueeze(1)

    def layer(self, index: int) -> "LayerStep":
        return LayerStep(self, self.cache.stores[index])

    def positions(self, S: int, device) -> torch.Tensor:
        return self.slots_Bq                                                      # [B, q]


class LayerStep:
    """A cache step seen by one block's attention."""

    def __init__(self, step: CacheStep, store: LayerStore):
        self.step, self.store = step, store

    def positions(self, S: int, device) -> torch.Tensor:
        return self.step.positions(S, device)

    def extend(self, *new_BqX: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write this chunk's tensors to their slots; every slot up to the step's end."""
        self.store.write(self.step.slots_Bq, self.step.contiguous_start, new_BqX)
        return tuple(t[:, :self.step.end] for t in self.store.tensors)

    def attend(self, q_BNqH, k_BNLH, v_BNLV, scale: float) -> torch.Tensor:
        return causal_attention(q_BNqH, k_BNLH, v_BNLV, scale, visible_B1SL=self.step.visible_B1qL)

    def latent_attention(self, mla, *args) -> torch.Tensor:
        """Multi-latent attention against the cached latents: the up-projections absorbed
        into the queries and the output (deepseek.MultiLatentAttention.absorbed)."""
        return mla.absorbed(self, *args)
