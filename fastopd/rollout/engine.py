"""RolloutEngine: truncated rollouts of the student, dense teacher scoring, the student's training forward."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fastopd._numbers import as_int, as_real
from fastopd._numbers import strict_index as _index
from fastopd.models.kv_cache import KVCache, build_attention_mask
from fastopd.models.layers import positions_from_mask
from fastopd.rollout.adapters import DecodeStep, LlamaFamilyAdapter, ModelAdapter, as_adapter
from fastopd.rollout.batch import RolloutBatch
from fastopd.rollout.horizon import Horizon, resolve_horizon
from fastopd.rollout.sampling import sample_tokens

Prompts = Sequence[Sequence[int]] | Sequence[torch.Tensor] | torch.Tensor


def _eos_ids(eos_token_id: int | Sequence[int] | None) -> list[int]:
    """The EOS ids as Python ints: one id or a sequence of them (ints, NumPy integers, 0-d tensors, a 1-D tensor)."""
    if eos_token_id is None:
        return []
    scalar = getattr(eos_token_id, "ndim", None) == 0 or not isinstance(eos_token_id, Iterable)
    try:
        ids = [_index(i) for i in ([eos_token_id] if scalar else eos_token_id)]
    except TypeError:
        ids = []
    if not ids or any(i < 0 for i in ids):
        raise ValueError(f"eos_token_id must be None, a non-negative int or a list of them, got {eos_token_id!r}")
    return ids


def _row_ids(row: Sequence[Any], what: str, i: int) -> list[int]:
    """Prompt row ``i`` as a list of ints.

    Raises:
        ValueError: an id that is not an integer (a float such as 1.7 is not truncated; a bool is refused).
    """
    if isinstance(row, (str, bytes)) or not isinstance(row, Iterable):
        hint = "tokenize the text first" if isinstance(row, (str, bytes)) else "a single prompt goes in a list: [[...]]"
        raise ValueError(f"{what}[{i}] is {row!r}, not a sequence of int token ids ({hint})")
    row = list(row)
    if all(type(x) is int for x in row):  # the usual case: no call per id
        return row
    ids = []
    for j, x in enumerate(row):
        try:
            ids.append(_index(x))
        except TypeError:
            raise ValueError(f"{what}[{i}] is not a sequence of int token ids: {x!r} at position {j} (floats and "
                             "bools are refused)") from None
    return ids


def _check_batch(batch: Any, method: str) -> None:
    if not isinstance(batch, RolloutBatch):
        raise TypeError(f"RolloutEngine.{method} takes the RolloutBatch that generate returned, got "
                        f"{type(batch).__name__}")


def _masked_rows(prompts: Sequence[Any], attention_mask: Any, what: str) -> list[list[Any]]:
    """The ids of each row of ``prompts`` (lists or 1-D tensors) where its row of ``attention_mask`` is nonzero.

    Raises:
        ValueError: row counts or a row's lengths that differ.
    """
    # tensors and NumPy arrays (a tokenizer's return_tensors="np") become lists
    rows = [r.tolist() if hasattr(r, "tolist") else r for r in prompts]
    masks = attention_mask.tolist() if hasattr(attention_mask, "tolist") else list(attention_mask)
    masks = [m.tolist() if hasattr(m, "tolist") else m for m in masks]  # rows of a ragged (object) NumPy batch
    if len(masks) != len(rows):
        raise ValueError(f"attention_mask has {len(masks)} rows, {what} {len(rows)}")
    out = []
    for i, (r, m) in enumerate(zip(rows, masks)):
        if isinstance(r, (str, bytes)) or not isinstance(r, Iterable):
            _row_ids(r, what, i)  # raises, saying why: text (tokenize first) or one unbatched prompt (tok(text))
        if not isinstance(r, Sequence) or isinstance(r, str) or not isinstance(m, Sequence) or len(r) != len(m):
            raise ValueError(f"{what}[{i}] and its attention_mask row do not match: {r!r} and {m!r}")
        out.append([x for x, keep in zip(r, m) if keep])
    return out


class RolloutEngine:
    """Generates truncated on-policy rollouts from a student and scores them with a teacher.

    Args:
        student: a :class:`fastopd.models.Transformer`, a supported Hugging Face causal LM or a
            :class:`ModelAdapter`.
        teacher: same kinds, or None (then :meth:`score` raises). May be the student itself.
        horizon: a :class:`Horizon`, any callable ``step -> H``, or an int (a fixed horizon).
        num_samples: ``n`` completions per prompt (samples of a prompt share its prefilled KV).
        temperature: 0 for greedy; top_k: 0 disables; top_p: 1.0 disables.
        eos_token_id: an id or a list of ids ending a sequence, or None (no early stop).
        pad_token_id: fills prompt padding and the columns after EOS; default: the first EOS id, else 0.
        generator: RNG of sampling; None uses torch's global RNG (``torch.manual_seed`` makes rollouts repeatable).
        share_prefix: prefill each prompt once and expand its KV to its samples (True), or prefill every sample.
        cuda_graphs: on CUDA, capture the decode step of Llama-family models (built-in, Llama, Qwen2, Mistral, Qwen3) in
            a CUDA graph once per :meth:`generate` and replay it every step (one launch instead of hundreds).
            Ignored on CPU and for other models.
        vocab_size: sample among the first ``vocab_size`` ids only, with log-probs normalized over them (as
            ``fused_linear_divergence(..., vocab_size=...)`` does): the tokenizer's vocabulary when the model's
            head is padded beyond it (e.g. to a multiple of 64). None: the whole head.

    After each call, ``last_stats`` holds the horizon, prefill tokens computed and saved, decode steps and the KV
    cache bytes; ``kv_cache_bytes`` is the memory held by the student's and teacher's caches. Caches are sized to
    the padded prompt width plus the horizon in force, reused across calls and grown only when a call needs more.
    """

    def __init__(
        self,
        student: nn.Module | ModelAdapter,
        teacher: nn.Module | ModelAdapter | None = None,
        *,
        horizon: Horizon | Callable[[int], int] | int,
        num_samples: int = 1,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
        share_prefix: bool = True,
        cuda_graphs: bool = False,
        vocab_size: int | None = None,
    ) -> None:
        n, k, temp, p = as_int(num_samples), as_int(top_k), as_real(temperature), as_real(top_p)
        if n is None or n <= 0:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if temp is None or not (temp >= 0 and math.isfinite(temp)):  # inf would make a -inf logit NaN
            raise ValueError(f"temperature must be a number >= 0 and finite (0: greedy), got {temperature!r}")
        if k is None or k < 0:
            raise ValueError(f"top_k must be a non-negative int, got {top_k!r}")
        if p is None or not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
        if not callable(horizon) and as_int(horizon) is None:
            raise ValueError(f"horizon must be a Horizon, a callable step -> H or an int, got {horizon!r}")
        if not callable(horizon) and as_int(horizon) <= 0:
            raise ValueError(f"horizon must be a positive int (new tokens per rollout), got {horizon!r}")
        num_samples, top_k, temperature, top_p = n, k, temp, p
        self.student = as_adapter(student)
        head_rows = self.student.output_weight.shape[0]
        if vocab_size is None:
            self.vocab_size = None
        else:
            v = as_int(vocab_size)
            if v is None or not 0 < v <= head_rows:
                raise ValueError(f"vocab_size must be None or an int in [1, {head_rows}] (the student's head rows), "
                                 f"got {vocab_size!r}")
            self.vocab_size = v
        # the student itself as teacher (self-distillation): one adapter, so `engine.teacher is engine.student`
        self.teacher = (self.student if teacher is student else as_adapter(teacher)) if teacher is not None else None
        self.horizon = horizon
        self.num_samples = num_samples
        self.temperature = float(temperature)
        self.top_k = top_k
        self.top_p = float(top_p)
        self.eos_ids = _eos_ids(eos_token_id)
        if pad_token_id is None:
            self.pad_token_id = self.eos_ids[0] if self.eos_ids else 0
        else:
            try:
                self.pad_token_id = _index(pad_token_id)
            except TypeError:
                raise ValueError(f"pad_token_id must be None or an int, got {pad_token_id!r}") from None
        for adapter in (self.student, self.teacher):
            if adapter is not None:
                self._check_special_ids(adapter)
        if self.vocab_size is not None and any(e >= self.vocab_size for e in self.eos_ids):
            raise ValueError(f"eos_token_id={self.eos_ids} has ids that vocab_size={self.vocab_size} never samples")
        self.generator = generator
        self.share_prefix = share_prefix
        self.cuda_graphs = cuda_graphs
        self._caches: dict[str, KVCache] = {}
        self.last_stats: dict[str, Any] = {}

    # ------------------------------------------------------------------ public API

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes held by the engine's KV caches (student and teacher)."""
        return sum(c.nbytes for c in self._caches.values())

    def release_caches(self) -> None:
        """Free the KV caches and the decode step's weight copies (packed layers, transposed head, and the
        snapshot that detects weight changes), e.g. to give their memory to the training step; the next call
        rebuilds them."""
        self._caches.clear()
        for adapter in (self.student, self.teacher):
            if adapter is not None:
                adapter.release_decode_weights()

    def horizon_at(self, step: int) -> int:
        """The horizon the schedule sets at ``step`` (before capping to the model's context)."""
        return resolve_horizon(self.horizon, step)

    def generate(self, prompts: Prompts, attention_mask: torch.Tensor | None = None, *, step: int = 0) -> RolloutBatch:
        """Sample ``num_samples`` completions of up to ``H = horizon(step)`` tokens for each prompt.

        Args:
            prompts: a list of token-id lists (or 1-D tensors), or ids ``[B, L]`` with ``attention_mask`` ``[B, L]``
                (any padding side; rows are re-packed left-padded).
            step: training step, the argument of the horizon schedule.
        Returns:
            a :class:`RolloutBatch` of ``B * num_samples`` rows; ``H`` is capped so that ``P + H`` fits the context.
        Raises:
            ValueError: no prompts, an empty prompt, a token id that is not an integer (a float or a bool, in a
                list or as a tensor's dtype) or is outside ``[0, vocab)``, a prompt that does not fit the model's
                context, or a schedule returning a non-positive horizon.
        """
        adapter = self.student
        ids, mask, lengths = self._pack_prompts(prompts, attention_mask, adapter, "prompts")
        horizon = self.horizon_at(step)
        step = as_int(step)  # validated: a NumPy / tensor integer becomes an int
        bp, p = ids.shape
        n = self.num_samples
        b = bp * n
        h = min(horizon, adapter.max_positions - p)
        with torch.inference_mode():
            out = self._generate(adapter, ids, mask, lengths, h)
        tokens, logprobs, completion_mask, finished, steps, prefill_tokens = out
        # Built outside inference mode (also when the caller is in it: tensors made there could not be saved for
        # backward), so the batch can feed autograd (the student's training forward).
        with torch.inference_mode(False):
            batch = RolloutBatch(
                input_ids=torch.cat([ids.repeat_interleave(n, 0), tokens], 1),
                attention_mask=torch.cat([mask.repeat_interleave(n, 0), completion_mask], 1),
                completion_mask=completion_mask.clone(),
                prompt_lengths=lengths.repeat_interleave(n, 0),
                logprobs=logprobs.clone(),
                truncated=~finished,
                horizon=h,
                num_samples=n,
            )
        self.last_stats = {
            "step": step, "horizon": h, "horizon_scheduled": horizon, "prompt_width": p, "rows": b,
            "decode_steps": steps, "prefill_tokens": prefill_tokens, "prefill_tokens_saved": b * p - prefill_tokens,
            "kv_cache_bytes": self._caches["student"].nbytes,
        }
        return batch

    def score(
        self,
        batch: RolloutBatch,
        teacher_prompts: Prompts | None = None,
        teacher_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher's final hidden states ``[B*n, H, D_t]`` over the batch's completions (no LM head).

        Row ``j`` is the state that predicts completion token ``j`` (sequence position ``P-1+j``), the alignment of
        :meth:`student_hidden`; feed it to ``fused_linear_divergence`` with ``teacher.output_weight`` and
        ``batch.labels()``. Each teacher prompt is prefilled once and its KV shared by its samples.

        Args:
            teacher_prompts: privileged context: ``B`` prompts (one per student prompt) or ``B*n`` (one per row) that
                the teacher sees instead of the student's prompt, before the same completion tokens.
        Raises:
            ValueError: no teacher, ``teacher_attention_mask`` without ``teacher_prompts``, a prompt count that
                matches neither ``B`` nor ``B*n``, ids outside the teacher's vocabulary, or prompt + horizon beyond
                the teacher's context.
        """
        _check_batch(batch, "score")
        teacher = self.teacher
        if teacher is None:
            raise ValueError("RolloutEngine.score needs a teacher: pass teacher=... to RolloutEngine")
        if teacher_prompts is None and teacher_attention_mask is not None:
            raise ValueError("teacher_attention_mask is the mask of a teacher_prompts tensor; it was given without "
                             "teacher_prompts (the batch's own prompts carry their mask)")
        rows, n, h = batch.input_ids.shape[0], batch.num_samples, batch.horizon
        if teacher_prompts is None:
            ids, mask = batch.input_ids[::n, : batch.prompt_width], batch.attention_mask[::n, : batch.prompt_width]
            lengths = batch.prompt_lengths[::n]
            self._check_vocab(ids, teacher, "prompts")
        else:
            ids, mask, lengths = self._pack_prompts(teacher_prompts, teacher_attention_mask, teacher, "teacher_prompts")
        if ids.shape[0] * n == rows:
            expand = n
        elif ids.shape[0] == rows:
            expand = 1
        else:
            raise ValueError(f"teacher_prompts has {ids.shape[0]} rows; expected {rows // n} (one per prompt) or "
                             f"{rows} (one per sample)")
        completion = batch.completion_ids
        self._check_vocab(completion, teacher, "completion tokens")
        pt = ids.shape[1]
        if pt + h - 1 > teacher.max_positions:
            raise ValueError(f"teacher prompt width {pt} + horizon {h} needs {pt + h - 1} positions (the last "
                             f"completion token is scored, not fed), more than the teacher's context "
                             f"{teacher.max_positions}{_window_note(teacher)}")
        ids, mask, lengths = ids.to(teacher.device), mask.to(teacher.device), lengths.to(teacher.device)
        completion = completion.to(teacher.device)
        with torch.inference_mode():
            last, rest = self._score(teacher, ids, mask, lengths, completion, expand)
        # Joined outside inference mode (also when the caller is in it): a normal tensor, which a loss may save
        # for backward, made by the one copy the join needs.
        with torch.inference_mode(False):
            return last[:, None].clone() if rest is None else torch.cat([last[:, None], rest], 1)

    def student_hidden(self, batch: RolloutBatch) -> torch.Tensor:
        """The student's final hidden states ``[B*n, H, D_s]`` over the completions, with autograd.

        One full forward over prompt + completion (no cache), aligned like :meth:`score`: row ``j`` predicts
        completion token ``j``. Use with ``student_output_weight`` and ``batch.labels()``.
        """
        _check_batch(batch, "student_hidden")
        p, h = batch.prompt_width, batch.horizon
        ids = batch.input_ids[:, : p + h - 1]
        mask = batch.attention_mask[:, : p + h - 1]
        hidden = self.student.forward(ids, positions_from_mask(mask), build_attention_mask(mask, 0, ids.shape[1]))
        return hidden[:, p - 1 :]

    @property
    def student_output_weight(self) -> torch.Tensor:
        """``[V_s, D_s]`` student LM-head weight (the parameter itself)."""
        return self.student.output_weight

    @property
    def teacher_output_weight(self) -> torch.Tensor:
        """``[V_t, D_t]`` teacher LM-head weight."""
        if self.teacher is None:
            raise ValueError("this RolloutEngine has no teacher")
        return self.teacher.output_weight

    # ------------------------------------------------------------------ internals

    def _check_special_ids(self, adapter: ModelAdapter) -> None:
        for name, i in [("eos_token_id", e) for e in self.eos_ids] + [("pad_token_id", self.pad_token_id)]:
            if not 0 <= i < adapter.vocab_size:
                raise ValueError(f"{name}={i!r} is outside the vocabulary [0, {adapter.vocab_size}) of "
                                 f"{type(adapter.model).__name__}")

    @staticmethod
    def _check_vocab(ids: torch.Tensor, adapter: ModelAdapter, what: str) -> None:
        lo, hi = torch.stack(torch.aminmax(ids)).tolist()  # one host sync
        if lo < 0 or hi >= adapter.vocab_size:
            raise ValueError(f"{what} contain token ids in [{lo}, {hi}], outside the vocabulary [0, "
                             f"{adapter.vocab_size}) of {type(adapter.model).__name__} (mismatched tokenizer?)")

    def _pack_prompts(
        self, prompts: Prompts, attention_mask: torch.Tensor | None, adapter: ModelAdapter, what: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded ``ids [B, P]`` int64, ``mask [B, P]`` bool and ``lengths [B]`` on the model's device."""
        if not isinstance(prompts, (Iterable, torch.Tensor)) or isinstance(prompts, (str, bytes)):
            raise ValueError(f"{what} is {prompts!r}: need a list of token-id lists, a [B, L] integer tensor or a "
                             "tokenizer's BatchEncoding")
        if isinstance(prompts, Mapping):  # a tokenizer's BatchEncoding (or any dict of input_ids/attention_mask)
            if "input_ids" not in prompts:
                raise ValueError(f"{what} is a mapping without 'input_ids' (keys: {list(prompts)})")
            if attention_mask is None:
                attention_mask = prompts.get("attention_mask")
            prompts = prompts["input_ids"]
        if attention_mask is not None and not isinstance(prompts, torch.Tensor):
            # lists of ids with their mask rows, as a tokenizer without return_tensors gives them (padded or not)
            prompts, attention_mask = _masked_rows(prompts, attention_mask, what), None
        if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
            try:
                attention_mask = torch.as_tensor(attention_mask)
            except (TypeError, ValueError, RuntimeError) as e:
                raise ValueError(f"attention_mask must be a [B, L] tensor of 0/1 or bools: {e}") from None
        if isinstance(prompts, torch.Tensor):
            dtype = prompts.dtype
            if prompts.dim() != 2 or dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
                raise ValueError(f"{what} tensor must be integer ids [B, L], got {tuple(prompts.shape)} "
                                 f"{prompts.dtype}")
            if attention_mask is None:
                rows = [r for r in prompts.cpu()]
            else:
                if attention_mask.shape != prompts.shape:
                    raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match {what} "
                                     f"{tuple(prompts.shape)}")
                rows = [r[m.bool()] for r, m in zip(prompts.cpu(), attention_mask.cpu())]
            rows = [r.tolist() for r in rows]
        else:
            rows = [_row_ids(p.tolist() if isinstance(p, torch.Tensor) else p, what, i) for i, p in enumerate(prompts)]
        if not rows:
            raise ValueError(f"{what} is empty: need at least one prompt")
        for i, r in enumerate(rows):
            if not r:
                raise ValueError(f"{what}[{i}] is empty: every prompt needs at least one token")
        p = max(len(r) for r in rows)
        if p >= adapter.max_positions:
            raise ValueError(f"{what}: a prompt of {p} tokens leaves no room in the context of "
                             f"{adapter.max_positions} positions of {type(adapter.model).__name__}"
                             f"{_window_note(adapter)}")
        ids = torch.full((len(rows), p), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), p, dtype=torch.bool)
        for i, r in enumerate(rows):
            try:
                ids[i, p - len(r) :] = torch.tensor(r, dtype=torch.long)
            except (TypeError, ValueError, RuntimeError) as e:
                raise ValueError(f"{what}[{i}] is not a sequence of int token ids: {e}") from None
            mask[i, p - len(r) :] = True
        self._check_vocab(ids[mask], adapter, what)
        lengths = mask.sum(1)
        return ids.to(adapter.device), mask.to(adapter.device), lengths.to(adapter.device)

    def _cache(self, role: str, adapter: ModelAdapter, batch_size: int, length: int) -> KVCache:
        """The role's cache reset to ``[batch_size, length]``, reallocated only if it does not fit."""
        cache = self._caches.get(role)
        if cache is None or not cache.fits(batch_size, length, adapter.num_kv_heads, adapter.head_dim, adapter.dtype,
                                           adapter.device):
            if cache is not None and cache.keys.shape[2] == adapter.num_kv_heads:
                b_old, s_old = cache.capacity
                batch_cap, len_cap = max(batch_size, b_old), max(length, s_old)
            else:
                batch_cap, len_cap = batch_size, length
            # Free the old one before allocating (the peak is the new cache alone): drop both references to it.
            self._caches.pop(role, None)
            del cache
            cache = adapter.new_cache(batch_cap, len_cap)
            self._caches[role] = cache
        cache.reset(batch_size, length)
        return cache

    def _prefill(
        self, adapter: ModelAdapter, role: str, ids: torch.Tensor, mask: torch.Tensor, expand: int, length: int
    ) -> tuple[torch.Tensor, KVCache, int]:
        """Prefill prompts ``[B, P]`` into a cache of ``B*expand`` rows and ``length`` columns; returns the last
        prompt position's hidden state ``[B*expand, D]``, the cache and the prefill tokens computed."""
        if not self.share_prefix and expand > 1:
            ids, mask, expand = ids.repeat_interleave(expand, 0), mask.repeat_interleave(expand, 0), 1
        cache = self._cache(role, adapter, ids.shape[0] * expand, length)
        p = ids.shape[1]
        hidden = adapter.forward(ids, positions_from_mask(mask), build_attention_mask(mask, 0, p), cache, 0, expand)
        last = hidden[:, -1]
        if expand > 1:
            last = last.repeat_interleave(expand, 0)
        return last, cache, ids.numel()

    def _generate(
        self, adapter: ModelAdapter, ids: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, h: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
        n = self.num_samples
        bp, p = ids.shape
        b = bp * n
        device = ids.device
        last, cache, prefill_tokens = self._prefill(adapter, "student", ids, mask, n, p + h)
        decode_step = adapter.prepare_decode(p + h, b)
        logits = decode_step.head(last)
        vocab = self.vocab_size if self.vocab_size is not None and self.vocab_size < logits.shape[-1] else None
        row_mask = mask.repeat_interleave(n, 0)
        positions = lengths.repeat_interleave(n, 0)[:, None].clone()
        tokens = torch.full((b, h), self.pad_token_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(b, h, dtype=torch.float32, device=device)
        completion_mask = torch.full((b, h), not self.eos_ids, dtype=torch.bool, device=device)
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=device) if self.eos_ids else None
        pad = torch.tensor(self.pad_token_id, dtype=torch.long, device=device)
        # Stopping is checked on the host: every step on CPU, every 8 steps on accelerators (fewer syncs).
        check_every = 1 if device.type == "cpu" else 8
        graphed = self.cuda_graphs and _can_capture(device) and isinstance(adapter, LlamaFamilyAdapter) and h > 1
        if graphed:
            # One static shape: the cache's full width under a key-validity mask whose completion columns turn
            # True as they are written. Warm-up/capture writes column p+h-1, which no step reads before
            # overwriting it.
            key_mask = torch.zeros(b, p + h, dtype=torch.bool, device=device)
            key_mask[:, :p] = row_mask
            decode_mask = key_mask[:, None, None, :]
            decode_step = _GraphedDecodeStep(decode_step, b, positions, decode_mask, cache, p + h - 1)
        elif bool(row_mask.all()):
            decode_mask = None  # no padding: every filled column is valid, the step attends to columns 0..p+t
        else:
            # Eager steps attend to the filled columns 0..p+t only: the mask is a static additive one (-inf at
            # prompt padding, 0 elsewhere), narrowed each step; completion columns are valid once written. (The
            # default step of ModelAdapter hands forward its boolean form.)
            decode_mask = torch.zeros(b, 1, 1, p + h, dtype=adapter.dtype, device=device)
            decode_mask[:, 0, 0, :p].masked_fill_(~row_mask, float("-inf"))
        steps = 0
        for t in range(h):
            if vocab is not None:
                logits = logits[:, :vocab]
            tok, lp = sample_tokens(logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                    generator=self.generator)
            steps = t + 1
            if eos is None:  # nothing stops: every row is alive at every step
                tokens[:, t] = tok
                logprobs[:, t] = lp
            else:
                alive = ~finished
                tok = torch.where(alive, tok, pad)
                tokens[:, t] = tok
                logprobs[:, t] = lp.masked_fill(finished, 0.0)
                completion_mask[:, t] = alive
                finished |= torch.isin(tok, eos) if eos.numel() > 1 else tok == eos
            if t == h - 1 or (eos is not None and (t + 1) % check_every == 0 and bool(finished.all())):
                break
            if graphed:
                key_mask[:, p + t] = True
                logits = decode_step(tok, positions, decode_mask, cache, p + t)
            else:
                step_mask = decode_mask[..., : p + t + 1] if decode_mask is not None else None
                logits = decode_step(tok, positions, step_mask, cache, p + t)
            positions += 1
        return tokens, logprobs, completion_mask, finished, steps, prefill_tokens

    def _score(
        self,
        adapter: ModelAdapter,
        ids: torch.Tensor,
        mask: torch.Tensor,
        lengths: torch.Tensor,
        completion: torch.Tensor,
        expand: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The hidden state at the last prompt position ``[B*n, D]`` and at the fed completion tokens ``[B*n, H-1,
        D]`` (None when ``H == 1``)."""
        rows, h = completion.shape
        pt = ids.shape[1]
        last, cache, _ = self._prefill(adapter, "teacher", ids, mask, expand, pt + h - 1)
        if h == 1:
            return last, None
        key_mask = torch.ones(rows, pt + h - 1, dtype=torch.bool, device=ids.device)
        key_mask[:, :pt] = mask.repeat_interleave(expand, 0)
        positions = lengths.repeat_interleave(expand, 0)[:, None] + torch.arange(h - 1, device=ids.device)
        scoring_mask = build_attention_mask(key_mask, pt, h - 1)
        hidden = adapter.forward(completion[:, : h - 1], positions, scoring_mask, cache, pt)
        return last, hidden


def _window_note(adapter: ModelAdapter) -> str:
    """For error messages: a note that the model's context is its sliding-window size, when it is."""
    window = getattr(adapter, "sliding_window", None)
    if window is None or window != adapter.max_positions:
        if getattr(adapter, "longrope_context", None) == adapter.max_positions:
            return (" (the original context of its longrope RoPE, original_max_position_embeddings: beyond it every "
                    "position's rotary frequencies change with the sequence length)")
        return ""
    return " (its sliding-window size: attention is exact only while prompt + horizon fit the window)"


def _can_capture(device: torch.device) -> bool:
    """Whether decode steps on `device` can be captured in a CUDA graph (tests stand in an eager graph on CPU)."""
    return device.type == "cuda"


class _GraphedDecodeStep:
    """A decode step captured in a CUDA graph for one generation: token ids and the write column are copied
    into static device buffers, ``positions`` and the mask are the engine's own buffers (updated in place), the
    cache is static; each call replays the graph and returns the static logits buffer.

    The graph holds raw device addresses, not owners, so this object keeps alive everything the captured kernels
    read or write that was allocated outside the capture's pool, for as long as the graph lives: the step (on CUDA
    the only owner of the packed layer weights and rotary tables, which :class:`DerivedWeights` does not keep
    there, and of the per-batch scratch its warm-up allocated) and the ``positions``, mask and cache passed in.
    Freed, their blocks would be reused by the caching allocator while replays still read and write them."""

    def __init__(
        self, step: DecodeStep, batch: int, positions: torch.Tensor, mask: torch.Tensor, cache: KVCache, column: int
    ) -> None:
        device = positions.device
        self.step = step
        self.inputs = (positions, mask, cache)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.column = torch.full((), column, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step(self.tokens, positions, mask, cache, self.column)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(self.tokens, positions, mask, cache, self.column)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: KVCache,
                 column: int) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.column.fill_(column)
        self.graph.replay()
        return self.logits
