"""`fastopd distill` stopped and restarted the way clusters do it: a SIGTERM (preemption) finishes the step and
checkpoints it like a Ctrl-C, on one process and on every rank under torchrun; temporary folders that killed
checkpoint writes left are removed at the next start and never resumed from; a resume with other `--steps` than
the run's cosine schedule is refused unless `--schedule-steps` says where the decay ends."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastopd.cli import main
from fastopd.train import checkpoint as ckpt
from fastopd.train.cli import ASSETS
from fastopd.train.task import AdditionTask

needs_assets = pytest.mark.skipif(not (ASSETS / "teacher" / "config.json").is_file(), reason="built-in models absent")
REPO = Path(__file__).resolve().parents[2]
TINY = ["--batch-size", "2", "--num-samples", "1", "--eval-size", "4", "--eval-every", "0", "--horizon", "full:4"]


def _distill(out, steps, *flags):
    return main(["distill", "--steps", str(steps), *TINY, *flags, "--out", str(out)])


def _dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _student(folder):
    from fastopd.models import Transformer

    return Transformer.from_pretrained(folder).state_dict()


# ---------------------------------------------------------------------------------------------- SIGTERM


@needs_assets
def test_sigterm_finishes_the_step_checkpoints_it_and_the_resumed_run_is_exact(tmp_path, capsys, monkeypatch):
    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        pytest.skip("SIGTERM has a handler of its own in this process")
    assert _distill(tmp_path / "straight", 4) == 0
    real = AdditionTask.train_prompts

    def terminated_at_step_1(self, k, n, seed=0):
        if k == 1:  # while step 1 starts: the job must catch it, not die of it
            assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL, "no SIGTERM handler while training"
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, k, n, seed=seed)

    monkeypatch.setattr(AdditionTask, "train_prompts", terminated_at_step_1)
    out = tmp_path / "run"
    capsys.readouterr()
    assert _distill(out, 4) == 143
    err = capsys.readouterr().err
    assert "terminated (SIGTERM): stopping after the step in progress" in err and "Traceback" not in err
    assert (f"fastopd distill: terminated (SIGTERM) at step 2 of 4: the newest checkpoint is "
            f"{out / 'checkpoints' / 'step_00000002'} (step 2); continue with `fastopd distill --resume --out {out}`"
            in err)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # put back
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # step 1 was finished, not torn
    assert not (out / "final_student").exists()

    monkeypatch.setattr(AdditionTask, "train_prompts", real)
    assert _distill(out, 4, "--resume") == 0
    want, got = _student(tmp_path / "straight" / "final_student"), _student(out / "final_student")
    for name, t in want.items():
        assert torch.equal(got[name], t), name


def _wait_for_steps(proc, metrics: Path, steps: int, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.2)


@needs_assets
def test_sigterm_on_the_command_line_exits_143_with_the_finished_steps_checkpointed(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "fastopd.cli", "distill", "--steps", "2000", *TINY, "--out",
                             str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_steps(proc, out / "metrics.jsonl", 3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "terminated (SIGTERM) at step" in err and "--resume --out" in err
    found = ckpt.latest_checkpoint(out / "checkpoints")
    assert found is not None
    assert ckpt.checkpoint_step(found) == len((out / "metrics.jsonl").read_text().splitlines()) >= 3


@needs_assets
def test_sigterm_under_torchrun_stops_every_rank_at_one_step_with_a_checkpoint(tmp_path):
    """torchrun passes a SIGTERM on to each rank; they agree on the step to stop before, so rank 0 checkpoints what
    every rank finished (before this, each rank died where the signal found it)."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend",
                             "c10d", "--rdzv-endpoint", "localhost:0", "-m", "fastopd.cli", "distill", "--steps",
                             "2000", *TINY, "--batch-size", "4", "--out", str(out)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_steps(proc, out / "metrics.jsonl", 3)
        proc.send_signal(signal.SIGTERM)  # to the launcher, as SLURM and Kubernetes do
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    found = ckpt.latest_checkpoint(out / "checkpoints")
    assert found is not None, err[-3000:]
    steps = len((out / "metrics.jsonl").read_text().splitlines())
    assert ckpt.checkpoint_step(found) == steps >= 3, err[-3000:]
    assert err.count(f"fastopd distill: terminated (SIGTERM) at step {steps} of 2000") == 1, err[-3000:]


# ---------------------------------------------------------------------------------------------- temporary folders


def _saved(root: Path, step: int) -> Path:
    return ckpt.save_checkpoint(root, step, model_state={"w": torch.full((2,), float(step))}, optimizer_state=None,
                                trainer_state={})


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    root = tmp_path / "ckpt"
    good = _saved(root, 1)
    dead, live = _dead_pid(), os.getppid()  # the parent runs while this test does
    hex12 = "0123456789ab"
    stale = [f".step_00000002.tmp-{dead}-{hex12}", f".step_00000003.tmp-{os.getpid()}-{hex12}",
             f".step_00000001.old-{dead}-{hex12}",  # step 1 is complete again: the copy aside is garbage
             f".deleting-step_00000000-{hex12}"]
    kept = [f".step_00000004.tmp-{live}-{hex12}",  # another live process may be writing it
            f".step_00000005.old-{dead}-{hex12}",  # its step has no complete copy: latest_checkpoint moves it back
            ".step_00000006.tmp-dead", f"step.tmp-{dead}-{hex12}", "notes", "step_00000007"]  # not ours
    for name in stale + kept:
        shutil.copytree(good, root / name)
    (root / f".latest.{dead}.partial").write_text("step_00000002\n")
    (root / "my.partial").write_text("")
    (root / f".step_00000008.tmp-{dead}-{hex12}.txt").write_text("")  # a file, not a temporary folder
    removed = ckpt.remove_stale_temporaries(root)
    assert sorted(p.name for p in removed) == sorted(stale + [f".latest.{dead}.partial"])
    left = {p.name for p in root.iterdir()}
    assert left == {good.name, "latest", *kept, "my.partial", f".step_00000008.tmp-{dead}-{hex12}.txt"}
    assert ckpt.remove_stale_temporaries(tmp_path / "absent") == []


