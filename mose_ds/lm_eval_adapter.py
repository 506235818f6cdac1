"""A MoSE checkpoint as an lm-evaluation-harness model, registered as `mose`.

    python -m mose_ds.lm_eval_adapter --model mose --model_args checkpoint=runs/x,policy=uniform,width=0.5 --tasks lambada_openai
    python -m mose_ds.lm_eval_adapter --model mose --model_args checkpoint=runs/x,policy=normprob,budget=1.0 --tasks hellaswag
    python -m mose_ds.lm_eval_adapter --model mose \
        --model_args checkpoint=runs/x,policy=gamma,budget=1.0,table=runs/x/gamma_table.yaml --tasks piqa

(or `import mose_ds.lm_eval_adapter` before calling `lm_eval.simple_evaluate(model="mose", ...)`).

`--model_args` keys: `checkpoint` (a run folder, checkpoint root or tag folder), `data` (a
prepared data folder, checked against the tokenizer the checkpoint records; only needed for
a checkpoint that predates the record and whose training data folder is elsewhere), `top_k`
(route to k' <= k experts), `device` (default: CUDA when torch sees it, else the CPU, as the
harness's own HF model chooses; lm-eval's `--device` does the same), and the width policy:
`policy=full` (the default), `policy=uniform` with `width`, `policy=normprob` with `budget`
(and optionally `gamma`, default 1, and `exact_budget=true`), or `policy=gamma` with `budget`,
`table` (a gamma table from mose-calibrate for this checkpoint) and `gamma_mode`
(`layerwise`, the default, or `shared`). All scoring goes through `mose_ds.scoring.Scorer`, one sequence per forward,
so the harness's `batch_size` is accepted and ignored.

Run as a module, the harness's CLI is used with one change: a run that names no device gets
`auto` (lm-eval's CLI would pass its default `cuda:0`, which a CPU-only machine lacks), and
a bad checkpoint, device, tokenizer or policy is a one-line error.
"""

from __future__ import annotations

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:   # the adapter is an optional extra
    raise ImportError("mose_ds.lm_eval_adapter needs lm-evaluation-harness: pip install -e .[eval]") from e

import sys
from typing import Any

import yaml
from tqdm import tqdm

from . import devices
from .checkpoint import CheckpointError
from .config import ConfigError, RunConfig
from .model import MoSEGPT
from .policies import PolicyError, PolicySpec, build_policy
from .scoring import Scorer
from .tokenizer import TextCodec, TokenizerError
from .widths import FULL_WIDTH, NormProbPolicy, UniformPolicy, WidthPolicy

DEFAULT_MAX_GEN_TOKS = 256
# Arguments the harness passes to every model; scoring is one sequence at a time.
_HARNESS_ARGS = ("batch_size", "max_batch_size")
_POLICY_ARGS = ("policy", "width", "budget", "gamma", "table", "gamma_mode", "exact_budget")


def _policy_from_args(args: dict, cfg: RunConfig | None, identity: dict) -> WidthPolicy:
    """The width policy named by `policy=` and its parameters (consumed from `args`).

    With a checkpoint every kind of `mose_ds.policies` is available (`full`, `uniform`,
    `normprob`, `gamma` with `table=` and `gamma_mode=`), clipped and rounded as the run was
    trained; an in-memory model (no run config) takes `uniform` or `normprob` only.
    """
    kind = args.pop("policy", "uniform" if "width" in args else "full")
    spec = PolicySpec(kind=kind,
                      width=float(args.pop("width")) if "width" in args else None,
                      budget=float(args.pop("budget")) if "budget" in args else None,
                      gamma=float(args.pop("gamma", 1.0)), table=args.pop("table", None),
                      gamma_mode=args.pop("gamma_mode", "layerwise"),
                      exact_budget=str(args.pop("exact_budget", False)).lower() in ("1", "true", "yes"))
    if cfg is not None:
        return build_policy(spec, cfg, identity)
    if kind == "full":
        return FULL_WIDTH
    if kind == "uniform":
        return UniformPolicy(1.0 if spec.width is None else spec.width)
    if kind == "normprob" and spec.budget is not None:
        return NormProbPolicy(spec.budget, spec.gamma, exact_budget=spec.exact_budget)
    raise PolicyError(f"an in-memory model takes policy=full, uniform (width=) or normprob (budget=), "
                      f"not {kind!r}")


