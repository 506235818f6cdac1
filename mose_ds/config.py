"""Run configuration: YAML recipe sections mapped 1:1 onto validated dataclasses.

A recipe (`ds_configs/*.yaml`) has the sections model, moe, mose, optim, train, data,
engine, logging and checkpoint. Unknown keys and wrong types are errors naming the key
and the file; cross-field rules live in each dataclass's `__post_init__`. Dotted
`section.key=value` overrides from the command line are applied before validation, and
the resolved config (`to_dict`) is written beside every run and checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A bad recipe, key or value; the message is one line that names the offender."""


FAMILIES = ("gpt2", "deepseek_v2")


@dataclass
class ModelConfig:
    """The decoder; MoE blocks are `moe_offset, moe_offset + moe_every, ...`.

    `family: gpt2` is the paper's GPT-2-style model. `family: deepseek_v2` is built from an
    HF DeepSeek-V2 `config.json` (`hf_config`, a file or its folder): the architecture keys
    below are derived from it, its contents are kept in `hf` (so checkpoints carry them), and
    a recipe may only repeat a derived key with the same value. `ffn_hidden` and
    `expert_hidden` override the dense and expert FFN sizes (0: `ffn_mult * hidden_size`).
    """
    name: str = "custom"
    family: str = "gpt2"
    hf_config: str = ""
    hf: dict = field(default_factory=dict)
    num_layers: int = 6
    num_heads: int = 6
    hidden_size: int = 384
    ffn_mult: int = 4
    vocab_size: int = 50304
    seq_len: int = 1024
    moe_every: int = 2
    moe_offset: int = 0
    activation: str = "gelu"
    init_std: float = 0.02
    layernorm_eps: float = 1e-5
    tie_embeddings: bool = True
    ffn_hidden: int = 0
    expert_hidden: int = 0

    def __post_init__(self):
        _positive(self, "num_layers", "num_heads", "hidden_size", "ffn_mult", "vocab_size",
                  "seq_len", "moe_every", "init_std", "layernorm_eps")
        if self.family not in FAMILIES:
            raise ConfigError(f"model.family={self.family!r}: expected one of {', '.join(FAMILIES)}")
        if (self.family == "deepseek_v2") != bool(self.hf):
            raise ConfigError("model.family=deepseek_v2 needs model.hf_config (an HF DeepSeek-V2 config.json), "
                              "and only that family takes one")
        if self.ffn_hidden < 0 or self.expert_hidden < 0:
            raise ConfigError("model.ffn_hidden and model.expert_hidden must be >= 0 (0: ffn_mult * hidden_size)")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} is not divisible by "
                              f"model.num_heads={self.num_heads}")
        if self.activation not in ("gelu", "swiglu"):
            raise ConfigError(f"model.activation={self.activation!r}: expected 'gelu' or 'swiglu'")
        if not 0 <= self.moe_offset < self.num_layers:
            raise ConfigError(f"model.moe_offset={self.moe_offset} must be in [0, num_layers)")

    @property
    def ffn_hidden_size(self) -> int:
        """Hidden size of the dense FFN blocks."""
        return self.ffn_hidden or self.ffn_mult * self.hidden_size

    @property
    def expert_hidden_size(self) -> int:
        """Hidden size H of one routed expert (the slimmable dimension)."""
        return self.expert_hidden or self.ffn_hidden_size

    @property
    def shared_expert_hidden_size(self) -> int:
        """Hidden size of the always-on shared experts of a MoE block (0: none)."""
        return (self.hf.get("n_shared_experts") or 0) * self.expert_hidden_size

    def is_moe_layer(self, index: int) -> bool:
        return index >= self.moe_offset and (index - self.moe_offset) % self.moe_every == 0

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))


