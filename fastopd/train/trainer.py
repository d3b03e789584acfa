"""OPDTrainer: on-policy distillation in one readable loop.

One step (`OPDTrainer.step`):
  1. rollout:  the student samples `num_samples` completions per prompt, cut to the horizon in force
               (`fastopd.rollout.RolloutEngine.generate`);
  2. scoring:  the teacher reads them under no_grad and returns final hidden states, no LM head
               (`RolloutEngine.score`, optionally under another prompt: `teacher_prompt_fn`);
  3. update:   the student's training forward gives hidden states with autograd, `fused_linear_divergence`
               compares both heads without materializing [tokens x vocab] logits, backward, clip, optimizer
               (AdamW, or `fastopd.optim.SparseMaskedAdamW` on a mask).

Objectives. "fkl" / "rkl" / "jsd" take the full-vocabulary divergence at every sampled position (mean over
completion tokens). "pg" uses the sampled-token reverse KL r_t = log p_s(y_t) - log p_t(y_t) as a per-token cost
(reward -r_t, no credit to earlier tokens, no baseline) in an importance-sampled policy gradient:

    loss = (1/N) sum_t  w_t * r_t * log p_s(y_t),    w_t = min(p_s(y_t) / q(y_t), pg_ratio_cap),

r_t and w_t detached, q the sampling distribution (the rollout's log-probs). r_t is a cost, hence the + sign:
minimizing the loss lowers log p_s of tokens the student over-weights (r_t > 0). Its gradient is
(1/N) sum_t w_t r_t grad log p_s(y_t), the per-token REINFORCE estimate of grad E_y~q[sum_t r_t]. The per-token
-log p_s(y_t) is the hard-label term of `fused_linear_divergence(reduction="none")`, which also returns both
models' log-probs of y_t as statistics, so one fused call serves the loss and the reward.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastopd._io import folder_write_problem, json_text, write_text_atomic
from fastopd._numbers import as_int
from fastopd.distributed.data_parallel import DataParallel, LossModule, is_dtensor, local_shard
from fastopd.losses import fused_linear_divergence
from fastopd.train import checkpoint as ckpt
from fastopd.train.config import OPDConfig, parse_horizon_spec

Prompts = Sequence[Sequence[int]]
PromptSource = Callable[[int], Prompts] | Iterable[Prompts]


def make_horizon(config: OPDConfig):
    """The rollout horizon of `config`: a `fastopd.rollout.Horizon` built from a spec, or the callable as given."""
    from fastopd.rollout import Horizon

    spec = parse_horizon_spec(config.horizon, config.max_new_tokens)
    if spec is None:
        return config.horizon
    kind, t = spec["kind"], spec["max_new_tokens"]
    if kind == "full":
        return Horizon.full(t)
    if kind == "truncated":
        return Horizon.truncated(spec["ratio"], t)
    return Horizon.progressive(spec["start"], spec["step"], spec["every"], t)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB: CUDA's max allocated on `device`, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
    except ImportError:  # Windows
        return float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_everything(seed: int) -> None:
    """Seed torch's (CPU and CUDA), Python's and numpy's global RNGs."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