def test_a_save_removes_what_killed_saves_left(tmp_path):
    _saved(tmp_path, 1)
    leftover = tmp_path / f".step_00000002.tmp-{_dead_pid()}-0123456789ab"
    leftover.mkdir()
    (leftover / ckpt.MODEL_FILE).write_bytes(b"half")
    _saved(tmp_path, 2)
    assert not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001", "step_00000002"]


@needs_assets
def test_a_resume_removes_stale_temporary_folders_and_never_resumes_from_one(tmp_path, capsys):
    out = tmp_path / "run"
    assert _distill(out, 2, "--checkpoint-every", "1") == 0
    root = out / "checkpoints"
    # a save of step 3 killed before its rename: complete files, a higher step, even a pointer written to it
    temp = root / f".step_00000003.tmp-{_dead_pid()}-0123456789ab"
    shutil.copytree(root / "step_00000002", temp)
    (root / "latest").write_text(f"{temp.name}\n")
    (root / "mine").mkdir()
    capsys.readouterr()
    assert _distill(out, 3, "--checkpoint-every", "1", "--schedule-steps", "3", "--resume") == 0
    text = capsys.readouterr().out
    assert f"resuming from {root / 'step_00000002'} (step 2)" in text
    assert f"note: removed 1 temporary file(s) that interrupted checkpoint writes left in {root}: {temp.name}" in text
    assert not temp.exists() and (root / "mine").is_dir()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "mine", "step_00000002", "step_00000003"]


# ---------------------------------------------------------------------------------------------- --steps on resume


def _lrs(out: Path) -> list[float]:
    return [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@needs_assets
def test_resuming_with_other_steps_is_refused_unless_schedule_steps_says_where_the_decay_ends(tmp_path, capsys):
    cfg = tmp_path / "job.toml"
    cfg.write_text("warmup_steps = 0\nlr = 0.001\n")
    out = tmp_path / "run"
    assert _distill(out, 2, "--config", str(cfg)) == 0
    written = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert _distill(out, 4, "--config", str(cfg), "--resume") == 2
    err = capsys.readouterr().err
    assert err.startswith("fastopd distill: error: steps: the run's cosine learning-rate schedule decays to 0 over "
                          f"2 steps (checkpoint {out / 'checkpoints' / 'step_00000002'}); --steps 4 would change the "
                          "rate from step 2 on. Pass --steps 2 to finish the run as planned, or --schedule-steps "
                          "N"), err
    assert "Traceback" not in err and err.count("\n") == 1
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == written  # nothing written

    assert _distill(out, 4, "--config", str(cfg), "--schedule-steps", "2", "--resume") == 0  # the run's schedule
    assert "note: options differ" not in capsys.readouterr().out
    assert _lrs(out) == pytest.approx([1e-3, 1e-3 * 0.5 * (1 + math.cos(math.pi / 2)), 0.0, 0.0], rel=1e-12)
    assert _distill(out, 6, "--config", str(cfg), "--schedule-steps", "8", "--resume") == 0  # a longer decay
    assert ("note: options differ from the checkpoint's run, and apply from step 4 on: schedule_steps 2 -> 8"
            in capsys.readouterr().out)
    assert _lrs(out)[4:] == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * k / 8)) for k in (4, 5)], rel=1e-12)
    # the checkpoint now holds schedule_steps 8, so --steps 8 goes on without --schedule-steps
    assert _distill(out, 8, "--config", str(cfg), "--resume") == 0


@needs_assets
def test_a_checkpoint_without_schedule_steps_takes_the_steps_config_json_records(tmp_path, capsys):
    """Checkpoints of an older fastopd hold schedule_steps None: their decay ended at the run's --steps."""
    out = tmp_path / "run"
    assert _distill(out, 2) == 0
    found = ckpt.latest_checkpoint(out / "checkpoints")
    state = torch.load(found / ckpt.TRAINER_FILE, weights_only=True)
    state["config"]["schedule_steps"] = None
    torch.save(state, found / ckpt.TRAINER_FILE)
    manifest = json.loads((found / ckpt.MANIFEST_FILE).read_text())
    manifest["files"][ckpt.TRAINER_FILE] = (found / ckpt.TRAINER_FILE).stat().st_size
    (found / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))
    recorded = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**recorded, "schedule_steps": None}))
    capsys.readouterr()
    assert _distill(out, 3, "--resume") == 2
    assert "decays to 0 over 2 steps" in capsys.readouterr().err
    assert _distill(out, 2, "--resume") == 0
    assert "note: options differ" not in capsys.readouterr().out
