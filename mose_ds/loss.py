"""Next-token cross-entropy in fp32 without an fp32 copy of the logits.

`F.cross_entropy(logits.float(), ...)` makes an fp32 copy of the whole [B * S, V] logits
tensor and keeps its fp32 log-softmax for backward: with GPT-2's 50,304-word vocabulary
that is 200 KB per token, the largest tensor of a step. `chunked_cross_entropy` upcasts
`CHUNK_BYTES` of rows at a time: the forward keeps the logits themselves (in the model's
dtype) and one fp32 log-sum-exp per row; the backward recomputes each chunk's softmax in
fp32 and writes its gradient in the logits' dtype. The value is the same cross-entropy,
computed in fp32.

Shape legend: N rows (tokens), V vocabulary.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 1 << 28      # fp32 bytes of logits upcast at once (256 MiB)


def _chunks(rows: int, vocab: int) -> list[slice]:
    step = max(1, CHUNK_BYTES // (4 * vocab))
    return [slice(start, start + step) for start in range(0, rows, step)]


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Forward keeps the logits (no copy) and one fp32 log-sum-exp per row; backward rebuilds
    each chunk's softmax from them, so no fp32 tensor of all rows ever exists."""

    @staticmethod
    def forward(ctx, logits_NV: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
        lse_N = torch.empty(logits_NV.shape[0], dtype=torch.float32, device=logits_NV.device)
        for rows in _chunks(*logits_NV.shape):
            lse_N[rows] = torch.logsumexp(logits_NV[rows].float(), dim=-1)
        target_N = logits_NV.gather(1, targets_N[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits_NV, targets_N, lse_N)
        return (lse_N - target_N).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits_NV, targets_N, lse_N = ctx.saved_tensors
        scale = grad / logits_NV.shape[0]
        grad_NV = torch.empty_like(logits_NV)
        for rows in _chunks(*logits_NV.shape):
            # softmax - one-hot, in place on one fp32 copy of the chunk (never on the saved logits)
            p_NV = logits_NV[rows].to(torch.float32, copy=True).sub_(lse_N[rows, None]).exp_()
            p_NV.scatter_add_(1, targets_N[rows, None], p_NV.new_full((p_NV.shape[0], 1), -1.0))
            grad_NV[rows] = p_NV.mul_(scale)
        return grad_NV, None


def chunked_cross_entropy(logits_NV: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of rows `logits_NV` against class ids `targets_N`, in fp32."""
    return _ChunkedCrossEntropy.apply(logits_NV, targets_N)
