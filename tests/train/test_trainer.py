"""OPDTrainer on tiny models: objectives, the pg loss against a float64 reference, sparse masks, exact resume,
privileged teacher context and a teacher in another dtype; `fastopd distill` end to end on a tiny budget."""

import math

import numpy as np
import pytest
import torch

from fastopd.models import Transformer, TransformerConfig
from fastopd.train import OPDConfig, OPDTrainer
from fastopd.train.task import EOS, PAD, AdditionTask

TASK = AdditionTask(digits=2)
TIMING_KEYS = {"rollout_s", "scoring_s", "update_s", "peak_mem_mb"}


def _tiny(seed: int, hidden: int = 32, layers: int = 1, dtype=torch.float32) -> Transformer:
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=TASK.tokenizer.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_layers=layers, num_heads=2, max_position_embeddings=48)
    return Transformer(cfg).to(dtype)


def _config(**kw) -> OPDConfig:
    base = dict(objective="rkl", lr=3e-3, num_samples=2, max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD, seed=0)
    return OPDConfig(**{**base, **kw})


def _prompts(k: int, n: int = 4):
    return TASK.train_prompts(k, n)


@pytest.mark.parametrize("objective", ["fkl", "rkl", "jsd", "pg"])
def test_each_objective_steps_and_reports_metrics(objective):
    student, teacher = _tiny(0), _tiny(1, hidden=48)
    trainer = OPDTrainer(student, teacher, _config(objective=objective, grad_accum=2))
    before = [p.detach().clone() for p in student.parameters()]
    m = trainer.step(_prompts(0))
    assert set(m) >= {"step", "loss", "rkl", "horizon", "tokens", "rollout_s", "scoring_s", "update_s",
                      "peak_mem_mb", "update_density", "grad_norm", "lr"}
    assert m["step"] == 1 and m["horizon"] == 8 and 0 < m["tokens"] <= 4 * 2 * 8
    assert math.isfinite(m["loss"]) and math.isfinite(m["rkl"]) and m["update_density"] > 0.9
    assert all(not torch.equal(p, b) for p, b in zip(student.parameters(), before))
    assert all(p.grad is None for p in teacher.parameters())


def _reference_losses(trainer, batch):
    """float64 loss and summed sampled reverse KL of one batch, from full logits (independent of the fused op)."""
    s, t = trainer.engine.student, trainer.engine.teacher
    with torch.no_grad():
        hs = trainer.engine.student_hidden(batch).double()
        ht = trainer.engine.score(batch).double()
    zs = hs @ s.output_weight.detach().double().T / trainer.config.temperature
    zt = ht @ t.output_weight.detach().double().T / trainer.config.temperature
    ls, lt = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    y = batch.completion_ids
    mask = batch.completion_mask
    lps, lpt = ls.gather(-1, y[..., None])[..., 0], lt.gather(-1, y[..., None])[..., 0]
    r = (lps - lpt) * mask
    n = mask.sum()
    cfg = trainer.config
    if cfg.objective == "pg":
        w = (lps - batch.logprobs.double()).exp().clamp(max=cfg.pg_ratio_cap)
        loss = (w * r * lps).sum() / n  # (1/N) sum w r log p_s: r is a cost
    elif cfg.objective == "rkl":
        loss = ((ls.exp() * (ls - lt)).sum(-1) * mask).sum() / n
    else:
        loss = ((lt.exp() * (lt - ls)).sum(-1) * mask).sum() / n
    return loss, r.sum()


@pytest.mark.parametrize("objective,temperature", [("pg", 1.0), ("pg", 0.7), ("rkl", 1.3), ("fkl", 1.0)])
def test_loss_matches_float64_reference(objective, temperature):
    trainer = OPDTrainer(_tiny(2), _tiny(3, hidden=40), _config(objective=objective, temperature=temperature))
    torch.manual_seed(7)
    batch = trainer.engine.generate(_prompts(3, 5))
    num = batch.completion_mask.sum()
    loss, rkl_sum = trainer._loss(batch, trainer.engine.student_hidden(batch), trainer.engine.score(batch), num)
    ref_loss, ref_rkl = _reference_losses(trainer, batch)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rkl_sum.double(), ref_rkl, rtol=1e-5, atol=1e-5)


