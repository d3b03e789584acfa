"""TRL and Hugging Face drop-ins: the fused loss equals TRL's generalized_jsd_loss on real GKDTrainer batches,
and the HF helper's loss and gradients equal a plain logits computation."""

from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from fastopd.integrations.hf import causal_lm_hidden_states, distillation_loss, final_softcap  # noqa: E402
from fastopd.integrations.trl import FusedGKDTrainer, GKDTrainer  # noqa: E402

VOCAB = 48


def _llama(seed, hidden=32, layers=2, heads=4, kv=2):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                   max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(cfg)


def _gemma2(seed, softcap, hidden=32):
    torch.manual_seed(seed)
    cfg = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    max_position_embeddings=64, final_logit_softcapping=softcap, pad_token_id=0)
    return transformers.Gemma2ForCausalLM(cfg)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")


def _collate(examples):
    """input_ids/attention_mask/labels (right-padded, prompt masked) and left-padded prompts, as GKDTrainer wants."""
    seqs = [e["prompt_ids"] + e["completion_ids"] for e in examples]
    width = max(map(len, seqs))
    pwidth = max(len(e["prompt_ids"]) for e in examples)
    n = len(examples)
    ids = torch.zeros(n, width, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    labels = torch.full((n, width), -100)
    prompts = torch.zeros(n, pwidth, dtype=torch.long)
    pmask = torch.zeros(n, pwidth, dtype=torch.long)
    for i, e in enumerate(examples):
        s, p = seqs[i], len(e["prompt_ids"])
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        labels[i, p:len(s)] = torch.tensor(e["completion_ids"])
        prompts[i, pwidth - p:] = torch.tensor(e["prompt_ids"])
        pmask[i, pwidth - p:] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "prompts": prompts,
            "prompt_attention_mask": pmask}


def _dataset(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = {"prompt_ids": [], "completion_ids": []}
    for _ in range(n):
        p = int(torch.randint(2, 6, (1,), generator=g))
        c = int(torch.randint(1, 5, (1,), generator=g))
        rows["prompt_ids"].append([1] + torch.randint(3, VOCAB, (p,), generator=g).tolist())
        rows["completion_ids"].append(torch.randint(3, VOCAB, (c,), generator=g).tolist() + [2])
    return datasets.Dataset.from_dict(rows)


class _Recording(FusedGKDTrainer):
    """Records, per training step, fastopd's loss and TRL's generalized_jsd_loss on the very same inputs."""

    records: list

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with torch.no_grad():
            s_logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            t_logits = self.teacher_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            ref = GKDTrainer.generalized_jsd_loss(s_logits[:, :-1], t_logits[:, :-1], inputs["labels"][:, 1:],
                                                  beta=self.beta, num_items_in_batch=num_items_in_batch)
        self.records.append((loss.detach().clone(), ref, bool((inputs["labels"] != -100).any())))
        return loss


@pytest.mark.parametrize("lmbda,beta", [pytest.param(1.0, 0.5, id="on-policy-jsd"),
                                        pytest.param(0.0, 0.1, id="off-policy-beta0.1")])
def test_gkd_trainer_steps_match_trl_loss(tmp_path, lmbda, beta):
    from trl.experimental.gkd import GKDConfig

    student, teacher = _llama(0), _llama(1, hidden=48, layers=3)
    args = GKDConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
                     lmbda=lmbda, beta=beta, max_new_tokens=5, temperature=1.0, report_to=[], logging_steps=1,
                     save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, max_length=64,
                     bf16=False)  # fp32 on both sides: TRL's loss on fp32 logits is the reference
    trainer = _Recording(model=student, teacher_model=teacher, args=args, train_dataset=_dataset(),
                         processing_class=_tokenizer(), data_collator=_collate)
    trainer.records = []
    before = [p.detach().clone() for p in student.parameters()]
    trainer.train()
    assert len(trainer.records) == 3
    for ours, ref, has_tokens in trainer.records:
        assert has_tokens
        torch.testing.assert_close(ours, ref.float(), rtol=2e-5, atol=1e-6)
    changed = sum(int((p.detach() != b).sum()) for p, b in zip(student.parameters(), before))
    assert changed > 0, "the trainer took no optimizer step"


def _shifted_reference_loss(student, teacher, ids, mask, labels, beta, temperature, num_items=None):
    s_logits = student(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
    lab = labels[:, 1:]
    ls = torch.log_softmax(s_logits / temperature, -1)
    lt = torch.log_softmax(t_logits / temperature, -1)
    lm = torch.logsumexp(torch.stack([ls + torch.log1p(torch.tensor(-beta, dtype=torch.float64)),
                                      lt + torch.log(torch.tensor(beta, dtype=torch.float64))]), 0)
    per = beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)
    valid = lab != -100
    return per[valid].sum() / (num_items if num_items is not None else valid.sum())


