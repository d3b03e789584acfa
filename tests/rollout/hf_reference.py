"""Hugging Face references the rollout tests compare with."""

import torch

from fastopd.rollout import RolloutEngine


def hf_greedy(model, batch, new_tokens, eos_token_id=None, pad_token_id=0):
    """Hugging Face `generate(do_sample=False)` from the batch's prompts: its completion columns. Without EOS it
    runs the full `new_tokens` (as the engine does); with one, rows stop there and are padded as HF pads them.
    The model's generation config holds the EOS for the call: `eos_token_id=None` as a keyword falls back to the
    config's own (2 for LlamaConfig), and `min_new_tokens`, the old way to run the full length, masks that id out
    of the greedy choice, so a model whose argmax is 2 differed from HF for a reason of the harness."""
    p = batch.prompt_width
    default = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos_token_id
    try:
        with torch.no_grad():
            ref = model.generate(input_ids=batch.input_ids[:, :p], attention_mask=batch.attention_mask[:, :p].long(),
                                 max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id)
    finally:
        model.generation_config.eos_token_id = default
    assert ref.shape[1] == p + new_tokens or eos_token_id is not None
    return ref[:, p:]


def hf_hidden(model, ids, mask):
    """HF's final hidden states [B, S, D] of left-padded rows (positions counted from the mask), with autograd."""
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return model.base_model(input_ids=ids, attention_mask=mask.long(), position_ids=positions)[0]


def assert_scores_and_training_forward_match_hf(engine, student, teacher, batch):
    """`engine.score(batch)` equals the teacher's HF forward at the completion positions, `engine.student_hidden`
    the student's, and its parameter gradients under one random upstream gradient equal those of HF's forward
    (1e-5 relative to each tensor's largest gradient: sums in another order). Leaves the student's grads set."""
    p, h = batch.prompt_width, batch.horizon
    m = batch.completion_mask
    scored = engine.score(batch)
    with torch.no_grad():
        ref_t = hf_hidden(teacher, batch.input_ids, batch.attention_mask)[:, p - 1 : p - 1 + h]
    torch.testing.assert_close(scored[m], ref_t[m], rtol=1e-5, atol=1e-5)

    upstream = torch.randn(scored.shape[:2] + (student.config.hidden_size,),
                           generator=torch.Generator().manual_seed(3)) * m[..., None]
    ref_s = hf_hidden(student, batch.input_ids[:, : p + h - 1], batch.attention_mask[:, : p + h - 1])[:, p - 1 :]
    (ref_s * upstream).sum().backward()
    ref_grads = {n: prm.grad.clone() for n, prm in student.named_parameters() if prm.grad is not None}
    student.zero_grad(set_to_none=True)
    hs = engine.student_hidden(batch)
    torch.testing.assert_close(hs[m], ref_s[m].detach(), rtol=1e-5, atol=1e-5)
    (hs * upstream).sum().backward()
    grads = {n: prm.grad for n, prm in student.named_parameters() if prm.grad is not None}
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        scale = float(ref_grads[name].abs().max())
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


def assert_greedy_equals_hf(model, prompts, new_tokens=16):
    """Greedy rollouts of `prompts` equal HF `generate(do_sample=False)`, without EOS and with one (an id the
    second row emits at its fifth step: that row stops there, as HF's does)."""
    batch = RolloutEngine(model, horizon=new_tokens, temperature=0, pad_token_id=0).generate(prompts)
    assert torch.equal(batch.completion_ids, hf_greedy(model, batch, new_tokens))
    eos = int(batch.completion_ids[1, 4])
    stopped = RolloutEngine(model, horizon=new_tokens, temperature=0, eos_token_id=eos,
                            pad_token_id=0).generate(prompts)
    ref = hf_greedy(model, stopped, new_tokens, eos_token_id=eos)
    assert torch.equal(stopped.completion_ids[:, : ref.shape[1]], ref) and not stopped.truncated[1]


def sampled_batch_with_hf_logprobs(model, prompts, temperature=0.9):
    """A sampled batch (3 samples per prompt: prefix sharing, top-k 40, EOS 3) and HF's full-forward log-probs
    of its tokens at `temperature` (float64, 0 past each row's end) to compare `batch.logprobs` with."""
    engine = RolloutEngine(model, horizon=12, num_samples=3, temperature=temperature, top_k=40, eos_token_id=3,
                           generator=torch.Generator().manual_seed(1))
    batch = engine.generate(prompts)
    p, h = batch.prompt_width, batch.horizon
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(),
                       position_ids=(batch.attention_mask.long().cumsum(-1) - 1).clamp(min=0)).logits
    ref = (logits[:, p - 1 : p - 1 + h].double() / temperature).log_softmax(-1)
    return batch, ref.gather(-1, batch.completion_ids[..., None])[..., 0].masked_fill(~batch.completion_mask, 0.0)
