"""Width policies from user-facing specifications (CLI flags, lm-eval model args, gamma tables).

The maths lives in `widths.py`; this module turns names, flags and files into policies and
refuses bad specifications with one-line errors (it imports torch only to build a policy, so
commands parse their flags without it):

* `full`      - plain MoE: every selected expert at full width (Gamma = k);
* `uniform`   - every selected expert at `width`;
* `normprob`  - router-conditioned widths with gamma = 1 (or a given gamma) under `budget`;
* `gamma`     - the same with gamma learned by `mose-calibrate`, read from a gamma
                table for `budget` and `gamma_mode` (shared / layerwise). The table must have
                been made for these very weights (checked by digest) and layer count.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import yaml

KINDS = ("full", "uniform", "normprob", "gamma")


class PolicyError(ValueError):
    """A bad policy specification or gamma table; the message names it."""


def default_budgets(k: int) -> list[float]:
    """Five budgets evenly spread over [k * 0.25, k * 0.75], the range where widths matter,
    and the full budget Gamma = k (the paper's Table 1 operating point: learned gamma spends
    at most what MoE at full width does)."""
    return [round(k * f, 4) for f in (0.25, 0.375, 0.5, 0.625, 0.75, 1.0)]


def check_budgets(budgets, k: int) -> None:
    """Refuse per-token budgets outside (0, k]: Gamma counts full-expert widths of k experts."""
    bad = [b for b in budgets if not 0 < b <= k]
    if bad:
        raise PolicyError(f"budget(s) {bad} outside (0, k={k}] (k = active experts per token)")


@dataclass
class PolicySpec:
    kind: str = "full"
    width: float | None = None
    budget: float | None = None
    gamma: float = 1.0
    table: str | None = None
    gamma_mode: str = "layerwise"
    exact_budget: bool = False
    continuous: bool = False           # do not round deployed widths to the training grid

    def label(self) -> str:
        if self.kind == "full":
            return "full width"
        if self.kind == "uniform":
            return f"uniform w={self.width:g}"
        if self.kind == "normprob":
            return f"normprob Gamma={self.budget:g}" + (f" gamma={self.gamma:g}" if self.gamma != 1 else "")
        return f"gamma-{self.gamma_mode} Gamma={self.budget:g}"


def add_policy_arguments(p) -> None:
    """The width-policy flags of every command (an argparse parser or group)."""
    p.add_argument("--policy", default="full", help=" | ".join(KINDS))
    p.add_argument("--width", type=float, help="uniform width in (0, 1]")
    p.add_argument("--budget", type=float, help="per-token budget Gamma in (0, k] (normprob, gamma)")
    p.add_argument("--gamma", type=float, default=1.0, help="normprob sharpness")
    p.add_argument("--table", help="gamma table from mose-calibrate (policy gamma)")
    p.add_argument("--gamma-mode", default="layerwise", choices=["shared", "layerwise"])
    p.add_argument("--exact-budget", action="store_true", help="widths of a token sum to Gamma")
    p.add_argument("--continuous", action="store_true", help="do not round widths to the grid")


def spec_from_arguments(args) -> PolicySpec:
    """The PolicySpec of parsed `add_policy_arguments` flags."""
    return PolicySpec(kind=args.policy, width=args.width, budget=args.budget, gamma=args.gamma, table=args.table,
                      gamma_mode=args.gamma_mode, exact_budget=args.exact_budget, continuous=args.continuous)


def gamma_table(identity: dict, top_k: int, relaxation: str, policy: dict, calibration: dict, results: dict) -> dict:
    """The gamma table of a calibration (`calibrate.calibrate`'s CalibrationResult per mode,
    in budget order): what `read_gamma_table` reads back and checks."""
    return {
        "checkpoint": identity, "top_k": top_k, "relaxation": relaxation, "policy": policy,
        "calibration": calibration,
        "modes": {mode: [{
            "budget": r.budget, "gamma": [round(g, 6) for g in r.gamma],
            "loss_hard": round(r.loss_hard, 6), "loss_hard_at_gamma_1": round(r.loss_hard_at_1, 6),
            "loss_relaxed": round(r.loss_relaxed, 6), "loss_relaxed_at_gamma_1": round(r.loss_relaxed_at_1, 6),
            "mflops_per_token": {c: round(v, 4) for c, v in r.hard.mflops.items()},
            "mflops_per_token_executed": {c: round(v, 4) for c, v in r.hard.mflops_executed.items()},
            "mean_width": round(r.hard.mean_width, 4), "stream_evaluations": r.evaluations}
            for r in rs] for mode, rs in results.items()},
    }


def write_gamma_table(path: str, table: dict) -> None:
    """Write a gamma table atomically (a reader never sees half a table)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(table, f, sort_keys=False)
    os.replace(tmp, path)


