"""Reproduce the built-in task's models: a teacher trained to solve 3-digit addition, and a weaker student start.

    python -m fastopd.train.make_teacher --out fastopd/train/assets/addition3

Both are `fastopd.models.Transformer`s trained by supervised fine-tuning (cross-entropy on the worked solutions)
from random initialization, each on its own stream of problems (disjoint from the training and evaluation streams
of `fastopd distill`): the teacher (3 layers, width 96) until it solves the task, the student (2 layers, width 64)
for a few steps only (a snapshot early in a longer supervised run), so that it writes the format but gets most
sums wrong. On-policy distillation then closes
the gap. The committed files under fastopd/train/assets/ came from this script with its defaults; runs on other
machines may differ in the last bits (CPU floating-point reduction order), not in behaviour.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastopd.models import Transformer, TransformerConfig
from fastopd.train.task import PAD, AdditionTask, accuracy

TEACHER = dict(hidden_size=96, intermediate_size=256, num_layers=3, num_heads=4)
STUDENT = dict(hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4)


def sft_batch(task: AdditionTask, batch_size: int, seed: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T] right-padded, labels [B, T] shifted for next-token prediction, -100 outside the completion)."""
    pairs = task.sequence_ids(task.problems(batch_size, seed=seed))
    width = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((batch_size, width), PAD, dtype=torch.long)
    labels = torch.full((batch_size, width), -100, dtype=torch.long)
    for i, (p, c) in enumerate(pairs):
        s = p + c
        ids[i, :len(s)] = torch.tensor(s)
        labels[i, len(p) - 1:len(s) - 1] = torch.tensor(c)  # position t predicts token t + 1
    return ids, labels


def supervised_fine_tune(model: Transformer, task: AdditionTask, steps: int, *, stream: str, batch_size: int = 64,
                         lr: float = 3e-3, schedule_steps: int | None = None, log_every: int = 100) -> None:
    """Cross-entropy on worked solutions with AdamW and a one-cycle schedule (10% warm-up, cosine decay) planned
    over `schedule_steps` (default `steps`); stopping before the end leaves a model in mid-training."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, schedule_steps or steps),
                                                pct_start=0.1)
    model.train()
    t0 = time.time()
    for step in range(steps):
        ids, labels = sft_batch(task, batch_size, seed=f"{stream}-{step}")
        positions = torch.arange(ids.shape[1]).expand_as(ids)  # right padding: plain causal positions
        logits = model.logits(ids, positions)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"  [{stream}] step {step:4d}  loss {loss.item():.4f}  {time.time() - t0:.0f}s", flush=True)
    model.eval()


def build(kind: dict, task: AdditionTask, seed: int) -> Transformer:
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=task.tokenizer.vocab_size, max_position_embeddings=64, **kind)
    return Transformer(cfg)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "assets" / "addition3"))
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--student-steps", type=int, default=200)
    ap.add_argument("--student-schedule", type=int, default=600,
                    help="the student is a snapshot after --student-steps of a schedule planned for this many")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=("teacher", "student"), default=None)
    args = ap.parse_args(argv)
    task = AdditionTask(digits=3)
    problems = task.eval_problems(512, seed=999)  # a check set of its own
    out = Path(args.out)
    plan = (("teacher", TEACHER, args.teacher_steps, None),
            ("student", STUDENT, args.student_steps, args.student_schedule))
    for role, kind, steps, schedule in plan:
        if args.only not in (None, role):
            continue
        model = build(kind, task, args.seed)
        n = sum(p.numel() for p in model.parameters())
        print(f"{role}: {n} parameters, {steps} SFT steps", flush=True)
        supervised_fine_tune(model, task, steps, stream=f"sft-{role}-{args.seed}", schedule_steps=schedule)
        print(f"{role}: accuracy {accuracy(model, task, problems):.3f} on 512 problems", flush=True)
        model.save_pretrained(out / role)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
