"""TensorBoard logging on rank 0: width-wise validation curves and routing diagnostics.

Scalars: `val/ppl/w0.25 ... val/ppl/w1.00` and `val/loss/w...` (one per evaluation width,
each set overlaid in one custom-scalars chart; a run started with `checkpoint.init_from` also
logs them at step 0, where continual pre-training starts), `train/*` for both branch losses, the sampled width, lr, grad norm
and tokens/s, and `routing/<branch>/layer<i>/<stat>` for each MoE layer (paper appendix
B.3 and B.5).
"""

from __future__ import annotations

import math
import os

import torch

from .gating import RoutingStats


def width_tag(width: float) -> str:
    return f"w{width:.2f}"


def routing_scalars(branch: str, stats: list[RoutingStats]) -> dict[str, float]:
    """The routing statistics of one branch's MoE layers, read from the device in one copy."""
    out = {}
    for i, s in enumerate(stats):
        prefix = f"routing/{branch}/layer{i}"
        out.update({f"{prefix}/load_cv": s.load_cv, f"{prefix}/entropy": s.entropy,
                    f"{prefix}/aux_loss": s.load_balance, f"{prefix}/z_loss": s.z_loss,
                    f"{prefix}/dropped_frac": s.dropped_frac})
    if not out:
        return {}
    return dict(zip(out, torch.stack([v.detach().float().reshape(()) for v in out.values()]).tolist()))


class Monitor:
    """A SummaryWriter on rank 0; a no-op elsewhere or when TensorBoard is off."""

    def __init__(self, out_dir: str, enabled: bool, eval_widths: list[float]):
        self.writer = None
        self.path = os.path.join(out_dir, "tensorboard")
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(self.path)
            self.writer.add_custom_scalars({"MoSE": {
                "validation perplexity by width": ["Multiline", [f"val/ppl/{width_tag(w)}" for w in eval_widths]],
                "validation loss by width": ["Multiline", [f"val/loss/{width_tag(w)}" for w in eval_widths]],
                "training loss by branch": ["Multiline", ["train/loss_full", "train/loss_width"]]}})

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def validation(self, val: dict[float, float], step: int) -> None:
        """Perplexity and loss per evaluation width ({width: perplexity})."""
        self.scalars({f"val/ppl/{width_tag(w)}": p for w, p in val.items()}, step)
        self.scalars({f"val/loss/{width_tag(w)}": math.log(p) for w, p in val.items()}, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
