"""The Python examples of README.md and docs/*.md run as written, on tiny random-weight models, so the documentation
cannot drift from the API unseen. Each ```python block is either executed here (with the names it takes for
granted bound to small stand-ins) or listed in NOT_RUN with the reason; a new block that is neither fails
`test_every_example_is_run_or_excused`. Where an example names sizes meant for a real run (1000 steps, 1024 new
tokens), SHRINK swaps them for small ones; each swap must still find its text, so an edit of the example that
drops it fails too."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def examples() -> dict[str, str]:
    """`FILE#i` -> the i-th ```python block of FILE (0-based)."""
    out = {}
    for name in DOCS:
        for i, code in enumerate(BLOCK.findall((ROOT / name).read_text())):
            out[f"{name}#{i}"] = code
    return out


NOT_RUN = {
    "docs/distributed.md#0": "a fragment under a tensor-parallel process group (h_s, w_s_shard, tp_group); the "
                             "vocab-parallel loss is run under torch.distributed by "
                             "tests/distributed/test_vocab_parallel.py",
    "docs/training.md#1": "GKDConfig(...) is a placeholder for the reader's TRL options; FusedGKDTrainer is run by "
                          "tests/integrations/test_trl_hf.py",
}

# Sizes meant for a real run, shrunk for CI: (old text, new text); each old text must occur in its example.
SHRINK = {
    "README.md#1": [("steps=1000", "steps=2"),
                    ("Horizon.progressive(64, 64, 100, 1024)", "Horizon.progressive(4, 2, 1, 8)")],
    "README.md#2": [("max_new_tokens=1024", "max_new_tokens=40")],
    "docs/rollout.md#0": [("max_new_tokens=1024", "max_new_tokens=40")],
    "docs/training.md#0": [("schedule_steps=1000", "schedule_steps=4"), ("steps=1000", "steps=2"),
                           ("max_new_tokens=64), ", "max_new_tokens=8), "),
                           ("max_new_tokens=64, ", "max_new_tokens=8, ")],
}

VOCAB, PAD, EOS = 61, 0, 1


def _builtin(seed: int, hidden: int) -> torch.nn.Module:
    from fastopd.models import Transformer, TransformerConfig

    torch.manual_seed(seed)
    return Transformer(TransformerConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                         num_layers=2, num_heads=2, max_position_embeddings=128,
                                         initializer_range=0.1))


def _prompts() -> list[list[int]]:
    return [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]


def _loss_names(tmp: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    n, ds, dt = 13, 24, 40
    hs, ht = torch.randn(n, ds, requires_grad=True), torch.randn(n, dt)
    ws, wt = torch.randn(VOCAB, ds, requires_grad=True), torch.randn(VOCAB, dt)
    labels = torch.randint(0, VOCAB, (n,))
    return dict(student_hidden=hs, student_weight=ws, teacher_hidden=ht, teacher_weight=wt, hs=hs, ws=ws, ht=ht,
                wt=wt, labels=labels, student_logits=(hs @ ws.T).detach().requires_grad_(), teacher_logits=ht @ wt.T)


def _trainer_names(tmp: Path) -> dict[str, Any]:
    prompts = _prompts()
    return dict(student=_builtin(0, 32), teacher=_builtin(1, 48), prompts=prompts, prompt_source=lambda k: prompts)


def _rollout_names(tmp: Path) -> dict[str, Any]:
    return {**_trainer_names(tmp), "eos": EOS, "pad": PAD, "k": 3}


def _hf_names(tmp: Path) -> dict[str, Any]:
    """Two Hugging Face Llamas sharing a tokenizer built from a word-level vocabulary (no download)."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    words = ["<pad>", "<eos>", *[f"w{i}" for i in range(VOCAB - 2)]]
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0")
    raw = tokenizers.Tokenizer(model)
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>",
                                               padding_side="left")

    def llama(seed: int, hidden: int) -> Any:
        torch.manual_seed(seed)
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                       max_position_embeddings=128, pad_token_id=PAD, eos_token_id=EOS)
        return transformers.LlamaForCausalLM(cfg).eval()

    texts = ["w3 w4 w5", "w6 w7", "w8 w9 w10 w11"]
    return dict(student=llama(0, 32), teacher=llama(1, 48), tok=tok, texts=texts, k=2)


def _optim_names(tmp: Path) -> dict[str, Any]:
    from fastopd.optim import masks

    model = _builtin(0, 32)
    masks.save(str(tmp / "mask.safetensors"), masks.random(model.named_parameters(), density=0.25))
    out = model(torch.tensor([[5, 6, 7, 8]]))
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return dict(model=model, loss=logits.float().square().mean())


def _analysis_names(tmp: Path) -> dict[str, Any]:
    base = _builtin(0, 32)
    base.save_pretrained(tmp / "base_model")
    with torch.no_grad():
        for p in base.parameters():
            p[..., :3] += 0.01
    base.save_pretrained(tmp / "tuned_model")
    return {}


def _training_names(tmp: Path) -> dict[str, Any]:
    ns = _hf_names(tmp)
    prompts = [ns["tok"](t)["input_ids"] for t in ns["texts"]]
    batch = ns["tok"](ns["texts"], padding=True, return_tensors="pt")
    return dict(ns, prompts=prompts, ids=batch["input_ids"], mask=batch["attention_mask"],
                prompts_of_step=lambda k: prompts)


def _tiny_rows() -> list[dict[str, list[int]]]:
    return [{"input_ids": [3 + i, 4 + i, 5 + i, 6 + i], "attention_mask": [1, 1, 1, 1],
             "labels": [-100, 4 + i, 5 + i, 6 + i]} for i in range(4)]


def _training_args(**kw: Any) -> Any:
    import transformers

    return transformers.TrainingArguments(output_dir="hf_out", max_steps=2, per_device_train_batch_size=2,
                                          report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, **kw)


def _hf_optim_names(tmp: Path) -> dict[str, Any]:
    """docs/optim.md#1 continues #0: SparseMaskedAdamW and a mask dict in hand, inside a transformers.Trainer."""
    import transformers

    from fastopd.optim import SparseMaskedAdamW, masks

    model = _hf_names(tmp)["student"].train()
    mask_dict = masks.random(model.named_parameters(), density=0.25)
    return dict(Trainer=transformers.Trainer, model=model, args=_training_args(weight_decay=0.1), ds=_tiny_rows(),
                SparseMaskedAdamW=SparseMaskedAdamW, mask_dict=mask_dict,
                before={n: p.detach().clone() for n, p in model.named_parameters()})


def _hf_trainer_names(tmp: Path) -> dict[str, Any]:
    ns = _hf_names(tmp)
    return dict(student=ns["student"], teacher=ns["teacher"])


SETUP: dict[str, Callable[[Path], dict[str, Any]]] = {
    "README.md#0": _loss_names,
    "README.md#1": _trainer_names,
    "README.md#2": _rollout_names,
    "README.md#3": _optim_names,
    "docs/analysis.md#0": _analysis_names,
    "docs/optim.md#0": _optim_names,
    "docs/optim.md#1": _hf_optim_names,
    "docs/rollout.md#0": _hf_names,
    "docs/training.md#0": _training_names,
    "docs/training.md#2": _hf_trainer_names,
    "docs/training.md#3": lambda tmp: {},
}


def _check(key: str, ns: dict[str, Any]) -> None:
    """What each example leaves behind, checked beyond 'it ran'."""
    if key == "README.md#0":
        assert math.isfinite(float(ns["loss"].detach()))
    elif key in ("README.md#1", "docs/training.md#0"):
        assert math.isfinite(float(ns["metrics"]["loss"]))
        assert (Path("ckpt")).is_dir()
    elif key == "README.md#2":
        assert ns["teacher_hidden"].shape[:2] == ns["batch"].completion_mask.shape
    elif key == "README.md#3":
        assert type(ns["opt"]).__name__ == "SparseMaskedAdamW"
    elif key == "docs/analysis.md#0":
        assert (Path("report_dir") / "report.json").is_file() and Path("masks.safetensors").is_file()
        assert 0.0 < ns["report"].summary["density_exact"] < 1.0
    elif key == "docs/optim.md#0":  # one masked step: state for the mask's coordinates only
        state = [s for s in ns["opt"].state.values() if "exp_avg" in s]
        assert state and all(s["exp_avg"].numel() < p.numel() for p, s in ns["opt"].state.items() if "exp_avg" in s)
    elif key == "docs/optim.md#1":  # two Trainer steps moved masked coordinates only
        moved = 0
        for n, p in ns["model"].named_parameters():
            changed = (p.detach() != ns["before"][n]).flatten().nonzero().flatten()
            assert torch.isin(changed, ns["mask_dict"][n].to(changed.device)).all(), n
            moved += changed.numel()
        assert moved > 0
    elif key == "docs/rollout.md#0":
        assert math.isfinite(float(ns["loss"].detach())) and ns["student_hidden"].grad_fn is not None
    elif key == "docs/training.md#2":  # the documented Trainer subclass, trained for two steps
        trainer = ns["DistillTrainer"](model=ns["student"], args=_training_args(), train_dataset=_tiny_rows(),
                                       teacher=ns["teacher"])
        before = ns["student"].lm_head.weight.detach().clone()
        out = trainer.train()
        assert math.isfinite(out.training_loss) and not torch.equal(before, ns["student"].lm_head.weight)
    elif key == "docs/training.md#3":
        assert callable(ns["LigerFusedLinearJSDLoss"])


def test_every_example_is_run_or_excused():
    keys, known = set(examples()), set(SETUP) | set(NOT_RUN)
    assert keys == known, f"not classified: {sorted(keys - known)}; gone: {sorted(known - keys)}"
    assert not set(SETUP) & set(NOT_RUN)


@pytest.mark.parametrize("key", sorted(SETUP))
def test_example_runs_as_written(key, tmp_path, monkeypatch):
    code = examples()[key]
    for old, new in SHRINK.get(key, []):
        assert old in code, f"{key}: the example no longer holds {old!r}; update SHRINK"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    ns = SETUP[key](tmp_path)
    exec(compile(code, key, "exec"), ns)  # noqa: S102 - the documentation's own code
    _check(key, ns)