class OPDTrainer:
    """On-policy distillation of `student` towards `teacher`.

    Args:
        student: the model trained; a `fastopd.models.Transformer`, a supported Hugging Face causal LM or a
            `fastopd.rollout.ModelAdapter`.
        teacher: the model imitated, put in eval mode and only run under inference mode; it may live on another
            device or dtype than the student, and may be the student itself (self-distillation, usually with
            `teacher_prompt_fn`). Under FSDP2 a teacher of its own on the student's device is sharded in place
            (per decoder layer, as the student); score it through :meth:`score` after.
        config: an `OPDConfig`.
        teacher_prompt_fn: optional, maps the step's prompts (a list of token-id lists) to the prompts the teacher
            sees instead (one per prompt): privileged-context distillation on the same completion tokens.
        evaluator: optional `evaluate(trainer) -> dict of floats`, run by `train` before, every `eval_every`
            steps and after; its results go to `eval_history`.
        run_dir: optional folder for ``metrics.jsonl`` and ``eval.jsonl``.

    Under torchrun (`config.parallel`, default "auto": DDP when there is more than one process) every rank builds
    the same trainer; `step`/`train` take the step's *global* batch of prompts and each rank rolls out its
    contiguous share, so a step means the same on any world size. Rollout sampling is seeded with
    `config.seed + rank`; metrics are reduced over the ranks (sums and means over all tokens, timings the slowest
    rank's); only rank 0 writes logs, checkpoints and the progress bar; the evaluator runs on every rank.
    Checkpoints hold full (gathered) weights and optimizer state, so a run resumes on any world size (exactly,
    RNG included, on the same one).

    Attributes:
        engine: the `RolloutEngine`; optimizer: the optimizer (AdamW, or SparseMaskedAdamW when `config.masks` is
        given or a resumed checkpoint is masked); global_step: steps taken so far; history: per-step metric dicts;
        eval_history: evaluation dicts (with "step"); masks_from_checkpoint: whether a resumed checkpoint's masks
        replaced other masks (or none) that `config.masks` gave.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        config: OPDConfig | None = None,
        *,
        teacher_prompt_fn: Callable[[Prompts], Prompts] | None = None,
        evaluator: Callable[[OPDTrainer], dict[str, float]] | None = None,
        run_dir: str | Path | None = None,
    ) -> None:
        from fastopd.rollout import RolloutEngine

        self.config = cfg = config if config is not None else OPDConfig()
        if not isinstance(cfg, OPDConfig):
            raise ValueError(f"config must be an OPDConfig, got {type(cfg).__name__}")
        if teacher is None:
            raise ValueError("OPDTrainer needs a teacher (pass the student itself for self-distillation)")
        self.parallel = DataParallel.resolve(cfg.parallel, cfg.hsdp_shard_size)
        seed_everything(cfg.seed + self.parallel.rank)
        self.student = student
        self.teacher = teacher
        if teacher is not student:
            teacher.eval()
        self.teacher_prompt_fn = teacher_prompt_fn
        self.evaluator = evaluator
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.engine = RolloutEngine(student, teacher, horizon=make_horizon(cfg), num_samples=cfg.num_samples,
                                    temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                    eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
                                    vocab_size=cfg.vocab_size)
        self.device = self.engine.student.device
        self.vocab_size = _shared_vocab(self.engine.student, self.engine.teacher, cfg.vocab_size)
        self.softcap = _shared_softcap(self.engine.student, self.engine.teacher)
        from fastopd import _dispatch

        # An unusable loss backend (loss_impl, FASTOPD_IMPL) is refused here, not after the first rollout.
        _dispatch.resolve("divergence_chunk", cfg.loss_impl, self.device)
        # The training forward and the loss run as one module call: what DDP and FSDP2 wrap.
        self.module = self.parallel.wrap(LossModule(student, self._micro_loss), self.engine.student.layer_modules())
        # Under FSDP2 a teacher of its own on the student's device is sharded too: scoring gathers one layer at a time.
        t = self.engine.teacher
        self.teacher_sharded = (t is not self.engine.student and t.device == self.device
                                and self.parallel.shard_frozen(t.model, t.layer_modules()))
        # The student's trainable parameters by name, as the optimizer holds them (masks, the optimizer, clipping,
        # density tracking and trainable_count all read this one list).
        self.named_trainable = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
        if not self.named_trainable:
            raise ValueError("the student has no parameter with requires_grad=True")
        self.params = [p for _, p in self.named_trainable]
        self.masks = self._load_masks(cfg.masks)
        found = ckpt.latest_checkpoint(cfg.checkpoint_dir) if cfg.resume else None
        data = ckpt.load_checkpoint(found, map_location=self.device) if found is not None else None
        # A masked run resumed without masks goes on with the checkpoint's (its optimizer state fixes them).
        self.optimizer = self._make_optimizer(sparse=data is not None and _is_masked_state(data["optimizer"]))
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.eval_history: list[dict[str, Any]] = []
        self._teacher_weight_cache: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._reference: list[torch.Tensor] | None = None
        self.resumed_from: Path | None = None
        self._saved_step: int | None = None
        self._restored_steps = 0  # batches of an iterator prompt source the next `train` skips (after a resume)
        self._train_steps: int | None = None
        if cfg.schedule_steps is not None:
            _warn_warmup_outlasts_cosine(cfg, cfg.schedule_steps)
        self.masks_from_checkpoint = False
        self.changed_options: dict[str, tuple[Any, Any]] = {}  # after a resume: option -> (checkpoint's, this one's)
        self._logs_stale = False  # metrics/eval.jsonl to be rewritten from the histories before the next write
        if data is not None:
            self._restore(found, data)
        if cfg.track_density and self._reference is None:
            self._mark_reference()

    # ------------------------------------------------------------------ construction helpers

    def _load_masks(self, masks: Any) -> dict[str, torch.Tensor] | None:
        if masks is None:
            return None
        recorded: dict[str, tuple[int, ...]] = {}  # the parameter shapes a mask file was made for
        source = "masks"
        if not isinstance(masks, dict):
            from safetensors import SafetensorError

            from fastopd.optim import masks as mask_io

            source = f"masks file {masks}"
            try:
                recorded = mask_io.recorded_shapes(str(masks))
                masks = mask_io.load(str(masks), device=self.device)
            except (SafetensorError, OSError) as exc:  # not a safetensors file at all (mask_io raises ValueError
                # for a safetensors file of another format)
                raise ValueError(f"masks: cannot read {masks} as a fastopd.optim.masks file ({exc})") from None
        from fastopd.analysis import match_param_names

        # Every name of a trainable parameter: a tied weight (a Hugging Face head tied to the input embedding) has a
        # second name, "lm_head.weight", that `state_dict()` lists and named_parameters() leaves out.
        canonical = {id(p): n for n, p in self.named_trainable}
        aliases = {n: canonical[id(p)] for n, p in self.student.named_parameters(remove_duplicate=False)
                   if id(p) in canonical}
        # A mask file from `fastopd analyze` on Hugging Face checkpoints names "model.layers...": names one uniform
        # prefix away from this student's are matched; anything else is left for the optimizer to refuse by name.
        try:
            renamed = match_param_names({n: (m, recorded.get(n)) for n, m in masks.items()}, list(aliases))
        except ValueError:
            return masks
        params = dict(self.student.named_parameters(remove_duplicate=False))
        out: dict[str, Any] = {}
        for name, (mask, made_for) in renamed.items():  # a mask on a tied weight's second name masks that weight
            # An index mask made for a parameter of another shape can still fit this one's range: the shape the
            # file records tells them apart (a student of another size than the one the masks were computed on).
            if made_for is not None and name in params and tuple(params[name].shape) != made_for:
                raise ValueError(f"{source}: mask {name!r} was made for a parameter of shape {made_for}, the "
                                 f"student's is {tuple(params[name].shape)}")
            own = aliases.get(name, name)
            if own in out and not _same_mask(out[own], mask):
                tied = sorted(a for a, c in aliases.items() if c == own)
                raise ValueError(f"masks: {tied} name one tied weight and their masks differ")
            out[own] = mask
        return out

    def _make_optimizer(self, sparse: bool = False) -> torch.optim.Optimizer:
        """AdamW, or SparseMaskedAdamW when there are masks or `sparse` (then without masks of its own: a masked
        checkpoint's state brings them)."""
        cfg = self.config
        named = self.named_trainable
        if self.masks is not None or not sparse:  # (a masked checkpoint's state brings masks not yet known here)
            _warn_low_precision_dense(named, self.masks)
        if self.masks is None and not sparse:
            return torch.optim.AdamW([p for _, p in named], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                     weight_decay=cfg.weight_decay)
        from fastopd.optim import SparseMaskedAdamW
        from fastopd.optim.sparse_adamw import masks_digest

        masks = self.masks if self.masks is not None else {}
        opt = SparseMaskedAdamW(named, masks=masks, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                weight_decay=cfg.weight_decay)
        digests = self.parallel.gather_objects(masks_digest(masks))
        if len(set(digests)) > 1:  # every rank raises, none is left waiting in a collective
            differ = [r for r, d in enumerate(digests) if d != digests[0]]
            raise ValueError(f"the sparse masks differ across ranks (ranks {differ} differ from rank 0): every rank "
                             "must load the same masks")
        return opt

    # ------------------------------------------------------------------ one step

    def score(self, batch, teacher_prompts=None, engine=None) -> torch.Tensor:
        """The teacher's hidden states over `batch` (`engine.score`, default this trainer's engine), through the
        sharded teacher under FSDP2 (one layer gathered at a time)."""
        engine = engine if engine is not None else self.engine
        return self.parallel.run_frozen(self.engine.teacher.model, engine.score, batch, teacher_prompts)

    def _teacher_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher LM-head weight (and bias) on the student's device. A teacher elsewhere, or sharded under FSDP2,
        is copied (gathered) once and cached (it does not train); a teacher on the student's device is used in place
        (it may be the student)."""
        t = self.engine.teacher
        w, b = t.output_weight, t.output_bias
        if w.device == self.device and not self.teacher_sharded:
            return w.detach(), (b.detach() if b is not None else None)
        if self._teacher_weight_cache is None:  # a sharded teacher's head is gathered once (it does not train)
            full = lambda x: (x.full_tensor() if is_dtensor(x) else x).detach().to(self.device)  # noqa: E731
            self._teacher_weight_cache = (full(w), full(b) if b is not None else None)
        return self._teacher_weight_cache

    def _loss(self, batch, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
              num_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss of this micro-batch, normalized by the step's token count `num_tokens`; sum over its tokens of
        the sampled reverse KL log p_s(y) - log p_t(y), detached)."""
        cfg = self.config
        s, t = self.engine.student, self.engine.teacher
        wt, bt = self._teacher_head()
        # Heads that scale their logits (Granite, Cohere): scale * (h W^T + b) = (scale h) W^T + scale b.
        student_hidden, bs = _scaled(student_hidden, s.output_bias, s.logit_scale)
        teacher_hidden, bt = _scaled(teacher_hidden, bt, t.logit_scale)
        labels = batch.labels().to(self.device)
        common = dict(student_bias=bs, teacher_bias=bt, temperature=cfg.temperature, softcap=self.softcap,
                      vocab_size=self.vocab_size, return_stats=True, impl=cfg.loss_impl, chunk_size=cfg.chunk_size)
        if cfg.objective == "pg":
            nll, stats = fused_linear_divergence(student_hidden, s.output_weight, teacher_hidden, wt, labels,
                                                 reduction="none", hard_label_weight=1.0, soft_label_weight=0.0,
                                                 **common)
            mask = labels != -100
            r = (stats.logp_student - stats.logp_teacher).masked_fill(~mask, 0.0)
            ratio = (stats.logp_student - batch.logprobs.to(self.device)).exp().clamp(max=cfg.pg_ratio_cap)
            weight = (ratio * r).masked_fill(~mask, 0.0)
            loss = (weight * nll).sum().neg() / num_tokens
        else:
            loss, stats = fused_linear_divergence(student_hidden, s.output_weight, teacher_hidden, wt, labels,
                                                  divergence=cfg.objective, beta=cfg.beta, reduction="mean",
                                                  num_items_in_batch=num_tokens, **common)
            r = stats.logp_student - stats.logp_teacher  # zero at ignored positions
        return loss, r.sum()

    def lr_at(self, step: int) -> float:
        """Learning rate of step `step` (0-based): linear warm-up over `warmup_steps`, then constant or a cosine
        decay reaching 0 at `schedule_steps` (default: the `steps` of the running `train` call)."""
        cfg = self.config
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        total = cfg.schedule_steps or self._train_steps
        if cfg.lr_schedule == "cosine" and total:
            w = cfg.warmup_steps
            frac = min(1.0, max(0, step - w) / max(1, total - w))
            lr *= 0.5 * (1.0 + math.cos(math.pi * frac))
        return lr

    def _micro_loss(self, batch, teacher_hidden: torch.Tensor,
                    num_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's training forward and the loss of one micro-batch (the body of `self.module`)."""
        return self._loss(batch, self.engine.student_hidden(batch), teacher_hidden, num_tokens)

    def step(self, prompts: Prompts, attention_mask: torch.Tensor | None = None) -> dict[str, float]:
        """One OPD step on `prompts`: rollouts, teacher scoring, loss, optimizer step.

        `prompts` is a list of token-id lists (or 1-D tensors); or ids ``[B, L]`` (a tensor) with `attention_mask`
        ``[B, L]`` saying which are tokens (padding on either side is dropped; without a mask every id is a
        token); or a mapping with ``input_ids`` and ``attention_mask`` (a tokenizer's padded batch).

        The prompts are split into `grad_accum` micro-batches; all are rolled out first so the loss is the mean
        over every completion token of the step. Under data parallelism `prompts` is the global batch: this rank
        takes its contiguous share (`len(prompts)` must be at least world size x grad_accum).
        Returns the step's metrics (also appended to `history`):
        step, loss, rkl (mean per-token log p_s(y) - log p_t(y) on the sampled tokens, before the update),
        horizon, tokens (completion tokens generated), rollout_s, scoring_s, update_s, peak_mem_mb,
        grad_norm, and update_density (fraction of student weights changed since the last checkpoint, or since
        the start) when `track_density`.
        """
        cfg, par = self.config, self.parallel
        prompts = _prompt_lists(prompts, attention_mask)
        if not prompts:
            raise ValueError("prompts is empty: a step needs at least one prompt")
        if cfg.lr_schedule == "cosine" and not (cfg.schedule_steps or self._train_steps):
            raise ValueError("lr_schedule='cosine' decays over the steps of train(); step() called on its own needs "
                             "OPDConfig(schedule_steps=...) to know where the decay ends")
        if len(prompts) < cfg.grad_accum * par.world_size:
            raise ValueError(f"{len(prompts)} prompts cannot be split into grad_accum={cfg.grad_accum} micro-batches"
                             f" on each of {par.world_size} ranks")
        k = self.global_step
        teacher_prompts = None
        if self.teacher_prompt_fn is not None:
            teacher_prompts = [list(p) for p in self.teacher_prompt_fn(prompts)]
            if len(teacher_prompts) != len(prompts):
                raise ValueError(f"teacher_prompt_fn returned {len(teacher_prompts)} prompts for {len(prompts)}")
        if par.active:
            a, b = _split(len(prompts), par.world_size)[par.rank]
            prompts = prompts[a:b]
            teacher_prompts = teacher_prompts[a:b] if teacher_prompts is not None else None
        chunks = _split(len(prompts), cfg.grad_accum)
        self.student.train()

        _sync(self.device)
        t0 = time.perf_counter()
        with par.unsharded(self.module):
            batches = [self.engine.generate(prompts[a:b], step=k) for a, b in chunks]
        _sync(self.device)
        t_rollout = time.perf_counter() - t0
        num_tokens = par.sum_(sum(b.completion_mask.sum() for b in batches).to(self.device))
        # DDP and FSDP2 average gradients over the ranks: normalize each rank's loss by tokens / world size so
        # that the average is the loss over every token of the step.
        norm = num_tokens / par.world_size
        self_scoring = self.engine.teacher is self.engine.student

        t_score = t_update = 0.0
        loss_sum = torch.zeros((), device=self.device)
        rkl_sum = torch.zeros((), device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        for i, ((a, b), batch) in enumerate(zip(chunks, batches)):
            t0 = time.perf_counter()
            tp = teacher_prompts[a:b] if teacher_prompts is not None else None
            with par.unsharded(self.module) if self_scoring else contextlib.nullcontext():
                teacher_hidden = self.score(batch, tp).to(self.device)
            _sync(self.device)
            t1 = time.perf_counter()
            with par.no_sync(self.module, last=i == len(batches) - 1):
                loss, rkl = self.module(batch, teacher_hidden, norm)
                loss.backward()
            loss_sum += loss.detach()
            rkl_sum += rkl.detach()
            _sync(self.device)
            t_score += t1 - t0
            t_update += time.perf_counter() - t1
        t0 = time.perf_counter()
        lr = self.lr_at(k)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if cfg.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        if is_dtensor(grad_norm):  # FSDP2: the norm over every shard
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _sync(self.device)
        t_update += time.perf_counter() - t0
        self.global_step = k + 1

        sums = par.sum_(torch.stack([loss_sum / par.world_size, rkl_sum]))
        slowest = par.max_(torch.tensor([t_rollout, t_score, t_update, peak_memory_mb(self.device)],
                                        dtype=torch.float64, device=self.device)).tolist()
        metrics = {
            "step": self.global_step,
            "loss": float(sums[0]),
            "rkl": float(sums[1] / num_tokens),
            "horizon": int(batches[0].horizon),
            "tokens": int(num_tokens),
            "rollout_s": slowest[0],
            "scoring_s": slowest[1],
            "update_s": slowest[2],
            "peak_mem_mb": slowest[3],
            "grad_norm": float(grad_norm),
            "lr": lr,
        }
        if cfg.track_density:
            metrics["update_density"] = self.update_density()
        self.history.append(metrics)
        self._log("metrics.jsonl", metrics)
        return metrics

    # ------------------------------------------------------------------ the loop

    def train(self, prompt_source: PromptSource, steps: int, *, progress: bool = True) -> list[dict[str, Any]]:
        """Run until `global_step == steps`: progress bar, logging, evaluation and checkpoints.

        Args:
            prompt_source: a callable `step -> prompts` (the exact-resume form: step k's prompts depend on k only),
                or an iterable of prompt batches, one per step. A collection (a list) is read from its start, so
                the batches of finished steps are skipped; an iterator (a generator) is read on from where it is,
                and only on the first `train` after `load_checkpoint` are the restored steps' batches skipped.
            steps: the total number of steps (a resumed run continues up to it).
            progress: show a tqdm progress bar on stderr.
        A Ctrl-C (SIGINT, on one process) lets the step in progress finish, saves a checkpoint of it (with a
        `checkpoint_dir`) and raises KeyboardInterrupt; a second Ctrl-C interrupts at once. A SIGTERM (preemption)
        does the same and raises `Terminated`, a SystemExit with code 143. Under torchrun neither is handled here
        (the ranks would stop at different steps); `fastopd distill` handles SIGTERM on every rank.

        Returns:
            `history`, the per-step metrics of the whole run (resumed runs include the steps before the resume).
        Raises:
            ValueError: `checkpoint_dir` cannot be created or written (before any step).
        """
        cfg = self.config
        steps = _whole_steps(steps)
        if steps < self.global_step:
            raise ValueError(f"steps={steps} is below the step already reached ({self.global_step})")
        restored, self._restored_steps = self._restored_steps, 0
        if callable(prompt_source):
            get = prompt_source
        elif iter(prompt_source) is prompt_source:  # an iterator is read on: it skips only the restored steps, once
            get = _IterSource(prompt_source, restored)
        else:  # a collection is read from its start: skip every finished step
            get = _IterSource(prompt_source, self.global_step)
        if cfg.checkpoint_dir is not None:  # found now, not at the first save after the steps it would keep
            problem = folder_write_problem(cfg.checkpoint_dir) if self.parallel.is_main else None
            problem = self.parallel.gather_objects(problem)[0]
            if problem is not None:
                raise ValueError(f"checkpoint_dir: cannot write checkpoints in {cfg.checkpoint_dir}: {problem}")
        self._train_steps = steps
        if cfg.schedule_steps is None and steps > self.global_step:
            _warn_warmup_outlasts_cosine(cfg, steps)
        start = self.global_step
        stop = _StopOnInterrupt(enabled=not self.parallel.active)
        bar = None
        try:
            with stop:
                if self._logs_stale:
                    self._rewrite_logs()
                if self.evaluator is not None and not self.eval_history:
                    self.evaluate()
                if progress and self.parallel.is_main:
                    from tqdm.auto import tqdm

                    bar = tqdm(total=steps, initial=self.global_step, desc="distill", unit="step", dynamic_ncols=True,
                               file=sys.stderr)
                self._train_loop(get, steps, bar, stop)
                if stop.requested and self.global_step < steps:  # a signal: keep the finished steps, then stop
                    if (cfg.checkpoint_dir is not None and self.global_step > start
                            and self._saved_step != self.global_step):
                        self.save_checkpoint()
                    why = f"stopped at step {self.global_step} of {steps}"
                    raise KeyboardInterrupt(why) if stop.requested == signal.SIGINT else Terminated(why)
                if bar is not None:
                    bar.close()
                    bar = None
                if self.evaluator is not None and (not self.eval_history or self.eval_history[-1]["step"] != steps):
                    # no step ran (a resumed run already at `steps`) and no evaluation there yet
                    self.evaluate()
                if cfg.checkpoint_dir is not None and self._saved_step != self.global_step:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            self._train_steps = None  # the cosine total holds while train runs (a later step() needs schedule_steps)
        return self.history

    def _train_loop(self, get: Callable[[int], Prompts], steps: int, bar, stop: _StopOnInterrupt) -> None:
        """The steps of `train`, each with its evaluation and checkpoint, until `steps` or a Ctrl-C's request."""
        cfg = self.config
        while self.global_step < steps and not stop.requested:
            m = self.step(get(self.global_step))
            k = self.global_step
            if bar is not None:
                bar.update(1)
                if k % cfg.log_every == 0 or k == steps:
                    bar.set_postfix(loss=f"{m['loss']:.4f}", rkl=f"{m['rkl']:.4f}", H=m["horizon"])
            # The final evaluation comes before the checkpoint of the same step, so the checkpoint holds it
            # and a run resumed from there keeps it.
            if self.evaluator is not None and (k == steps or cfg.eval_every and k % cfg.eval_every == 0):
                self.evaluate()
            if cfg.checkpoint_dir is not None and cfg.checkpoint_every and k % cfg.checkpoint_every == 0:
                self.save_checkpoint()

    def evaluate(self) -> dict[str, Any]:
        """Run the evaluator (if any) at the current step; the result (with "step") is kept in `eval_history`."""
        if self.evaluator is None:
            raise ValueError("this OPDTrainer has no evaluator")
        was_training = self.student.training
        self.student.eval()
        try:  # on every rank; under FSDP2 with the full weights (the evaluator may run the student as it likes)
            with self.parallel.unsharded(self.module):
                result = {"step": self.global_step, **_plain_result(self.evaluator(self))}
        finally:
            self.student.train(was_training)
        self.eval_history.append(result)
        self._log("eval.jsonl", result)
        return result

    # ------------------------------------------------------------------ density and checkpoints

    def _mark_reference(self) -> None:
        self._reference = [local_shard(p).detach().clone() for p in self.params]

    @torch.no_grad()
    def update_density(self) -> float:
        """Fraction of the student's trainable coordinates that differ (bitwise) from the last checkpoint (or the
        start of the run), over every rank's shard. Synchronizes."""
        if self._reference is None:
            raise ValueError("update_density needs track_density=True")
        changed = sum((local_shard(p) != r).sum() for p, r in zip(self.params, self._reference))
        if self.parallel.sharded:  # each rank of a shard group holds a shard of every parameter
            changed = self.parallel.sum_over_shards_(torch.as_tensor(changed, device=self.device))
        total = sum(p.numel() for p in self.params)
        return float(changed) / total

    def state_dict(self) -> dict[str, Any]:
        """The trainer's own state: step, config, RNG states (one per rank under data parallelism) and histories
        (model and optimizer excluded). A collective under data parallelism: every rank must call it."""
        rng = self.parallel.gather_objects(ckpt.rng_state())
        return {"step": self.global_step, "config": _plain(self.config.to_dict()), "rng": rng[0], "rng_ranks": rng,
                "history": self.history, "eval_history": self.eval_history}

    def save_checkpoint(self) -> Path:
        """Write an atomic checkpoint of the current step to `config.checkpoint_dir`; resets the density reference.

        Under data parallelism every rank calls it (weights and optimizer state are gathered to full tensors) and
        rank 0 alone writes; the others wait for the write to finish."""
        cfg, par = self.config, self.parallel
        if cfg.checkpoint_dir is None:
            raise ValueError("save_checkpoint needs config.checkpoint_dir")
        model_state = par.full_model_state(self.student)
        optimizer_state = par.full_optimizer_state(self.optimizer)
        trainer_state = self.state_dict()
        path = Path(cfg.checkpoint_dir) / ckpt.step_dir_name(self.global_step)
        if par.is_main:
            path = ckpt.save_checkpoint(cfg.checkpoint_dir, self.global_step, model_state=model_state,
                                        optimizer_state=optimizer_state, trainer_state=trainer_state,
                                        keep=cfg.keep_checkpoints)
        par.barrier()
        self._saved_step = self.global_step
        if cfg.track_density:
            self._mark_reference()
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore student weights, optimizer state (masks included: the checkpoint's replace this trainer's),
        RNG states, step and histories; with a `run_dir`, metrics.jsonl and eval.jsonl are rewritten from the
        restored histories when `train` starts or a record is next logged.

        Raises:
            ValueError: the checkpoint's weights do not fit the student (names or shapes), or it holds a masked
                (SparseMaskedAdamW) state and this trainer's optimizer is AdamW (`resume=True` at construction
                builds a SparseMaskedAdamW for it).
        """
        self._restore(path, ckpt.load_checkpoint(path, map_location=self.device))

    def _restore(self, path: str | Path, data: dict[str, Any]) -> None:
        state = data["model"]
        own = self.student.state_dict()
        for name, t in own.items():  # checked before anything is loaded
            if name in state and tuple(state[name].shape) != tuple(t.shape):
                raise ValueError(f"checkpoint {path} does not match the student: {name} has shape "
                                 f"{tuple(state[name].shape)} there, {tuple(t.shape)} in the student")
        sparse = self.sparse
        if _is_masked_state(data["optimizer"]) and not sparse:
            raise ValueError(f"checkpoint {path} holds a sparse-masked optimizer state (SparseMaskedAdamW) and "
                             f"this trainer's optimizer is {type(self.optimizer).__name__}: build the trainer with "
                             "resume=True (it goes on with the checkpoint's masks) or with masks")
        for name, t in own.items():  # tied weights are saved under every name; copy into each
            if name in state:
                state[name] = state[name].to(dtype=t.dtype)
        missing, unexpected = self.parallel.load_full_model_state(self.student, state)
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not match the student: missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]}")
        if data["optimizer"] is not None:
            before = _mask_signature(self.optimizer) if sparse else None
            self.parallel.load_full_optimizer_state(self.optimizer, data["optimizer"])
            # load_state_dict puts back the saving run's hyperparameters; this run's config holds (the lr is set
            # at every step), as changed_options says
            cfg = self.config
            for group in self.optimizer.param_groups:
                group.update(betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
            changed = sparse and _mask_signature(self.optimizer) != before
            self.masks_from_checkpoint = any(self.parallel.gather_objects(changed))
        tr = data["trainer"]
        then, now = tr.get("config") or {}, _plain(self.config.to_dict())
        # Options the resumed run changes (they apply from here on); the masks are reported apart.
        self.changed_options = {k: (then[k], now[k]) for k in now
                                if k in then and then[k] != now[k] and k not in _RESUME_OWN_OPTIONS
                                and not (_is_object_repr(then[k]) and _is_object_repr(now[k]))}
        ranks = tr.get("rng_ranks", [tr["rng"]])
        if len(ranks) == self.parallel.world_size and "seed" not in self.changed_options:
            ckpt.set_rng_state(ranks[self.parallel.rank])
        else:  # another world size or seed: fresh per-rank streams, a function of the seed, rank and step only
            seed_everything(self.config.seed + self.parallel.rank + 1_000_003 * int(tr["step"]))
        self.global_step = self._restored_steps = int(tr["step"])
        self.history = list(tr.get("history", []))
        self.eval_history = list(tr.get("eval_history", []))
        self.resumed_from = Path(path)
        self._saved_step = self.global_step
        self._logs_stale = True  # rewritten at the next train() or log write: building a trainer writes nothing
        self._teacher_weight_cache = None
        if self.config.track_density:
            self._mark_reference()

    @property
    def sparse(self) -> bool:
        """Whether the optimizer is SparseMaskedAdamW (masks given, or a masked checkpoint resumed)."""
        from fastopd.optim import SparseMaskedAdamW

        return isinstance(self.optimizer, SparseMaskedAdamW)

    @torch.no_grad()
    def trainable_count(self) -> int:
        """Coordinates of the student the optimizer updates: all of a dense parameter, the selected ones of a masked
        one (SparseMaskedAdamW; its masks may be a resumed checkpoint's). A collective under FSDP2 (every rank
        calls it)."""
        if not self.sparse:
            return sum(p.numel() for p in self.params)
        masked = self.optimizer.mask_indices()
        named = dict(self.named_trainable)
        dense = sum(p.numel() for n, p in named.items() if n not in masked)
        local = sum(local_shard(named[n]).numel() if idx is None else idx.numel() for n, idx in masked.items())
        if self.parallel.sharded:  # shard-local indices: sum over the ranks holding different shards
            local = self.parallel.sum_over_shards_(torch.tensor(local, device=self.device))
        return dense + int(local)

    def _rewrite_logs(self) -> None:
        """Make metrics.jsonl and eval.jsonl hold the current histories, one line per record (each file replaced
        atomically): after a resume, the lines a dead run wrote past its last checkpoint are dropped."""
        self._logs_stale = False
        if self.run_dir is None or not self.parallel.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name, records in (("metrics.jsonl", self.history), ("eval.jsonl", self.eval_history)):
            write_text_atomic(self.run_dir / name, "".join(json_text(r, indent=None) for r in records))

    def _log(self, name: str, record: dict[str, Any]) -> None:
        """Append `record` (already the last of its history) to `name` in the run folder."""
        if self._logs_stale:  # after a restore: the files become the histories, this record included
            self._rewrite_logs()
            return
        if self.run_dir is None or not self.parallel.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / name, "a") as f:
            f.write(json_text(record, indent=None))


def _whole_steps(steps: Any) -> int:
    """`steps` as an int: ints (NumPy's too) and integral floats (1e4); 2.5 ran 3 steps under a schedule planned over
    2.5, and True ran one."""
    if isinstance(steps, float) and steps.is_integer():
        return int(steps)
    if (whole := as_int(steps)) is not None:
        return whole
    raise ValueError(f"steps must be a whole number of steps, got {steps!r}")


def _warn_warmup_outlasts_cosine(cfg: OPDConfig, total: int) -> None:
    """Warns when a cosine schedule's warm-up takes all its `total` steps: the rate then only rises (to lr *
    total / warmup_steps at most) and never decays. Not an error: `fastopd distill --steps 10` with the default
    warm-up of 20 is a fair smoke run."""
    if cfg.lr_schedule == "cosine" and cfg.warmup_steps >= total:
        warnings.warn(
            f"OPDTrainer: warmup_steps={cfg.warmup_steps} is not below the cosine schedule's {total} steps "
            f"(schedule_steps, else the steps given to train): the learning rate only rises, to at most lr * "
            f"{total}/{cfg.warmup_steps}, and never decays. Lower warmup_steps or raise schedule_steps",
            UserWarning, stacklevel=3)


def _warn_low_precision_dense(named: list[tuple[str, torch.nn.Parameter]], masks: dict | None) -> None:
    """Warns when bf16/fp16 parameters are trained densely (torch's AdamW, no fp32 master weights): each update is
    rounded into the parameter's own dtype, and one below half its spacing (0.4% of the weight in bf16, 0.05% in
    fp16) is lost, so at fine-tuning learning rates most weights never move."""
    low = [(n, p.dtype) for n, p in named if p.dtype in (torch.bfloat16, torch.float16) and not (masks and n in masks)]
    if low:
        warnings.warn(
            f"OPDTrainer: {len(low)} student parameter(s) (e.g. {low[0][0]!r}, {low[0][1]}) are trained densely by "
            "AdamW in their own dtype, without fp32 master weights: an update below half the dtype's spacing at a "
            "weight (0.4% of it in bf16) is rounded away, so at small learning rates most weights never move. Keep "
            "the student in float32 (torch.autocast keeps bf16 speed), or pass masks (SparseMaskedAdamW keeps fp32 "
            "masters for masked bf16/fp16 parameters)", UserWarning, stacklevel=4)


# Options that say how to resume or where to write, not how to train: never reported as changed on a resume.
_RESUME_OWN_OPTIONS = frozenset({"resume", "checkpoint_dir", "checkpoint_every", "keep_checkpoints", "masks",
                                 "log_every"})


def _is_object_repr(value: Any) -> bool:
    """Whether a config value is the repr of an object with no value form (a callable horizon: `<function ... at
    0x...>`): two such reprs differ by address, not by what they do, so a resume does not report them."""
    return isinstance(value, str) and re.search(r" at 0x[0-9a-fA-F]+>$", value) is not None


def _is_masked_state(optimizer_state: dict[str, Any] | None) -> bool:
    """Whether an optimizer state dict is SparseMaskedAdamW's with at least one masked parameter."""
    return optimizer_state is not None and any("indices" in st for st in optimizer_state["state"].values())


def _mask_signature(optimizer) -> str:
    """A digest of a SparseMaskedAdamW's masks (its selected flat indices, whatever their integer dtype)."""
    from fastopd.optim.sparse_adamw import masks_digest

    return masks_digest({n: None if i is None else i.to(torch.int64) for n, i in optimizer.mask_indices().items()})


def _shared_softcap(student, teacher) -> float | None:
    """The final logit soft-cap both adapters' models apply (None: none): the fused loss takes one for both."""
    if student.logit_softcap != teacher.logit_softcap:
        raise ValueError(f"the student's final logit soft-cap ({student.logit_softcap}) differs from the teacher's "
                         f"({teacher.logit_softcap}): the fused loss applies one soft-cap to both models' logits")
    return student.logit_softcap


def _scaled(hidden: torch.Tensor, bias: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states and head bias whose head product is `scale` times the unscaled one (themselves for 1)."""
    if scale == 1.0:
        return hidden, bias
    return hidden * scale, (bias * scale if bias is not None else None)


class Terminated(SystemExit):
    """Raised by `OPDTrainer.train` after a SIGTERM (preemption: SLURM, Kubernetes) once the step in progress has
    finished and been checkpointed; a SystemExit with code 143 (128 + SIGTERM), so an uncaught one ends the process
    with the status a SIGTERM gives, after `finally` blocks and atexit handlers ran."""

    def __init__(self, message: str) -> None:
        super().__init__(143)
        self.message = message

    def __str__(self) -> str:
        return self.message


class _StopOnInterrupt:
    """While `train` runs (in the main thread of a single process), the first Ctrl-C (SIGINT, where Python's
    default handler is installed) or SIGTERM (where its default action is) only sets `requested`: the step in
    progress finishes, so the trainer's state is never torn, and `train` checkpoints it and raises
    KeyboardInterrupt, or `Terminated` for a SIGTERM. Both handlers are then the previous ones again, so a second
    signal acts at once (the newest checkpoint is then the last one written). Under torchrun (the ranks would not
    agree on the step to stop at; `fastopd distill` makes them agree) and where another handler is installed (as
    `fastopd distill` installs its own for SIGTERM) nothing changes."""

    _DEFAULTS = ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL))

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.requested: int | None = None  # the signal that asked to stop
        self._installed: list[tuple[int, Any]] = []

    def __enter__(self) -> _StopOnInterrupt:
        self.requested = None
        if self.enabled and threading.current_thread() is threading.main_thread():
            for signum, default in self._DEFAULTS:
                if signal.getsignal(signum) == default:
                    signal.signal(signum, self._handle)
                    self._installed.append((signum, default))
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = signum
        self._restore()
        what = "interrupted (Ctrl-C)" if signum == signal.SIGINT else "terminated (SIGTERM)"
        again = "press Ctrl-C again" if signum == signal.SIGINT else "another SIGTERM stops the process"
        print(f"\n{what}: stopping after the step in progress, with a checkpoint; {again} to stop at once",
              file=sys.stderr, flush=True)

    def _restore(self) -> None:
        for signum, default in self._installed:
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, default)
        self._installed = []

    def __exit__(self, *exc: Any) -> None:
        self._restore()


_END = object()


class _IterSource:
    """Step-indexed view of an iterable of prompt batches (skips its first `start` batches)."""

    def __init__(self, iterable: Iterable[Prompts], start: int) -> None:
        self._it = iter(iterable)
        for k in range(start):
            if next(self._it, _END) is _END:
                raise ValueError(f"the prompt source holds {k} batches, fewer than the {start} steps it must skip "
                                 "(the steps already taken)")

    def __call__(self, step: int) -> Prompts:
        try:
            return next(self._it)
        except StopIteration:
            raise ValueError(f"the prompt source ran out at step {step}") from None


def _same_mask(a: Any, b: Any) -> bool:
    """Two masks of one tensor are the same (None: every coordinate)."""
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def _shared_vocab(student, teacher, vocab_size: int | None = None) -> int | None:
    """The `vocab_size` of the loss: the one given (OPDConfig.vocab_size, which the rollouts sample below too);
    else None when both heads have the same rows, else the student's (a teacher head padded past the student's
    vocabulary is compared on its leading rows).

    Raises:
        ValueError: the ids sampled (below `vocab_size`, else the student's head rows) reach past what the teacher
            can embed or score.
    """
    vs, vt = int(student.output_weight.shape[0]), int(teacher.output_weight.shape[0])
    limit = min(vt, teacher.vocab_size)
    if vocab_size is not None:
        if vocab_size > limit:
            raise ValueError(f"vocab_size={vocab_size} is more than the teacher's vocabulary ({vt} head rows, "
                             f"{teacher.vocab_size} embedding rows): the student would sample token ids the "
                             "teacher cannot score")
        return vocab_size
    if vs == vt and teacher.vocab_size >= vs:
        return None
    if vs > limit:
        raise ValueError(f"the student's LM head has {vs} rows, more than the teacher's vocabulary ({vt} head rows, "
                         f"{teacher.vocab_size} embedding rows): the student would sample token ids the teacher "
                         f"cannot score; pass OPDConfig(vocab_size=...) with the tokenizer's vocabulary (at most "
                         f"{limit}) to sample and distill only the ids both models have, or use a teacher whose "
                         "vocabulary covers the student's")
    return vs


def _prompt_lists(prompts: Any, attention_mask: torch.Tensor | None) -> list[list[Any]]:
    """The step's prompts as lists of ids: a list of token-id lists (or 1-D tensors), ids ``[B, L]`` (a tensor or
    array) with an optional ``attention_mask`` (padding dropped), lists with their mask rows, or a mapping with
    ``input_ids`` and ``attention_mask`` (a tokenizer's batch, with or without return_tensors). Raises ValueError
    for anything else."""
    if isinstance(prompts, Mapping) and "input_ids" in prompts:
        if attention_mask is not None:
            raise ValueError("attention_mask given twice: as an argument and in the prompts mapping")
        prompts, attention_mask = prompts["input_ids"], prompts.get("attention_mask")
    if not isinstance(prompts, torch.Tensor) and hasattr(prompts, "__array__") and getattr(prompts, "ndim", 0) == 2:
        prompts = torch.as_tensor(prompts)
    if attention_mask is not None and not isinstance(prompts, torch.Tensor):
        # lists of ids with their mask rows, as a tokenizer without return_tensors gives them (padded or not)
        from fastopd.rollout.engine import _masked_rows

        return _masked_rows(prompts, attention_mask, "prompts")
    if attention_mask is not None:
        if prompts.dim() != 2:
            raise ValueError(f"attention_mask is only accepted with prompts given as ids [B, L], got shape "
                             f"{tuple(prompts.shape)}")
        attention_mask = torch.as_tensor(attention_mask)
        if tuple(attention_mask.shape) != tuple(prompts.shape):
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match the prompts "
                             f"{tuple(prompts.shape)}")
        return [r[m.bool()].tolist() for r, m in zip(prompts.cpu(), attention_mask.cpu())]
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"prompts as a tensor must be ids [B, L], got shape {tuple(prompts.shape)}")
        return prompts.tolist()
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Iterable):
        raise ValueError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor) and p.dim() == 1:
            out.append(p.tolist())
        elif isinstance(p, (str, bytes, Mapping, torch.Tensor)) or not isinstance(p, Iterable):
            raise ValueError(f"prompts must be a list of token-id lists; prompts[{i}] is {type(p).__name__} "
                             f"{p!r:.40} (a single prompt goes in a list of its own: [ids])")
        else:
            out.append(list(p))
    return out


def _plain_result(result: Any) -> dict[str, Any]:
    """An evaluator's result with plain Python values: NumPy scalars and one-element tensors or arrays become
    Python numbers (a checkpoint holding NumPy scalars would not load under `torch.load(weights_only=True)`, nor
    would they all log as JSON).

    Raises:
        ValueError: the result is no dict, or holds a value that is not a number, a string, None or a list/dict
            of them (named by its key).
    """
    if not isinstance(result, Mapping):
        raise ValueError(f"the evaluator must return a dict of floats, got {type(result).__name__}")

    def plain(key: str, v: Any) -> Any:
        if v is None or type(v) in (bool, int, float, str):
            return v
        for kind in (bool, int, float, str):  # their subclasses: numpy.float64, IntEnum, ...
            if isinstance(v, kind):
                return kind(v)
        if isinstance(v, (list, tuple)):
            return [plain(key, x) for x in v]
        if isinstance(v, Mapping):
            return {str(k): plain(f"{key}.{k}", x) for k, x in v.items()}
        size = v.numel() if isinstance(v, torch.Tensor) else getattr(v, "size", None)
        if size == 1 and callable(getattr(v, "item", None)):  # 0-d / one-element tensors, NumPy scalars and arrays
            return plain(key, v.item())
        raise ValueError(f"the evaluator returned {key}={v!r:.60}: values must be numbers (or strings)")

    return {str(k): plain(str(k), v) for k, v in result.items()}


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous, nearly equal [a, b) ranges covering range(n)."""
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _plain(value: Any) -> Any:
    """Only plain values (for weights_only checkpoint loading): others become their repr."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