@dataclass
class MoEConfig:
    """Router and capacity; capacity factors default to the paper's values for the given k."""
    num_experts: int = 8
    top_k: int = 2
    capacity_factor: Optional[float] = None
    eval_capacity_factor: Optional[float] = None
    min_capacity: int = 4
    drop_tokens: bool = True
    load_balance_coef: float = 0.01
    z_loss_coef: float = 0.001
    expert_parallel_size: int = 1
    shared_slimmable: bool = False     # DeepSeek shared experts follow the routed widths
    width_quantum: int = 1             # executed hidden units rounded up to a multiple of this
    expert_kernel: str = "auto"        # loop | grouped | auto (grouped.auto_picks_grouped)

    def __post_init__(self):
        _positive(self, "num_experts", "top_k", "expert_parallel_size", "width_quantum")
        if self.expert_kernel not in ("auto", "loop", "grouped"):
            raise ConfigError(f"moe.expert_kernel={self.expert_kernel!r}: expected auto, loop or grouped")
        if self.top_k > self.num_experts:
            raise ConfigError(f"moe.top_k={self.top_k} exceeds moe.num_experts={self.num_experts}")
        if self.num_experts % self.expert_parallel_size:
            raise ConfigError(f"moe.num_experts={self.num_experts} is not divisible by "
                              f"moe.expert_parallel_size={self.expert_parallel_size}")
        train_cf, eval_cf = (1.25, 2.0) if self.top_k <= 2 else (1.75, 3.0)
        if self.capacity_factor is None:
            self.capacity_factor = train_cf
        if self.eval_capacity_factor is None:
            self.eval_capacity_factor = eval_cf
        for key in ("capacity_factor", "eval_capacity_factor"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"moe.{key}={getattr(self, key)} must be positive")
        if self.min_capacity < 0:
            raise ConfigError(f"moe.min_capacity={self.min_capacity} must be >= 0")
        for key in ("load_balance_coef", "z_loss_coef"):
            if getattr(self, key) < 0:
                raise ConfigError(f"moe.{key}={getattr(self, key)} must be >= 0")


@dataclass
class MoSEConfig:
    """Slimmable experts: the width grid and the two-pass objective (paper eq. 6).

    `enabled: false` trains plain MoE at full width (the baseline). `two_pass` chooses how
    the two branches are back-propagated: `joint` (one backward on the mean loss) or
    `sequential` (one backward per branch as two DeepSpeed micro-steps on the same batch,
    half the activation memory); both give the same gradients.
    """
    enabled: bool = True
    width_min: float = 0.25
    width_max: float = 1.0
    width_step: float = 0.05
    eval_widths: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    two_pass: str = "joint"

    def __post_init__(self):
        for key in ("width_min", "width_max"):
            _check_width(f"mose.{key}", getattr(self, key))
        if self.width_min > self.width_max:
            raise ConfigError(f"mose.width_min={self.width_min} exceeds mose.width_max={self.width_max}")
        if not self.width_step > 0:
            raise ConfigError(f"mose.width_step={self.width_step} must be positive")
        if not self.eval_widths:
            raise ConfigError("mose.eval_widths is empty")
        for w in self.eval_widths:
            _check_width("mose.eval_widths", w)
        if self.two_pass not in ("joint", "sequential"):
            raise ConfigError(f"mose.two_pass={self.two_pass!r}: expected 'joint' or 'sequential'")

    @property
    def grid(self) -> list[float]:
        """The width grid A = {width_min, width_min + step, ..., width_max}."""
        n = int(math.floor((self.width_max - self.width_min) / self.width_step + 1e-6))
        grid = [round(self.width_min + i * self.width_step, 6) for i in range(n + 1)]
        if grid[-1] < self.width_max - 1e-9:
            grid.append(self.width_max)
        return grid


@dataclass
class OptimConfig:
    """AdamW with linear warmup then linear decay to `min_lr` (paper appendix A.2)."""
    lr: float = 6e-4
    min_lr: float = 6e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_iters: int = 200

    def __post_init__(self):
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"optim.lr={self.lr}, optim.min_lr={self.min_lr}: need 0 <= min_lr <= lr, lr > 0")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"optim.{key}={getattr(self, key)} must be in [0, 1)")
        for key in ("warmup_iters", "grad_clip", "weight_decay"):
            if getattr(self, key) < 0:
                raise ConfigError(f"optim.{key}={getattr(self, key)} must be >= 0")
        _positive(self, "eps")


