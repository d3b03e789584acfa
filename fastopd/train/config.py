"""OPDConfig: every option of an on-policy distillation run, validated with errors that name the field.

Configs load from dicts and TOML files (`load_toml`); unknown keys are refused with the closest known name,
and each value is checked against the field's type and range, so a typo never silently falls back to a
default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass
from typing import Any

from fastopd import _dispatch

OBJECTIVES = ("fkl", "rkl", "jsd", "pg")
PARALLEL_MODES = ("auto", "none", "ddp", "fsdp2", "hsdp")  # fastopd.distributed.data_parallel.MODES
# `fused_linear_divergence(impl=)`: "auto" or a backend of the dispatch's divergence op (fastopd._dispatch)
LOSS_IMPLS = ("auto", *_dispatch.backend_names("divergence_chunk"))
MAX_SEED = 2**63 - 1


class ConfigError(ValueError):
    """A bad config value; the message starts with the field's name."""


def parse_horizon_spec(spec: Any, max_new_tokens: int, where: str = "horizon") -> dict[str, Any] | None:
    """Normalize a horizon spec to a dict ``{"kind": ..., ...}``; None for non-spec values (callables).

    Accepted forms: None or "full" (the full `max_new_tokens`); an int H (full horizon H); "full:H";
    "truncated:RATIO"; "progressive:START,STEP,EVERY" (H_k = min(max, START + STEP*floor(k/EVERY)));
    or the same as a dict/TOML table, e.g. ``{kind = "progressive", start = 8, step = 4, every = 10}``.
    """
    if spec is None:
        return {"kind": "full", "max_new_tokens": max_new_tokens}
    if isinstance(spec, bool):
        raise ConfigError(f"{where}: expected a horizon spec, got {spec!r}")
    if isinstance(spec, int):
        if spec < 1:
            raise ConfigError(f"{where}: a fixed horizon must be >= 1 token, got {spec}")
        return {"kind": "full", "max_new_tokens": spec}
    if isinstance(spec, str):
        kind, _, rest = spec.partition(":")
        nums = [x for x in rest.replace(",", " ").split()] if rest else []
        try:
            if kind == "full" and len(nums) <= 1:
                d = {"kind": "full", "max_new_tokens": int(nums[0]) if nums else max_new_tokens}
            elif kind == "truncated" and len(nums) == 1:
                d = {"kind": "truncated", "ratio": float(nums[0]), "max_new_tokens": max_new_tokens}
            elif kind == "progressive" and len(nums) == 3:
                d = {"kind": "progressive", "start": int(nums[0]), "step": int(nums[1]), "every": int(nums[2]),
                     "max_new_tokens": max_new_tokens}
            else:
                raise ValueError
        except ValueError:
            raise ConfigError(f"{where}: cannot parse {spec!r}; expected 'full', 'full:H', 'truncated:RATIO' or "
                              f"'progressive:START,STEP,EVERY'") from None
        return parse_horizon_spec(d, max_new_tokens, where)
    if isinstance(spec, dict):
        d = dict(spec)
        kind = d.get("kind")
        need = {"full": (), "truncated": ("ratio",), "progressive": ("start", "step", "every")}
        if kind not in need:
            raise ConfigError(f"{where}.kind: must be one of {tuple(need)}, got {kind!r}")
        d.setdefault("max_new_tokens", max_new_tokens)
        allowed = {"kind", "max_new_tokens", *need[kind]}
        for key in d:
            if key not in allowed:
                raise ConfigError(f"{where}.{key}: unknown key for a {kind!r} horizon (allowed: {sorted(allowed)})")
        for key in need[kind]:
            if key not in d:
                raise ConfigError(f"{where}.{key}: missing (a {kind!r} horizon needs {list(need[kind])})")
        for key in ("max_new_tokens", "start", "step", "every"):
            least = 0 if key == "step" else 1
            if key in d and (not isinstance(d[key], int) or isinstance(d[key], bool) or d[key] < least):
                raise ConfigError(f"{where}.{key}: must be an integer >= {least}, got {d[key]!r}")
        if kind == "truncated" and not (isinstance(d["ratio"], (int, float)) and 0.0 < d["ratio"] <= 1.0):
            raise ConfigError(f"{where}.ratio: must lie in (0, 1], got {d['ratio']!r}")
        return d
    if callable(spec):
        return None
    raise ConfigError(f"{where}: expected None, an int, a spec string, a table or a callable, got "
                      f"{type(spec).__name__}")


