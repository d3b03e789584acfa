"""The built-in task: multi-digit addition written out digit by digit, with a character-level tokenizer.

A problem is two non-negative integers; the prompt is ``"347+285="`` and the reference completion works
the sum from the least significant digit, carrying explicitly, then states the answer after ``|``::

    347+285=7+5=12,4+8+1=13,3+2+1=6|632<eos>

Each step is ``a+b=s`` or, with an incoming carry, ``a+b+1=s``; missing digits of the shorter operand
are written as 0. The task is verifiable: a completion is correct when the number after the last ``|``
(up to EOS) equals the true sum (exact match). Everything here is deterministic given a seed, so a
training run can draw the prompts of step k from `(seed, k)` alone and resume exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

PAD, BOS, EOS = 0, 1, 2
CHARS = "0123456789+=,|"


class CharTokenizer:
    """Character-level tokenizer for the addition task: ids 0..2 are PAD, BOS, EOS, then one id per char."""

    pad_token_id = PAD
    bos_token_id = BOS
    eos_token_id = EOS

    def __init__(self, chars: str = CHARS):
        self.chars = chars
        self._index = {c: i + 3 for i, c in enumerate(chars)}
        self.vocab_size = len(chars) + 3

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of `text`; raises ValueError naming the first character outside the alphabet."""
        try:
            ids = [self._index[c] for c in text]
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} is not in the task alphabet {self.chars!r}") from None
        return ([BOS] if bos else []) + ids + ([EOS] if eos else [])

    def decode(self, ids, stop_at_eos: bool = True) -> str:
        """Text of `ids` (a list or 1-D tensor); PAD and BOS are skipped, decoding stops at EOS."""
        out = []
        for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            if i == EOS and stop_at_eos:
                break
            if i >= 3:
                out.append(self.chars[i - 3])
        return "".join(out)


def worked_solution(a: int, b: int) -> str:
    """The reference completion for ``a+b=``: digit steps from the right, then ``|`` and the sum."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}+1={s}" if carry else f"{x}+{y}={s}")
        carry = s // 10
    return ",".join(steps) + f"|{a + b}"


def parse_answer(completion: str) -> int | None:
    """The integer after the last ``|`` of a completion, or None when there is none or it is not a number."""
    if "|" not in completion:
        return None
    tail = completion.rsplit("|", 1)[1]
    return int(tail) if tail.isdigit() else None


@dataclass(frozen=True)
class AdditionTask:
    """Addition of two integers of up to `digits` digits (each drawn uniformly from [0, 10**digits)).

    `max_new_tokens` is the longest reference completion (EOS included), the natural full horizon.
    """

    digits: int = 3

    def __post_init__(self):
        if not 1 <= self.digits <= 9:
            raise ValueError(f"digits must lie in [1, 9], got {self.digits}")

    @property
    def tokenizer(self) -> CharTokenizer:
        return CharTokenizer()

    @property
    def max_new_tokens(self) -> int:
        big = 10**self.digits - 1
        return len(worked_solution(big, big)) + 1

    @property
    def prompt_length(self) -> int:
        """Longest prompt in tokens (BOS included)."""
        return 2 * self.digits + 3

    def problems(self, n: int, seed: int | str) -> list[tuple[int, int]]:
        """`n` problems drawn from a private RNG seeded by `seed` (the global RNGs are not touched)."""
        rng = random.Random(seed)
        hi = 10**self.digits
        return [(rng.randrange(hi), rng.randrange(hi)) for _ in range(n)]

    def prompt_ids(self, problems: list[tuple[int, int]]) -> list[list[int]]:
        """Token ids of each prompt ``a+b=``, BOS first, unpadded."""
        tok = self.tokenizer
        return [tok.encode(f"{a}+{b}=", bos=True) for a, b in problems]

    def sequence_ids(self, problems: list[tuple[int, int]]) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, reference completion ids with EOS) per problem: supervised data for the teacher."""
        tok = self.tokenizer
        return [(tok.encode(f"{a}+{b}=", bos=True), tok.encode(worked_solution(a, b), eos=True)) for a, b in problems]

    def train_prompts(self, step: int, batch_size: int, seed: int = 0) -> list[list[int]]:
        """The prompts of training step `step`: a function of (seed, step) only, so runs resume exactly."""
        return self.prompt_ids(self.problems(batch_size, seed=f"fastopd-train-{seed}-{step}"))

    def eval_problems(self, n: int, seed: int = 12345) -> list[tuple[int, int]]:
        """A fixed evaluation set, drawn from a stream separate from `train_prompts`'s."""
        return self.problems(n, seed=f"fastopd-eval-{seed}")

    def score(self, problems: list[tuple[int, int]], completions: list[str]) -> float:
        """Exact-match accuracy: the fraction of completions whose final answer equals the sum."""
        if len(problems) != len(completions):
            raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
        if not problems:
            return 0.0
        ok = sum(parse_answer(c) == a + b for (a, b), c in zip(problems, completions))
        return ok / len(problems)