@dataclass
class TrainConfig:
    """Batch geometry and loop lengths; global batch = micro * accum * data-parallel size.

    `global_batch_size` (sequences per optimizer step, all ranks together) is what the paper
    fixes; with it set, `grad_accum_steps` is derived from the job's world size (`geometry`), so
    the same recipe trains with the same batch on 4 GPUs or 32. Setting both is allowed only when
    they agree. Without it, the global batch is micro x accum (default 1) x ranks.

    `stop_at` ends this job after that iteration with a checkpoint (for time-limited jobs);
    the schedule still runs to `max_iters`, and a resumed job continues it. 0 = never.
    An iteration whose loss is not finite on any rank changes no weight (it is skipped and
    logged); `max_nonfinite_in_a_row` such iterations in a row stop the run.
    `activation_checkpointing` recomputes each block's activations in the backward pass
    (only block inputs are kept), trading about a third more compute for memory.
    Validation reads the first `eval_batches` micro-batches per rank of the val split (the same
    windows at every evaluation), so compare validation numbers between runs of one world size.
    """
    micro_batch_size: int = 12
    grad_accum_steps: Optional[int] = None     # None: derived from global_batch_size (else 1)
    global_batch_size: Optional[int] = None    # sequences per optimizer step over all ranks
    max_iters: int = 10000
    stop_at: int = 0
    seed: int = 1337
    eval_interval: int = 500
    eval_batches: int = 20
    log_interval: int = 10
    max_nonfinite_in_a_row: int = 5
    activation_checkpointing: bool = False

    def __post_init__(self):
        _positive(self, "micro_batch_size", "max_iters", "eval_interval",
                  "eval_batches", "log_interval", "max_nonfinite_in_a_row")
        for key in ("stop_at", "seed"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be >= 0")
        for key in ("grad_accum_steps", "global_batch_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be positive (or null)")

    def geometry(self, data_parallel: int) -> "BatchGeometry":
        """Micro-batch, accumulation and global batch of a job with `data_parallel` ranks."""
        return batch_geometry(self.micro_batch_size, self.grad_accum_steps, self.global_batch_size, data_parallel)


@dataclass(frozen=True)
class BatchGeometry:
    micro: int
    accum: int
    data_parallel: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.data_parallel

    def __str__(self) -> str:
        return (f"micro-batch {self.micro} x accumulation {self.accum} x data-parallel {self.data_parallel} "
                f"= global batch {self.global_batch}")


def batch_geometry(micro: int, accum: Optional[int], global_batch: Optional[int],
                   data_parallel: int) -> BatchGeometry:
    """The accumulation that makes micro x accum x data-parallel equal the global batch; a
    global batch the job cannot make is an error naming the three numbers (and the micro-batch
    sizes that would work)."""
    if global_batch is None:
        return BatchGeometry(micro, accum or 1, data_parallel)
    per_step = micro * data_parallel
    if accum is not None and micro * accum * data_parallel != global_batch:
        raise ConfigError(f"train.global_batch_size={global_batch} but train.micro_batch_size={micro} x "
                          f"train.grad_accum_steps={accum} x {data_parallel} data-parallel rank(s) = "
                          f"{micro * accum * data_parallel}; drop train.grad_accum_steps (it is derived) or fix one")
    if global_batch % per_step:
        fits = [m for m in range(1, global_batch // data_parallel + 1)
                if global_batch % (m * data_parallel) == 0] if global_batch % data_parallel == 0 else []
        hint = (f"micro-batch sizes that divide it on {data_parallel} rank(s): {', '.join(map(str, fits))}"
                if fits else f"no micro-batch size does on {data_parallel} ranks: use a rank count that divides it")
        raise ConfigError(f"train.global_batch_size={global_batch} is not a multiple of train.micro_batch_size="
                          f"{micro} x {data_parallel} data-parallel rank(s) = {per_step}; {hint}")
    return BatchGeometry(micro, global_batch // per_step, data_parallel)


@dataclass
class DataConfig:
    """A folder written by `mose-prepare` (train.bin, val.bin, meta.json)."""
    path: str = "data/openwebtext"

    def __post_init__(self):
        if not self.path:
            raise ConfigError("data.path is empty")


@dataclass
class EngineConfig:
    """DeepSpeed engine concerns only; batch sizes and the optimizer are filled in by code.
    Every key and why it has its default: docs/config.md."""
    zero_stage: int = 1
    precision: str = "bf16"
    device: str = "auto"          # auto | cpu | cuda (devices.py); auto refuses a bf16 run without CUDA
    grad_comm_dtype: str = "fp32"  # gradients cross ranks in fp32 (bf16: half the traffic, rounded sums)
    overlap_comm: bool = True     # ZeRO-2 reduces buckets on a side stream while backward runs
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000
    comm_timeout_s: int = 600     # a collective that waits longer aborts the job (a dead peer)
    heartbeat_timeout_s: int = 60  # multi-node: a node silent this long is named and ends the job
    extra: dict = field(default_factory=dict)

    OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
             "optimizer", "scheduler", "gradient_clipping", "zero_optimization", "bf16", "fp16",
             "communication_data_type")

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"engine.zero_stage={self.zero_stage}: expected 0, 1 or 2 "
                              "(DeepSpeed MoE does not support ZeRO-3)")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"engine.precision={self.precision!r}: expected 'fp32' or 'bf16'")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"engine.device={self.device!r}: expected 'auto', 'cpu' or 'cuda'")
        if self.grad_comm_dtype not in ("fp32", "bf16"):
            raise ConfigError(f"engine.grad_comm_dtype={self.grad_comm_dtype!r}: expected 'fp32' or 'bf16'")
        if self.grad_comm_dtype == "bf16" and self.precision != "bf16":
            raise ConfigError("engine.grad_comm_dtype=bf16 with engine.precision=fp32: fp32 gradients are "
                              "reduced in fp32 (set grad_comm_dtype=fp32)")
        _positive(self, "comm_timeout_s", "heartbeat_timeout_s")
        if self.zero_stage == 0 and self.precision == "bf16":
            raise ConfigError("engine.zero_stage=0 with engine.precision=bf16: DeepSpeed accumulates bf16 "
                              "gradients in fp32 only under ZeRO; use engine.zero_stage=1 or 2")
        for key in self.extra:
            if key in self.OWNED:
                raise ConfigError(f"engine.extra.{key} is set by the run config, not the engine section")