def test_pg_gradient_is_the_importance_weighted_policy_gradient():
    """d loss / d logits of the pg surrogate = (1/N) w r (onehot(y) - p_s), checked against autograd in float64."""
    trainer = OPDTrainer(_tiny(4), _tiny(5), _config(objective="pg"))
    torch.manual_seed(1)
    batch = trainer.engine.generate(_prompts(1, 3))
    n = batch.completion_mask.sum()
    hs = trainer.engine.student_hidden(batch).detach().requires_grad_()
    loss, _ = trainer._loss(batch, hs, trainer.engine.score(batch), n)
    loss.backward()
    w_s = trainer.engine.student_output_weight.detach().double()
    h = hs.detach().double().requires_grad_()
    ref_loss, _ = _reference_losses(trainer, batch)  # value check of the same surrogate
    ls = torch.log_softmax(h @ w_s.T, -1)
    with torch.no_grad():
        lt = torch.log_softmax(trainer.engine.score(batch).double() @ trainer.engine.teacher_output_weight.double().T,
                               -1)
    y, mask = batch.completion_ids, batch.completion_mask
    lps = ls.gather(-1, y[..., None])[..., 0]
    coef = ((lps - lt.gather(-1, y[..., None])[..., 0]) * (lps - batch.logprobs.double()).exp().clamp(max=2.0)
            * mask).detach()
    ((coef * lps).sum() / n).backward()  # surrogate: (1/N) sum w r log p_s, r a cost (the documented sign)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hs.grad.double(), h.grad, rtol=1e-4, atol=1e-7)


def test_sparse_masks_keep_unmasked_weights_bitwise():
    from fastopd.optim import masks as mask_lib

    student, teacher = _tiny(6), _tiny(7)
    masks = mask_lib.random(student, 0.1, generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer = OPDTrainer(student, teacher, _config(masks=masks, weight_decay=0.1))
    for k in range(3):
        m = trainer.step(_prompts(k))
    changed = 0
    for name, p in student.named_parameters():
        keep = torch.ones(p.numel(), dtype=torch.bool)
        keep[masks[name]] = False
        flat, ref = p.detach().reshape(-1), before[name].reshape(-1)
        assert torch.equal(flat[keep], ref[keep]), name
        changed += int((flat[~keep] != ref[~keep]).sum())
    total = sum(p.numel() for p in student.parameters())
    assert changed > 0.05 * total
    assert m["update_density"] == pytest.approx(changed / total)


def test_a_mask_file_made_for_another_student_size_is_refused(tmp_path):
    """Index masks of a smaller student's parameters fit the larger one's index range and trained the wrong
    coordinates without a word; the shapes the file records tell them apart."""
    from fastopd.optim import masks as mask_lib

    small, big = _tiny(6, hidden=32), _tiny(6, hidden=48)
    path = str(tmp_path / "small.safetensors")
    mask_lib.save(path, mask_lib.random(small, 0.1, generator=torch.Generator().manual_seed(0)),
                  shapes={n: p.shape for n, p in small.named_parameters()})
    OPDTrainer(_tiny(6, hidden=32), _tiny(7), _config(masks=path))  # the student it was made for
    with pytest.raises(ValueError, match=r"small.safetensors: mask '.*' was made for a parameter of shape "
                                         r"\(\d+, 32\), the student's is \(\d+, 48\)"):
        OPDTrainer(big, _tiny(7), _config(masks=path))


def _strip(history):
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in history]


@pytest.mark.parametrize("objective", ["rkl", "pg"])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, objective):
    cfg = dict(objective=objective, warmup_steps=3, checkpoint_every=2)
    straight = OPDTrainer(_tiny(8), _tiny(9), _config(**cfg, checkpoint_dir=str(tmp_path / "a")))
    straight.train(_prompts, 5, progress=False)

    first = OPDTrainer(_tiny(8), _tiny(9), _config(**cfg, checkpoint_dir=str(tmp_path / "b")))
    first.train(_prompts, 2, progress=False)
    torch.manual_seed(12345)  # disturb every global RNG in between: the checkpoint must restore them
    resumed = OPDTrainer(_tiny(8), _tiny(9), _config(**cfg, checkpoint_dir=str(tmp_path / "b"), resume=True))
    assert resumed.global_step == 2
    resumed.train(_prompts, 5, progress=False)
    assert _strip(resumed.history) == _strip(straight.history)
    for p, q in zip(resumed.student.parameters(), straight.student.parameters()):
        assert torch.equal(p, q)


