"""Stopping and resuming `fastopd distill` / `OPDTrainer.train`: Ctrl-C keeps the finished steps, a checkpoint
folder that cannot be written is refused before any step, the distilled student is written in the format
`--student` and `Transformer.from_pretrained` read, and seeds outside the RNGs' range are refused by name."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastopd.cli import main
from fastopd.models import Transformer, TransformerConfig
from fastopd.train import OPDConfig, OPDTrainer
from fastopd.train import checkpoint as ckpt
from fastopd.train.cli import ASSETS
from fastopd.train.config import ConfigError
from fastopd.train.task import EOS, PAD, AdditionTask

TASK = AdditionTask(digits=2)
TIMING_KEYS = {"rollout_s", "scoring_s", "update_s", "peak_mem_mb"}
needs_assets = pytest.mark.skipif(not (ASSETS / "teacher" / "config.json").is_file(), reason="built-in models absent")


def _tiny(seed: int, hidden: int = 32) -> Transformer:
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=TASK.tokenizer.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_layers=1, num_heads=2, max_position_embeddings=48)
    return Transformer(cfg)


def _config(**kw) -> OPDConfig:
    base = dict(objective="rkl", lr=3e-3, num_samples=2, max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD, seed=0,
                warmup_steps=2, lr_schedule="cosine")
    return OPDConfig(**{**base, **kw})


def _strip(history):
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in history]


def _interrupting(at: int):
    """Step k's prompts; while drawing those of step `at`, a Ctrl-C arrives (mid-step, before its rollout)."""
    def source(k):
        if k == at:
            os.kill(os.getpid(), signal.SIGINT)
        return TASK.train_prompts(k, 4)
    return source


def test_ctrl_c_finishes_the_step_saves_a_checkpoint_and_the_resumed_run_is_exact(tmp_path, capsys):
    straight = OPDTrainer(_tiny(8), _tiny(9, 48), _config(checkpoint_dir=str(tmp_path / "a")))
    straight.train(lambda k: TASK.train_prompts(k, 4), 5, progress=False)

    first = OPDTrainer(_tiny(8), _tiny(9, 48), _config(checkpoint_dir=str(tmp_path / "b")))
    with pytest.raises(KeyboardInterrupt):
        first.train(_interrupting(2), 5, progress=False)  # checkpoint_every=0: only at the end, which never came
    assert first.global_step == 3  # the step in progress was finished, not torn
    assert ckpt.checkpoint_step(ckpt.latest_checkpoint(tmp_path / "b")) == 3
    assert "Ctrl-C" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back

    resumed = OPDTrainer(_tiny(8), _tiny(9, 48), _config(checkpoint_dir=str(tmp_path / "b"), resume=True))
    resumed.train(lambda k: TASK.train_prompts(k, 4), 5, progress=False)
    assert _strip(resumed.history) == _strip(straight.history)
    for p, q in zip(resumed.student.parameters(), straight.student.parameters()):
        assert torch.equal(p, q)


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    def source(k):
        if k == 1:
            os.kill(os.getpid(), signal.SIGINT)  # asks to stop after this step
            os.kill(os.getpid(), signal.SIGINT)  # and now
        return TASK.train_prompts(k, 4)

    trainer = OPDTrainer(_tiny(8), _tiny(9, 48), _config(checkpoint_dir=str(tmp_path)))
    with pytest.raises(KeyboardInterrupt):
        trainer.train(source, 5, progress=False)
    assert trainer.global_step == 1  # step 1 never ran
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_sigterm_finishes_the_step_checkpoints_and_raises_terminated(tmp_path, capsys):
    """OPDTrainer.train used directly (not through `fastopd distill`) died on a SIGTERM (preemption) mid-step,
    losing every step since the last checkpoint."""
    from fastopd.train import Terminated

    def source(k):
        if k == 2:
            # without a handler the signal would end the test process: fail as a test instead
            assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL, "train installed no SIGTERM handler"
            os.kill(os.getpid(), signal.SIGTERM)
        return TASK.train_prompts(k, 4)

    trainer = OPDTrainer(_tiny(8), _tiny(9, 48), _config(checkpoint_dir=str(tmp_path)))
    with pytest.raises(Terminated) as info:
        trainer.train(source, 5, progress=False)
    assert info.value.code == 143 and isinstance(info.value, SystemExit) and "step 3 of 5" in str(info.value)
    assert trainer.global_step == 3 and ckpt.checkpoint_step(ckpt.latest_checkpoint(tmp_path)) == 3
    assert "SIGTERM" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # put back
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_checkpoint_dir_that_cannot_be_written_is_refused_before_any_step(tmp_path):
    (tmp_path / "afile").write_text("")
    trainer = OPDTrainer(_tiny(8), _tiny(9, 48), _config(checkpoint_dir=str(tmp_path / "afile" / "ckpt")))
    with pytest.raises(ValueError, match="checkpoint_dir: cannot write checkpoints in .*afile/ckpt: cannot create"):
        trainer.train(lambda k: TASK.train_prompts(k, 4), 3, progress=False)
    assert trainer.global_step == 0 and trainer.history == []


@pytest.mark.parametrize("seed", [2**63, 2**64, -1])
def test_a_seed_outside_the_rngs_range_names_the_field(seed):
    with pytest.raises(ConfigError, match=r"^seed: must lie in \[0, 2\*\*63 - 1\]"):
        _config(seed=seed)


TINY = ["--steps", "3", "--batch-size", "2", "--num-samples", "1", "--eval-size", "4", "--eval-every", "0",
        "--horizon", "full:4"]


@needs_assets
def test_distill_refuses_a_checkpoint_dir_it_cannot_write_before_training(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    cfg = tmp_path / "job.toml"
    cfg.write_text(f'checkpoint_dir = "{tmp_path / "afile" / "ckpt"}"\n')
    assert main(["distill", "--config", str(cfg), *TINY, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastopd distill: error: checkpoint_dir: ") and "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@needs_assets
def test_distill_writes_the_distilled_student_as_a_model_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", *TINY, "--out", str(out)]) == 0
    assert "final_student" in capsys.readouterr().out
    model = Transformer.from_pretrained(out / "final_student")
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(out / "checkpoints"))["model"]
    for name, t in model.state_dict().items():
        assert torch.equal(t, saved[name]), name
    assert json.loads((out / "summary.json").read_text())["final_student"] == str(out / "final_student")
    # ... and another run starts from it
    assert main(["distill", *TINY, "--steps", "1", "--student", str(out / "final_student"),
                 "--out", str(tmp_path / "next")]) == 0


@needs_assets
def test_ctrl_c_on_the_command_line_keeps_the_finished_steps(tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "fastopd.cli", "distill", *TINY, "--steps", "2000", "--out", str(out)]
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(argv, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = out / "metrics.jsonl"
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "--resume --out" in err
    found = ckpt.latest_checkpoint(out / "checkpoints")
    assert found is not None
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert ckpt.checkpoint_step(found) == len(lines) >= 3  # every step logged is in the checkpoint
