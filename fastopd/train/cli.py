"""`fastopd distill`: on-policy distillation of the built-in addition task (or given models), end to end.

With no arguments: the shipped teacher (a 3-layer model that solves 3-digit addition written out digit by digit)
distills into the shipped student start (2 layers, trained only briefly), on the CPU, in a few minutes. It prints a
progress bar, then a table (student accuracy before/after, teacher accuracy, reverse KL to the teacher, wall time,
peak memory), and writes a run folder: summary.md / summary.json (the table), config.json, metrics.jsonl (per
step), eval.jsonl, loss.png and accuracy.png, final_student/ (the distilled student, a Transformer.save_pretrained
folder) and the final checkpoint. Ctrl-C finishes the step in progress, checkpoints it and exits with code 130; a
SIGTERM (preemption: SLURM, Kubernetes, torchrun passing it on) does the same and exits with 143, on every rank.

Precedence: built-in defaults < `--config file.toml` < command-line flags. The TOML file holds flat keys, any
field of `OPDConfig` (objective, lr, horizon, masks, ...) or of the job (steps, batch_size, eval_size, out,
teacher, student, device, mask_density); unknown keys and bad values are reported with the field's name.
`masks` and `mask_density` exclude each other: a flag for one replaces the file's value of either, and a file may
not set both. `checkpoint_dir` (default <out>/checkpoints) is honoured, relative to the working directory.
`--resume` needs `--out DIR`; a run folder without a checkpoint starts a fresh run (with a notice) unless its
config.json names another checkpoint_dir that holds the run's checkpoints (refused), and a masked run goes on
with its checkpoint's masks. The cosine learning-rate schedule decays over `--steps` (the job sets `schedule_steps`
to it): a resume with other `--steps` is refused unless `--schedule-steps` says where the decay
ends. Temporary folders that killed checkpoint writes left in the checkpoint folder are removed at the start. Bad
input is reported as one `error:` line (exit code 2) before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastopd._io import folder_write_problem, json_text, save_figure_atomic, write_text_atomic
from fastopd.train.config import ConfigError, OPDConfig, check_keys, load_toml

ASSETS = Path(__file__).parent / "assets" / "addition3"
FINAL_STUDENT = "final_student"  # the distilled student in the run folder, a Transformer.save_pretrained folder

# The job's own defaults for OPDConfig fields (the task fixes max_new_tokens / eos / pad itself).
OPD_DEFAULTS: dict[str, Any] = dict(objective="fkl", lr=1e-3, warmup_steps=20, lr_schedule="cosine", num_samples=4,
                                    temperature=1.0, log_every=5, eval_every=50, max_grad_norm=1.0, weight_decay=0.0,
                                    seed=0)


@dataclass
class DistillJob:
    """Options of the `fastopd distill` job that are not `OPDConfig` fields."""

    steps: int = 300
    batch_size: int = 16
    eval_size: int = 256
    out: str | None = None
    teacher: str | None = None
    student: str | None = None
    device: str = "cpu"
    mask_density: float | None = None
    threads: int = 1

    def __post_init__(self) -> None:
        from fastopd.train.config import _check_types

        _check_types(self)
        for name in ("out", "teacher", "student"):  # `--teacher "$UNSET"` would silently fall back to the default
            if getattr(self, name) is not None and not getattr(self, name).strip():
                raise ConfigError(f"{name}: must be a folder path, got an empty string (leave it out for the default)")
        for name in ("steps", "batch_size", "eval_size", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.mask_density is not None and not 0.0 <= self.mask_density <= 1.0:
            raise ConfigError(f"mask_density: must lie in [0, 1], got {self.mask_density}")
        cpus = os.cpu_count() or 1
        if self.threads > cpus:  # torch.set_num_threads of a huge count crashes the process
            raise ConfigError(f"threads: {self.threads} is more than the {cpus} CPUs of this machine")


JOB_FIELDS = {f.name for f in dataclasses.fields(DistillJob)}
OPD_FIELDS = {f.name for f in dataclasses.fields(OPDConfig)}
# Fields the job sets from the task; a config file may not override them.
TASK_FIELDS = {"max_new_tokens", "eos_token_id", "pad_token_id"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML file with any OPDConfig or job field (flat keys)")
    p.add_argument("--objective", choices=("fkl", "rkl", "jsd", "pg"),
                   help="fkl/rkl/jsd: full-vocabulary divergence on the student's samples; pg: sampled-token "
                        "reverse KL as a per-token reward, importance-sampled policy gradient (default fkl)")
    p.add_argument("--beta", type=float, help="JSD mixture weight (0 = fkl, 1 = rkl; default 0.5)")
    p.add_argument("--temperature", type=float, help="sampling and loss temperature (default 1)")
    p.add_argument("--horizon", metavar="SPEC",
                   help="'full', 'full:H', 'truncated:RATIO' or 'progressive:START,STEP,EVERY' (default full)")
    p.add_argument("--steps", type=int, help="optimizer steps (default 300); the cosine learning-rate decay ends there")
    p.add_argument("--schedule-steps", type=int, dest="schedule_steps", metavar="N",
                   help="the step where the cosine learning-rate decay reaches 0 (default: --steps); needed to "
                        "resume with other --steps than the run's: its old --steps keeps its schedule, the new one "
                        "stretches or shortens the decay from the resumed step on")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="prompts per step (default 16)")
    p.add_argument("--num-samples", type=int, dest="num_samples", help="completions per prompt (default 4)")
    p.add_argument("--lr", type=float, help="learning rate (default 1e-3)")
    masks = p.add_mutually_exclusive_group()
    masks.add_argument("--masks", metavar="FILE", help="train only the coordinates of a mask file "
                                                       "(fastopd.optim.masks format) with SparseMaskedAdamW "
                                                       "(replaces a config file's masks or mask_density)")
    masks.add_argument("--mask-density", type=float, dest="mask_density",
                       help="train a random fraction of every weight tensor with SparseMaskedAdamW (replaces a "
                            "config file's masks or mask_density)")
    p.add_argument("--seed", type=int, help="seed of every RNG (default 0)")
    p.add_argument("--eval-every", type=int, dest="eval_every", help="evaluate every N steps (default 50)")
    p.add_argument("--eval-size", type=int, dest="eval_size", help="evaluation problems (default 256)")
    p.add_argument("--checkpoint-every", type=int, dest="checkpoint_every",
                   help="checkpoint every N steps (default: only at the end; a Ctrl-C or a SIGTERM finishes the "
                        "step in progress and checkpoints it too)")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue the run in --out DIR (required) from its newest checkpoint up to --steps (other "
                        "--steps than the run's cosine schedule was made for need --schedule-steps); without a "
                        "checkpoint there, start a fresh run (with a notice; refused when the folder's config.json "
                        "names another checkpoint_dir holding the run's checkpoints). A masked run goes on with its "
                        "checkpoint's masks, whatever --masks/--mask-density say (with a notice)")
    p.add_argument("--out", metavar="DIR", help="run folder (default ./fastopd-runs/distill-<time>)")
    p.add_argument("--teacher", metavar="DIR", help="teacher folder (fastopd.models.Transformer.save_pretrained); "
                                                    "default: the built-in addition teacher")
    p.add_argument("--student", metavar="DIR", help="student start folder; default: the built-in student")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--parallel", choices=("auto", "none", "ddp", "fsdp2", "hsdp"),
                   help="data parallelism under torchrun (default auto: DDP when there is more than one process); "
                        "e.g. torchrun --nproc-per-node 2 -m fastopd.cli distill --parallel fsdp2")
    p.add_argument("--hsdp-shard-size", type=int, metavar="N",
                   help="with --parallel hsdp: ranks per shard group (default: one node's, torchrun's "
                        "LOCAL_WORLD_SIZE); the groups replicate each other")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default 1: the built-in models are tiny, and "
                                               "more threads only add synchronization, badly so on a busy machine)")


def resolve(args: argparse.Namespace) -> tuple[DistillJob, dict[str, Any]]:
    """Merge defaults, the TOML file and flags into (job, OPDConfig keyword dict). Raises ConfigError."""
    values: dict[str, Any] = {}
    source = "the command line"
    if getattr(args, "config", None):
        values = load_toml(args.config)
        source = f"config file {args.config}"
        for key, value in values.items():
            if isinstance(value, dict) and key != "horizon":
                raise ConfigError(f"{key}: tables are not fields; {source} takes flat keys (e.g. lr = 1e-3)")
        check_keys(values, (JOB_FIELDS | OPD_FIELDS) - TASK_FIELDS, source)
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "command") and v is not None}
    for given, other in (("masks", "mask_density"), ("mask_density", "masks")):
        if given in flags:  # a flag replaces the file's choice of either
            values.pop(other, None)
    values.update(flags)
    if values.get("masks") is not None and values.get("mask_density") is not None:
        raise ConfigError(f"mask_density: {source} sets both masks and mask_density; give one of them")
    job = DistillJob(**{k: v for k, v in values.items() if k in JOB_FIELDS})
    opd = {**OPD_DEFAULTS, **{k: v for k, v in values.items() if k in OPD_FIELDS}}
    return job, opd


def _fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def summary_table(s: dict[str, Any]) -> str:
    """The end-of-run table as aligned text (also valid Markdown)."""
    rows = [
        ("student accuracy", _fmt_pct(s["student_accuracy_before"]), _fmt_pct(s["student_accuracy_after"])),
        ("teacher accuracy", _fmt_pct(s["teacher_accuracy"]), ""),
        ("reverse KL to teacher (nats/token)", f"{s['rkl_before']:.4f}", f"{s['rkl_after']:.4f}"),
        ("wall time", "", f"{s['wall_s']:.1f} s"),
        ("peak memory", "", f"{s['peak_mem_mb']:.0f} MiB"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"| {'':<{width}} | {'before':>8} | {'after':>10} |", f"|{'-' * (width + 2)}|{'-' * 10}|{'-' * 12}|"]
    lines += [f"| {a:<{width}} | {b:>8} | {c:>10} |" for a, b, c in rows]
    return "\n".join(lines)


def _plots(run_dir: Path, history: list[dict[str, Any]], evals: list[dict[str, Any]],
           teacher_accuracy: float) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    steps = [m["step"] for m in history]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(steps, [m["loss"] for m in history], label="loss")
    ax.plot(steps, [m["rkl"] for m in history], label="sampled reverse KL / token")
    ax.set_xlabel("step")
    ax.set_title("training loss")
    ax.legend()
    fig.tight_layout()
    save_figure_atomic(fig, run_dir / "loss.png")
    plt.close(fig)
    written.append("loss.png")
    if evals:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.plot([e["step"] for e in evals], [e["accuracy"] for e in evals], "o-", label="student")
        ax.axhline(teacher_accuracy, color="gray", ls="--", label="teacher")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("step")
        ax.set_ylabel("exact-match accuracy")
        ax2 = ax.twinx()
        ax2.plot([e["step"] for e in evals], [e["rkl"] for e in evals], "s:", color="tab:red", label="reverse KL")
        ax2.set_ylabel("reverse KL (nats/token)", color="tab:red")
        ax.legend(loc="center right")
        ax.set_title("evaluation")
        fig.tight_layout()
        save_figure_atomic(fig, run_dir / "accuracy.png")
        plt.close(fig)
        written.append("accuracy.png")
    return written


def run(args: argparse.Namespace) -> int:
    try:
        job, opd = resolve(args)
    except ConfigError as exc:
        print(f"fastopd distill: error: {exc}", file=sys.stderr)
        return 2
    code = distill(job, opd)
    _close_process_group(finished=code == 0)
    return code


# Set once a run of more than one rank has destroyed its process group: `fastopd.cli.entry` then leaves the process
# by os._exit, past the interpreter's finalization, where torch's lingering worker threads could abort the rank.
distributed_run_closed = False


def _close_process_group(*, finished: bool) -> None:
    """Destroy the process group a torchrun launch initialized, before the interpreter exits. After a finished run
    every rank first meets the others at a barrier, so none tears its connections down while a peer is still
    writing the run folder; after a failed one (a rank may have stopped early) it destroys at once rather than
    wait. Destroying is not enough after an FSDP2 run (its gloo threads live on): see `fastopd.cli.entry`."""
    global distributed_run_closed
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    if finished and world > 1:
        dist.barrier()
    dist.destroy_process_group()
    distributed_run_closed = distributed_run_closed or world > 1


def distill(job: DistillJob, opd: dict[str, Any], *, progress: bool = True, out=None) -> int:
    """Run the job; returns a process exit code (2 on a configuration error). Prints to `out` (default stdout);
    torch's CPU thread count is set to `job.threads` for the run and restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    try:
        return _distill(job, opd, progress, out if out is not None else sys.stdout)
    finally:
        torch.set_num_threads(threads)