def _counting(seen):
    """Batch k = _prompts(k), recording every k drawn."""
    k = 0
    while True:
        seen.append(k)
        yield _prompts(k)
        k += 1


def test_iterator_source_is_read_on_and_skips_only_restored_steps(tmp_path):
    seen = []
    gen = _counting(seen)
    trainer = OPDTrainer(_tiny(2), _tiny(3), _config(checkpoint_dir=str(tmp_path)))
    trainer.train(gen, 1, progress=False)
    trainer.train(gen, 2, progress=False)  # the same generator goes on: no batch thrown away
    assert seen == [0, 1]
    seen.clear()
    gen = _counting(seen)
    resumed = OPDTrainer(_tiny(2), _tiny(3), _config(checkpoint_dir=str(tmp_path), resume=True))
    resumed.train(gen, 3, progress=False)  # a fresh generator: the 2 restored steps' batches are skipped, once
    resumed.train(gen, 4, progress=False)
    assert seen == [0, 1, 2, 3]


def test_collection_source_is_read_from_its_start_past_finished_steps():
    class Batches:  # a re-iterable collection: every iter() starts at batch 0
        def __iter__(self):
            return _counting(seen)

    seen = []
    trainer = OPDTrainer(_tiny(2), _tiny(3), _config())
    trainer.train(Batches(), 1, progress=False)
    trainer.train(Batches(), 2, progress=False)
    assert seen == [0, 0, 1]


def test_resume_after_a_crash_keeps_one_log_line_per_step(tmp_path):
    import json

    class Crash(Exception):
        pass

    def dies_before_step_4(k):
        if k == 3:
            raise Crash
        return _prompts(k)

    cfg = dict(checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=2, eval_every=1)
    evaluator = lambda trainer: {"x": 1.0}  # noqa: E731
    first = OPDTrainer(_tiny(8), _tiny(9), _config(**cfg), evaluator=evaluator, run_dir=tmp_path)
    with pytest.raises(Crash):  # step 3 is logged, the last checkpoint is step 2's
        first.train(dies_before_step_4, 5, progress=False)
    steps = lambda name: [json.loads(line)["step"] for line in (tmp_path / name).read_text().splitlines()]  # noqa: E731
    resumed = OPDTrainer(_tiny(8), _tiny(9), _config(**cfg, resume=True), evaluator=evaluator, run_dir=tmp_path)
    assert resumed.global_step == 2
    assert steps("metrics.jsonl") == [1, 2, 3]  # building the trainer writes nothing (the caller may still fail)
    resumed.train(_prompts, 2, progress=False)  # no step left to take: the logs still become the histories
    assert steps("metrics.jsonl") == [1, 2] and steps("eval.jsonl") == [0, 1, 2]
    resumed.train(_prompts, 4, progress=False)
    assert steps("metrics.jsonl") == [1, 2, 3, 4]
    assert steps("eval.jsonl") == [0, 1, 2, 3, 4]


def test_run_logs_are_strict_json_with_a_nan_metric(tmp_path):
    """A diverged number (an evaluator's NaN, a loss gone inf) was written as a bare NaN/Infinity, which jq,
    JavaScript and pandas' default reader refuse; it is written as null."""
    import json

    def refuse(constant):
        raise ValueError(f"bare {constant} in a log line")

    evaluator = lambda trainer: {"x": float("nan"), "y": float("-inf"), "z": 1.5}  # noqa: E731
    trainer = OPDTrainer(_tiny(8), _tiny(9), _config(eval_every=1), evaluator=evaluator, run_dir=tmp_path)
    trainer.train(_prompts, 1, progress=False)
    lines = (tmp_path / "eval.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=refuse) for line in lines]
    assert [(r["x"], r["y"], r["z"]) for r in records] == [(None, None, 1.5)] * 2
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=refuse)