@pytest.mark.parametrize("mode", ["decoder", "hidden_states"])
def test_hf_distillation_loss_and_grads_match_logits(mode):
    student, teacher = _llama(2), _llama(3, hidden=40, heads=4, kv=4)
    torch.manual_seed(5)
    ids = torch.randint(3, VOCAB, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # prompt
    loss = distillation_loss(student, teacher, ids, mask, labels, beta=0.3, temperature=1.5, mode=mode)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    ref = _shifted_reference_loss(student, teacher, ids, mask, labels, 0.3, 1.5)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-7)
    for n, p in student.named_parameters():
        torch.testing.assert_close(ours[n].double(), p.grad.double(), rtol=1e-4, atol=1e-6, msg=n)


def test_hidden_states_give_the_logits_and_default_labels_skip_padding():
    model = _llama(4)
    ids = torch.randint(3, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    h = causal_lm_hidden_states(model, ids, mask)
    torch.testing.assert_close(h @ model.lm_head.weight.T, model(input_ids=ids, attention_mask=mask).logits)
    teacher = _llama(5)
    with_default = distillation_loss(model, teacher, ids, mask, divergence="fkl")
    explicit = distillation_loss(model, teacher, ids, mask, ids.masked_fill(mask == 0, -100), divergence="fkl")
    torch.testing.assert_close(with_default, explicit, rtol=0, atol=0)


@pytest.mark.parametrize("student_cap,teacher_cap", [pytest.param(None, 2.0, id="llama-student-capped-teacher"),
                                                     pytest.param(2.0, None, id="capped-student-llama-teacher"),
                                                     pytest.param(2.0, 3.0, id="different-caps")])
def test_differing_softcaps_are_refused(student_cap, teacher_cap):
    make = lambda seed, cap: _llama(seed) if cap is None else _gemma2(seed, cap)  # noqa: E731
    student, teacher = make(0, student_cap), make(1, teacher_cap)
    ids = torch.randint(3, VOCAB, (2, 6))
    with pytest.raises(ValueError, match=rf"student's final_logit_softcapping \({student_cap}\) differs from the "
                                         rf"teacher's \({teacher_cap}\): the fused loss applies one softcap"):
        distillation_loss(student, teacher, ids, divergence="fkl")


def test_shared_softcap_matches_the_capped_logits():
    student, teacher = _gemma2(0, softcap=0.5), _gemma2(1, softcap=0.5, hidden=40)  # a cap small enough to bind
    ids = torch.randint(3, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    loss = distillation_loss(student, teacher, ids, mask, beta=0.3)
    ref = _shifted_reference_loss(student, teacher, ids, mask, ids, 0.3, 1.0)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-7)


def test_recurrent_gemma_logits_soft_cap_is_applied():
    """RecurrentGemma caps its logits by `logits_soft_cap`, not `final_logit_softcapping`."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "RecurrentGemmaForCausalLM"):
        pytest.skip("this transformers has no RecurrentGemma")

    def make(seed, hidden=32):
        torch.manual_seed(seed)
        cfg = transformers.RecurrentGemmaConfig(
            vocab_size=VOCAB, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, head_dim=8, lru_width=hidden, attention_window_size=16,
            block_types=["recurrent", "attention"], logits_soft_cap=2.0, pad_token_id=0)
        m = transformers.RecurrentGemmaForCausalLM(cfg)
        with torch.no_grad():
            m.get_output_embeddings().weight.mul_(30.0)  # logits far beyond the cap: it binds
        return m.eval()

    student, teacher = make(0), make(1, hidden=40)
    assert final_softcap(student) == 2.0
    ids = torch.randint(3, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    loss = distillation_loss(student, teacher, ids, mask, beta=0.3)
    ref = _shifted_reference_loss(student, teacher, ids, mask, ids, 0.3, 1.0)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-7)


def test_xlstm_output_logit_soft_cap_is_applied():
    """xLSTM caps its logits by `output_logit_soft_cap` (30 by default) and its forward takes no logits_to_keep, so
    the loss runs its decoder, where the self-check cannot see a missed cap."""
    if not hasattr(transformers, "xLSTMForCausalLM"):
        pytest.skip("this transformers has no xLSTM")

    def make(seed):
        torch.manual_seed(seed)
        cfg = transformers.xLSTMConfig(vocab_size=VOCAB, hidden_size=64, num_heads=1, num_blocks=1,
                                       qk_dim_factor=1.0, v_dim_factor=1.0, mode="train", output_logit_soft_cap=0.5)
        return transformers.xLSTMForCausalLM(cfg)  # random logits reach ~2: a cap of 0.5 binds

    student, teacher = make(0), make(1)
    assert final_softcap(student) == 0.5
    ids = torch.randint(3, VOCAB, (2, 64))  # the native chunkwise kernel needs T divisible by its chunk size, 64
    mask = torch.ones_like(ids)
    loss = distillation_loss(student, teacher, ids, mask, beta=0.3)
    ref = _shifted_reference_loss(student, teacher, ids, mask, ids, 0.3, 1.0)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-7)


def _gkd_trainer(tmp_path, **extra):
    from trl.experimental.gkd import GKDConfig

    args = GKDConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                     max_steps=1, lmbda=0.0, beta=0.5, report_to=[], save_strategy="no", use_cpu=True,
                     disable_tqdm=True, seed=0, max_length=64, bf16=False)
    return FusedGKDTrainer(model=_llama(0), teacher_model=_llama(1, hidden=48, layers=3), args=args,
                           train_dataset=_dataset(), eval_dataset=_dataset(8, seed=1), processing_class=_tokenizer(),
                           data_collator=_collate, **extra)


def test_gkd_evaluate_with_compute_metrics_and_predict_get_the_student_logits(tmp_path):
    seen = []

    def compute_metrics(ev):
        seen.append(ev.predictions.shape)
        return {"n_predictions": float(len(ev.predictions))}

    trainer = _gkd_trainer(tmp_path, compute_metrics=compute_metrics)
    metrics = trainer.evaluate()
    assert metrics["eval_n_predictions"] == 8.0 and seen[0][0] == 8 and seen[0][-1] == VOCAB
    assert metrics["eval_loss"] > 0
    pred = trainer.predict(_dataset(4, seed=2))
    assert pred.predictions.shape[0] == 4 and pred.predictions.shape[-1] == VOCAB


def test_gkd_loss_is_scaled_by_the_ranks_when_tokens_are_counted_across_devices(tmp_path):
    """HF sums num_items_in_batch over the ranks (average_tokens_across_devices) and DDP averages the gradients, so
    Trainer.compute_loss multiplies by the number of ranks; FusedGKDTrainer does too."""
    trainer = _gkd_trainer(tmp_path)
    batch = _collate([_dataset(4)[i] for i in range(4)])
    num_items = torch.tensor(23)
    one_rank = trainer.compute_loss(trainer.model, batch, num_items_in_batch=num_items)
    trainer.accelerator = SimpleNamespace(num_processes=4)  # what compute_loss reads of a 4-rank accelerator
    four_ranks = trainer.compute_loss(trainer.model, batch, num_items_in_batch=num_items)
    torch.testing.assert_close(four_ranks, 4 * one_rank)
    trainer.args.average_tokens_across_devices = False
    torch.testing.assert_close(trainer.compute_loss(trainer.model, batch, num_items_in_batch=num_items), one_rank)


def test_gkd_teacher_with_a_larger_head_uses_the_shared_vocabulary(tmp_path):
    """A teacher whose head has more (padding) rows than the student's, as Qwen2.5 7B's 152064 against 0.5B's
    151936: the loss error said "pass vocab_size=", which FusedGKDTrainer had no way to pass."""
    trainer = _gkd_trainer(tmp_path)
    torch.manual_seed(1)
    cfg = trainer.teacher_model.config
    cfg.vocab_size = VOCAB + 13
    big = transformers.LlamaForCausalLM(cfg).eval()
    trainer.teacher_model = big
    batch = _collate([_dataset(4)[i] for i in range(4)])
    with pytest.raises(ValueError, match="vocab_size"):
        trainer.compute_loss(trainer.model, batch)
    trainer.loss_vocab_size = VOCAB
    loss = trainer.compute_loss(trainer.model, batch)

    class Cropped(torch.nn.Module):  # the teacher's logits over the shared vocabulary, for the reference
        def forward(self, **kw):
            return SimpleNamespace(logits=big(**kw).logits[..., :VOCAB])

    ref = _shifted_reference_loss(trainer.model, Cropped(), batch["input_ids"], batch["attention_mask"],
                                  batch["labels"], trainer.beta, 1.0)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("accumulation,bf16", [pytest.param(2, False, id="grad-accum2-fp32"),
                                               pytest.param(2, True, id="grad-accum2-bf16-autocast")])
def test_gkd_training_updates_match_trl_gkd_trainer(tmp_path, accumulation, bf16):
    """An optimizer step (two micro-batches) of FusedGKDTrainer and of TRL's GKDTrainer (off-policy, SGD, same
    seed) leave the same student: the loss, its num_items_in_batch normalization under gradient accumulation and
    accelerate's autocast all go through the stock Trainer paths."""
    from trl.experimental.gkd import GKDConfig

    def train(cls, out):
        args = GKDConfig(output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=accumulation,
                         max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", lmbda=0.0,
                         beta=0.5, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                         max_length=64, bf16=bf16)
        trainer = cls(model=_llama(0), teacher_model=_llama(1, hidden=48, layers=3), args=args,
                      train_dataset=_dataset(), processing_class=_tokenizer(), data_collator=_collate)
        trainer.train()
        return [p.detach().clone() for p in trainer.model.parameters()]

    start = [p.detach().clone() for p in _llama(0).parameters()]
    ref, ours = train(GKDTrainer, tmp_path / "trl"), train(FusedGKDTrainer, tmp_path / "fastopd")
    moved = max(float((r - s).abs().max()) for r, s in zip(ref, start))
    assert moved > 1e-4
    tol = 1e-2 if bf16 else 1e-3  # under autocast TRL's reference is itself a loss on bf16 logits
    for r, o, s in zip(ref, ours, start):
        torch.testing.assert_close(o - s, r - s, rtol=0, atol=tol * moved)
