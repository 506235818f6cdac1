"""Offline gamma calibration ("test-time training", paper eq. 12; DESIGN section 4).

For a budget Gamma, learn the sharpness gamma of the normalised-probability policy (one
value shared by every MoE layer, or one per MoE layer) so that the LM loss on a short
calibration stream is lowest, with every model weight frozen. Two methods:

* `SearchMethod` (the default): a direct search on the loss of the hard deployed widths,
  the very objective of eq. 12. gamma is one scalar (or one per layer), so a scan over
  log gamma followed by golden-section refinement costs a few dozen forward passes of the
  stream; layer-wise gammas are found by coordinate search from the shared optimum. The
  result is never worse on the stream than gamma = 1, which the scan includes.
* `SGDMethod` (the paper's optimiser: SGD, one step per batch) on a relaxation. Hard
  widths m = ceil(w * H) are piecewise constant in gamma, so their gradient is zero almost
  everywhere; during calibration each expert instead weights hidden unit j by
  clamp(w * H - j, 0, 1) (a soft prefix mask, `experts.RelaxedKernel`): the loss becomes
  the linear interpolation between neighbouring hard widths, exact at whole units. gamma
  is optimised as log gamma. Why it is not the default: the token-mean LM loss is nearly
  flat in gamma (on the CPU pareto model d loss / d log gamma is of order 1e-2 to 1e-3), so
  the paper's lr 0.01 moves log gamma by well under 0.01 in 50 steps (docs/pareto.md has the
  measurements). `reduction: sum` sums the token losses of a batch instead (a step as large
  as lr x tokens-per-batch on the mean), which does move gamma, with the noise of a single
  batch in every step.

Both report the calibration loss at gamma = 1 and at the learned gammas, with the
relaxation and with hard deployed widths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from .inference import EvalResult, evaluate_policy, weights_digest
from .model import MoSEGPT, lm_loss
from .widths import NormProbPolicy

MODES = ("shared", "layerwise")
Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]
Progress = Callable[[int, float], None]
GOLDEN = (math.sqrt(5) - 1) / 2


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
    method: str
    gamma: list[float]                  # one per MoE layer (repeated for `shared`)
    loss_relaxed: float                 # on the calibration stream, learned gamma, relaxation
    loss_hard: float                    # same, hard deployed widths
    loss_relaxed_at_1: float            # the same two at gamma = 1 (normalised probability)
    loss_hard_at_1: float
    hard: EvalResult = field(repr=False)
    trajectory: list[float] = field(default_factory=list, repr=False)   # the method's loss per step
    evaluations: int = 0                # forward passes over the whole stream (search)


class WeightsChanged(RuntimeError):
    """Calibration touched a model weight (a bug: it must only learn gamma)."""


class Method(Protocol):
    name: str

    def learn(self, model: MoSEGPT, batches: Batches, budget: float, mode: str, settings: PolicySettings,
              on_step: Progress | None, start: list[float] | None = None) -> tuple[list[float], list[float], int]:
        """(gamma per MoE layer, the loss of each step, whole-stream evaluations). `start`:
        gammas (one per layer) to begin from, e.g. the shared optimum for layer-wise search."""


def freeze(model: MoSEGPT) -> str:
    """Stop gradients into every weight, check it, and return the weights' digest."""
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if trainable:
        raise WeightsChanged(f"weights still trainable after freezing: {trainable[:3]}")
    return weights_digest(model)


@dataclass
class SGDMethod:
    """The paper's optimiser: plain SGD on log gamma, one step per batch of the stream, on
    the relaxed loss (`reduction`: "mean" over the batch's tokens, or their "sum")."""
    lr: float = 0.01
    reduction: str = "mean"
    name: str = "sgd"

    def __post_init__(self):
        if self.reduction not in ("mean", "sum") or self.lr <= 0:
            raise ValueError(f"SGD calibration needs lr > 0 and reduction mean or sum, got {self.lr}, {self.reduction!r}")

    def learn(self, model, batches, budget, mode, settings, on_step=None, start=None):
        """Starts at gamma = 1 (the paper's normalised probability), whatever `start`."""
        device = next(model.parameters()).device
        n_layers = len(model.moe_layers())
        log_gamma = torch.zeros(1 if mode == "shared" else n_layers, device=device, requires_grad=True)
        optimizer = torch.optim.SGD([log_gamma], lr=self.lr)
        trajectory = []
        for step, (x_BS, y_BS) in enumerate(batches):
            gammas = log_gamma.exp().expand(n_layers)
            logits_BSV, _ = model(x_BS.to(device), settings.policy(budget, gammas), relaxed=True)
            loss = lm_loss(logits_BSV, y_BS.to(device))
            optimizer.zero_grad(set_to_none=True)
            (loss * y_BS.numel() if self.reduction == "sum" else loss).backward()
            optimizer.step()
            trajectory.append(loss.item())
            if on_step:
                on_step(step, trajectory[-1])
        return log_gamma.detach().exp().expand(n_layers).cpu().tolist(), trajectory, 0