def left_pad(seqs: list[list[int]], pad_id: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists to one length: (ids [B, P] int64, attention mask [B, P] int64)."""
    if not seqs:
        raise ValueError("left_pad needs at least one sequence")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


@torch.no_grad()
def greedy_completions(model, task: AdditionTask, problems: list[tuple[int, int]], batch_size: int = 256) -> list[str]:
    """Greedy (temperature 0) completions of `model` for `problems`, decoded; draws no random numbers."""
    from fastopd.rollout import RolloutEngine

    engine = RolloutEngine(model, horizon=task.max_new_tokens, num_samples=1, temperature=0.0, eos_token_id=EOS,
                           pad_token_id=PAD)
    tok = task.tokenizer
    out: list[str] = []
    for i in range(0, len(problems), batch_size):
        batch = engine.generate(task.prompt_ids(problems[i:i + batch_size]))
        out.extend(tok.decode(row) for row in batch.completion_ids.cpu())
    return out


def accuracy(model, task: AdditionTask, problems: list[tuple[int, int]], batch_size: int = 256) -> float:
    """Exact-match accuracy of `model`'s greedy completions on `problems`."""
    return task.score(problems, greedy_completions(model, task, problems, batch_size))


class AdditionEvaluator:
    """Evaluation of an `OPDTrainer`'s student on the addition task, without touching the global RNGs.

    Returns {"accuracy": greedy exact-match accuracy on `num_problems` fixed problems, "rkl": the mean per-token
    reverse KL(student || teacher) over the full vocabulary, on completions the student samples (at the
    trainer's temperature, from a private generator reseeded each time, so every evaluation reads the same
    random draws)}.
    """

    def __init__(self, task: AdditionTask, num_problems: int = 256, seed: int = 0, rkl_samples: int = 1) -> None:
        self.task = task
        self.problems = task.eval_problems(num_problems, seed=seed)
        self.seed = seed
        self.rkl_samples = rkl_samples

    @torch.no_grad()
    def __call__(self, trainer) -> dict[str, float]:
        from fastopd.losses import fused_linear_divergence
        from fastopd.rollout import RolloutEngine

        student = trainer.engine.student.model
        acc = accuracy(student, self.task, self.problems)
        cfg = trainer.config
        gen = torch.Generator(device=trainer.device).manual_seed(self.seed)
        engine = RolloutEngine(trainer.engine.student, trainer.engine.teacher, horizon=self.task.max_new_tokens,
                               num_samples=self.rkl_samples, temperature=cfg.temperature, eos_token_id=EOS,
                               pad_token_id=PAD, generator=gen)
        batch = engine.generate(self.task.prompt_ids(self.problems))
        ht = trainer.score(batch, engine=engine).to(trainer.device)
        hs = engine.student_hidden(batch)
        wt, bt = trainer._teacher_head()
        rkl = fused_linear_divergence(hs, engine.student_output_weight, ht, wt, batch.labels().to(trainer.device),
                                      divergence="rkl", temperature=cfg.temperature, teacher_bias=bt,
                                      student_bias=engine.student.output_bias)
        return {"accuracy": acc, "rkl": float(rkl)}
