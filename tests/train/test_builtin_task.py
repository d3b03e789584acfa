"""On the built-in addition task, on-policy distillation of the shipped student towards the shipped teacher raises
the student's exact-match accuracy and lowers its reverse KL within a small step budget (dense and "pg")."""

import pytest
import torch

from fastopd.models import Transformer
from fastopd.train import OPDConfig, OPDTrainer
from fastopd.train.cli import ASSETS
from fastopd.train.task import EOS, PAD, AdditionEvaluator, AdditionTask

pytestmark = pytest.mark.skipif(not (ASSETS / "teacher" / "config.json").is_file(), reason="built-in models missing")
TASK = AdditionTask(digits=3)


@pytest.fixture
def one_thread():
    """Tiny models: one thread is faster, and immune to spin-waiting on a loaded machine; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(objective: str, steps: int, lr: float):
    teacher = Transformer.from_pretrained(ASSETS / "teacher")
    student = Transformer.from_pretrained(ASSETS / "student")
    cfg = OPDConfig(objective=objective, lr=lr, warmup_steps=10, lr_schedule="cosine", num_samples=4,
                    max_new_tokens=TASK.max_new_tokens, eos_token_id=EOS, pad_token_id=PAD, seed=0)
    trainer = OPDTrainer(student, teacher, cfg, evaluator=AdditionEvaluator(TASK, 128))
    trainer.train(lambda k: TASK.train_prompts(k, 16), steps, progress=False)
    return trainer.eval_history[0], trainer.eval_history[-1], trainer.history


@pytest.mark.usefixtures("one_thread")
def test_dense_opd_raises_accuracy_and_lowers_reverse_kl():
    before, after, history = _run("fkl", 100, 1e-3)
    assert after["accuracy"] >= before["accuracy"] + 0.15, (before, after)
    assert after["rkl"] < 0.75 * before["rkl"], (before, after)
    first, last = history[:10], history[-10:]
    assert sum(m["rkl"] for m in last) < 0.8 * sum(m["rkl"] for m in first)  # the training-time estimate falls too


@pytest.mark.usefixtures("one_thread")
def test_pg_objective_raises_accuracy_and_lowers_reverse_kl():
    before, after, _ = _run("pg", 120, 1e-3)
    assert after["accuracy"] >= before["accuracy"] + 0.15, (before, after)
    assert after["rkl"] < 0.75 * before["rkl"], (before, after)