def _distill(job: DistillJob, opd: dict[str, Any], progress: bool, out) -> int:
    import torch

    from fastopd.distributed.data_parallel import DataParallel
    from fastopd.models import Transformer
    from fastopd.train import checkpoint as ckpt
    from fastopd.train.task import EOS, PAD, AdditionEvaluator, AdditionTask, accuracy
    from fastopd.train.trainer import OPDTrainer, peak_memory_mb

    task = AdditionTask(digits=3)
    run_dir = Path(job.out or Path("fastopd-runs") / time.strftime("distill-%Y%m%d-%H%M%S"))
    own_checkpoint_dir = opd.get("checkpoint_dir") is not None  # honoured; else <run folder>/checkpoints
    # The cosine decay ends at --steps unless schedule_steps says otherwise; kept in the checkpoint's config, so a
    # resume can tell when other --steps would move it.
    own_schedule = opd.get("schedule_steps") is not None
    schedule = {} if own_schedule or opd.get("lr_schedule") != "cosine" else {"schedule_steps": job.steps}
    try:
        if opd.get("resume") and job.out is None:
            raise ConfigError("resume: --resume needs --out DIR (the run folder to continue)")
        config = OPDConfig(**{"checkpoint_dir": str(run_dir / "checkpoints"), **opd, **schedule,
                              "max_new_tokens": task.max_new_tokens, "eos_token_id": EOS, "pad_token_id": PAD})
        try:
            device = torch.device(job.device)
        except RuntimeError:
            raise ConfigError(f"device: {job.device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device: {job.device!r} requested but no CUDA device is visible")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device: {job.device!r} requested but only {torch.cuda.device_count()} CUDA "
                              "device(s) are visible")
        if isinstance(config.masks, (str, os.PathLike)) and not Path(config.masks).is_file():
            raise ConfigError(f"masks: {os.fspath(config.masks)} is not a file (a fastopd.optim.masks file)")
        found = ckpt.latest_checkpoint(config.checkpoint_dir) if config.checkpoint_dir is not None else None
        if found is not None and not config.resume:  # a fresh run would mix its checkpoints with that run's
            where = ("checkpoint_dir" if own_checkpoint_dir else "out", "another checkpoint_dir in the config file"
                     if own_checkpoint_dir else "another --out")
            raise ConfigError(f"{where[0]}: {config.checkpoint_dir} already holds checkpoints of a run (newest: "
                              f"{found.name}); pass --resume to continue it, or give {where[1]}")
        if found is None and config.resume:  # the checkpoints may be where the run's config file put them
            elsewhere = _recorded_checkpoint_dir(run_dir / "config.json", config.checkpoint_dir)
            if elsewhere is not None:
                raise ConfigError(f"resume: no checkpoint in {config.checkpoint_dir}, but the run folder's config.json "
                                  f"records checkpoint_dir {elsewhere[0]}, which holds them (newest: {elsewhere[1]}); "
                                  "pass the config file that set it (or checkpoint_dir = that folder)")
        if found is not None and job.steps < ckpt.checkpoint_step(found):
            raise ConfigError(f"steps: {job.steps} is below the step the run already reached "
                              f"({ckpt.checkpoint_step(found)}, {found}); a resumed run continues up to --steps")
        from fastopd import _dispatch

        _dispatch.resolve("divergence_chunk", config.loss_impl, device)  # loss_impl / FASTOPD_IMPL runnable here
        if config.masks is not None or job.mask_density is not None:
            _dispatch.resolve("sparse_adamw_step", "auto", device)
        try:  # under torchrun this initializes the process group; every rank uses rank 0's run folder
            par = DataParallel.resolve(config.parallel, config.hsdp_shard_size)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if job.batch_size < config.grad_accum * par.world_size:
            raise ConfigError(f"grad_accum: {job.batch_size} prompts per step cannot be split into grad_accum="
                              f"{config.grad_accum} micro-batches on each of {par.world_size} rank(s) (raise "
                              "--batch-size or lower grad_accum)")
        if par.active and job.out is None:
            run_dir = Path(par.gather_objects(str(run_dir))[0])
            if not own_checkpoint_dir:
                config = dataclasses.replace(config, checkpoint_dir=str(run_dir / "checkpoints"))
        if device.type == "cpu":
            torch.set_num_threads(job.threads)
        teacher_dir = Path(job.teacher) if job.teacher else ASSETS / "teacher"
        student_dir = Path(job.student) if job.student else ASSETS / "student"
        for name, d in (("teacher", teacher_dir), ("student", student_dir)):
            if not (d / "config.json").is_file():
                raise ConfigError(f"{name}: {d} holds no config.json (a Transformer.save_pretrained folder)")
        teacher = Transformer.from_pretrained(teacher_dir, device=device)
        student = Transformer.from_pretrained(student_dir, device=device)
        for name, m in (("teacher", teacher), ("student", student)):
            if m.config.vocab_size != task.tokenizer.vocab_size:
                raise ConfigError(f"{name}: vocab_size {m.config.vocab_size} does not match the addition task's "
                                  f"{task.tokenizer.vocab_size}")
        if job.mask_density is not None:
            from fastopd.optim import masks as mask_lib

            gen = torch.Generator().manual_seed(config.seed)
            config = dataclasses.replace(config, masks=mask_lib.random(student, job.mask_density, generator=gen))
        t0 = time.perf_counter()
        evaluator = AdditionEvaluator(task, job.eval_size)
        teacher_acc = accuracy(teacher, task, evaluator.problems)  # before the trainer shards it (FSDP2)
        # The trainer checks what remains (mask files and names, a checkpoint that does not fit the student, the
        # optimizer's hyper-parameters) before the run folder is written.
        trainer = OPDTrainer(student, teacher, config, evaluator=evaluator, run_dir=run_dir)
        planned = _planned_schedule_steps(trainer, run_dir, par) if schedule else None
        if planned is not None and planned != job.steps:
            raise ConfigError(
                f"steps: the run's cosine learning-rate schedule decays to 0 over {planned} steps (checkpoint "
                f"{trainer.resumed_from}); --steps {job.steps} would change the rate from step {trainer.global_step} "
                f"on. Pass --steps {planned} to finish the run as planned, or --schedule-steps N to set where the "
                f"decay ends: {planned} keeps the run's schedule (a rate of 0 from step {planned} on), {job.steps} "
                "stretches or shortens it over the new total")
    except (ValueError, RuntimeError, OSError) as exc:  # ConfigError is a ValueError
        if isinstance(exc, RuntimeError):  # also what a bug or CUDA/NCCL failure raises: keep where it came from
            import traceback

            traceback.print_exc()
        print(f"fastopd distill: error: {_error_text(exc)}", file=sys.stderr)
        return 2

    # The job's options the checkpoint does not hold, against what the run folder's config.json recorded (read before
    # this run rewrites it): a resume with another --batch-size, --eval-size or --teacher is named in the note too.
    job_changes = (_changed_job_options(run_dir / "config.json", job, teacher_dir)
                   if trainer.resumed_from is not None and par.is_main else {})
    failed, stale = None, []
    if par.is_main:  # rank 0 prints and writes the run folder; the others train beside it
        try:
            # A checkpoint folder that cannot be written is found now, not at the first save after the steps it was
            # to keep (a checkpoint_dir of its own before the run folder is made, the default one inside it after).
            failed = _checkpoint_dir_problem(config.checkpoint_dir, own_checkpoint_dir) if own_checkpoint_dir else None
            if failed is None:
                run_dir.mkdir(parents=True, exist_ok=True)
                failed = None if own_checkpoint_dir else _checkpoint_dir_problem(config.checkpoint_dir, False)
            if failed is None and config.checkpoint_dir is not None:  # what killed saves of earlier runs left
                stale = ckpt.remove_stale_temporaries(config.checkpoint_dir)
            if failed is None:
                _write_run_folder(run_dir, fresh=trainer.resumed_from is None,
                                  resolved={**dataclasses.asdict(job), **config.to_dict(), "teacher": str(teacher_dir),
                                            "student": str(student_dir), "world_size": par.world_size,
                                            # a resumed masked run trains its checkpoint's masks, whatever the flags
                                            "masks_from_checkpoint": trainer.masks_from_checkpoint})
        except OSError as exc:
            failed = f"out: cannot write the run folder {run_dir} ({exc.strerror or exc})"
    failed = par.gather_objects(failed)[0]  # every rank stops if rank 0 could not write it
    if failed is not None:
        print(f"fastopd distill: error: {failed}", file=sys.stderr)
        return 2
    if not par.is_main:
        out = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
    mask_note = ""
    if trainer.sparse:  # what the optimizer trains: the given masks, or a resumed checkpoint's
        share = trainer.trainable_count() / sum(p.numel() for p in student.parameters())
        mask_note = f", sparse masks ({100 * share:.1f}% trainable)"
    ranks = f", {par.world_size} ranks ({par.mode})" if par.active else ""
    print(f"fastopd distill: 3-digit addition, teacher {sum(p.numel() for p in teacher.parameters()):,} params, "
          f"student {sum(p.numel() for p in student.parameters()):,} params; objective {config.objective}, "
          f"{job.steps} steps x {job.batch_size} prompts x {config.num_samples} samples, horizon "
          f"{_horizon_text(config)}{mask_note}{ranks}", file=out, flush=True)
    if stale:
        print(f"note: removed {len(stale)} temporary file(s) that interrupted checkpoint writes left in "
              f"{config.checkpoint_dir}: {', '.join(p.name for p in stale)}", file=out, flush=True)
    if trainer.resumed_from is not None:
        print(f"resuming from {trainer.resumed_from} (step {trainer.global_step})", file=out, flush=True)
        if trainer.masks_from_checkpoint:
            why = ("; the masks given (--masks, --mask-density or the config file's) select others and are not used"
                   if config.masks is not None else " (the run was started with masks)")
            print(f"note: resuming with the checkpoint's sparse masks{why}", file=out, flush=True)
        # schedule_steps is the job's own (--steps) unless given, and then equals the run's, checked above
        changed = {k: v for k, v in trainer.changed_options.items() if own_schedule or k != "schedule_steps"}
        changed.update(job_changes)
        if changed:
            changes = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in sorted(changed.items())))
            print(f"note: options differ from the checkpoint's run, and apply from step {trainer.global_step} on: "
                  f"{changes}", file=out, flush=True)
    elif config.resume:
        print(f"no checkpoint in {config.checkpoint_dir}: starting a fresh run", file=out, flush=True)
    first_step = trainer.global_step  # after a resume: the steps before it ran in another process
    try:
        with _StopOnTerminate(par) as terminate:  # also over the save below: a rank the signal reaches late lives
            try:
                history = trainer.train(terminate.checked(lambda k: task.train_prompts(k, job.batch_size,
                                                                                       seed=config.seed)),
                                        job.steps, progress=progress)
            except _Terminated:  # every rank finished the step in progress: checkpoint it, as a Ctrl-C does
                due = config.checkpoint_every and trainer.global_step % config.checkpoint_every == 0  # saved then
                if config.checkpoint_dir is not None and trainer.global_step > first_step and not due:
                    trainer.save_checkpoint()  # on every rank: a collective under data parallelism
                raise
    except KeyboardInterrupt:  # a Ctrl-C: the trainer finished the step in progress and checkpointed it
        _report_stop("interrupted", trainer, job, config, run_dir, par)
        return 130
    except _Terminated:
        _report_stop("terminated (SIGTERM)", trainer, job, config, run_dir, par)
        return 143
    final_state = par.full_model_state(student)  # every rank takes part (gathered under FSDP2)
    wall = time.perf_counter() - t0
    ran = [m for m in history if m["step"] > first_step]  # what the wall time covers
    first, last = trainer.eval_history[0], trainer.eval_history[-1]
    summary = {
        "task": "addition-3digit", "objective": config.objective, "steps": trainer.global_step,
        "student_accuracy_before": first["accuracy"], "student_accuracy_after": last["accuracy"],
        "teacher_accuracy": teacher_acc, "rkl_before": first["rkl"], "rkl_after": last["rkl"],
        "wall_s": wall, "peak_mem_mb": peak_memory_mb(trainer.device),
        "steps_this_process": len(ran), "tokens_generated": sum(m["tokens"] for m in ran),
        "rollout_s": sum(m["rollout_s"] for m in ran), "scoring_s": sum(m["scoring_s"] for m in ran),
        "update_s": sum(m["update_s"] for m in ran), "run_dir": str(run_dir), "world_size": par.world_size,
        "final_student": str(run_dir / FINAL_STUDENT),
    }
    if not par.is_main:
        return 0
    _save_student(student.config, final_state, run_dir / FINAL_STUDENT)
    table = summary_table(summary)
    plots = _plots(run_dir, history, trainer.eval_history, teacher_acc)
    write_text_atomic(run_dir / "summary.json", json_text(summary))
    write_text_atomic(
        run_dir / "summary.md",
        f"# fastopd distill\n\n{table}\n\nObjective `{config.objective}`, {trainer.global_step} steps, horizon "
        f"{_horizon_text(config)}; time split: rollout {summary['rollout_s']:.1f} s, teacher scoring "
        f"{summary['scoring_s']:.1f} s, update {summary['update_s']:.1f} s.\n"
        + "".join(f"\n![{p}]({p})\n" for p in plots))
    print(table, file=out)
    print(f"time: rollout {summary['rollout_s']:.1f} s, scoring {summary['scoring_s']:.1f} s, update "
          f"{summary['update_s']:.1f} s; {summary['tokens_generated']:,} tokens generated", file=out)
    checkpoints = f", checkpoints{os.sep})" if not own_checkpoint_dir else f"); checkpoints: {config.checkpoint_dir}"
    print(f"run folder: {run_dir}{os.sep} (summary.md, metrics.jsonl, eval.jsonl, {', '.join(plots) or 'no plots'}"
          f", {FINAL_STUDENT}{os.sep}{checkpoints}", file=out, flush=True)
    return 0