def test_sparse_optimizer_state_resumes(tmp_path):
    from fastopd.optim import masks as mask_lib

    def make(folder, resume=False):
        student = _tiny(10)
        masks = mask_lib.random(student, 0.2, generator=torch.Generator().manual_seed(1))
        return OPDTrainer(student, _tiny(11), _config(masks=masks, checkpoint_dir=str(tmp_path / folder),
                                                      resume=resume))

    straight = make("a")
    straight.train(_prompts, 4, progress=False)
    make("b").train(_prompts, 2, progress=False)
    resumed = make("b", resume=True)
    assert resumed.global_step == 2
    resumed.train(_prompts, 4, progress=False)
    assert _strip(resumed.history) == _strip(straight.history)


@pytest.mark.parametrize("dtype,masked,warns", [
    pytest.param(torch.bfloat16, False, True, id="bf16-dense-warns"),
    pytest.param(torch.float16, False, True, id="fp16-dense-warns"),
    pytest.param(torch.bfloat16, True, False, id="bf16-every-tensor-masked-has-masters"),
    pytest.param(torch.float32, False, False, id="fp32-dense-quiet")])
def test_a_low_precision_student_trained_densely_is_warned_about(dtype, masked, warns):
    """A bf16 student under torch's AdamW (no fp32 masters) silently lost every update below half a bf16 spacing:
    at lr 1e-5 about 15% of the weights ever moved, against 26% with SparseMaskedAdamW's masters."""
    import warnings

    from fastopd.optim import masks as mask_lib

    student = _tiny(14, dtype=dtype)
    masks = mask_lib.random(student, 0.5, generator=torch.Generator().manual_seed(0)) if masked else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        OPDTrainer(student, _tiny(15), _config(masks=masks))
    msgs = [str(w.message) for w in caught if "master weights" in str(w.message)]
    assert len(msgs) == int(warns), msgs
    if warns:
        assert str(dtype) in msgs[0] and caught[0].filename == __file__