@register_model("mose")
class MoSELM(LM):
    """lm-eval model over a checkpoint (`checkpoint=...`) or an in-memory model
    (`model=` + `codec=`, for tests and notebooks; `width_policy=` may pass a policy object)."""

    def __init__(self, checkpoint: str | None = None, *, model: MoSEGPT | None = None,
                 codec: TextCodec | None = None, width_policy: WidthPolicy | None = None,
                 data: str | None = None, top_k: int | None = None, device: str | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, **args: Any):
        super().__init__()
        for key in _HARNESS_ARGS:
            args.pop(key, None)
        unknown = sorted(set(args) - set(_POLICY_ARGS))
        if unknown:
            raise ValueError(f"unknown mose model_args: {', '.join(unknown)}")
        cfg, self.identity = None, {}
        if model is None:
            if checkpoint is None:
                raise ValueError("the mose model needs checkpoint=PATH in --model_args")
            from .inference import load_model
            loaded = load_model(str(checkpoint), top_k=None if top_k is None else int(top_k),
                                device=device or "auto")
            model, cfg, self.identity = loaded.model, loaded.cfg, loaded.identity
            codec = codec or TextCodec.for_checkpoint(loaded.folder, None if data is None else str(data))
        elif codec is None or top_k is not None:
            raise ValueError("an in-memory model takes its codec (codec=TextCodec(...)) and no top_k")
        elif device is not None:
            model.to(devices.choose(device, why="the mose model"))
        policy = width_policy or _policy_from_args(args, cfg, self.identity)
        self.scorer = Scorer(model, codec, policy)
        self.max_gen_toks = int(max_gen_toks)
        self._device = self.scorer.device

    @property
    def codec(self) -> TextCodec:
        return self.scorer.codec

    def get_model_info(self) -> dict:
        """Recorded in the harness's results: which weights, and the compute of the policy
        (nominal: the paper's count of the deployed widths; executed: what the kernels ran)."""
        meter = self.scorer.meter
        return {"mose_checkpoint": self.identity,
                "mose_mflops_per_token": meter.mflops() if meter.tokens else None,
                "mose_mflops_per_token_executed": meter.mflops(executed=True) if meter.tokens else None,
                "mose_mean_width": meter.mean_width() if meter.tokens else None}

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.scorer.loglikelihood([req.args for req in requests], progress=not disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return self.scorer.loglikelihood_rolling([req.args[0] for req in requests], progress=not disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations (sampling arguments are ignored), stopped at the end-of-text
        token, after `max_gen_toks` tokens, or at a stop string of `until`, and cut before
        the first stop string. Decoded with a KV cache; a context longer than seq_len minus
        `max_gen_toks` keeps its last tokens."""
        return [self._generate(*req.args) for req in tqdm(requests, disable=disable_tqdm, desc="generate_until")]

    def _generate(self, context: str, gen_kwargs: dict) -> str:
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.get("max_gen_toks", gen_kwargs.get("max_new_tokens", self.max_gen_toks)))

        def stop(new_ids: list[int]) -> bool:
            text = self.codec.decode(new_ids)
            return any(s and s in text for s in until)

        text = self.codec.decode(self.scorer.greedy_continue(self.codec.encode(context), max_new, stop))
        for s in until:
            if s:
                text = text.split(s)[0]
        return text


def _names_device(args) -> bool:
    """Whether a harness run names a device: `--device`, `device=` in `--model_args` (the
    harness passes both to the model, so only one may be set), or `device:` in `--config`."""
    if args.device:
        return True
    model_args = getattr(args, "model_args", None)
    if isinstance(model_args, dict) and "device" in model_args:
        return True
    if isinstance(model_args, str) and any(part.strip().startswith("device=") for part in model_args.split(",")):
        return True
    if not getattr(args, "config", None):
        return False
    try:
        with open(args.config) as f:
            return "device" in (yaml.safe_load(f) or {})
    except (OSError, yaml.YAMLError, TypeError):     # the harness reports a bad config file itself
        return False


def parse_cli():
    """(the harness's CLI, its parsed sys.argv), a run that names no device set to `auto`."""
    from lm_eval._cli import HarnessCLI
    cli = HarnessCLI()
    args = cli.parse_args()
    if getattr(args, "command", None) == "run" and not _names_device(args):
        args.device = "auto"
    return cli, args


def main() -> None:
    """`python -m mose_ds.lm_eval_adapter --model mose ...`: the harness's CLI with `mose` registered."""
    from lm_eval.utils import setup_logging
    setup_logging()
    cli, args = parse_cli()
    try:
        cli.execute(args)
    except (CheckpointError, ConfigError, devices.DeviceError, PolicyError, TokenizerError) as e:
        sys.exit(f"lm_eval_adapter: error: {e}")


if __name__ == "__main__":
    main()