@dataclass
class SearchMethod:
    """Direct search on the stream's loss under hard deployed widths.

    Shared: the loss at gamma = 2^s for s in `scan` (gamma = 1 among them), extended by
    factors of 2 past an end that holds the minimum (at most `extend` more points), then
    golden-section refinement of log gamma between the best point's neighbours for `refine`
    evaluations.
    Layer-wise: from the shared optimum (or `start`: the shared optimum found before on the
    same stream), each layer in turn is refined the same way within a factor `span` of its
    current value, the others fixed, for `sweeps` passes. The best point seen is kept, so the
    loss never exceeds that of any point evaluated (gamma = 1, or `start`, included). Cost:
    len(scan) + refine + sweeps x layers x layer_refine evaluations of the stream (22 for two
    MoE layers; 11 from a given start)."""
    scan: tuple[float, ...] = (-2, -1, 0, 1, 2, 3)
    extend: int = 4               # scan points added beyond an end that holds the minimum
    refine: int = 6
    span: float = 2.0
    layer_refine: int = 5
    sweeps: int = 1
    name: str = "search"

    def learn(self, model, batches, budget, mode, settings, on_step=None, start=None):
        trajectory: list[float] = []

        def loss(log_gammas: Sequence[float]) -> float:
            value = evaluate_policy(model, batches, settings.policy(budget, [math.exp(t) for t in log_gammas])).loss
            trajectory.append(value)
            if on_step:
                on_step(len(trajectory) - 1, value)
            return value

        log_gammas = self.search(loss, len(model.moe_layers()), mode,
                                 [math.log(g) for g in start] if start else None)
        return [math.exp(t) for t in log_gammas], trajectory, len(trajectory)

    def search(self, loss: Callable[[Sequence[float]], float], n_layers: int, mode: str,
               start: list[float] | None = None) -> list[float]:
        """The log gammas (one per layer) that minimise `loss(log_gammas)`; each distinct
        point is evaluated once. `start`: layer-wise search starts there instead of at the
        shared optimum."""
        cache: dict[tuple[float, ...], float] = {}

        def cached(log_gammas: list[float]) -> float:
            key = tuple(round(t, 9) for t in log_gammas)
            if key not in cache:
                cache[key] = loss(list(log_gammas))
            return cache[key]

        if start is not None and mode == "layerwise":
            best = list(start)
        else:
            ln2 = math.log(2)
            points = [s * ln2 for s in self.scan]
            values = [cached([t] * n_layers) for t in points]
            i = min(range(len(points)), key=values.__getitem__)
            while i in (0, len(points) - 1) and len(points) < len(self.scan) + self.extend:
                # the best point is at an end of the scan: step outwards until the loss rises
                step = ln2 if i else -ln2
                points.insert(len(points) if i else 0, points[i] + step)
                values.insert(len(values) if i else 0, cached([points[-1 if i else 0]] * n_layers))
                i = min(range(len(points)), key=values.__getitem__)
            lo, hi = points[max(i - 1, 0)], points[min(i + 1, len(points) - 1)]
            best = [golden_section(lambda t: cached([t] * n_layers), lo, hi, self.refine, points[i], values[i])] * n_layers
        if mode == "layerwise":
            half = math.log(self.span)
            for _ in range(self.sweeps):
                for layer in range(n_layers):
                    def along(t, layer=layer):
                        return cached(best[:layer] + [t] + best[layer + 1:])
                    best[layer] = golden_section(along, best[layer] - half, best[layer] + half, self.layer_refine,
                                                 best[layer], along(best[layer]))
        return best


def golden_section(f: Callable[[float], float], lo: float, hi: float, steps: int, start: float,
                   start_value: float) -> float:
    """The best of `start` and `steps` golden-section evaluations of f on [lo, hi]: a
    minimum of a unimodal f to within (hi - lo) 0.618^steps; on a noisy f, never worse than
    `start` (whose value is given)."""
    best, best_value = start, start_value
    a, b = lo, hi
    c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    for t, v in ((c, fc), (d, fd)):
        if v < best_value:
            best, best_value = t, v
    for _ in range(max(steps - 2, 0)):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - GOLDEN * (b - a)
            fc = f(c)
            t, v = c, fc
        else:
            a, c, fc = c, d, fd
            d = a + GOLDEN * (b - a)
            fd = f(d)
            t, v = d, fd
        if v < best_value:
            best, best_value = t, v
    return best


def calibrate(model: MoSEGPT, batches: Batches, budget: float, mode: str, settings: PolicySettings,
              method: Method | None = None, on_step: Progress | None = None,
              start: list[float] | None = None) -> CalibrationResult:
    """Learn gamma for one budget on `batches` with `method` (default `SearchMethod()`); the
    model must be frozen (`freeze`) and in eval mode. `start`: see `Method.learn`."""
    if mode not in MODES:
        raise ValueError(f"unknown calibration mode {mode!r}: expected one of {MODES}")
    if any(p.requires_grad for p in model.parameters()):
        raise WeightsChanged("calibrate() needs a frozen model: call freeze(model) first")
    method = method or SearchMethod()
    gamma, trajectory, evaluations = method.learn(model, batches, budget, mode, settings, on_step, start)
    relaxed = evaluate_policy(model, batches, settings.policy(budget, gamma), relaxed=True)
    hard = evaluate_policy(model, batches, settings.policy(budget, gamma))
    relaxed_1 = evaluate_policy(model, batches, settings.policy(budget, 1.0), relaxed=True)
    hard_1 = evaluate_policy(model, batches, settings.policy(budget, 1.0))
    return CalibrationResult(budget, mode, method.name, [float(g) for g in gamma], relaxed.loss, hard.loss,
                             relaxed_1.loss, hard_1.loss, hard, trajectory, evaluations)
