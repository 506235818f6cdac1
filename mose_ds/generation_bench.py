"""What self-speculative decoding buys: measured against plain decoding, and predicted.

Three measurements, each printed as a table and written as JSON:

* `compare`: a trained checkpoint, prompts from its held-out split, greedy, a full-width (or
  any) target: plain decoding, then self-speculative decoding for each draft width and draft
  length N, `--batch` prompts at a time (rows of one batch share every forward). Per setting:
  the acceptance rate, tokens per round, tokens/s, the measured decode-phase speed-up, and the
  speed-up predicted from the acceptance and the per-forward costs measured in the same runs:

      speed-up = T * c_plain / (N * c_draft + c_verify),

  T being the tokens a row's round yields (kept drafts + 1, the mean over rows and rounds;
  a forward costs the same whichever of its rows are still decoding), and whether the
  greedy texts are identical (they must be). The textbook T for independent acceptance,
  E(alpha, N) = (1 - alpha^(N+1)) / (1 - alpha), is reported beside it: text acceptance is
  bursty (a repeated phrase is drafted whole, a new word refused at once), so E
  underestimates T at large N.
* `shape`: the per-step costs of one layer shape with random weights (default: the 16B
  recipe's DeepSeek-V2-Lite): a dense block, a MoE block and the LM head, timed for a plain
  decode step, a draft step at each width and a verify step of N + 1 tokens against a KV
  cache of `--context` tokens, then composed into the whole model's step costs and, with
  acceptance rates from `compare` runs, the predicted speed-ups at that shape.
* `scan`: the same per-step costs for GPT-2 MoSE models of growing size (random weights)
  on this machine, at a batch of `--batch` rows: at which size a narrow draft starts to pay.

Timing: the median of `--repeats` runs after one warm-up, CUDA synchronised. The module
imports torch and the model only where a measurement needs them: `--help` and `report` stay
quick and print nothing but their own output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DRAFT_WIDTHS = (0.25, 0.5, 0.75)
DRAFT_LENGTHS = (2, 4, 8)


def expected_tokens(alpha: float, n: int) -> float:
    """Tokens one round yields when each draft is kept with probability alpha, independently,
    until the first rejection: 1 + alpha + ... + alpha^N."""
    return float(n + 1) if alpha >= 1 else (1 - alpha ** (n + 1)) / (1 - alpha)


def predicted_speedup(tokens_per_round: float, n: int, c_plain: float, c_draft: float, c_verify: float) -> float:
    """Plain decoding's time per token over self-speculative decoding's: a round costs N
    draft steps and one verify step and yields `tokens_per_round` tokens."""
    return tokens_per_round * c_plain / (n * c_draft + c_verify)


def median_seconds(cases: dict, repeats: int, device: torch.device) -> dict:
    """{name: median seconds} of zero-argument callables, after one warm-up call each, timed
    round-robin (one call of each per repeat), so drifting load on a shared machine hits all
    of them alike."""
    import torch
    times = {name: [] for name in cases}
    for fn in cases.values():
        fn()
    for _ in range(repeats):
        for name, fn in cases.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            begin = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - begin)
    return {name: statistics.median(t) for name, t in times.items()}


# --------------------------------------------------------------------------- compare

@dataclasses.dataclass
class Setting:
    draft_width: float
    draft_top_k: int | None
    n: int
    acceptance: float
    tokens_per_round: float
    tokens_per_s: float
    measured_speedup: float        # plain decode-phase seconds / speculative decode-phase seconds
    predicted_speedup: float       # from tokens_per_round and the measured costs
    predicted_iid: float           # the same with E(acceptance, N), independent acceptance
    c_draft: float
    c_verify: float
    identical: bool                # greedy text equal to plain decoding's


def decode_seconds(gen) -> float:
    """Wall time after the prompts were fed (both decoders take their first token from it)."""
    return gen.seconds - gen.forward_seconds["prefill"]


def compare(model, prompts, max_new: int, target=None, widths=DRAFT_WIDTHS, lengths=DRAFT_LENGTHS,
            draft_top_k: int | None = None, eos_id: int | None = None, batch: int = 1, log=print) -> dict:
    """Plain against self-speculative greedy decoding of `prompts`, `batch` at a time, each
    batch decoded by every setting in turn (so drifting load hits them alike), at the target
    policy (None: full width)."""
    from .generation import PlainDecoding, Sampling, SelfSpeculativeDecoding
    from .widths import FULL_WIDTH, UniformPolicy
    target = target or FULL_WIDTH
    decoders = {None: PlainDecoding(model, target, Sampling(), eos_id)}
    decoders.update({(w, n): SelfSpeculativeDecoding(model, target, UniformPolicy(w, top_k=draft_top_k), n,
                                                     Sampling(), eos_id)
                     for w in widths for n in lengths})
    runs = {key: [] for key in decoders}
    groups = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
    for index, group in enumerate(groups):
        for key, dec in decoders.items():
            runs[key].append(dec.generate(group, max_new))
        log(f"batch {index + 1}/{len(groups)} ({len(group)} prompts) decoded by {len(decoders)} settings")
    base = runs.pop(None)
    plain_tokens = [t for g in base for t in g.tokens]
    plain_decode = sum(decode_seconds(g) for g in base)
    c_plain = sum(g.forward_seconds["target"] for g in base) / sum(g.target_forwards for g in base)
    new_tokens = sum(len(t) for t in plain_tokens)
    log(f"plain: {new_tokens} tokens, {new_tokens / sum(g.seconds for g in base):.1f} tokens/s, "
        f"{c_plain * 1e3:.2f} ms per step")
    settings = []
    for (width, n), gens in runs.items():
        drafted, accepted = sum(g.drafted for g in gens), sum(g.accepted for g in gens)
        row_rounds = drafted / n                                   # rounds of each row, summed
        alpha, per_round = accepted / drafted, (accepted + row_rounds) / row_rounds
        c_draft = sum(g.forward_seconds["draft"] for g in gens) / sum(g.draft_forwards for g in gens)
        c_verify = sum(g.forward_seconds["target"] for g in gens) / sum(g.target_forwards for g in gens)
        setting = Setting(width, draft_top_k, n, alpha, per_round,
                          sum(g.new_tokens for g in gens) / sum(g.seconds for g in gens),
                          plain_decode / sum(decode_seconds(g) for g in gens),
                          predicted_speedup(per_round, n, c_plain, c_draft, c_verify),
                          predicted_speedup(expected_tokens(alpha, n), n, c_plain, c_draft, c_verify),
                          c_draft, c_verify, [t for g in gens for t in g.tokens] == plain_tokens)
        settings.append(setting)
        log(f"draft w={width:g}{'' if draft_top_k is None else f' top-{draft_top_k}'} N={n}: acceptance "
            f"{alpha:.3f}, {per_round:.2f} tokens/round, speed-up measured {setting.measured_speedup:.3f} "
            f"predicted {setting.predicted_speedup:.3f}, draft {c_draft * 1e3:.2f} ms verify {c_verify * 1e3:.2f} ms, "
            f"identical {setting.identical}")
    return {"prompts": len(prompts), "batch": batch, "max_new_tokens": max_new, "new_tokens": new_tokens,
            "plain_tokens_per_s": new_tokens / sum(g.seconds for g in base), "c_plain": c_plain,
            "settings": [dataclasses.asdict(s) for s in settings]}


def held_out_prompts(folder: str, split: str, count: int, length: int, seed: int = 0) -> list[list[int]]:
    """`count` prompts of `length` token ids from a prepared split, at evenly spaced offsets."""
    from .data import TokenSplit
    data = TokenSplit(folder, split, length, 1 << 40)
    ids = data.tokens
    step = max((len(ids) - length) // count, 1)
    return [ids[i * step: i * step + length].astype("int64").tolist() for i in range(count)]


# --------------------------------------------------------------------------- per-step costs

@dataclasses.dataclass
class StepCosts:
    """Seconds of one decoding step, by part, for a plain step, each draft width and each
    verify length; `total` composes the whole model from its blocks."""
    embed_head: dict
    dense: dict
    moe: dict
    dense_blocks: int
    moe_blocks: int

    def total(self, key: str) -> float:
        return self.embed_head[key] + self.dense_blocks * self.dense[key] + self.moe_blocks * self.moe[key]


def step_costs(model, dense_blocks: int, moe_blocks: int, context: int, widths, lengths, repeats: int,
               draft_top_k: int | None = None, seed: int = 0, batch: int = 1) -> StepCosts:
    """Per-part step costs of `model` (one dense block at index 0, one MoE block at index 1
    are timed; the whole model has `dense_blocks` and `moe_blocks` of them) for `batch` rows
    with `context` cached tokens each."""
    import torch

    from .kv_cache import KVCache
    from .widths import FULL_WIDTH, UniformPolicy
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    D = model.cfg.hidden_size
    gen = torch.Generator(device="cpu").manual_seed(seed)
    keys = {"plain": (FULL_WIDTH, 1)}
    keys.update({f"draft_w{w:g}": (UniformPolicy(w, top_k=draft_top_k), 1) for w in widths})
    keys.update({f"verify_n{n}": (FULL_WIDTH, n + 1) for n in lengths})
    cases = {}
    with torch.no_grad():
        for key, (policy, q) in keys.items():
            cache = KVCache(len(model.layers), batch, context + q, device)
            prompt = torch.randint(0, model.cfg.vocab_size, (batch, context), generator=gen).to(device)
            model(prompt, FULL_WIDTH, context=cache.step([0] * batch, context))   # fill the cache
            step = cache.step([context] * batch, q)
            h_SBD = (torch.randn(q, batch, D, generator=gen) * 0.5).to(device, dtype)
            ids_Bq = torch.randint(0, model.cfg.vocab_size, (batch, q), generator=gen).to(device)
            cases.update(_step_parts(model, key, step, h_SBD, ids_Bq, policy))
        seconds = median_seconds(cases, repeats, device)
    parts = {"embed_head": {}, "dense": {}, "moe": {}}
    for (part, key), value in seconds.items():
        parts[part][key] = value
    return StepCosts(parts["embed_head"], parts["dense"], parts["moe"], dense_blocks, moe_blocks)


def _step_parts(model, key: str, step, h_SBD, ids_Bq, policy) -> dict:
    """Callables for one step's parts: embedding + final norm + LM head, block 0 (dense) and
    block 1 (MoE), each against the step's cache."""
    import torch.nn.functional as F
    device, q = ids_Bq.device, ids_Bq.shape[1]
    head = model.wte.weight if model.lm_head is None else model.lm_head.weight

    def embed_head():
        x = model.wte(ids_Bq)
        if model.wpe is not None:
            x = x + model.wpe(step.positions(q, device))
        return F.linear(model.final_norm(x), head)

    def block(index):
        return lambda: model.layers[index](h_SBD, step.layer(index), policy)

    return {("embed_head", key): embed_head, ("dense", key): block(0), ("moe", key): block(1)}


