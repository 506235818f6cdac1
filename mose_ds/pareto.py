"""Pareto frontiers of perplexity vs MFLOPs/token, and FLOPs saved at matched perplexity.

Points are (mflops, ppl) pairs measured under one policy mode at several budgets. Frontiers
are drawn against the compute the deployed widths cost (the paper's count), never against
the budget Gamma (clipping makes the two differ). Pure functions.
"""

from __future__ import annotations

from typing import Sequence

Point = tuple[float, float]   # (MFLOPs/token, perplexity)


def frontier(points: Sequence[Point]) -> list[Point]:
    """Non-dominated points, by increasing compute: each has lower perplexity than every
    cheaper point."""
    out: list[Point] = []
    for flops, ppl in sorted(points):
        if not out or ppl < out[-1][1]:
            out.append((flops, ppl))
    return out


def _interp(x: float, x0: float, x1: float, y0: float, y1: float) -> float:
    return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def ppl_at(front: Sequence[Point], flops: float) -> float | None:
    """Perplexity of the piecewise-linear frontier at `flops`: flat beyond its most expensive
    point (more compute can always run that point), None below its cheapest."""
    if not front or flops < front[0][0] - 1e-9 * max(1.0, flops):
        return None
    for (f0, p0), (f1, p1) in zip(front, front[1:]):
        if f0 <= flops <= f1:
            return _interp(flops, f0, f1, p0, p1)
    return front[-1][1] if flops >= front[-1][0] else front[0][1]


def flops_at(front: Sequence[Point], ppl: float) -> float | None:
    """Compute the frontier needs to reach perplexity `ppl`; None outside its range."""
    for (f0, p0), (f1, p1) in zip(front, front[1:]):
        if p1 <= ppl <= p0:
            return _interp(ppl, p0, p1, f0, f1)
    if front and abs(front[0][1] - ppl) <= 1e-9 * ppl:
        return front[0][0]
    return None


def below(points: Sequence[Point], reference: Sequence[Point]) -> list[bool | None]:
    """For each point: is it below (better than) the reference frontier at the same compute?
    None where the reference frontier does not reach that compute."""
    ref = frontier(reference)
    out = []
    for flops, ppl in points:
        ref_ppl = ppl_at(ref, flops)
        out.append(None if ref_ppl is None else ppl < ref_ppl)
    return out


def flops_reduction(points: Sequence[Point], reference: Sequence[Point]) -> list[tuple[float, float]]:
    """(perplexity, 1 - mode FLOPs / reference FLOPs) at each reference-frontier perplexity
    that the mode's frontier also reaches: the compute saved at matched quality."""
    mine, ref = frontier(points), frontier(reference)
    out = []
    for ref_flops, ppl in ref:
        f = flops_at(mine, ppl)
        if f is not None:
            out.append((ppl, 1.0 - f / ref_flops))
    return out


def against(points: dict[str, list[Point]], reference: str) -> dict[str, dict]:
    """Each router-conditioned mode of a sweep (`points`: mode -> its points) against the
    frontier of mode `reference`: how many of its points lie below / above it and the compute
    it saves at matched perplexity. The uniform frontier is closed by full width (w = 1);
    the full-width point and the MoE baseline are not compared."""
    ref = points.get(reference, []) + (points.get("full", []) if reference == "uniform" else [])
    out = {}
    for mode, pts in points.items():
        if mode in ("full", "uniform", "moe", reference) or not ref:
            continue
        flags = below(pts, ref)
        out[mode] = {"below": sum(f is True for f in flags), "above": sum(f is False for f in flags),
                     "not_comparable": sum(f is None for f in flags),
                     "flops_reduction_at_matched_ppl": flops_reduction(pts, ref)}
    return out


# --------------------------------------------------------------------------- a sweep's summary

MODES = ("full", "uniform", "normprob", "gamma-shared", "gamma-layerwise", "moe")


def mode_points(rows: list[dict], key: str) -> dict[str, list]:
    """(MFLOPs/token under `key`, perplexity) of every mode of a sweep's rows that has points."""
    points = {m: [(r[key], r["ppl"]) for r in rows if r["mode"] == m] for m in MODES}
    return {m: p for m, p in points.items() if p}


def table1(rows: list[dict], k: int) -> dict:
    """The paper's Table 1 operating point: MoSE at full width, MoSE with learned gamma at the
    full budget Gamma = k (layer-wise, else shared), and the MoE baseline at full width."""
    def at(mode, budget):
        return next((r for r in rows if r["mode"] == mode and abs(r["budget"] - budget) < 1e-9), None)
    picks = {"mose_full_width": at("full", k),
             "mose_ttt_at_gamma_k": at("gamma-layerwise", k) or at("gamma-shared", k),
             "moe_full_width": at("moe", k)}
    return {name: r for name, r in picks.items() if r}


def sweep_summary(rows: list[dict], k: int) -> dict:
    """What a sweep's summary.json says of its rows: every mode against the uniform and the
    normalised-probability frontiers, with nominal and with executed MFLOPs, and Table 1."""
    keys = (("", "mflops_paper"), ("_executed", "mflops_paper_executed"))
    return {"rows": rows,
            **{f"vs_{ref}{tag}": against(mode_points(rows, key), ref) for ref in ("uniform", "normprob")
               for tag, key in keys},
            "table1": table1(rows, k)}