def _report_stop(what: str, trainer, job: DistillJob, config: OPDConfig, run_dir: Path, par) -> None:
    """Rank 0's last line of a run stopped early: where it stopped, its newest checkpoint and how to go on."""
    from fastopd.train import checkpoint as ckpt

    if not par.is_main:
        return
    found = ckpt.latest_checkpoint(config.checkpoint_dir) if config.checkpoint_dir is not None else None
    kept = (f"the newest checkpoint is {found} (step {ckpt.checkpoint_step(found)}); continue with "
            f"`fastopd distill --resume --out {run_dir}` and the same options" if found is not None
            else "no checkpoint was written")
    print(f"fastopd distill: {what} at step {trainer.global_step} of {job.steps}: {kept}", file=sys.stderr, flush=True)


class _Terminated(Exception):
    """Raised where the next step's prompts are drawn, once every rank knows a SIGTERM asked to stop."""


class _StopOnTerminate:
    """A SIGTERM while `train` runs asks to stop as a Ctrl-C does (`OPDTrainer.train`): the step in progress
    finishes, so the trainer's state is never torn, and the job checkpoints it and exits with 143. The request is
    read where every rank draws the next step's prompts (`checked`), and under torchrun (which passes a SIGTERM on
    to every rank, not at the same moment) the ranks agree there: a request on any rank stops all of them before
    the same step. The handler is installed in the main thread over the default action only, and the previous one
    is put back at the first SIGTERM (a second one ends the process at once) and when the run and its last
    checkpoint are done."""

    def __init__(self, par) -> None:
        self.par = par
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _StopOnTerminate:
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self._restore()
        if self.par.is_main:
            print("\nterminated (SIGTERM): stopping after the step in progress, with a checkpoint; another SIGTERM "
                  "stops at once", file=sys.stderr, flush=True)

    def _restore(self) -> None:
        if self._previous is not None and signal.getsignal(signal.SIGTERM) == self._handle:
            signal.signal(signal.SIGTERM, self._previous)
        self._previous = None

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def checked(self, prompts: Callable[[int], Any]) -> Callable[[int], Any]:
        """`prompts`, raising `_Terminated` instead of drawing a step's prompts once a stop is asked for (on any
        rank: one small collective per step under data parallelism)."""
        def get(k: int) -> Any:
            if any(self.par.gather_objects(self.requested)):
                raise _Terminated
            return prompts(k)
        return get


