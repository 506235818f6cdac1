"""Load a training checkpoint for inference and measure perplexity and compute under a width
policy.

`load_model` reads DeepSpeed's checkpoint files directly: the non-expert weights from
`mp_rank_00_model_states.pt` and every expert from its own
`layer_{l}_expert_{e}_mp_rank_00_model_states.pt`, keyed by global expert id. So a
checkpoint written by any expert-parallel layout and any ZeRO stage (1/2 keep full module
weights beside the optimizer shards) loads into one single-rank model. The checkpoint's
identity is a digest of the weights themselves, independent of the file layout.

Shape legend: B batch, S sequence, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from . import devices
from .checkpoint import CheckpointError, checkpoint_config, newest_good, read_model_states, tags
from .config import RunConfig
from .data import TokenSplit, val_batch_count, val_batches
from .flops import FlopsMeter
from .model import MoSEGPT, build_model, lm_loss
from .tokenizer import TextCodec
from .widths import WidthPolicy



@dataclass
class LoadedModel:
    model: MoSEGPT
    cfg: RunConfig
    folder: str             # the checkpoint's tag folder
    iteration: int
    digest: str             # sha256 of the weights (names, dtypes, bytes), layout-independent

    @property
    def identity(self) -> dict:
        return {"path": self.folder, "iteration": self.iteration, "weights_sha256": self.digest,
                "name": self.cfg.model.name, "moe_layers": len(self.model.moe_layers())}


def resolve_checkpoint(path: str) -> str:
    """A tag folder from a tag folder, or the newest verified checkpoint of a checkpoint
    root or run folder (partial or damaged ones are reported on stderr and skipped)."""
    if not os.path.exists(path):
        raise CheckpointError(f"no such checkpoint: {path}")
    if os.path.isfile(os.path.join(path, "config.yaml")) and os.path.isfile(
            os.path.join(path, "mp_rank_00_model_states.pt")):
        return os.path.abspath(path)
    for root in (path, os.path.join(path, "checkpoints")):
        if tags(root):
            folder = newest_good(root, report=lambda msg: print(msg, file=sys.stderr))
            if folder is None:
                raise CheckpointError(f"no complete checkpoint under {root}: every iter_* folder failed verification")
            return folder
    raise CheckpointError(f"{path} is not a checkpoint (no config.yaml + mp_rank_00_model_states.pt, "
                          "no iter_* folders in it or in its checkpoints/)")


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not isinstance(tensor, torch.Tensor) or name.endswith("_extra_state"):
            continue
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_model(path: str, top_k: int | None = None, device: str | torch.device = "cpu",
               dropless: bool = False) -> LoadedModel:
    """The checkpoint's model on one rank (fp32, eval mode), optionally routing to `top_k`
    experts instead of the trained k (inference-time routing transfer, k' < k). `dropless`:
    no expert capacity (generation: a token's output must not depend on the other tokens of
    its forward, or decoding with a cache would differ from the full sequence)."""
    from . import engine as engine_lib

    folder = resolve_checkpoint(path)
    cfg = checkpoint_config(folder)
    moe = dataclasses.replace(cfg.moe, expert_parallel_size=1)
    if top_k is not None:
        if not 1 <= top_k <= cfg.moe.top_k:
            raise CheckpointError(f"top_k={top_k}: routing transfer needs 1 <= k' <= trained k={cfg.moe.top_k}")
        moe = dataclasses.replace(moe, top_k=top_k)
    if dropless:
        moe = dataclasses.replace(moe, drop_tokens=False)
    cfg = dataclasses.replace(cfg, moe=moe)
    engine_lib.init_distributed(device=device)        # the process group (its first call decides it)
    model = build_model(cfg, devices.choose(device, why="loading a model"))

    states, weights = read_model_states(folder)
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights and not k.endswith("_extra_state")]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {folder} does not match its config: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]} ({len(missing)} / {len(unexpected)})")
    for name, tensor in expected.items():
        if name in weights and isinstance(tensor, torch.Tensor) and weights[name].shape != tensor.shape:
            raise CheckpointError(f"checkpoint {folder}: {name} has shape {tuple(weights[name].shape)}, "
                                  f"the config expects {tuple(tensor.shape)}")
    model.load_state_dict(weights, strict=False)
    model.eval()
    return LoadedModel(model, cfg, folder, int(states.get("iteration", 0)), weights_digest(model))


# ---------------------------------------------------------------------------------------
# Token streams for perplexity.

def text_windows(codec: TextCodec, text: str, seq_len: int) -> np.ndarray:
    """A text as non-overlapping windows of seq_len + 1 tokens (the last partial one dropped):
    [N, seq_len + 1] model ids."""
    ids = np.array(codec.encode(text), dtype=np.int64)
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ValueError(f"text of {len(ids)} tokens is shorter than one window of {seq_len + 1}")
    return np.stack([ids[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)])


def window_batches(windows: np.ndarray, batch_size: int, limit: int | None = None
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    rows = windows if limit is None else windows[:limit * batch_size]
    for start in range(0, len(rows) - batch_size + 1, batch_size):
        data = torch.from_numpy(rows[start:start + batch_size])
        yield data[:, :-1], data[:, 1:]


def split_batches(folder: str, split: str, cfg: RunConfig, batch_size: int, limit: int
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `limit` batches of a prepared split (the validation order of training)."""
    data = TokenSplit(folder, split, cfg.model.seq_len, cfg.model.vocab_size)
    val_batch_count(data, limit, 1, batch_size)
    return list(val_batches(data, limit, 0, 1, batch_size))


@dataclass
class EvalResult:
    loss: float
    ppl: float
    mflops: dict[str, float]          # {"paper": x, "standard": y} per token, nominal (sum ceil(w H))
    mflops_executed: dict[str, float]  # the same with the units the kernels computed
    breakdown: dict[str, float]       # standard-convention nominal MFLOPs per token by category
    mean_width: float                 # nominal units / units of k full-width slots
    executed_width: float             # executed units / units of k full-width slots
    counts: list[list[float]]         # expert-selection histogram per MoE layer (before capacity)
    dropped: float                    # fraction of routed choices dropped for capacity
    tokens: int


@torch.no_grad()
def evaluate_policy(model: MoSEGPT, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    policy: WidthPolicy, relaxed: bool = False) -> EvalResult:
    """Token-averaged LM loss, perplexity and FLOPs (nominal and executed) of `policy` on `batches`
    (`relaxed`: gamma calibration's differentiable forward)."""
    device = next(model.parameters()).device
    meter = FlopsMeter(model.cfg, model.moe_cfg)
    loss_sum, n, dropped, counts = 0.0, 0, 0.0, None
    for x_BS, y_BS in batches:
        logits_BSV, routing = model(x_BS.to(device), policy, relaxed=relaxed)
        tokens = y_BS.numel()
        loss_sum += lm_loss(logits_BSV, y_BS.to(device)).item() * tokens
        n += tokens
        meter.add(routing, x_BS.shape[1])
        layer_counts = [r.stats.counts_E.cpu() for r in routing]
        counts = layer_counts if counts is None else [a + b for a, b in zip(counts, layer_counts)]
        dropped += sum(float(r.stats.dropped_frac) for r in routing) / max(len(routing), 1) * tokens
    if not n:
        raise ValueError("no evaluation batch (the data is shorter than one batch)")
    loss = loss_sum / n
    standard = meter.per_token("standard")
    return EvalResult(loss, math.exp(loss), meter.mflops(), meter.mflops(executed=True),
                      {k: v / 1e6 for k, v in standard.items() if k != "total"}, meter.mean_width(),
                      meter.mean_width(executed=True), [c.tolist() for c in counts or []], dropped / n, n)
