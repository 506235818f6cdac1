"""mose-generate: text from a checkpoint at any width policy, plain or self-speculative.

    mose-generate --ckpt runs/quickstart --prompt "ROMEO:"
    mose-generate --ckpt RUN --prompt "ROMEO:" --policy uniform --width 0.5 --temperature 0.8 --top-p 0.9
    mose-generate --ckpt RUN --prompt "ROMEO:" --draft-width 0.25 --draft-tokens 4 --json
    mose-generate --ckpt RUN --prompts-file prompts.txt --auto-draft

The text streams to stdout as it is generated (with --json, stdout carries one JSON object
per prompt instead: `text`, `tokens` (the generated ids), `acceptance_rate`, draft and
verify forwards, tokens/s). A draft (`--draft-width`, `--draft-top-k`, or `--auto-draft`)
turns on self-speculative decoding: the same weights at the draft policy propose
`--draft-tokens` tokens, the target policy verifies them in one forward; the text is the
target policy's (greedy: identical to plain decoding; sampling: the same distribution).
`--auto-draft` times each draft width (0.25 / 0.5 / 0.75) and length (2 / 4 / 8), and plain
decoding, on the first prompt (repeated to the batch's size: the best draft depends on it) and
keeps the fastest. Prompts of a file are decoded as one batch. A summary goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import library_output
from ..policies import add_policy_arguments

DEFAULT_NEW_TOKENS = 128


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mose-generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a run folder, checkpoint root or tag folder")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="the prompt text")
    prompts.add_argument("--prompts-file", help="a text file, one prompt per line (one batch)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"tokens per prompt (unset: {DEFAULT_NEW_TOKENS}, or fewer where the model's positions end sooner)")
    p.add_argument("--data", help="prepared data folder (only for a checkpoint that records no tokenizer)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--top-k", type=int, help="route to k' <= k experts (routing transfer) in the target policy")
    add_policy_arguments(p.add_argument_group("target width policy"))
    s = p.add_argument_group("token choice (greedy unless a temperature is given)")
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--sample-top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    s.add_argument("--seed", type=int, default=0)
    d = p.add_argument_group("self-speculative decoding")
    d.add_argument("--draft-width", type=float, help="the draft's uniform width")
    d.add_argument("--draft-top-k", type=int, help="the draft routes to k' < k experts")
    d.add_argument("--draft-tokens", type=int, default=4, help="tokens drafted per verification")
    d.add_argument("--auto-draft", action="store_true",
                   help="time the draft settings on the first prompt (as many rows as prompts), keep the fastest")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout, no streamed text")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    with library_output() as out:
        from ..checkpoint import CheckpointError
        from ..config import ConfigError
        from ..devices import DeviceError
        from ..generation import GenerationError
        from ..policies import PolicyError
        from ..tokenizer import TokenizerError
        try:
            return run(args, out)
        except (CheckpointError, ConfigError, DeviceError, GenerationError, PolicyError, TokenizerError, OSError,
                ValueError) as e:
            print(f"mose-generate: {e}", file=sys.stderr)
            return 2


def read_prompts(args) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    with open(args.prompts_file, encoding="utf-8") as f:
        prompts = [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file {args.prompts_file}: no prompt in it")
    return prompts


def decoder(model, target, args, width: float | None, top_k: int | None, tokens: int, eos_id):
    """Plain decoding, or self-speculative decoding with a draft at (width, top_k)."""
    from ..generation import PlainDecoding, Sampling, SelfSpeculativeDecoding
    from ..widths import UniformPolicy
    sampling = Sampling(args.temperature, args.sample_top_k, args.top_p, args.seed)
    if width is None and top_k is None:
        return PlainDecoding(model, target, sampling, eos_id)
    draft = UniformPolicy(1.0 if width is None else width, top_k=top_k)
    return SelfSpeculativeDecoding(model, target, draft, tokens, sampling, eos_id)


def auto_draft(model, target, args, prompt: list[int], rows: int, longest: int, eos_id) -> tuple[tuple, list[dict]]:
    """The fastest of plain decoding and each (draft width, draft length) on one prompt,
    decoded as `rows` rows; a draft length that leaves the batch's longest prompt no room for
    `--max-new-tokens` under the model's positions is skipped."""
    from ..generation import max_positions
    from ..generation_bench import DRAFT_LENGTHS, DRAFT_WIDTHS
    budget, positions = min(args.max_new_tokens, 48), max_positions(model)
    trials = []
    for width, n in [(None, 0)] + [(w, n) for w in DRAFT_WIDTHS for n in DRAFT_LENGTHS]:
        if width is not None and longest + args.max_new_tokens + n + 1 > positions:
            print(f"auto-draft: width {width:g} x {n} skipped: {longest} prompt tokens + {args.max_new_tokens} new + "
                  f"{n + 1} do not fit the model's {positions} positions", file=sys.stderr)
            continue
        gen = decoder(model, target, args, width, args.draft_top_k if width else None, n, eos_id).generate(
            [prompt] * rows, budget)
        trials.append({"draft_width": width, "draft_tokens": n or None, "tokens_per_second": gen.tokens_per_second,
                       "acceptance_rate": gen.acceptance_rate})
        print(f"auto-draft: {'plain' if width is None else f'width {width:g} x {n}'}: "
              f"{gen.tokens_per_second:.1f} tokens/s", file=sys.stderr)
    best = max(trials, key=lambda t: t["tokens_per_second"])
    return (best["draft_width"], best["draft_tokens"]), trials