def _planned_schedule_steps(trainer, run_dir: Path, par) -> int | None:
    """After a resume, the step where the checkpoint's run ends its cosine decay; None when not resumed, when
    the schedule changes anyway (another `lr_schedule`) or when it cannot be known."""
    if trainer.resumed_from is None or "lr_schedule" in trainer.changed_options:
        return None
    if "schedule_steps" not in trainer.changed_options:
        return trainer.config.schedule_steps
    planned = trainer.changed_options["schedule_steps"][0]
    if planned is None:  # a checkpoint of an older fastopd: the decay ended at the --steps config.json records
        planned = _recorded_steps(run_dir / "config.json") if par.is_main else None
        planned = par.gather_objects(planned)[0]  # rank 0's run folder, as every rank uses
    return planned


def _recorded_steps(path: Path) -> int | None:
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    steps = recorded.get("steps") if isinstance(recorded, dict) and recorded.get("schedule_steps") is None else None
    return steps if isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1 else None


def _recorded_checkpoint_dir(path: Path, checkpoint_dir: str | None) -> tuple[str, str] | None:
    """(folder, newest checkpoint's name) when the run folder's config.json records another checkpoint_dir than
    `checkpoint_dir` and that folder holds checkpoints; else None."""
    from fastopd.train import checkpoint as ckpt

    try:
        recorded = json.loads(path.read_text()).get("checkpoint_dir")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(recorded, str) or not recorded.strip() or (
            checkpoint_dir is not None and Path(recorded).resolve() == Path(checkpoint_dir).resolve()):
        return None
    found = ckpt.latest_checkpoint(recorded)
    return (recorded, found.name) if found is not None else None


