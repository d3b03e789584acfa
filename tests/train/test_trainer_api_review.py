"""OPDTrainer from Python, as a user drives it: padded teacher vocabularies, prompts as padded ids with a mask,
tokenizer-style special ids, path-like folders, evaluators returning NumPy numbers, and bad input refused with a
message that names it before any rollout."""

import warnings

import numpy as np
import pytest
import torch

from fastopd.models import Transformer, TransformerConfig
from fastopd.train import ConfigError, OPDConfig, OPDTrainer
from fastopd.train.task import EOS, PAD, AdditionTask

TASK = AdditionTask(digits=2)
V = TASK.tokenizer.vocab_size


def _tiny(seed: int, hidden: int = 32, vocab: int = V) -> Transformer:
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_layers=1,
                            num_heads=2, max_position_embeddings=48)
    return Transformer(cfg)


def _config(**kw) -> OPDConfig:
    base = dict(objective="fkl", lr=3e-3, num_samples=2, max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD)
    return OPDConfig(**{**base, **kw})


def _prompts(k: int = 0, n: int = 3):
    return TASK.train_prompts(k, n)


def _no_rollout(trainer):
    def refuse(*args, **kwargs):
        raise AssertionError("a rollout ran before the bad input was refused")

    trainer.engine.generate = refuse


@pytest.mark.parametrize("objective", ["fkl", "pg"])
def test_a_teacher_with_a_padded_vocabulary_is_compared_on_the_students_rows(objective):
    """A teacher head with more rows than the student's (a padded vocabulary, e.g. Qwen2.5-7B's 152064 against
    0.5B's 151936) trains; the loss renormalizes the teacher over the student's rows (a float64 reference)."""
    student, teacher = _tiny(0), _tiny(1, hidden=40, vocab=V + 7)
    trainer = OPDTrainer(student, teacher, _config(objective=objective))
    torch.manual_seed(3)
    batch = trainer.engine.generate(_prompts(1))
    n = batch.completion_mask.sum()
    loss, rkl_sum = trainer._loss(batch, trainer.engine.student_hidden(batch), trainer.engine.score(batch), n)
    with torch.no_grad():
        hs = trainer.engine.student_hidden(batch).double()
        ht = trainer.engine.score(batch).double()
    ls = torch.log_softmax(hs @ student.lm_head.weight.detach().double().T, -1)
    lt = torch.log_softmax(ht @ teacher.lm_head.weight.detach().double()[:V].T, -1)  # the student's V rows
    y, mask = batch.completion_ids, batch.completion_mask
    lps, lpt = ls.gather(-1, y[..., None])[..., 0], lt.gather(-1, y[..., None])[..., 0]
    r = (lps - lpt) * mask
    if objective == "fkl":
        ref = ((lt.exp() * (lt - ls)).sum(-1) * mask).sum() / n
    else:
        ref = ((lps - batch.logprobs.double()).exp().clamp(max=2.0) * r * lps).sum() / n
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rkl_sum.double(), r.sum(), rtol=1e-5, atol=1e-5)
    m = trainer.step(_prompts(2))
    assert np.isfinite(m["loss"]) and np.isfinite(m["rkl"])


def test_a_student_vocabulary_beyond_the_teachers_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"student's LM head has 24 rows, more than the teacher's vocabulary"):
        OPDTrainer(_tiny(0, vocab=24), _tiny(1), _config())


@pytest.mark.parametrize("objective", ["fkl", "pg"])
def test_vocab_size_restricts_rollouts_and_loss_to_the_tokenizers_ids(objective):
    """OPDConfig(vocab_size=V) with both heads padded past the tokenizer (a student head larger than the
    teacher's, refused without it): only ids below V are sampled and both models are compared, normalized, on
    their first V logits (a float64 reference)."""
    student, teacher = _tiny(0, vocab=V + 9), _tiny(1, hidden=40, vocab=V + 4)
    trainer = OPDTrainer(student, teacher, _config(objective=objective, vocab_size=V, temperature=3.0))
    assert trainer.vocab_size == V and trainer.engine.vocab_size == V
    torch.manual_seed(4)
    batch = trainer.engine.generate(_prompts(1, n=6))
    y, mask = batch.completion_ids, batch.completion_mask
    assert int(y[mask].max()) < V  # at temperature 3 the padded rows of random heads would be drawn
    n = mask.sum()
    loss, _ = trainer._loss(batch, trainer.engine.student_hidden(batch), trainer.engine.score(batch), n)
    with torch.no_grad():
        hs = trainer.engine.student_hidden(batch).double()
        ht = trainer.engine.score(batch).double()
    ls = torch.log_softmax(hs @ student.lm_head.weight.detach().double()[:V].T / 3.0, -1)
    lt = torch.log_softmax(ht @ teacher.lm_head.weight.detach().double()[:V].T / 3.0, -1)
    lps = ls.gather(-1, y[..., None])[..., 0]
    torch.testing.assert_close(batch.logprobs.double()[mask], lps[mask], rtol=1e-4, atol=1e-5)
    if objective == "fkl":
        ref = ((lt.exp() * (lt - ls)).sum(-1) * mask).sum() / n
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)  # at temperature 3, not T^2-scaled
    assert np.isfinite(trainer.step(_prompts(2))["loss"])