def read_gamma_table(path: str, identity: dict | None = None) -> dict:
    """A gamma table, checked against the checkpoint `identity` (LoadedModel.identity)."""
    if not os.path.isfile(path):
        raise PolicyError(f"gamma table {path}: no such file")
    try:
        with open(path) as f:
            table = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise PolicyError(f"gamma table {path}: not YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(table, dict) or not isinstance(table.get("modes"), dict) or "checkpoint" not in table:
        raise PolicyError(f"gamma table {path}: not a table written by mose-calibrate")
    if identity is not None:
        made_for = table["checkpoint"]
        if made_for.get("moe_layers") != identity["moe_layers"]:
            raise PolicyError(f"gamma table {path} is for a model with {made_for.get('moe_layers')} MoE layers, "
                              f"this checkpoint has {identity['moe_layers']}")
        if made_for.get("weights_sha256") != identity["weights_sha256"]:
            raise PolicyError(f"gamma table {path} was calibrated for another checkpoint "
                              f"({made_for.get('path')}, weights {str(made_for.get('weights_sha256'))[:12]}), "
                              f"not {identity['path']} (weights {identity['weights_sha256'][:12]})")
    return table


def table_gammas(table: dict, mode: str, budget: float, path: str = "gamma table") -> list[float]:
    entries = table["modes"].get(mode)
    if entries is None:
        raise PolicyError(f"{path} has no {mode!r} mode (it has {sorted(table['modes'])})")
    for entry in entries:
        if abs(entry["budget"] - budget) < 1e-9:
            return [float(g) for g in entry["gamma"]]
    raise PolicyError(f"{path} has no budget {budget:g} in mode {mode!r} "
                      f"(calibrated: {[e['budget'] for e in entries]})")


def build_policy(spec: PolicySpec, cfg, identity: dict | None = None):
    """The width policy (widths.py) of `spec` for a model of config `cfg` (a RunConfig)."""
    from .widths import FULL_WIDTH, NormProbPolicy, UniformPolicy    # torch: not needed to parse flags
    k = cfg.moe.top_k
    if spec.kind not in KINDS:
        raise PolicyError(f"unknown policy {spec.kind!r}: expected one of {', '.join(KINDS)}")
    if spec.kind == "full":
        return FULL_WIDTH
    if spec.kind == "uniform":
        if spec.width is None or not 0 < spec.width <= 1:
            raise PolicyError(f"uniform policy needs a width in (0, 1], got {spec.width}")
        return UniformPolicy(spec.width)
    if spec.budget is None:
        raise PolicyError(f"{spec.kind} policy needs a budget in (0, k={k}]")
    check_budgets([spec.budget], k)
    grid = None if spec.continuous else cfg.mose.grid
    wmin, wmax = cfg.mose.width_min, cfg.mose.width_max
    if spec.kind == "normprob":
        if spec.gamma <= 0:
            raise PolicyError(f"normprob policy needs gamma > 0, got {spec.gamma}")
        return NormProbPolicy(spec.budget, spec.gamma, wmin, wmax, grid, spec.exact_budget)
    if not spec.table:
        raise PolicyError("gamma policy needs a gamma table (from mose-calibrate)")
    table = read_gamma_table(spec.table, identity)
    gammas = table_gammas(table, spec.gamma_mode, spec.budget, spec.table)
    deployed = table.get("policy", {})
    return NormProbPolicy(spec.budget, gammas, deployed.get("wmin", wmin), deployed.get("wmax", wmax),
                           None if not deployed.get("round_to_grid", True) else cfg.mose.grid,
                           deployed.get("exact_budget", False))
