"""Offline gamma calibration ("test-time training", paper eq. 12; DESIGN section 4).

For a budget Gamma, learn the sharpness gamma of the normalised-probability policy (one
value shared by every MoE layer, or one per MoE layer) by minimising the LM loss on a short
calibration stream with every model weight frozen.

Relaxation. Hard widths m = ceil(w * H) are piecewise constant in gamma, so their gradient is
zero almost everywhere. During calibration each expert instead weights hidden unit j by
clamp(w * H - j, 0, 1) (a soft prefix mask, `experts.RelaxedKernel`): the loss
becomes the linear interpolation between neighbouring hard widths, exact at whole units,
and d loss / d w is the effect of the partially included unit. gamma is optimised as
log gamma (positive by construction, scale-free steps) with plain SGD. Clipping at wmin/wmax
still has zero gradient, as it should: a clipped width does not move with gamma. Grid
rounding is applied only to the deployed widths. Both losses are reported: with the
relaxation and with the hard deployed widths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .inference import EvalResult, evaluate_policy, weights_digest
from .model import MoSEGPT, lm_loss
from .widths import NormProbPolicy

MODES = ("shared", "layerwise")


@dataclass
class PolicySettings:
    """How learned gammas are deployed (stored in the gamma table beside them)."""
    wmin: float = 0.25
    wmax: float = 1.0
    exact_budget: bool = False
    grid: list[float] | None = None      # round deployed widths to this grid; None = continuous

    def policy(self, budget: float, gamma) -> NormProbPolicy:
        return NormProbPolicy(budget, gamma, self.wmin, self.wmax, self.grid, self.exact_budget)


@dataclass
class CalibrationResult:
    budget: float
    mode: str
    gamma: list[float]                  # one per MoE layer (repeated for `shared`)
    loss_relaxed: float                 # on the calibration stream, learned gamma, relaxation
    loss_hard: float                    # same, hard deployed widths
    hard: EvalResult = field(repr=False)
    trajectory: list[float] = field(default_factory=list, repr=False)   # relaxed loss per step


class WeightsChanged(RuntimeError):
    """Calibration touched a model weight (a bug: it must only learn gamma)."""


def freeze(model: MoSEGPT) -> str:
    """Stop gradients into every weight, check it, and return the weights' digest."""
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if trainable:
        raise WeightsChanged(f"weights still trainable after freezing: {trainable[:3]}")
    return weights_digest(model)


def calibrate(model: MoSEGPT, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], budget: float,
              mode: str, settings: PolicySettings, lr: float = 0.01,
              on_step: Callable[[int, float], None] | None = None) -> CalibrationResult:
    """Learn gamma for one budget on `batches` (one SGD step per batch); the model must be
    frozen (`freeze`) and in eval mode."""
    if mode not in MODES:
        raise ValueError(f"unknown calibration mode {mode!r}: expected one of {MODES}")
    if any(p.requires_grad for p in model.parameters()):
        raise WeightsChanged("calibrate() needs a frozen model: call freeze(model) first")
    device = next(model.parameters()).device
    n_layers = len(model.moe_layers())
    log_gamma = torch.zeros(1 if mode == "shared" else n_layers, device=device, requires_grad=True)
    optimizer = torch.optim.SGD([log_gamma], lr=lr)

    def gammas() -> torch.Tensor:
        return log_gamma.exp().expand(n_layers)

    trajectory = []
    for step, (x_BS, y_BS) in enumerate(batches):
        logits_BSV, _ = model(x_BS.to(device), settings.policy(budget, gammas()), relaxed=True)
        loss = lm_loss(logits_BSV, y_BS.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        trajectory.append(loss.item())
        if on_step:
            on_step(step, trajectory[-1])

    gamma = gammas().detach().cpu()
    relaxed = evaluate_policy(model, batches, settings.policy(budget, gamma), relaxed=True)
    hard = evaluate_policy(model, batches, settings.policy(budget, gamma))
    return CalibrationResult(budget, mode, gamma.tolist(), relaxed.loss, hard.loss, hard, trajectory)
