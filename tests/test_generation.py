"""Generation: KV-cache decoding against the full forward (both families, every policy kind,
rows of different lengths), token choice, and self-speculative decoding (greedy: the plain
greedy text; sampling: the target distribution)."""

from __future__ import annotations

import os

import pytest
import torch
from scipy.stats import chisquare

from conftest import ROOT, tiny_config
from mose_ds.config import from_dict
from mose_ds.generation import (GenerationError, PlainDecoding, Sampling, SelfSpeculativeDecoding,
                                accept_drafts)
from mose_ds.kv_cache import KVCache
from mose_ds.widths import FULL_WIDTH, NormProbPolicy, UniformPolicy

TINY_DEEPSEEK = os.path.join(ROOT, "ds_configs", "hf", "tiny_deepseek_v2")


def build(cfg, seed: int = 0, device="cpu"):
    from mose_ds.model import MoSEGPT
    model = MoSEGPT(cfg.model, cfg.moe)
    for layer in model.moe_layers():
        layer.set_deepspeed_parallelism()
    model.init_weights(seed)
    return model.to(device).eval()


def family_config(family: str, **model):
    if family == "gpt2":
        return tiny_config(model={"num_layers": 4, **model}, moe={"drop_tokens": False})
    return from_dict({"model": {"hf_config": TINY_DEEPSEEK, "seq_len": 48, **model}, "moe": {"drop_tokens": False}})


def policies(cfg):
    """One policy of each kind: full, uniform, normalised probability, a layer-wise gamma
    table's map, and routing transfer to k' = 1 (with a width)."""
    grid, layers = cfg.mose.grid, cfg.model.num_moe_layers
    return {"full": FULL_WIDTH, "uniform": UniformPolicy(0.5),
            "normprob": NormProbPolicy(1.0, 1.0, grid=grid),
            "gamma": NormProbPolicy(1.0, [0.5 + i for i in range(layers)], grid=grid),
            "top_k": UniformPolicy(0.75, top_k=1)}


def cached_logits(model, rows, policy, chunks):
    """Each row's logits at every position, fed to a cache in `chunks` (token counts per
    forward, the same for every row; rows shorter than a chunk's end are padded)."""
    device = next(model.parameters()).device
    cache = KVCache(len(model.layers), len(rows), max(len(r) for r in rows) + 4, device)
    out, start = [[] for _ in rows], 0
    for size in chunks:
        ids = torch.zeros(len(rows), size, dtype=torch.long)
        for b, row in enumerate(rows):
            part = row[start:start + size]
            ids[b, :len(part)] = part
        logits, _ = model(ids.to(device), policy, context=cache.step([start] * len(rows), size))
        for b, row in enumerate(rows):
            out[b].append(logits[b, :max(0, min(size, len(row) - start))])
        start += size
    return [torch.cat(o) for o in out]


@pytest.mark.parametrize("family", ["gpt2", "deepseek_v2"])
def test_cached_decoding_equals_the_full_forward_for_every_policy(world, family):
    cfg = family_config(family)
    model = build(cfg)
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, cfg.model.vocab_size, (n,), generator=gen) for n in (11, 6, 9)]
    for name, policy in policies(cfg).items():
        with torch.no_grad():
            full = [model(r[None], policy)[0][0] for r in rows]
            # a prompt chunk, single steps, a verify-sized chunk, single steps
            cached = cached_logits(model, rows, policy, [4, 1, 1, 3, 1, 1])
        for b in range(len(rows)):
            assert torch.allclose(cached[b], full[b], atol=1e-5, rtol=0), (family, name, b)