def shape_model(hf: dict, device, dtype):
    """A two-block model of an HF DeepSeek-V2 config's shape (block 0 dense, block 1 MoE),
    random weights, dropless, on `device` in `dtype`."""
    import tempfile

    from .config import from_dict
    small = dict(hf, num_hidden_layers=2, first_k_dense_replace=1)
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(small, f)
        cfg = from_dict({"model": {"hf_config": folder, "seq_len": 4096}, "moe": {"drop_tokens": False}})
    return _build(cfg, device, dtype), hf.get("first_k_dense_replace", 1), \
        hf["num_hidden_layers"] - hf.get("first_k_dense_replace", 1)


def _build(cfg, device, dtype):
    """Random weights sampled on the host (the same on any device), then moved."""
    from .model import build_model
    return build_model(cfg, "cpu", seed=0).to(device=device, dtype=dtype).eval()


def gpt2_model(hidden: int, expert_hidden: int, layers: int, experts: int, top_k: int, vocab: int, device, dtype):
    """A GPT-2 MoSE model with random weights, block 0 dense and block 1 MoE (the two that
    `step_costs` times)."""
    from .config import from_dict
    cfg = from_dict({"model": {"name": f"scan-{hidden}", "num_layers": layers, "num_heads": max(hidden // 64, 1),
                               "hidden_size": hidden, "ffn_hidden": expert_hidden, "expert_hidden": expert_hidden,
                               "vocab_size": vocab, "seq_len": 1024, "moe_offset": 1},
                     "moe": {"num_experts": experts, "top_k": top_k, "drop_tokens": False}})
    return _build(cfg, device, dtype), cfg


def composed_parameters(model, dense_blocks: int, moe_blocks: int) -> int:
    """Parameters of the whole model `step_costs` composes: embeddings, head and norms, and
    copies of block 0 (dense) and block 1 (MoE)."""
    count = lambda module: sum(p.numel() for p in module.parameters())   # noqa: E731
    return (count(model) - sum(count(layer) for layer in model.layers)
            + dense_blocks * count(model.layers[0]) + moe_blocks * count(model.layers[1]))


def predictions(costs: StepCosts, acceptance: dict, widths, lengths) -> list[dict]:
    """The predicted speed-up at these costs for each (width, N) with a measured tokens per
    round."""
    rows = []
    for w in widths:
        for n in lengths:
            per_round = acceptance.get((w, n))
            if per_round is None:
                continue
            c_plain, c_draft, c_verify = (costs.total(k) for k in ("plain", f"draft_w{w:g}", f"verify_n{n}"))
            rows.append({"draft_width": w, "n": n, "tokens_per_round": per_round, "c_plain": c_plain,
                         "c_draft": c_draft, "c_verify": c_verify,
                         "predicted_speedup": predicted_speedup(per_round, n, c_plain, c_draft, c_verify)})
    return rows


def read_acceptance(paths) -> dict:
    """{(width, N): tokens per round} from `compare` JSON files (the lowest over the files:
    a prediction should not borrow the best model's acceptance)."""
    out = {}
    for path in paths or []:
        with open(path) as f:
            for s in json.load(f)["settings"]:
                key = (s["draft_width"], s["n"])
                out[key] = min(out.get(key, float("inf")), s["tokens_per_round"])
    return out


# --------------------------------------------------------------------------- report

def _shape_costs(path: str) -> StepCosts:
    with open(path) as f:
        return StepCosts(**json.load(f)["costs"])


def report(compares: dict, scans: dict, shapes: dict, plot: str | None) -> str:
    """Markdown tables (and a plot) of `compare`, `scan` and `shape` results, each given as
    {name or label: JSON path}."""
    out, acceptance = [], read_acceptance(list(compares.values()))
    out.append("| model | batch | draft | N | acceptance | tokens/round | speed-up measured | predicted | "
               "predicted/measured | draft step / plain step | verify step / plain step | identical |")
    out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    points = []
    for name, path in compares.items():
        with open(path) as f:
            r = json.load(f)
        for s in r["settings"]:
            draft = f"w={s['draft_width']:g}" + ("" if s["draft_top_k"] is None else f" top-{s['draft_top_k']}")
            out.append(f"| {name} | {r.get('batch', 1)} | {draft} | {s['n']} | {s['acceptance']:.3f} | {s['tokens_per_round']:.2f} | "
                       f"{s['measured_speedup']:.3f} | {s['predicted_speedup']:.3f} | "
                       f"{s['predicted_speedup'] / s['measured_speedup']:.3f} | {s['c_draft'] / r['c_plain']:.2f} | "
                       f"{s['c_verify'] / r['c_plain']:.2f} | {'yes' if s['identical'] else 'NO'} |")
            points.append((name, s["measured_speedup"], s["predicted_speedup"]))
    for label, path in scans.items():
        with open(path) as f:
            scan = json.load(f)
        keys = [k for k in scan["sizes"][0]["totals"] if k != "plain"]
        names = [f"draft w={k[len('draft_w'):]}" if k.startswith("draft") else f"verify N={k[len('verify_n'):]}"
                 for k in keys]
        out += ["", f"**{label}**", "", "| hidden (expert hidden) | parameters | plain step ms | "
                + " | ".join(f"{n} / plain" for n in names) + " | best predicted speed-up (draft, N) |",
                "| --- | --- | --- | " + " | ".join("---" for _ in keys) + " | --- |"]
        for size in scan["sizes"]:
            t = size["totals"]
            best = max(size["predictions"], key=lambda r: r["predicted_speedup"], default=None)
            out.append(f"| {size['hidden']} ({size['expert_hidden']}) | {size['params'] / 1e6:.1f}M | "
                       f"{t['plain'] * 1e3:.2f} | " + " | ".join(f"{t[k] / t['plain']:.2f}" for k in keys) + " | "
                       + (f"{best['predicted_speedup']:.2f} (w={best['draft_width']:g}, {best['n']})" if best else "-")
                       + " |")
    for label, path in shapes.items():
        costs = _shape_costs(path)
        rows = predictions(costs, acceptance, DRAFT_WIDTHS, DRAFT_LENGTHS)
        plain = costs.total("plain")
        out += ["", f"**{label}**: plain step {plain * 1e3:.1f} ms (MoE block {costs.moe['plain'] * 1e3:.2f} ms, "
                f"dense block {costs.dense['plain'] * 1e3:.2f} ms, embedding + head "
                f"{costs.embed_head['plain'] * 1e3:.2f} ms)", "",
                "| draft | N | tokens/round (trained models, lower) | draft / plain | verify / plain | predicted speed-up |",
                "| --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            out.append(f"| w={r['draft_width']:g} | {r['n']} | {r['tokens_per_round']:.2f} | "
                       f"{r['c_draft'] / plain:.2f} | {r['c_verify'] / plain:.2f} | {r['predicted_speedup']:.2f} |")
    if plot and points:
        _plot(points, plot)
        out += ["", f"![predicted against measured speed-up]({os.path.basename(plot)})"]
    return "\n".join(out) + "\n"


def _plot(points, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name in dict.fromkeys(p[0] for p in points):
        xs, ys = zip(*[(m, p) for n, m, p in points if n == name])
        ax.scatter(xs, ys, label=name)
    lo = min(min(m, p) for _, m, p in points) * 0.9
    hi = max(max(m, p) for _, m, p in points) * 1.1
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="predicted = measured")
    ax.fill_between([lo, hi], [lo * 0.85, hi * 0.85], [lo * 1.15, hi * 1.15], color="grey", alpha=0.15, label="+-15%")
    ax.axvline(1.0, color="tab:red", lw=0.8)
    ax.set_xlabel("measured speed-up over plain decoding")
    ax.set_ylabel("predicted speed-up (acceptance x measured step costs)")
    ax.set_title("Self-speculative greedy decoding on 2 CPU cores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI

def parse(argv=None):
    p = argparse.ArgumentParser(prog="mose-bench generation", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="plain against self-speculative decoding of a trained checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("--ckpt", required=True)
    c.add_argument("--data", default=None, help="prepared data folder (default: the run's)")
    c.add_argument("--split", default="val")
    c.add_argument("--prompts", type=int, default=8)
    c.add_argument("--prompt-tokens", type=int, default=32)
    c.add_argument("--max-new-tokens", type=int, default=64)
    c.add_argument("--draft-top-k", type=int, default=None)
    c.add_argument("--batch", type=int, default=1, help="prompts decoded together")
    for q in (c,):
        q.add_argument("--widths", type=float, nargs="+", default=list(DRAFT_WIDTHS))
        q.add_argument("--lengths", type=int, nargs="+", default=list(DRAFT_LENGTHS))
        q.add_argument("--device", default="cpu")
        q.add_argument("--out", required=True, help="JSON file to write")
    s = sub.add_parser("shape", help="per-step costs of an HF DeepSeek-V2 layer shape, random weights",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--hf-config", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      "ds_configs", "hf", "deepseek_v2_lite", "config.json"))
    n = sub.add_parser("scan", help="per-step costs of GPT-2 MoSE models of growing size, random weights",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    n.add_argument("--hidden", type=int, nargs="+", default=[128, 256, 512, 1024])
    n.add_argument("--expert-ratio", type=int, default=4, help="expert hidden / model hidden")
    n.add_argument("--layers", type=int, default=4)
    n.add_argument("--experts", type=int, default=8)
    n.add_argument("--top-k", type=int, default=2)
    n.add_argument("--vocab", type=int, default=257)
    n.add_argument("--moe-every", type=int, default=2, help="MoE in blocks 0, E, 2E, ... (2: the presets)")
    r = sub.add_parser("report", help="markdown tables and a plot of compare / scan / shape results",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--compare", nargs="+", default=[], help="NAME=compare.json ...")
    r.add_argument("--scan", nargs="*", default=[], help="LABEL=scan.json ...")
    r.add_argument("--shape", nargs="*", default=[], help="LABEL=shape.json ...")
    r.add_argument("--plot", help="PNG of predicted against measured speed-ups")
    for q in (s, n):
        q.add_argument("--context", type=int, default=128, help="tokens in the KV cache")
        q.add_argument("--repeats", type=int, default=5)
        q.add_argument("--batch", type=int, default=1, help="rows per step")
        q.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
        q.add_argument("--acceptance", nargs="*", default=[], help="compare JSON files: acceptance rates")
        q.add_argument("--widths", type=float, nargs="+", default=list(DRAFT_WIDTHS))
        q.add_argument("--lengths", type=int, nargs="+", default=list(DRAFT_LENGTHS))
        q.add_argument("--device", default="cpu")
        q.add_argument("--out", required=True, help="JSON file to write")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.command == "report":
        pairs = lambda items: dict(item.split("=", 1) for item in items)  # noqa: E731
        print(report(pairs(args.compare), pairs(args.scan), pairs(args.shape), args.plot), end="")
        return 0
    import torch

    from . import engine
    device = engine.init_distributed(device=args.device)
    if args.command == "compare":
        from .inference import load_model
        from .tokenizer import TextCodec
        loaded = load_model(args.ckpt, device=device, dropless=True)
        folder = args.data or loaded.cfg.data.path
        prompts = held_out_prompts(folder, args.split, args.prompts, args.prompt_tokens)
        codec = TextCodec.for_checkpoint(loaded.folder, args.data)
        result = compare(loaded.model, prompts, args.max_new_tokens, None, args.widths, args.lengths,
                         args.draft_top_k, codec.eot, args.batch)
        result["checkpoint"] = loaded.identity
    else:
        dtype = getattr(torch, args.dtype)
        if args.command == "shape":
            with open(args.hf_config) as f:
                hf = json.load(f)
            model, dense, moe = shape_model(hf, device, dtype)
            costs = step_costs(model, dense, moe, args.context, args.widths, args.lengths, args.repeats,
                               batch=args.batch)
            result = {"hf_config": args.hf_config, "batch": args.batch, "costs": dataclasses.asdict(costs),
                      "totals": {k: costs.total(k) for k in costs.moe},
                      "predictions": predictions(costs, read_acceptance(args.acceptance), args.widths, args.lengths)}
        else:
            result = {"sizes": [], "batch": args.batch, "moe_every": args.moe_every}
            for hidden in args.hidden:
                model, cfg = gpt2_model(hidden, hidden * args.expert_ratio, args.layers, args.experts, args.top_k,
                                        args.vocab, device, dtype)
                moe_blocks = len(range(0, args.layers, args.moe_every))
                costs = step_costs(model, args.layers - moe_blocks, moe_blocks, args.context, args.widths,
                                   args.lengths, args.repeats, batch=args.batch)
                size = {"hidden": hidden, "expert_hidden": hidden * args.expert_ratio,
                        "params": composed_parameters(model, args.layers - moe_blocks, moe_blocks),
                        "totals": {k: costs.total(k) for k in costs.moe},
                        "predictions": predictions(costs, read_acceptance(args.acceptance), args.widths,
                                                   args.lengths)}
                result["sizes"].append(size)
                best = max((r["predicted_speedup"] for r in size["predictions"]), default=None)
                print(f"hidden {hidden}: plain step {size['totals']['plain'] * 1e3:.2f} ms, "
                      + " ".join(f"{k} {v / size['totals']['plain']:.2f}x" for k, v in size["totals"].items()
                                 if k != "plain")
                      + (f", best predicted speed-up {best:.3f}" if best is not None else ""))
                del model
        result["device"] = str(device)
        result["dtype"] = args.dtype
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
