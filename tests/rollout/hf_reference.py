"""Hugging Face references the rollout tests compare with."""

import torch


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