def _changed_job_options(path: Path, job: DistillJob, teacher_dir: Path) -> dict[str, tuple[Any, Any]]:
    """The job options that change what a resumed run trains or evaluates on (prompts per step, evaluation
    problems, the teacher) and differ from those the run folder's config.json records: option -> (then, now)."""
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(recorded, dict):
        return {}
    changed: dict[str, tuple[Any, Any]] = {}
    for name in ("batch_size", "eval_size"):
        if name in recorded and recorded[name] != getattr(job, name):
            changed[name] = (recorded[name], getattr(job, name))
    then = recorded.get("teacher")
    if isinstance(then, str) and Path(then).resolve() != teacher_dir.resolve():
        changed["teacher"] = (then, str(teacher_dir))
    return changed


def _error_text(exc: BaseException) -> str:
    """A configuration error's message; other exceptions keep their type, so a real bug is still recognizable."""
    return str(exc) if isinstance(exc, ValueError) and str(exc) else f"{type(exc).__name__}: {exc}"


def _save_student(config, state: dict[str, Any], folder: Path) -> None:
    """Write the distilled student as `Transformer.save_pretrained` does, so `Transformer.from_pretrained` and
    `--student` read it (from the full state, as a sharded student cannot save itself)."""
    from fastopd.models import Transformer

    model = Transformer(config)
    model.load_state_dict({k: v.detach().to("cpu") for k, v in state.items()})
    model.save_pretrained(folder)


def _checkpoint_dir_problem(checkpoint_dir: str | None, own: bool) -> str | None:
    """Why checkpoints cannot be written in `checkpoint_dir` (created if need be), as an error naming the field that
    set it; None when they can (or there is none)."""
    problem = folder_write_problem(checkpoint_dir) if checkpoint_dir is not None else None
    if problem is None:
        return None
    return f"{'checkpoint_dir' if own else 'out'}: cannot write checkpoints in {checkpoint_dir}: {problem}"


def _write_run_folder(run_dir: Path, fresh: bool, resolved: dict[str, Any]) -> None:
    """Create the run folder and write config.json; a fresh run drops the logs a previous one left there (resumed
    runs have rewritten them from the checkpoint's histories)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if fresh:
        for stale in ("metrics.jsonl", "eval.jsonl"):
            (run_dir / stale).unlink(missing_ok=True)
    # non-finite options as text: `max_grad_norm = inf` stays apart from None
    write_text_atomic(run_dir / "config.json", json_text(resolved, nonfinite_as_text=True, default=str))


def _horizon_text(config: OPDConfig) -> str:
    spec = config.horizon_spec()
    if spec is None:
        return repr(config.horizon)
    rest = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "kind")
    return f"{spec['kind']}({rest})"