def test_vocab_size_beyond_the_teachers_vocabulary_is_refused():
    with pytest.raises(ValueError, match=r"vocab_size=25 is more than the teacher's vocabulary"):
        OPDTrainer(_tiny(0, vocab=30), _tiny(1, vocab=24), _config(vocab_size=25))
    with pytest.raises(ConfigError, match="^vocab_size: must be >= 1"):
        _config(vocab_size=0)


def test_a_loss_impl_that_cannot_run_on_the_device_is_refused_at_construction(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("FASTOPD_IMPL", raising=False)
    with pytest.raises(ValueError, match="triton"):
        OPDTrainer(_tiny(0), _tiny(1), _config(loss_impl="triton"))
    monkeypatch.setenv("FASTOPD_IMPL", "cuda")
    with pytest.raises(ValueError, match="FASTOPD_IMPL"):
        OPDTrainer(_tiny(0), _tiny(1), _config())


def test_special_ids_are_taken_as_the_rollout_engine_takes_them():
    """`pad_token_id=tok.pad_token_id` (None for Llama/GPT-2 tokenizers) and a list of EOS ids (Llama 3's
    generation config) are what docs/training.md's example and the RolloutEngine accept."""
    cfg = _config(pad_token_id=None, eos_token_id=(EOS, 3))
    assert cfg.eos_token_id == [EOS, 3] and cfg.pad_token_id is None
    trainer = OPDTrainer(_tiny(0), _tiny(1), cfg)
    assert trainer.engine.pad_token_id == EOS and trainer.engine.eos_ids == [EOS, 3]
    assert trainer.step(_prompts())["tokens"] > 0
    for bad in ([], [EOS, True], -1, "2", 2.0):
        with pytest.raises(ConfigError, match="^eos_token_id: "):
            _config(eos_token_id=bad)


def test_checkpoint_dir_may_be_a_path(tmp_path):
    cfg = _config(checkpoint_dir=tmp_path / "ckpt")
    assert cfg.checkpoint_dir == str(tmp_path / "ckpt")
    trainer = OPDTrainer(_tiny(0), _tiny(1), cfg)
    trainer.step(_prompts())
    assert trainer.save_checkpoint() == tmp_path / "ckpt" / "step_00000001"


def test_step_takes_padded_ids_with_an_attention_mask():
    """Padded ids and their mask (or a tokenizer's batch) roll out the unpadded prompts, never the pad ids."""
    trainer = OPDTrainer(_tiny(0), _tiny(1), _config())
    seen = []
    generate = trainer.engine.generate
    trainer.engine.generate = lambda prompts, *a, **k: (seen.append(prompts), generate(prompts, *a, **k))[1]
    rows = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    right = torch.tensor([r + [PAD] * (4 - len(r)) for r in rows])  # right padding
    left = torch.tensor([[PAD] * (4 - len(r)) + r for r in rows])
    trainer.step(right, attention_mask=right != PAD)
    trainer.step({"input_ids": left, "attention_mask": (left != PAD).long()})
    trainer.step(np.array([r[:2] for r in rows]))
    trainer.step([torch.tensor(r) for r in rows])
    # a tokenizer's batch without return_tensors: lists, padded, with list mask rows
    trainer.step({"input_ids": right.tolist(), "attention_mask": (right != PAD).long().tolist()})
    trainer.step(rows, attention_mask=[[1] * len(r) for r in rows])  # unpadded rows with their masks
    assert seen == [rows, rows, [r[:2] for r in rows], rows, rows, rows]


@pytest.mark.parametrize("prompts,mask,match", [
    ([5, 6, 7], None, r"prompts\[0\] is int 5 \(a single prompt goes in a list"),
    (None, None, "list of token-id lists, got NoneType"),
    ("5 6 7", None, "list of token-id lists, got str"),
    ([], None, "prompts is empty"),
    ([[5, 6]], torch.ones(2, 2), "attention_mask has 2 rows, prompts 1"),
    ([[5, 6], [7]], [[1, 1], [1, 1]], r"prompts\[1\] and its attention_mask row do not match"),
    (torch.ones(3, dtype=torch.long), torch.ones(3), r"given as ids \[B, L\], got shape \(3,\)"),
    (torch.ones(2, 3, dtype=torch.long), torch.ones(2, 2), r"attention_mask \(2, 2\) does not match"),
])
def test_bad_prompts_are_refused_before_any_rollout(prompts, mask, match):
    trainer = OPDTrainer(_tiny(0), _tiny(1), _config())
    _no_rollout(trainer)
    with pytest.raises(ValueError, match=match):
        trainer.step(prompts, mask)


def test_a_prompt_list_shorter_than_the_finished_steps_names_the_problem():
    trainer = OPDTrainer(_tiny(0), _tiny(1), _config())
    trainer.step(_prompts(0))
    trainer.step(_prompts(1))
    _no_rollout(trainer)
    with pytest.raises(ValueError, match="holds 1 batches, fewer than the 2 steps it must skip"):
        trainer.train([_prompts(0)], steps=4, progress=False)


def test_a_cosine_schedule_in_a_step_loop_needs_schedule_steps():
    """Outside `train` there is no total to decay to: the rate would stay at its peak without a word."""
    trainer = OPDTrainer(_tiny(0), _tiny(1), _config(lr_schedule="cosine", lr=1.0))
    _no_rollout(trainer)
    with pytest.raises(ValueError, match="schedule_steps"):
        trainer.step(_prompts())
    trainer = OPDTrainer(_tiny(0), _tiny(1), _config(lr_schedule="cosine", lr=1.0, schedule_steps=4))
    assert trainer.step(_prompts())["lr"] == 1.0 and trainer.lr_at(2) == pytest.approx(0.5)


@pytest.mark.parametrize("where", ["schedule_steps", "train_steps"])
def test_a_warmup_as_long_as_the_cosine_schedule_warns(where):
    """warmup_steps >= the cosine total: the rate only rises and never decays. A warning, not an error, since
    `fastopd distill --steps 10` keeps the default warm-up of 20; one step shorter warns nothing."""
    def trainer(warmup):
        extra = dict(schedule_steps=2) if where == "schedule_steps" else {}
        t = OPDTrainer(_tiny(0), _tiny(1), _config(lr_schedule="cosine", lr=1.0, warmup_steps=warmup, **extra))
        t.train(lambda k: _prompts(k), steps=2, progress=False)
        return t

    with pytest.warns(UserWarning, match=r"warmup_steps=2 is not below the cosine schedule's 2 steps"):
        t = trainer(2)
    assert [m["lr"] for m in t.history] == [pytest.approx(0.5), pytest.approx(1.0)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = trainer(1)
    assert [m["lr"] for m in t.history] == [pytest.approx(1.0), pytest.approx(1.0)]


def test_a_step_after_train_does_not_run_at_the_finished_schedules_zero_rate():
    """train(steps=2) decayed to 0 at step 2; a step() after it took lr=0 and changed nothing, silently."""
    trainer = OPDTrainer(_tiny(0), _tiny(1), _config(lr_schedule="cosine", lr=1e-2))
    history = trainer.train(lambda k: _prompts(k), steps=2, progress=False)
    assert [m["lr"] for m in history] == [pytest.approx(1e-2), pytest.approx(5e-3)]
    _no_rollout(trainer)
    with pytest.raises(ValueError, match="schedule_steps"):
        trainer.step(_prompts(2))


def test_an_evaluator_returning_numpy_numbers_resumes(tmp_path):
    """np.mean gives np.float64: kept as such in eval_history, the checkpoint did not load (weights_only)."""
    def evaluate(trainer):
        return {"acc": np.mean([0.5, 1.0]), "kl": np.float32(0.25), "n": np.int64(3), "t": torch.tensor(2.0)}

    cfg = _config(checkpoint_dir=str(tmp_path / "ckpt"))
    trainer = OPDTrainer(_tiny(0), _tiny(1), cfg, evaluator=evaluate, run_dir=tmp_path / "run")
    trainer.train(lambda k: _prompts(k), steps=1, progress=False)
    assert trainer.eval_history[-1] == {"step": 1, "acc": 0.75, "kl": 0.25, "n": 3, "t": 2.0}
    assert all(type(v) in (int, float) for v in trainer.eval_history[-1].values())
    resumed = OPDTrainer(_tiny(2), _tiny(1), _config(checkpoint_dir=str(tmp_path / "ckpt"), resume=True),
                         evaluator=evaluate)
    assert resumed.global_step == 1 and resumed.eval_history == trainer.eval_history
    bad = OPDTrainer(_tiny(0), _tiny(1), _config(), evaluator=lambda t: 0.5)
    with pytest.raises(ValueError, match="evaluator must return a dict"):
        bad.evaluate()
    bad = OPDTrainer(_tiny(0), _tiny(1), _config(), evaluator=lambda t: {"curve": np.zeros(3)})
    with pytest.raises(ValueError, match="curve="):
        bad.evaluate()


def test_load_checkpoint_on_the_folder_of_checkpoints_says_so(tmp_path):
    trainer = OPDTrainer(_tiny(0), _tiny(1), _config(checkpoint_dir=str(tmp_path)))
    trainer.step(_prompts())
    trainer.save_checkpoint()
    with pytest.raises(FileNotFoundError, match="is a folder of checkpoints, not one checkpoint"):
        trainer.load_checkpoint(tmp_path)
    trainer.load_checkpoint(tmp_path / "step_00000001")