def test_rows_at_different_slots_and_a_rolled_back_row(world):
    """Rows that sit at different slots in one forward (ragged starts), and a row whose last
    slots are rewritten (a rolled-back draft), give the full forward's logits."""
    cfg = family_config("gpt2")
    model = build(cfg)
    gen = torch.Generator().manual_seed(2)
    a, b, junk = (torch.randint(0, cfg.model.vocab_size, (n,), generator=gen) for n in (7, 5, 2))
    cache = KVCache(len(model.layers), 2, 12)
    with torch.no_grad():
        model(torch.stack([a[:5], torch.cat([b[:4], junk[:1]])]), FULL_WIDTH, context=cache.step([0, 0], 5))
        model(torch.stack([a[5:6], junk[1:2]]), FULL_WIDTH, context=cache.step([5, 5], 1))   # b: junk at 4, 5
        # b rolls back to 4 slots; in one forward the rows write slots 6 and 4 (over b's junk)
        step, _ = model(torch.stack([a[6:7], b[4:5]]), FULL_WIDTH, context=cache.step([6, 4], 1))
        full_a, full_b = (model(r[None], FULL_WIDTH)[0][0, -1] for r in (a, b))
    assert torch.allclose(step[0, 0], full_a, atol=1e-5) and torch.allclose(step[1, 0], full_b, atol=1e-5)


def test_sampling_processes_logits_as_documented():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    assert Sampling().probs(logits).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    soft = torch.softmax(logits / 0.5, -1)
    assert torch.allclose(Sampling(temperature=0.5).probs(logits), soft)
    top2 = Sampling(temperature=0.5, top_k=2).probs(logits)
    assert torch.allclose(top2, torch.cat([soft[:, :2] / soft[:, :2].sum(), torch.zeros(1, 2)], 1))
    p = torch.softmax(logits, -1)[0]                       # 0.644, 0.237, 0.087, 0.032
    nucleus = Sampling(temperature=1.0, top_p=0.85).probs(logits)[0]   # the top two hold 0.881 >= 0.85
    assert torch.allclose(nucleus, torch.cat([p[:2] / p[:2].sum(), torch.zeros(2)]))
    assert torch.allclose(Sampling(temperature=1.0, top_p=0.9).probs(logits)[0][:3], p[:3] / p[:3].sum())
    with pytest.raises(GenerationError, match="top_p"):
        Sampling(temperature=1.0, top_p=0.0)


def test_the_rejection_rule_returns_the_target_distribution():
    """One draft token from q, kept with probability min(1, p/q), else a token from
    max(p - q, 0): the result is distributed as p (20,000 draws, chi-square)."""
    p_V = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q_V = torch.tensor([0.1, 0.2, 0.3, 0.4])                 # far from p: most drafts are rejected
    sampling, gen = Sampling(temperature=1.0), torch.Generator().manual_seed(0)
    p_21V = torch.stack([p_V, torch.tensor([0.25] * 4)])
    counts, kept = torch.zeros(4), 0
    for _ in range(20_000):
        d = int(torch.multinomial(q_V, 1, generator=gen))
        n, token = accept_drafts([d], q_V[None], p_21V, sampling, gen)
        counts[d if n == 1 else token] += 1
        kept += n
    assert 0.2 < kept / 20_000 < 0.6                          # both branches were taken
    assert chisquare(counts.numpy(), 20_000 * p_V.numpy()).pvalue > 1e-3