def test_privileged_teacher_prompt_and_bf16_teacher():
    student, teacher = _tiny(12), _tiny(13, hidden=48, dtype=torch.bfloat16)
    seen = []

    def hint(prompts):
        seen.append(len(prompts))
        return [[p[0]] + TASK.tokenizer.encode("0+0=0|0,") + p[1:] for p in prompts]

    trainer = OPDTrainer(student, teacher, _config(objective="jsd"), teacher_prompt_fn=hint)
    m = trainer.step(_prompts(0, 3))
    assert seen == [3] and math.isfinite(m["loss"])
    self_trainer = OPDTrainer(student, student, _config(objective="fkl"), teacher_prompt_fn=hint)  # self-distillation
    assert math.isfinite(self_trainer.step(_prompts(1, 3))["loss"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="teacher"):
        OPDTrainer(_tiny(0), None, _config())
    trainer = OPDTrainer(_tiny(0), _tiny(1), _config(grad_accum=4))
    with pytest.raises(ValueError, match="grad_accum=4"):
        trainer.step(_prompts(0, 3))
    with pytest.raises(ValueError, match="masks name parameters"):
        OPDTrainer(_tiny(0), _tiny(1), _config(masks={"nope.weight": torch.tensor([0])}))


def test_a_mask_file_with_hugging_face_names_trains_the_matching_parameters(tmp_path):
    """`fastopd analyze` on Hugging Face checkpoints writes "model.layers..." names; the trainer maps a file one
    uniform prefix away onto the student's names and trains exactly those coordinates of that parameter (the
    parameters without a mask train densely, as always)."""
    from fastopd.optim import masks as mask_io

    student = _tiny(0)
    names = [n for n, _ in student.named_parameters()]
    target = next(n for n in names if n.startswith("layers.") and n.endswith("weight"))
    mask = torch.zeros(dict(student.named_parameters())[target].shape, dtype=torch.bool)
    mask.view(-1)[::7] = True
    path = tmp_path / "hf.safetensors"
    mask_io.save(str(path), {"model." + target: mask})
    trainer = OPDTrainer(student, _tiny(1), _config(masks=str(path)))
    assert set(trainer.optimizer.mask_indices()) == {target}
    before = dict(student.named_parameters())[target].detach().clone()
    trainer.step(_prompts(0, 3))
    moved = (dict(student.named_parameters())[target] != before).view(-1)
    assert moved[mask.view(-1)].any() and not moved[~mask.view(-1)].any()


def test_resume_keeps_the_evaluation_at_the_step_where_the_first_run_ended(tmp_path):
    import json

    cfg = dict(checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=2, eval_every=2)
    evaluator = lambda trainer: {"x": float(trainer.global_step)}  # noqa: E731
    first = OPDTrainer(_tiny(8), _tiny(9), _config(**cfg), evaluator=evaluator, run_dir=tmp_path)
    first.train(_prompts, 2, progress=False)  # its last evaluation (step 2) must reach the step-2 checkpoint
    resumed = OPDTrainer(_tiny(8), _tiny(9), _config(**cfg, resume=True), evaluator=evaluator, run_dir=tmp_path)
    assert [e["step"] for e in resumed.eval_history] == [0, 2]
    resumed.train(_prompts, 4, progress=False)
    assert [e["step"] for e in resumed.eval_history] == [0, 2, 4]
    assert [json.loads(line)["step"] for line in (tmp_path / "eval.jsonl").read_text().splitlines()] == [0, 2, 4]


def _masked_trainer(folder, masks=None, resume=False, density=0.2, seed=1):
    from fastopd.optim import masks as mask_lib

    student = _tiny(10)
    if masks == "random":
        masks = mask_lib.random(student, density, generator=torch.Generator().manual_seed(seed))
    return OPDTrainer(student, _tiny(11), _config(masks=masks, checkpoint_dir=str(folder), resume=resume))


def test_resuming_a_masked_run_without_masks_goes_on_with_the_checkpoints_masks(tmp_path):
    from fastopd.optim import SparseMaskedAdamW

    straight = _masked_trainer(tmp_path / "a", "random")
    straight.train(_prompts, 3, progress=False)
    _masked_trainer(tmp_path / "b", "random").train(_prompts, 1, progress=False)
    resumed = _masked_trainer(tmp_path / "b", masks=None, resume=True)  # no masks given: the checkpoint's
    assert isinstance(resumed.optimizer, SparseMaskedAdamW) and resumed.masks_from_checkpoint
    assert resumed.trainable_count() == straight.trainable_count() < sum(p.numel() for p in straight.params)
    resumed.train(_prompts, 3, progress=False)
    assert _strip(resumed.history) == _strip(straight.history)
    for p, q in zip(resumed.student.parameters(), straight.student.parameters()):
        assert torch.equal(p, q)


def test_resuming_with_other_masks_keeps_the_checkpoints_and_says_so(tmp_path):
    first = _masked_trainer(tmp_path, "random", density=0.5)
    first.train(_prompts, 1, progress=False)
    same = _masked_trainer(tmp_path, "random", density=0.5, resume=True)
    assert not same.masks_from_checkpoint
    other = _masked_trainer(tmp_path, "random", density=0.1, seed=2, resume=True)
    assert other.masks_from_checkpoint and other.trainable_count() == first.trainable_count()


def test_a_dense_run_resumed_with_masks_trains_only_the_masked_coordinates(tmp_path):
    _masked_trainer(tmp_path).train(_prompts, 1, progress=False)
    resumed = _masked_trainer(tmp_path, "random", resume=True)
    assert resumed.sparse and not resumed.masks_from_checkpoint
    before = {n: p.detach().clone() for n, p in resumed.student.named_parameters()}
    resumed.train(_prompts, 2, progress=False)
    changed = sum(int((p.detach() != before[n]).sum()) for n, p in resumed.student.named_parameters())
    assert 0 < changed <= resumed.trainable_count()


def test_load_checkpoint_refuses_what_does_not_fit_before_loading_anything(tmp_path):
    _masked_trainer(tmp_path / "masked", "random").train(_prompts, 1, progress=False)
    dense = _masked_trainer(tmp_path / "dense")
    weights = [p.detach().clone() for p in dense.student.parameters()]
    with pytest.raises(ValueError, match="sparse-masked optimizer state"):
        dense.load_checkpoint(tmp_path / "masked" / "step_00000001")
    OPDTrainer(_tiny(10, hidden=40), _tiny(11), _config(checkpoint_dir=str(tmp_path / "wide"))).save_checkpoint()
    with pytest.raises(ValueError, match=r"embed_tokens.weight has shape \(\d+, 40\) there, \(\d+, 32\)"):
        dense.load_checkpoint(tmp_path / "wide" / "step_00000000")
    assert dense.global_step == 0 and all(torch.equal(p, w) for p, w in zip(dense.student.parameters(), weights))


def test_resume_lists_the_options_it_changes_not_callable_identities(tmp_path):
    cfg = dict(checkpoint_dir=str(tmp_path / "ckpt"))
    first = OPDTrainer(_tiny(8), _tiny(9), _config(**cfg, horizon=lambda k: 3))
    first.train(_prompts, 1, progress=False)
    same = OPDTrainer(_tiny(8), _tiny(9), _config(**cfg, horizon=lambda k: 3, resume=True))
    assert same.global_step == 1 and same.changed_options == {}  # another lambda: its repr differs by address only
    other = OPDTrainer(_tiny(8), _tiny(9), _config(**cfg, horizon=lambda k: 3, resume=True, lr=1e-3,
                                                    objective="fkl", keep_checkpoints=5))
    assert other.changed_options == {"lr": (3e-3, 1e-3), "objective": ("rkl", "fkl")}


@pytest.mark.parametrize("masked", [pytest.param(False, id="dense-AdamW"), pytest.param(True, id="SparseMaskedAdamW")])
def test_optimizer_options_changed_on_resume_take_effect(tmp_path, masked):
    """betas, eps and weight_decay a resumed run changes are listed in changed_options as applying from the resumed
    step on: the optimizer state loaded from the checkpoint must not put the old run's values back."""
    from fastopd.optim import masks as mask_lib

    def make(resume=False, **kw):
        student = _tiny(8)
        masks = mask_lib.random(student, 0.5, generator=torch.Generator().manual_seed(0)) if masked else None
        return OPDTrainer(student, _tiny(9), _config(checkpoint_dir=str(tmp_path), masks=masks, resume=resume, **kw))

    make().train(_prompts, 1, progress=False)
    new = dict(betas=(0.5, 0.9), eps=1e-3, weight_decay=0.1)
    resumed = make(resume=True, **new)
    assert set(resumed.changed_options) == set(new)
    for group in resumed.optimizer.param_groups:
        assert (tuple(group["betas"]), group["eps"], group["weight_decay"]) == (new["betas"], new["eps"],
                                                                                new["weight_decay"])


def test_a_seed_changed_on_resume_takes_effect(tmp_path):
    """The checkpoint's RNG state was restored whatever the seed, so a resume with another seed (reported as
    applying from the resumed step on) sampled exactly the old run's rollouts. Now the streams are reseeded from
    the new seed, and a resume with the same seed still reproduces the uninterrupted run."""
    import shutil

    def make(name, **kw):
        return OPDTrainer(_tiny(8), _tiny(9), _config(checkpoint_dir=str(tmp_path / name), **kw))

    straight = make("a")
    straight.train(_prompts, 3, progress=False)
    make("b").train(_prompts, 1, progress=False)
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    same = make("b", resume=True)
    assert same.changed_options == {}
    same.train(_prompts, 3, progress=False)
    assert _strip(same.history) == _strip(straight.history)
    reseeded = make("c", resume=True, seed=7)
    assert reseeded.changed_options == {"seed": (0, 7)} and reseeded.global_step == 1
    reseeded.train(_prompts, 3, progress=False)
    assert _strip(reseeded.history)[0] == _strip(straight.history)[0]
    assert _strip(reseeded.history)[1]["loss"] != _strip(straight.history)[1]["loss"]


@pytest.mark.parametrize("steps,ok", [
    pytest.param(2.5, False, id="fractional"), pytest.param(True, False, id="bool"),
    pytest.param(np.True_, False, id="numpy-bool"),
    pytest.param("2", False, id="string"), pytest.param(2.0, True, id="integral-float"),
    pytest.param(np.int64(2), True, id="numpy-int")])
def test_train_steps_must_be_a_whole_number(steps, ok):
    """train(src, 2.5) ran 3 steps under a cosine schedule planned over 2.5; True ran one step."""
    trainer = OPDTrainer(_tiny(8), _tiny(9), _config())
    if ok:
        trainer.train(_prompts, steps, progress=False)
        assert trainer.global_step == 2 and type(trainer.global_step) is int
    else:
        with pytest.raises(ValueError, match="steps must be a whole number of steps"):
            trainer.train(_prompts, steps, progress=False)
