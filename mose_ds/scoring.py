"""Log-likelihood scoring of text under a width policy, with lm-evaluation-harness's rules.

`Scorer` answers the three questions evaluation tasks ask a language model: the
log-likelihood of a continuation given a context (and whether greedy decoding would
produce it), the total log-likelihood of a whole text cut into windows of the model's
context, and greedy generation. Tokenisation, truncation and windowing follow the
harness's Hugging Face model, so numbers are comparable with published lm-eval results.

One sequence per forward (batch size 1): the MoE layers size their expert capacity per
forward, so batching several requests together could drop different tokens and change a
request's score depending on its neighbours. Scoring one at a time makes every result a
function of its own input alone.

Every forward is metered (`Scorer.meter`), so a caller can report the MFLOPs per token that
the width policy actually executed on a task.

Shape legend: B batch (always 1), S sequence, V vocabulary, N continuation tokens.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from tqdm import tqdm

from .flops import FlopsMeter
from .model import MoSEGPT
from .tokenizer import TextCodec
from .widths import FULL_WIDTH, WidthPolicy


def split_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """Move the context's trailing whitespace to the start of the continuation, so that the
    space before a word is tokenised with that word (as BPE does in running text)."""
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


class Scorer:
    """Log-likelihoods of text under `model` running `policy`; see the module docstring.

    All methods run without gradients, on the model's device, one sequence per forward,
    with fp32 log-softmax.
    """

    def __init__(self, model: MoSEGPT, codec: TextCodec, policy: WidthPolicy = FULL_WIDTH):
        self.model, self.codec, self.policy = model, codec, policy
        self.max_len = model.cfg.seq_len
        self.meter = FlopsMeter(model.cfg, model.moe_cfg)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -----------------------------------------------------------------------------------
    # Forwards.

    @torch.no_grad()
    def _logits(self, ids: Sequence[int]) -> torch.Tensor:
        """One forward of `ids` (at most seq_len tokens): [S, V] logits, metered."""
        tokens_BS = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        logits_BSV, routing = self.model(tokens_BS, self.policy)
        self.meter.add(routing, tokens_BS.shape[1])
        return logits_BSV[0]

    def _score(self, context: Sequence[int], continuation: Sequence[int]) -> tuple[float, bool]:
        """Sum of log p(continuation | context) and whether greedy argmax reproduces it.

        Like the harness: keep the last seq_len + 1 tokens of context + continuation and
        feed all but the last, so the deepest context that fits conditions every token.
        """
        n = len(continuation)
        if n == 0:
            return 0.0, True
        if not context:
            raise ValueError("a continuation needs at least one context token to be predicted from")
        if n > self.max_len:
            raise ValueError(f"continuation of {n} tokens does not fit the model's context of "
                             f"{self.max_len} tokens")
        whole = (list(context) + list(continuation))[-(self.max_len + 1):]
        logits_SV = self._logits(whole[:-1])
        logp_NV = logits_SV[-n:].float().log_softmax(-1)
        target_N = torch.tensor(whole[-n:], dtype=torch.long, device=logp_NV.device)
        logp = logp_NV.gather(-1, target_N[:, None]).sum().item()
        greedy = bool((logp_NV.argmax(-1) == target_N).all())
        return logp, greedy

    # -----------------------------------------------------------------------------------
    # Requests.

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of a (context, continuation) request, split as the harness splits them:
        the continuation is what encoding the whole adds beyond the encoded context, and an
        empty context becomes the end-of-text token."""
        if context == "":
            return [self.codec.eot], self.codec.encode(continuation)
        context, continuation = split_trailing_space(context, continuation)
        whole = self.codec.encode(context + continuation)
        context_ids = self.codec.encode(context)
        return context_ids, whole[len(context_ids):]

    def loglikelihood_tokens(self, pairs: Iterable[tuple[Sequence[int], Sequence[int]]],
                             progress: bool = False) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy match) of each (context ids, continuation ids) pair."""
        pairs = list(pairs)
        return [self._score(ctx, cont) for ctx, cont in tqdm(pairs, disable=not progress, desc="loglikelihood")]

    def loglikelihood(self, requests: Iterable[tuple[str, str]], progress: bool = False
                      ) -> list[tuple[float, bool]]:
        """(sum of log p of the continuation's tokens, whether greedy decoding reproduces
        every one of them) for each (context, continuation) text pair."""
        return self.loglikelihood_tokens((self.encode_pair(c, x) for c, x in requests), progress)

    def rolling_windows(self, ids: Sequence[int]) -> list[tuple[list[int], list[int]]]:
        """(context, continuation) token pairs whose continuations cover `ids` exactly once,
        in disjoint chunks of up to seq_len tokens, the first one conditioned on [eot].

        The harness's rolling windows with context_len=1: each chunk is fed with as much
        preceding text as fits (one token for a full chunk, more for the shorter last one);
        `_score`'s left truncation keeps exactly that, so the context here is simply all
        that precedes the chunk.
        """
        seq = [self.codec.eot] + list(ids)
        return [(seq[:start], seq[start:start + self.max_len]) for start in range(1, len(seq), self.max_len)]

    def rolling_scores(self, texts: Iterable[str], progress: bool = False) -> list[tuple[float, int]]:
        """(total log-likelihood, tokens scored) of each text, in rolling windows."""
        out = []
        for text in tqdm(list(texts), disable=not progress, desc="loglikelihood_rolling"):
            ids = self.codec.encode(text)
            out.append((sum(self._score(c, x)[0] for c, x in self.rolling_windows(ids)), len(ids)))
        return out

    def loglikelihood_rolling(self, texts: Iterable[str], progress: bool = False) -> list[float]:
        """Total log-likelihood of each text (for perplexities), in rolling windows."""
        return [ll for ll, _ in self.rolling_scores(texts, progress)]

    # -----------------------------------------------------------------------------------
    # Generation.

    def greedy_continue(self, context: Sequence[int], max_new_tokens: int,
                        stop: Callable[[list[int]], bool] = lambda new: False) -> list[int]:
        """Greedily generated token ids after `context`: stops after `max_new_tokens`, at the
        end-of-text token (not returned), or once `stop(generated so far)` is true. Decoded
        with a KV cache (generation.py); a context longer than seq_len - max_new_tokens
        keeps its last tokens, so that the whole continuation fits the model's positions."""
        from .generation import PlainDecoding
        max_new_tokens = min(max_new_tokens, self.max_len - 1)
        ids = (list(context) or [self.codec.eot])[-(self.max_len - max_new_tokens):]
        decoding = PlainDecoding(self.model, self.policy, eos_id=self.codec.eot)
        return decoding.generate([ids], max_new_tokens, stop=lambda row, new: stop(new)).tokens[0]