@dataclass
class LoggingConfig:
    out_dir: str = "runs/default"
    tensorboard: bool = True


@dataclass
class CheckpointConfig:
    """`resume`: 'auto' (latest in `dir` if any), 'never', or a checkpoint directory.
    `init_from`: a weights folder (mose-convert-hf) that starts a new run
    (continual pre-training); a run that finds a checkpoint to resume resumes instead.
    `keep_last`: how many complete checkpoints to keep (0: all)."""
    dir: str = ""
    interval: int = 1000
    resume: str = "auto"
    save_final: bool = True
    init_from: str = ""
    keep_last: int = 0

    def __post_init__(self):
        _positive(self, "interval")
        if self.keep_last < 0:
            raise ConfigError(f"checkpoint.keep_last={self.keep_last} must be >= 0 (0: keep all)")


# HF config keys that neither weights nor computation depend on (an exported or re-saved
# config.json may differ in them).
HF_BOOKKEEPING = ("architectures", "auto_map", "dtype", "torch_dtype", "transformers_version", "use_cache",
                  "_name_or_path", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range",
                  "ep_size", "pretraining_tp", "output_router_logits")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    mose: MoSEConfig = field(default_factory=MoSEConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self):
        if self.moe.expert_kernel == "grouped":
            from .grouped import GRANULE, supported
            sizes = (self.model.hidden_size, self.model.expert_hidden_size)
            if not supported(*sizes):
                raise ConfigError(f"moe.expert_kernel=grouped needs model.hidden_size ({sizes[0]}) and the expert "
                                  f"hidden size ({sizes[1]}) to be multiples of {GRANULE}")

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.logging.out_dir, "checkpoints")

    def architecture(self) -> dict:
        """The fields a checkpoint's weights depend on; resuming with others is refused.
        (The model's name and init scale may change.)"""
        skip = ("name", "init_std", "hf_config") + (("seq_len",) if self.model.family != "gpt2" else ())
        model = {k: v for k, v in dataclasses.asdict(self.model).items() if k not in skip}
        if model["hf"]:
            model["hf"] = {k: v for k, v in model["hf"].items() if k not in HF_BOOKKEEPING}
        return {**model, "moe.num_experts": self.moe.num_experts, "moe.top_k": self.moe.top_k}