def run(args, out) -> int:
    import dataclasses

    from .. import engine
    from ..generation import max_positions
    from ..inference import load_model
    from ..policies import build_policy, spec_from_arguments
    from ..tokenizer import TextCodec
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: needs at least 1")
    device = engine.init_distributed(device=args.device)
    loaded = load_model(args.ckpt, device=device, dropless=True)
    codec = TextCodec.for_checkpoint(loaded.folder, args.data)
    target = build_policy(spec_from_arguments(args), loaded.cfg, loaded.identity)
    if args.top_k is not None:
        target = dataclasses.replace(target, top_k=args.top_k)
    prompts = read_prompts(args)
    ids = [codec.encode(p) for p in prompts]
    width, top_k, tokens, trials = args.draft_width, args.draft_top_k, args.draft_tokens, None
    if args.max_new_tokens is None:             # as many as fit, plainly or with the draft asked for
        drafting = width is not None or top_k is not None
        room = max_positions(loaded.model) - max(map(len, ids)) - (tokens + 1 if drafting else 0)
        args.max_new_tokens = max(1, min(DEFAULT_NEW_TOKENS, room))   # no room at all: the decoder says so
    if args.auto_draft:
        (width, tokens), trials = auto_draft(loaded.model, target, args, ids[0], len(ids), max(map(len, ids)),
                                             codec.eot)
        top_k = top_k if width is not None else None
    dec = decoder(loaded.model, target, args, width, top_k, tokens, codec.eot)
    streams = [StreamedText(codec, out, quiet=args.json or len(ids) > 1) for _ in ids]   # one prompt streams
    if not args.json and len(ids) == 1:
        out.write(prompts[0])
    gen = dec.generate(ids, args.max_new_tokens, on_tokens=lambda row, new: streams[row].add(new))
    for row, prompt in enumerate(prompts):
        if not args.json and len(ids) > 1:
            print(f"--- {prompt}\n{codec.decode(gen.tokens[row])}", file=out)
        if args.json:
            print(json.dumps({"prompt": prompt, "text": codec.decode(gen.tokens[row]), "tokens": gen.tokens[row],
                              **gen.summary(), "policy": spec_from_arguments(args).label(),
                              "draft": None if width is None and top_k is None else
                              {"width": width, "top_k": top_k, "tokens": tokens}, "auto_draft": trials}), file=out)
    rate = gen.acceptance_rate
    print(f"\n{gen.new_tokens} tokens in {gen.seconds:.2f} s ({gen.tokens_per_second:.1f} tokens/s) on {device}, "
          f"{spec_from_arguments(args).label()}"
          + ("" if rate is None else f"; self-speculative: draft width {width if width is not None else 1:g}"
             f"{'' if top_k is None else f' top-{top_k}'} x {tokens}, acceptance {rate:.2f}, "
             f"{gen.draft_forwards} draft + {gen.target_forwards} verify forwards"), file=sys.stderr)
    return 0


class StreamedText:
    """Writes a row's text to stdout as tokens arrive: the decoded text so far, less what
    was already written (a multi-byte character is written once its bytes are complete)."""

    def __init__(self, codec, out, quiet: bool):
        self.codec, self.out, self.quiet, self.ids, self.written = codec, out, quiet, [], ""

    def add(self, new: list[int]) -> None:
        self.ids += new
        if self.quiet:
            return
        text = self.codec.decode(self.ids)
        if text.endswith("\ufffd"):             # an incomplete UTF-8 sequence: wait for its rest
            return
        self.out.write(text[len(self.written):])
        self.out.flush()
        self.written = text


if __name__ == "__main__":
    sys.exit(main())