def test_greedy_self_speculative_text_is_the_plain_greedy_text(world):
    """20 prompts of different lengths: plain decoding of all of them in one batch, then
    self-speculative decoding of all of them in one batch for each draft setting (rows keep
    different numbers of drafts each round), and of each alone for one setting. The weights
    are random and large enough (std 0.15) for narrow drafts to be refused often."""
    model = build(family_config("gpt2", vocab_size=64, init_std=0.15), seed=3)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 64, (int(n),), generator=gen).tolist()
               for n in torch.randint(2, 9, (20,), generator=gen)]
    plain = PlainDecoding(model, FULL_WIDTH).generate(prompts, 12)
    assert all(len(t) == 12 for t in plain.tokens)
    rates = {}
    for width, top_k, n in [(0.25, None, 2), (0.5, None, 4), (0.75, None, 8), (1.0, 1, 3), (0.25, 1, 4)]:
        spec = SelfSpeculativeDecoding(model, FULL_WIDTH, UniformPolicy(width, top_k=top_k), n)
        result = spec.generate(prompts, 12)
        assert result.tokens == plain.tokens, (width, top_k, n)
        rates[(width, top_k, n)] = result.acceptance_rate
        assert result.target_forwards == result.rounds <= 11 and result.draft_forwards == n * result.rounds
        assert n * result.rounds <= result.drafted <= 20 * n * result.rounds
    spec = SelfSpeculativeDecoding(model, FULL_WIDTH, UniformPolicy(0.5), 3)
    batched, alone = spec.generate(prompts, 12), [spec.generate([p], 12) for p in prompts]
    assert [g.tokens[0] for g in alone] == plain.tokens == batched.tokens
    assert sum(g.accepted for g in alone) == batched.accepted and sum(g.drafted for g in alone) == batched.drafted
    # a draft under the target's own policy is always kept: rows draft from the right position,
    # also from a two-token feed after a full acceptance
    itself = SelfSpeculativeDecoding(model, FULL_WIDTH, FULL_WIDTH, 3).generate(prompts, 12)
    assert itself.tokens == plain.tokens and itself.acceptance_rate == 1.0
    assert all(0.1 < r < 0.9 for r in rates.values()), rates         # drafts were kept and refused


def test_speculative_sampling_follows_the_target_policy(world):
    """A tiny model over 5 tokens with peaked distributions: the joint law of generated tokens
    2 and 3 under self-speculative sampling (draft width 0.25, top-1 routing, 2 drafts) equals
    the target policy's, computed exactly from full forwards (600 rows decoded 15 to a batch,
    so rows that keep different numbers of drafts share forwards; chi-square)."""
    cfg = family_config("gpt2", vocab_size=5, init_std=0.5, num_layers=2)
    model = build(cfg, seed=4)
    prompt, sampling = [1, 3], Sampling(temperature=1.0)
    with torch.no_grad():
        probs = lambda seq: sampling.probs(model(torch.tensor([seq]), FULL_WIDTH)[0][:, -1])[0]  # noqa: E731
        p1 = probs(prompt)
        exact = torch.zeros(5, 5)
        for t1 in range(5):
            p2 = probs(prompt + [t1])
            for t2 in range(5):
                exact[t2] += p1[t1] * p2[t2] * probs(prompt + [t1, t2])
    counts, drafted, accepted = torch.zeros(5, 5), 0, 0
    draft = UniformPolicy(0.25, top_k=1)
    for seed in range(40):                                    # 40 batches of 15 rows: 600 samples
        out = SelfSpeculativeDecoding(model, FULL_WIDTH, draft, 2, Sampling(temperature=1.0, seed=seed)).generate(
            [prompt] * 15, 3)
        for tokens in out.tokens:
            counts[tokens[1], tokens[2]] += 1
        drafted, accepted = drafted + out.drafted, accepted + out.accepted
    assert 0.2 < accepted / drafted < 0.9, accepted / drafted
    cells = exact.flatten() * 600 >= 5
    observed, expected = counts.flatten()[cells], exact.flatten()[cells] * 600
    expected *= observed.sum() / expected.sum()
    assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3


def test_the_draft_shares_the_caches_before_the_first_moe_output(world):
    gpt2 = build(family_config("gpt2"))                       # MoE in blocks 0 and 2
    deepseek = build(family_config("deepseek_v2"))            # block 0 dense, then MoE
    assert gpt2.first_moe_block() == 0 and deepseek.first_moe_block() == 1
    target = KVCache(4, 1, 8)
    draft = KVCache(4, 1, 8, shared_from=target, shared_layers=2)
    assert [d is t for d, t in zip(draft.stores, target.stores)] == [True, True, False, False]