# --------------------------------------------------------------------------- loading

def _positive(obj, *keys):
    section = _SECTION_OF[type(obj)]
    for key in keys:
        if not getattr(obj, key) > 0:
            raise ConfigError(f"{section}.{key}={getattr(obj, key)} must be positive")


def _check_width(key, w):
    if not 0 < w <= 1:
        raise ConfigError(f"{key}: width {w} is outside (0, 1]")


_SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}
_SECTION_OF = {factory: name for name, factory in _SECTIONS.items()}


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation)
        return [_coerce(v, item, key) for v in value]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = {"int": int, "float": float, "bool": bool, "str": str, "dict": dict}.get(
        getattr(annotation, "__name__", str(annotation)), annotation)
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise ConfigError(f"{key}: expected {expected.__name__}, got {value!r}")
    return value


def _build_section(name: str, raw: Any, source: str):
    cls = _SECTIONS[name]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: section '{name}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{name}.{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown key '{name}.{key}'{hint}")
        kwargs[key] = _coerce(value, hints[key], f"{source}: {name}.{key}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings (values parsed as YAML) to a raw recipe dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) < 2:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        if parts[0] not in _SECTIONS:
            raise ConfigError(f"override {item!r}: unknown section '{parts[0]}'")
        node = raw.setdefault(parts[0], {}) or {}
        raw[parts[0]] = node
        for part in parts[1:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a mapping")
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: '{parts[0]}' is not a mapping")
        node[parts[-1]] = yaml.safe_load(text)
    return raw


def from_dict(raw: dict, source: str = "<config>") -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a recipe must be a mapping of sections")
    for name in raw:
        if name not in _SECTIONS:
            close = difflib.get_close_matches(name, list(_SECTIONS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown section '{name}'{hint}")
    _resolve_hf(raw, source)
    return RunConfig(**{name: _build_section(name, raw.get(name), source) for name in _SECTIONS})


def _resolve_hf(raw: dict, source: str) -> None:
    """Fill the architecture keys of a DeepSeek-V2 recipe from its HF config (in place);
    a key the recipe also sets must agree."""
    from .deepseek import HFConfigError, check_hf_config, model_fields, moe_fields, read_hf_config
    model = raw.get("model")
    if not isinstance(model, dict) or not (model.get("hf_config") or model.get("hf")):
        return
    try:
        if model.get("hf_config"):
            model["hf"] = read_hf_config(model["hf_config"])
        else:
            check_hf_config(model["hf"], f"{source}: model.hf")
    except HFConfigError as e:
        raise ConfigError(f"{source}: model.hf_config: {e}") from None
    model.setdefault("family", "deepseek_v2")
    for section, fields in (("model", model_fields(model["hf"])), ("moe", moe_fields(model["hf"]))):
        node = raw.setdefault(section, {}) or {}
        raw[section] = node
        for key, value in fields.items():
            if key in node and node[key] != value:
                raise ConfigError(f"{source}: {section}.{key}={node[key]!r} disagrees with the HF config "
                                  f"({value!r}); leave it out")
            node[key] = value


def load_config(path: str, overrides: Optional[list[str]] = None) -> RunConfig:
    """Read a YAML recipe, apply dotted overrides, validate; errors name the file and key."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return from_dict(apply_overrides(raw, overrides or []), source=path)


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str) -> None:
    """Write the resolved config atomically (never leaves a half-written file)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)
