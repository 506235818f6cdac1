"""Text generation with a KV cache, plain or self-speculative, at any width policy.

`PlainDecoding` feeds the prompts once (right-padded, rows of different lengths in one
batch) and then one token per row per forward against the cache (`kv_cache.py`).

`SelfSpeculativeDecoding` drafts with the same weights under a cheaper policy (a narrow
uniform width, fewer routed experts, or both) and verifies with the target policy:

1. the draft proposes N tokens, one forward each, against its own cache;
2. the target scores the last committed token and the N drafts in one forward;
3. the longest prefix the target agrees with is kept, plus one token of the target's own
   (a correction, or a bonus when all N were kept). Greedy: agreement is equal argmax, so
   the text is the plain greedy text. Sampling: draft token d is kept with probability
   min(1, p(d) / q(d)), and a rejection samples from max(p - q, 0) renormalised, so every
   token is distributed exactly as the target policy's (Leviathan et al., 2023; Chen et
   al., 2023).

The draft and the target share the cache of every block up to the first MoE block (their
inputs there do not depend on widths or routing); later blocks have a cache each. The
draft's cache is rolled back to the accepted prefix after each verification.

Every token choice goes through `Sampling.probs` (temperature, top-k, top-p), for the
draft and the target alike: the target distribution is the processed one.

Shape legend: B rows, S tokens, V vocabulary, N draft tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .kv_cache import KVCache
from .model import MoSEGPT
from .widths import WidthPolicy


class GenerationError(ValueError):
    """A generation request the model cannot serve; the message names it."""


@dataclass(frozen=True)
class Sampling:
    """How a token is chosen from logits: greedy (temperature 0) or sampled from the
    distribution at `temperature`, cut to the `top_k` most likely tokens (0: all) and to the
    smallest set holding `top_p` of the mass (1: all), with a seeded generator."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise GenerationError(f"sampling needs temperature >= 0, top_k >= 0 and top_p in (0, 1], got "
                                  f"temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits_BV: torch.Tensor) -> torch.Tensor:
        """The processed distribution [B, V] in fp32 (greedy: one-hot at the argmax)."""
        logits_BV = logits_BV.float()
        if self.greedy:
            return torch.zeros_like(logits_BV).scatter_(-1, logits_BV.argmax(-1, keepdim=True), 1.0)
        logits_BV = logits_BV / self.temperature
        if self.top_k and self.top_k < logits_BV.shape[-1]:
            kth_B1 = logits_BV.topk(self.top_k, dim=-1).values[..., -1:]
            logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
        probs_BV = torch.softmax(logits_BV, dim=-1)
        if self.top_p < 1:
            sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
            before_BV = sorted_BV.cumsum(-1) - sorted_BV           # mass of the more likely tokens
            sorted_BV = sorted_BV.masked_fill(before_BV >= self.top_p, 0.0)
            probs_BV = torch.zeros_like(probs_BV).scatter_(-1, order_BV, sorted_BV)
            probs_BV = probs_BV / probs_BV.sum(-1, keepdim=True)
        return probs_BV

    def generator(self, device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed)

    def choose(self, probs_BV: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One token per row [B] from processed distributions."""
        if self.greedy:
            return probs_BV.argmax(-1)
        return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def accept_drafts(drafts: Sequence[int], q_NV: torch.Tensor, p_N1V: torch.Tensor, sampling: Sampling,
                  generator: torch.Generator) -> tuple[int, int]:
    """(how many of the N drafted tokens to keep, the target's next token).

    `q_NV`: the draft's processed distributions the drafts were drawn from; `p_N1V`: the
    target's at the same N positions and one more. Greedy keeps drafts while they equal the
    target's argmax. Sampling keeps draft i with probability min(1, p_i(d_i) / q_i(d_i)); at
    the first rejection the next token comes from max(p_i - q_i, 0), renormalised; when all
    are kept, from p_N. One host read decides."""
    N = len(drafts)
    d_N = torch.tensor(list(drafts), device=p_N1V.device)
    rows_N = torch.arange(N, device=p_N1V.device)
    p_at_N = p_N1V[rows_N, d_N]
    if sampling.greedy:
        keep_N = p_at_N > 0                                   # one-hot: the target's argmax is d
    else:
        u_N = torch.rand(N, generator=generator, device=p_N1V.device)
        keep_N = u_N * q_NV[rows_N, d_N] < p_at_N            # u < p / q without dividing by q
    kept = int(torch.cat([keep_N, keep_N.new_zeros(1)]).float().argmin())   # first rejection (host read)
    if kept == N or sampling.greedy:
        return kept, int(sampling.choose(p_N1V[kept:kept + 1], generator))
    residual_V = (p_N1V[kept] - q_NV[kept]).clamp_min(0)
    if float(residual_V.sum()) <= 0:                          # p == q here: cannot reject; numerics
        residual_V = p_N1V[kept]
    return kept, int(torch.multinomial(residual_V / residual_V.sum(), 1, generator=generator))


@dataclass
class Generation:
    """What a generation produced and what it cost."""
    tokens: list[list[int]]                 # generated ids per prompt (the end-of-text token excluded)
    seconds: float = 0.0
    target_forwards: int = 0
    draft_forwards: int = 0
    drafted: int = 0                        # draft tokens proposed
    accepted: int = 0                       # draft tokens the target kept
    rounds: int = 0                         # verifications
    forward_seconds: dict = field(default_factory=lambda: {"prefill": 0.0, "target": 0.0, "draft": 0.0})

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    def summary(self) -> dict:
        return {"new_tokens": self.new_tokens, "seconds": round(self.seconds, 4),
                "tokens_per_second": round(self.tokens_per_second, 3),
                "acceptance_rate": None if self.acceptance_rate is None else round(self.acceptance_rate, 4),
                "target_forwards": self.target_forwards, "draft_forwards": self.draft_forwards,
                "drafted": self.drafted, "accepted": self.accepted, "rounds": self.rounds,
                "forward_seconds": {k: round(v, 4) for k, v in self.forward_seconds.items()}}


def max_positions(model: MoSEGPT) -> int:
    """The longest sequence the model can place: its learned positions (GPT-2), or the HF
    config's `max_position_embeddings` (rotary; DeepSeek-V2)."""
    if model.wpe is not None:
        return model.wpe.num_embeddings
    return int(model.cfg.hf.get("max_position_embeddings", model.cfg.seq_len))


class _Run:
    """Bookkeeping shared by both decoders: the device, timing per kind of forward, the
    stopping rule and the stream of new tokens."""

    def __init__(self, model: MoSEGPT, eos_id: int | None, on_tokens: Callable | None, result: Generation,
                 stop: Callable | None = None):
        self.model, self.eos_id, self.on_tokens, self.result = model, eos_id, on_tokens, result
        self.stop = stop
        self.device = next(model.parameters()).device

    def forward(self, kind: str, ids_BS: torch.Tensor, policy: WidthPolicy, context) -> torch.Tensor:
        begin = time.perf_counter()
        logits_BSV, _ = self.model(ids_BS.to(self.device), policy, context=context)
        logits_BSV = logits_BSV.float()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.result.forward_seconds[kind] += time.perf_counter() - begin
        return logits_BSV

    def emit(self, row: int, ids: list[int], limit: int) -> bool:
        """Append ids to a row up to `limit` new tokens, the end-of-text token or the caller's
        `stop(row, tokens so far)`; True when the row is done."""
        out = self.result.tokens[row]
        for token in ids:
            if token == self.eos_id or len(out) >= limit:
                return True
            out.append(token)
            if self.on_tokens:
                self.on_tokens(row, [token])
            if self.stop and self.stop(row, out):
                return True
        return len(out) >= limit


def _check_dropless(model: MoSEGPT, why: str) -> None:
    """A token's output must not depend on the other tokens of its forward: with expert
    capacity a verify chunk (or a padded batch) can drop slots a one-token step keeps."""
    if any(layer.moe.drop_tokens for layer in model.moe_layers()):
        raise GenerationError(f"{why} needs a dropless model (moe.drop_tokens: false; "
                              "inference.load_model(..., dropless=True))")


def _check(model: MoSEGPT, prompts: Sequence[Sequence[int]], room: int) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt needs at least one token")
    vocab = model.wte.num_embeddings
    bad = [t for p in prompts for t in p if not 0 <= t < vocab]
    if bad:
        raise GenerationError(f"token id {bad[0]} is outside the model's vocabulary of {vocab}")
    longest = max(len(p) for p in prompts) + room
    if longest > max_positions(model):
        raise GenerationError(f"prompt of {max(len(p) for p in prompts)} tokens + {room} new does not fit the "
                              f"model's {max_positions(model)} positions")


@dataclass
class PlainDecoding:
    """Batched decoding under one width policy: the prompts in one forward, then one token
    per row per forward."""
    model: MoSEGPT
    policy: WidthPolicy
    sampling: Sampling = Sampling()
    eos_id: int | None = None

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 on_tokens: Callable[[int, list[int]], None] | None = None,
                 stop: Callable[[int, list[int]], bool] | None = None) -> Generation:
        """Up to `max_new_tokens` per prompt; `on_tokens(row, new ids)` sees them as they come,
        `stop(row, ids so far)` ends a row early."""
        _check(self.model, prompts, max_new_tokens)
        if len(prompts) > 1:
            _check_dropless(self.model, "decoding a batch of prompts")
        result = Generation([[] for _ in prompts])
        run = _Run(self.model, self.eos_id, on_tokens, result, stop)
        begin = time.perf_counter()
        B, lengths = len(prompts), [len(p) for p in prompts]
        cache = KVCache(len(self.model.layers), B, max(lengths) + max_new_tokens, run.device)
        ids_BS = _right_padded([list(p) for p in prompts])
        logits_BSV = run.forward("prefill", ids_BS, self.policy, cache.step([0] * B, max(lengths)))
        last_BV = logits_BSV[torch.arange(B), torch.tensor(lengths) - 1]
        generator, done, starts = self.sampling.generator(run.device), [False] * B, list(lengths)
        while True:
            next_B = self.sampling.choose(self.sampling.probs(last_BV), generator)
            for b, token in enumerate(next_B.tolist()):
                done[b] = done[b] or run.emit(b, [token], max_new_tokens)
            if all(done):
                break
            last_BV = run.forward("target", next_B[:, None], self.policy, cache.step(starts, 1))[:, 0]
            result.target_forwards += 1
            starts = [s + 1 for s in starts]
        result.seconds = time.perf_counter() - begin
        return result


@dataclass
class SelfSpeculativeDecoding:
    """The target policy's text, drafted `draft_tokens` at a time by the same weights under
    `draft_policy`, for a batch of prompts at once.

    Rows move independently: each keeps its own count of tokens in each cache, so a round
    drafts N tokens for every row, verifies N + 1 per row in one forward, and every row keeps
    its own accepted prefix. A row that finishes stays in the batch, frozen (its forwards
    write junk at its slot 0 and are ignored). Batching is where a narrow draft pays at a modest
    size: a plain step of several rows reads most experts anyway, so verifying N + 1 tokens
    per row reads few more weights, while the draft reads a fraction of them."""
    model: MoSEGPT
    policy: WidthPolicy
    draft_policy: WidthPolicy
    draft_tokens: int = 4
    sampling: Sampling = Sampling()
    eos_id: int | None = None

    def __post_init__(self):
        if self.draft_tokens < 1:
            raise GenerationError(f"draft_tokens={self.draft_tokens}: needs at least 1")

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 on_tokens: Callable[[int, list[int]], None] | None = None,
                 stop: Callable[[int, list[int]], bool] | None = None) -> Generation:
        """Up to `max_new_tokens` per prompt; `on_tokens(row, new ids)` sees them as they come,
        `stop(row, ids so far)` ends a row early."""
        N = self.draft_tokens
        _check(self.model, prompts, max_new_tokens + N + 1)
        _check_dropless(self.model, "self-speculative decoding")
        result = Generation([[] for _ in prompts])
        run = _Run(self.model, self.eos_id, on_tokens, result, stop)
        begin = time.perf_counter()
        generator, sampling = self.sampling.generator(run.device), self.sampling
        B, lengths = len(prompts), [len(p) for p in prompts]
        capacity = max(lengths) + max_new_tokens + N + 1
        target = KVCache(len(self.model.layers), B, capacity, run.device)
        draft = KVCache(len(self.model.layers), B, capacity, run.device, shared_from=target,
                        shared_layers=self.model.first_moe_block() + 1)
        ids_BS = _right_padded([list(p) for p in prompts])
        logits_BSV = run.forward("prefill", ids_BS, self.policy, target.step([0] * B, max(lengths)))
        run.forward("prefill", ids_BS, self.draft_policy, draft.step([0] * B, max(lengths)))
        first_B = sampling.choose(sampling.probs(logits_BSV[torch.arange(B), torch.tensor(lengths) - 1]), generator)
        seqs = [list(p) + [t] for p, t in zip(prompts, first_B.tolist())]
        done = [run.emit(b, [seqs[b][-1]], max_new_tokens) for b in range(B)]
        # Slots each cache holds of each row's seq; a finished row's are 0 and its writes junk.
        target_len = [0 if d else n for d, n in zip(done, lengths)]
        draft_len = list(target_len)
        while not all(done):
            drafts_BN, q_BNV = self._draft(run, draft, seqs, draft_len, done, generator)
            verify_BS = torch.tensor([seqs[b][target_len[b]:] + drafts_BN[b] if not done[b] else [0] * (N + 1)
                                      for b in range(B)])          # the last committed token, then the drafts
            p_BSV = sampling.probs(run.forward("target", verify_BS, self.policy,
                                               target.step(target_len, N + 1)).flatten(0, 1)).view(B, N + 1, -1)
            result.draft_forwards += N
            result.target_forwards += 1
            result.rounds += 1
            for b in (b for b in range(B) if not done[b]):
                kept, token = accept_drafts(drafts_BN[b], q_BNV[b], p_BSV[b], sampling, generator)
                result.drafted += N
                result.accepted += kept
                target_len[b] = len(seqs[b]) + kept
                draft_len[b] = min(draft_len[b], target_len[b])    # roll the draft back to the kept prefix
                new = drafts_BN[b][:kept] + [token]
                seqs[b] += new
                done[b] = run.emit(b, new, max_new_tokens)
                if done[b]:
                    target_len[b] = draft_len[b] = 0                # frozen: later writes land at slot 0
        result.seconds = time.perf_counter() - begin
        return result

    def _draft(self, run: _Run, draft: KVCache, seqs: list[list[int]], draft_len: list[int], done: list[bool],
               generator: torch.Generator) -> tuple[list[list[int]], torch.Tensor]:
        """N draft tokens per row and the draft distributions they came from [B, N, V].
        A row's first feed is the tokens its draft cache lacks: one, or two after a full
        acceptance (the last draft and the bonus token); shorter feeds are right-padded, and
        a padded slot is overwritten by the row's next step before any query sees it.
        Advances `draft_len`; a finished row's feed is padding at slot 0."""
        B, sampling = len(seqs), self.sampling
        feeds = [[0] if done[b] else seqs[b][draft_len[b]:] for b in range(B)]
        drafts_BN, q_rows = [[] for _ in range(B)], []
        for _ in range(self.draft_tokens):
            width = max(len(f) for f in feeds)
            logits_BSV = run.forward("draft", _right_padded(feeds), self.draft_policy, draft.step(draft_len, width))
            q_BV = sampling.probs(logits_BSV[torch.arange(B), torch.tensor([len(f) for f in feeds]) - 1])
            tokens = sampling.choose(q_BV, generator).tolist()
            q_rows.append(q_BV)
            for b in range(B):
                if not done[b]:
                    draft_len[b] += len(feeds[b])
                    drafts_BN[b].append(tokens[b])
            feeds = [[0] if done[b] else [tokens[b]] for b in range(B)]
        return drafts_BN, torch.stack(q_rows, dim=1)


def _right_padded(rows: list[list[int]]) -> torch.Tensor:
    """Token rows of different lengths as one [B, S] tensor, padded on the right with 0."""
    ids_BS = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for b, row in enumerate(rows):
        ids_BS[b, :len(row)] = torch.as_tensor(row, dtype=torch.long)
    return ids_BS