def test_bad_requests_are_one_line_errors(world):
    model = build(family_config("gpt2"))
    plain = PlainDecoding(model, FULL_WIDTH)
    with pytest.raises(GenerationError, match="32 positions"):
        plain.generate([[1] * 30], 8)
    with pytest.raises(GenerationError, match="token id 5000"):
        plain.generate([[1, 5000]], 2)
    with pytest.raises(GenerationError, match="at least one token"):
        plain.generate([[]], 2)
    with pytest.raises(ValueError, match="top_k=3"):
        PlainDecoding(model, UniformPolicy(0.5, top_k=3)).generate([[1, 2]], 2)
    dropping = build(tiny_config(model={"num_layers": 2}, moe={"drop_tokens": True}))   # expert capacity
    with pytest.raises(GenerationError, match="needs a dropless model"):
        SelfSpeculativeDecoding(dropping, FULL_WIDTH, UniformPolicy(0.5), 2).generate([[1, 2]], 2)
    with pytest.raises(GenerationError, match="needs a dropless model"):
        PlainDecoding(dropping, FULL_WIDTH).generate([[1, 2], [3]], 2)


def test_mose_generate_plain_batched_speculative_and_auto_draft(trained, tmp_path, capsys):
    """The command on the suite's trained model: one prompt streams its text, and without
    --max-new-tokens generates what the model's 32 positions leave room for; a file of
    prompts decodes as one batch, self-speculative (--json) giving plain decoding's tokens;
    --auto-draft, timed on a short first prompt, skips the draft lengths that leave a longer
    prompt of the batch no room under the 32 positions, and decodes."""
    import json

    from conftest import load_tool
    generate = load_tool("generate").main
    assert generate(["--ckpt", trained, "--prompt", "the king", "--max-new-tokens", "6"]) == 0
    streamed = capsys.readouterr()
    assert streamed.out.startswith("the king") and len(streamed.out) > len("the king") and "6 tokens" in streamed.err
    for draft in ([], ["--draft-width", "0.5", "--draft-tokens", "3"]):   # no --max-new-tokens: what fits 32
        assert generate(["--ckpt", trained, "--prompt", "the king", "--json", *draft]) == 0
        (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert 1 <= len(row["tokens"]) <= 32 - 2 - (4 if draft else 0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the king\nmy lord, the\n\nand so\n")
    runs = {}
    for name, extra in {"plain": [], "draft": ["--draft-width", "0.5", "--draft-tokens", "3"]}.items():
        assert generate(["--ckpt", trained, "--prompts-file", str(prompts), "--max-new-tokens", "8", "--json",
                         *extra]) == 0
        runs[name] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in runs["draft"]] == ["the king", "my lord, the", "and so"]
    assert [r["tokens"] for r in runs["draft"]] == [r["tokens"] for r in runs["plain"]]
    assert runs["plain"][0]["acceptance_rate"] is None and 0 <= runs["draft"][0]["acceptance_rate"] <= 1
    prompts.write_text("the\n" + " ".join(["the"] * 24) + "\n")   # 24 tokens + 3 new + 9 do not fit 32
    assert generate(["--ckpt", trained, "--prompts-file", str(prompts), "--max-new-tokens", "3", "--auto-draft"]) == 0
    err = capsys.readouterr().err
    assert "width 0.25 x 8 skipped" in err and "auto-draft: width 0.25 x 2:" in err


def test_generation_benchmark_compares_batches_of_prompts(trained, tmp_path):
    """`mose-bench generation compare --batch 2` on the suite's trained model: each batch is
    decoded by plain and self-speculative decoding with identical text, tokens per round count
    a row's own rounds (at most N + 1, at least 1), and the report shows the batch."""
    import json

    from mose_ds.generation_bench import compare, report
    from mose_ds.inference import load_model
    model = load_model(trained, dropless=True).model
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 50, (6,), generator=gen).tolist() for _ in range(4)]
    result = compare(model, prompts, 10, widths=(1.0,), lengths=(2,), batch=2, log=lambda _: None)
    (setting,) = result["settings"]
    assert result["batch"] == 2 and setting["identical"] and setting["acceptance"] == 1.0
    assert setting["tokens_per_round"] == 3.0                 # a full-width draft: every round keeps N + 1
    path = tmp_path / "compare.json"
    path.write_text(json.dumps(result))
    assert "| tiny | 2 | w=1 | 2 | 1.000 | 3.00 |" in report({"tiny": str(path)}, {}, {}, None)
