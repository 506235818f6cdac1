"""TensorBoard logging on rank 0: width-wise validation curves and routing diagnostics.

Each evaluation width is a TensorBoard run of its own, `<out>/tensorboard/w0.25/` ...
`w1.00/`, holding the tags `val/ppl` and `val/loss`: TensorBoard's TIME SERIES and SCALARS
pages then overlay the widths in one chart each, one colour per width, named by the run
(tags of one run would share a colour, or get a card each). A run started with
`checkpoint.init_from` also logs them at step 0, where continual pre-training starts.

The run at `<out>/tensorboard/` itself holds `train/*` (both branch losses, the sampled
width, lr, grad norm, tokens/s), `routing/<branch>/layer<i>/<stat>` for each MoE layer
(paper appendix B.3 and B.5), and a custom-scalars layout with the width curves and both
training losses.
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
        self.width_writers = {}
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(self.path)
            self.width_writers = {w: SummaryWriter(os.path.join(self.path, width_tag(w))) for w in eval_widths}
            self.writer.add_custom_scalars({"MoSE": {     # tag regexes, matched in every run
                "validation perplexity by width": ["Multiline", ["^val/ppl$"]],
                "validation loss by width": ["Multiline", ["^val/loss$"]],
                "training loss by branch": ["Multiline", ["^train/loss_full$", "^train/loss_width$"]]}})

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def validation(self, val: dict[float, float], step: int) -> None:
        """Perplexity and loss per evaluation width ({width: perplexity}), each width in its
        own run."""
        for width, ppl in val.items():
            writer = self.width_writers.get(width)
            if writer is not None:
                writer.add_scalar("val/ppl", ppl, step)
                writer.add_scalar("val/loss", math.log(ppl), step)

    def close(self) -> None:
        for writer in [self.writer, *self.width_writers.values()]:
            if writer is not None:
                writer.flush()
                writer.close()