@dataclass
class OPDConfig:
    """Options of `OPDTrainer`. Every field is checked in `__post_init__`; errors name the field.

    Objective:
        objective: "fkl" (KL(teacher||student)), "rkl" (KL(student||teacher)), "jsd" (generalized JSD, `beta`)
            on the full vocabulary at every sampled position; or "pg": the sampled-token reverse KL
            r_t = log p_s(y_t) - log p_t(y_t) used as a per-token (detached) cost in an importance-sampled
            policy gradient, loss = sum_t w_t * r_t * log p_s(y_t) / tokens with w_t = min(ratio_t, pg_ratio_cap)
            (r_t is a cost: minimizing the loss lowers log p_s of the tokens the student over-weights, r_t > 0).
        beta: the JSD mixture weight (0 = fkl, 1 = rkl; TRL's convention).
        temperature: sampling temperature of the rollouts and the temperature of the loss.
        top_k, top_p: sampling filters (0 / 1.0 = off). With either on, "pg"'s importance ratio is only approximate.
    Rollouts:
        horizon: tokens generated per step: None (= max_new_tokens), an int, "truncated:0.5",
            "progressive:START,STEP,EVERY", a dict/TOML table, a `fastopd.rollout.Horizon`, or any callable
            step -> H.
        max_new_tokens: the full horizon: what None and "full" generate, and the most "truncated" and
            "progressive" reach; an int, "full:H", a table with its own max_new_tokens, a `Horizon` or a callable
            sets its own (the rollout engine caps every horizon at the model's context).
        num_samples: completions per prompt.
        eos_token_id, pad_token_id: as for `fastopd.rollout.RolloutEngine`: eos an id, a list of ids (any ends a
            completion) or None (no early stop); pad an id, or None for the first EOS id (else 0), so that a
            tokenizer's `pad_token_id=None` may be passed as it is.
        vocab_size: the tokenizer's vocabulary, for heads padded beyond it: rollouts sample only ids below it and
            the loss compares the first `vocab_size` logits of both models (normalized over them). None: the
            student's head rows (a larger teacher head is compared on them).
    Optimizer (AdamW, or SparseMaskedAdamW when `masks` is given):
        lr, betas, eps, weight_decay; warmup_steps (linear warm-up from lr/warmup_steps to lr); lr_schedule
        "constant" or "cosine" (decay to 0 at `schedule_steps`, default: the `steps` given to `train`; a warm-up
        as long as that total warns, as the rate would never decay); the rate is
        a function of the step alone, so there is no scheduler state to checkpoint; max_grad_norm (None: no
        clipping; the norm is torch's clip_grad_norm_ over the whole gradient, under masks too, coordinates the
        masks freeze included); grad_accum (micro-batches per step).
        masks: None (dense), a dict param name -> bool tensor, or a path to a masks file (fastopd.optim.masks).
    Run:
        seed: seeds torch's, Python's and numpy's RNGs at construction. log_every: how often the progress bar
        shows the loss (metrics.jsonl logs every step).
        eval_every: evaluation cadence in `train` (0: only before and after). checkpoint_dir: where checkpoints go
        (None: nowhere; a path-like is kept as its string); checkpoint_every (0: only at the end of `train`);
        keep_checkpoints; resume: continue from the newest checkpoint in checkpoint_dir.
        track_density: report the fraction of student weights changed since the last checkpoint (keeps a copy).
        loss_impl, chunk_size: passed to `fused_linear_divergence` (impl=, chunk_size=).
    Scale-out (see fastopd.distributed.data_parallel):
        parallel: "auto" (DDP when launched by torchrun with more than one process, else one process), "none",
            "ddp", "fsdp2" (`fully_shard` per decoder layer and on the rest) or "hsdp" (the same over a 2-D mesh:
            sharded within groups of `hsdp_shard_size` ranks, default one node's (torchrun's LOCAL_WORLD_SIZE),
            replicated across them). Each rank rolls out its share of the step's prompts; the loss is normalized
            by the step's token count over all ranks.
    """

    objective: str = "rkl"
    beta: float = 0.5
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    horizon: Any = None
    max_new_tokens: int = 64
    num_samples: int = 4
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = 0
    vocab_size: int | None = None
    lr: float = 1e-4
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    schedule_steps: int | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    grad_accum: int = 1
    masks: Any = None
    pg_ratio_cap: float = 2.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    track_density: bool = True
    loss_impl: str = "auto"
    chunk_size: int | None = None
    parallel: str = "auto"
    hsdp_shard_size: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.checkpoint_dir, os.PathLike):
            self.checkpoint_dir = os.fspath(self.checkpoint_dir)
        # Token ids as RolloutEngine takes them: NumPy integers and one-element integer tensors are ids too.
        self.pad_token_id = _plain_id(self.pad_token_id)
        self.eos_token_id = ([_plain_id(i) for i in self.eos_token_id] if isinstance(self.eos_token_id, (list, tuple))
                             else _plain_id(self.eos_token_id))
        _check_types(self)
        if self.checkpoint_dir is not None and not self.checkpoint_dir.strip():  # "" is the working directory
            raise ConfigError("checkpoint_dir: must be a folder path or None, got an empty string")
        _check_eos(self.eos_token_id)
        if isinstance(self.eos_token_id, tuple):
            self.eos_token_id = list(self.eos_token_id)
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective: must be one of {OBJECTIVES}, got {self.objective!r}")
        _in_range("beta", self.beta, 0.0, 1.0)
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"temperature: must be a positive finite number, got {self.temperature}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"lr_schedule: must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.schedule_steps is not None and self.schedule_steps < 1:
            raise ConfigError(f"schedule_steps: must be >= 1 or None, got {self.schedule_steps}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ConfigError(f"vocab_size: must be >= 1 or None, got {self.vocab_size}")
        if self.top_k < 0:
            raise ConfigError(f"top_k: must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p: must lie in (0, 1], got {self.top_p}")
        for name in ("max_new_tokens", "num_samples", "grad_accum", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed <= MAX_SEED:  # torch.manual_seed takes < 2**64; the trainer adds rank (and step) to it
            raise ConfigError(f"seed: must lie in [0, 2**63 - 1], got {self.seed}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr: must be a positive finite number, got {self.lr}")
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise ConfigError(f"betas: must hold two numbers (e.g. [0.9, 0.999]), got {self.betas!r}")
        self.betas = tuple(self.betas)
        for i, b in enumerate(self.betas):
            if not isinstance(b, (int, float)) or isinstance(b, bool):
                raise ConfigError(f"betas[{i}]: must be a number, got {type(b).__name__} {b!r}")
            if not 0.0 <= b < 1.0:
                raise ConfigError(f"betas[{i}]: must lie in [0, 1), got {b}")
        self.betas = tuple(float(b) for b in self.betas)
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ConfigError(f"eps: must be a positive finite number, got {self.eps}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigError(f"weight_decay: must be a finite number >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm: must be > 0 or None, got {self.max_grad_norm}")
        if not self.pg_ratio_cap >= 1.0:
            raise ConfigError(f"pg_ratio_cap: must be >= 1, got {self.pg_ratio_cap}")
        if self.resume and self.checkpoint_dir is None:
            raise ConfigError("resume: needs checkpoint_dir")
        if self.loss_impl not in LOSS_IMPLS:
            raise ConfigError(f"loss_impl: must be one of {LOSS_IMPLS}, got {self.loss_impl!r}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"chunk_size: must be >= 1 or None, got {self.chunk_size}")
        if self.masks is not None and not isinstance(self.masks, (dict, str, os.PathLike)):
            raise ConfigError(f"masks: must be None, a dict of bool tensors or a path, got {type(self.masks).__name__}")
        parse_horizon_spec(self.horizon, self.max_new_tokens)
        if self.parallel not in PARALLEL_MODES:
            raise ConfigError(f"parallel: must be one of {PARALLEL_MODES}, got {self.parallel!r}")
        if self.hsdp_shard_size is not None and self.hsdp_shard_size < 1:
            raise ConfigError(f"hsdp_shard_size: must be None or >= 1, got {self.hsdp_shard_size}")

    def horizon_spec(self) -> dict[str, Any] | None:
        """The horizon as a plain dict (None when it is a callable, e.g. a `fastopd.rollout.Horizon`)."""
        return parse_horizon_spec(self.horizon, self.max_new_tokens)

    def to_dict(self) -> dict[str, Any]:
        """A JSON/TOML-friendly dict (tensors and callables are replaced by short descriptions)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "horizon":
                spec = self.horizon_spec()
                value = spec if spec is not None else repr(value)
            elif f.name == "masks" and isinstance(value, dict):
                value = f"<{len(value)} masks>"
            elif isinstance(value, os.PathLike):
                value = os.fspath(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "OPDConfig") -> OPDConfig:
        """Build from a dict; unknown keys raise ConfigError with the closest field name."""
        check_keys(data, {f.name for f in dataclasses.fields(cls)}, source)
        return cls(**data)


def check_keys(data: dict[str, Any], known: set[str], source: str) -> None:
    """Raise ConfigError for the first key of `data` not in `known`, suggesting the closest known name."""
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: unknown field in {source}{hint}")


def _plain_id(value: Any) -> Any:
    """A token id as RolloutEngine reads it (`fastopd._numbers.as_int`: ints, NumPy integers, one-element
    integer tensors) as a Python int; anything else (bools, floats, lists) as it is, for the checks to refuse."""
    from fastopd._numbers import as_int

    as_id = as_int(value)
    return value if as_id is None else as_id


def _check_eos(value: Any) -> None:
    """eos_token_id: None, a non-negative int or a non-empty list of them (bools refused)."""
    ids = value if isinstance(value, (list, tuple)) else [value]
    if value is None or (ids and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
        return
    raise ConfigError(f"eos_token_id: must be None, a non-negative int or a non-empty list of them, got "
                      f"{type(value).__name__} {value!r}")


def _in_range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"{name}: must lie in [{lo}, {hi}], got {value}")


_SIMPLE_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _check_types(obj) -> None:
    """Check each field whose annotation is a simple type (int, float, str, bool, optionally `| None`)."""
    for f in dataclasses.fields(obj):
        ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        parts = [p.strip() for p in ann.split("|")]
        optional = "None" in parts
        kinds = [p for p in parts if p != "None"]
        if len(kinds) != 1 or kinds[0] not in _SIMPLE_TYPES:
            continue
        value = getattr(obj, f.name)
        if value is None and optional:
            continue
        want = _SIMPLE_TYPES[kinds[0]]
        ok = isinstance(value, want) and (kinds[0] == "bool" or not isinstance(value, bool))
        if not ok:
            raise ConfigError(f"{f.name}: must be {'an' if kinds[0] == 'int' else 'a'} {kinds[0]}"
                              f"{' or None' if optional else ''}, got {type(value).__name__} {value!r}")
        if kinds[0] == "float":
            setattr(obj, f.name, float(value))


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a TOML file into a dict; ConfigError names the file on a syntax error."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError(f"{path}: reading TOML on Python < 3.11 needs the 'tomli' package") from None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {os.fspath(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {os.fspath(path)!r} is a directory, not a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"config file {os.fspath(path)!r} cannot be read ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{os.fspath(path)}: invalid TOML ({exc})") from None
