"""Mask tools: module kinds, selection (radix select against a sort), sources, files, summary."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fastopd.optim import SparseMaskedAdamW, masks
from fastopd.optim.masks import _sortable_keys, _top_indices

KIND_CASES = [
    ("model.embed_tokens.weight", "embedding"),
    ("model.layers.0.self_attn.q_proj.weight", "attn_q"),
    ("model.layers.0.self_attn.q_proj.bias", "attn_q"),
    ("model.layers.0.self_attn.k_proj.weight", "attn_k"),
    ("model.layers.0.self_attn.v_proj.weight", "attn_v"),
    ("model.layers.0.self_attn.o_proj.weight", "attn_o"),
    ("model.layers.11.mlp.gate_proj.weight", "ffn_gate"),
    ("model.layers.11.mlp.up_proj.weight", "ffn_up"),
    ("model.layers.11.mlp.down_proj.weight", "ffn_down"),
    ("model.layers.0.input_layernorm.weight", "norm"),
    ("model.layers.0.post_attention_layernorm.weight", "norm"),
    ("model.layers.0.self_attn.q_norm.weight", "norm"),
    ("model.norm.weight", "norm"),
    ("lm_head.weight", "lm_head"),
    ("transformer.wte.weight", "embedding"),
    ("transformer.wpe.weight", "embedding"),
    ("transformer.h.3.ln_1.weight", "norm"),
    ("transformer.h.3.attn.c_attn.weight", "attn_qkv"),
    ("transformer.h.3.attn.c_proj.weight", "attn_o"),
    ("transformer.h.3.mlp.c_fc.bias", "ffn_up"),
    ("transformer.h.3.mlp.c_proj.weight", "ffn_down"),
    ("transformer.ln_f.bias", "norm"),
    ("layers.0.attention.wo.weight", "attn_o"),  # Meta-Llama checkpoints
    ("layers.0.feed_forward.w2.weight", "ffn_down"),
    ("tok_embeddings.weight", "embedding"),
    ("encoder.block.0.layer.1.DenseReluDense.wo.weight", "ffn_down"),  # T5
    ("gpt_neox.embed_in.weight", "embedding"),
    ("something.else", "other"),
]


@pytest.mark.parametrize("name,kind", KIND_CASES, ids=[c[0] for c in KIND_CASES])
def test_module_kind(name, kind):
    assert masks.module_kind(name) == kind


def test_module_kind_is_the_analysis_classifier():
    """One classifier: the masks' kinds are fastopd.analysis's, with its "embed" named "embedding"."""
    from fastopd.analysis import KINDS
    from fastopd.analysis import module_kind as analysis_kind

    rename = {"embed": "embedding"}
    assert masks.MODULE_KINDS == tuple(rename.get(k, k) for k in KINDS)
    for name, _ in KIND_CASES:
        assert masks.module_kind(name) == rename.get(analysis_kind(name), analysis_kind(name)), name


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_module_kind_covers_real_models(family):
    """Every parameter of tiny Llama/Qwen2/GPT-2 models from transformers gets a kind other than "other"."""
    transformers = pytest.importorskip("transformers")
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    else:
        cfg_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family]
        cfg = cfg_cls(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=50, tie_word_embeddings=False)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    kinds = {n: masks.module_kind(n) for n, _ in model.named_parameters()}
    assert "other" not in kinds.values(), kinds
    assert {masks.layer_index(n) for n in kinds} >= {0, 1}


def _reference_top(keys: list[torch.Tensor], k: int) -> list[set[int]]:
    """k largest keys across tensors by a full stable sort, ties broken by tensor order then index."""
    flat = torch.cat(keys).long()
    owner = torch.cat([torch.full((x.numel(),), i) for i, x in enumerate(keys)])
    local = torch.cat([torch.arange(x.numel()) for x in keys])
    order = sorted(range(flat.numel()), key=lambda j: (-int(flat[j]), int(owner[j]), int(local[j])))[:k]
    out = [set() for _ in keys]
    for j in order:
        out[int(owner[j])].add(int(local[j]))
    return out


@pytest.mark.parametrize("sizes,k,ties", [
    pytest.param((1000,), 37, False, id="one-1000-k37"),
    pytest.param((513, 7, 2000), 400, False, id="three-k400"),
    pytest.param((300, 301), 250, True, id="ties-k250"),
    pytest.param((50, 60), 0, False, id="k0"),
    pytest.param((50, 60), 110, True, id="k-all"),
])
def test_radix_top_matches_sort(sizes, k, ties):
    gen = torch.Generator().manual_seed(sum(sizes) + k)
    if ties:
        scores = [torch.randint(0, 4, (n,), generator=gen).float() for n in sizes]
    else:
        scores = [torch.randn(n, generator=gen).abs() * 10 ** torch.randint(-30, 30, (n,), generator=gen)
                  for n in sizes]
    keys = [_sortable_keys(s) for s in scores]
    got = _top_indices(keys, k)
    want = _reference_top(keys, k)
    for g, w in zip(got, want):
        assert g.tolist() == sorted(w)


def test_from_delta():
    base = {"a": torch.zeros(4, 5), "b": torch.ones(3), "ids": torch.arange(3)}
    tuned = {"a": base["a"].clone(), "b": base["b"].clone(), "ids": torch.arange(3) + 1}
    tuned["a"][1, 2] = 1e-6
    tuned["a"][3, 4] = 0.5
    assert masks.from_delta(base, tuned)["a"].tolist() == [7, 19]
    assert masks.from_delta(base, tuned, atol=1e-3)["a"].tolist() == [19]
    assert masks.from_delta(base, tuned)["b"].numel() == 0 and "ids" not in masks.from_delta(base, tuned)
    with pytest.raises(ValueError, match="shape"):
        masks.from_delta(base, {"a": torch.zeros(5, 4)})


NAN = float("nan")


@pytest.mark.parametrize("base,tuned,atol,want", [
    pytest.param(torch.ones(4, dtype=torch.float64), torch.tensor([1, 1 + 1e-9, 1, 1], dtype=torch.float64), 1e-10,
                 [1], id="fp64-change-below-fp32-resolution"),
    pytest.param(torch.ones(4, dtype=torch.float64), torch.tensor([1, 1 + 1e-9, 1, 1], dtype=torch.float64), 1e-8,
                 [], id="fp64-change-within-atol"),
    pytest.param(torch.tensor([NAN, 1.0]), torch.tensor([NAN, 1.0]), 0.0, [], id="unchanged-nan-atol0"),
    pytest.param(torch.tensor([NAN, 1.0]), torch.tensor([NAN, 1.0]), 1e-3, [], id="unchanged-nan-atol"),
    pytest.param(torch.tensor([1.0, 2.0]), torch.tensor([NAN, 2.0]), 1e-3, [0], id="became-nan-atol"),
    pytest.param(torch.tensor([0.0, 1.0]), torch.tensor([-0.0, 1.0]), 0.0, [0], id="signed-zero-atol0"),
    pytest.param(torch.tensor([0.0, 1.0]), torch.tensor([-0.0, 1.0]), 1e-3, [], id="signed-zero-atol"),
    pytest.param(torch.tensor([1.0, 2.0], dtype=torch.bfloat16), torch.tensor([1.0, 2.015625], dtype=torch.bfloat16),
                 1e-2, [1], id="bf16-one-ulp-atol"),
])
def test_from_delta_precision_nan_and_signed_zero(base, tuned, atol, want):
    assert masks.from_delta({"w": base}, {"w": tuned}, atol=atol)["w"].tolist() == want


NAMES = {"model.layers.0.self_attn.q_proj.weight": (24, 16), "model.layers.0.mlp.up_proj.weight": (40, 16),
         "model.layers.1.mlp.down_proj.weight": (16, 40), "model.norm.weight": (16,)}


def _params(gen):
    return {n: torch.randn(s, generator=gen) for n, s in NAMES.items()}


def test_random_counts_and_budgets():
    gen = torch.Generator().manual_seed(0)
    params = _params(gen)
    m = masks.random(params, 0.1, generator=torch.Generator().manual_seed(1))
    for n, idx in m.items():
        assert idx.numel() == round(0.1 * params[n].numel())
        assert torch.equal(idx, idx.unique()) and int(idx.max()) < params[n].numel()
    assert all(torch.equal(a, b) for a, b in zip(m.values(), masks.random(
        params, 0.1, generator=torch.Generator().manual_seed(1)).values()))
    m = masks.random(params, budgets={"ffn": 0.05, "attn_q": 0.5})
    assert m["model.layers.0.mlp.up_proj.weight"].numel() == 32 and m["model.norm.weight"].numel() == 0
    assert m["model.layers.0.self_attn.q_proj.weight"].numel() == 192
    with pytest.raises(ValueError, match="budget keys"):
        masks.random(params, budgets={"mlp": 0.1})
    with pytest.raises(ValueError, match="density"):
        masks.random(params, 1.5)


@pytest.mark.parametrize("density", [pytest.param(0.0, id="none"), pytest.param(0.013, id="sparse"),
                                     pytest.param(0.6, id="dense"), pytest.param(1.0, id="all")])
def test_random_masks_of_large_tensors_are_drawn_block_by_block(monkeypatch, density):
    """Beyond a block (here shrunk to 1000 coordinates) the mask is drawn per block: still exactly k sorted,
    distinct, in-range indices, reproducible, and uniform (every block's share near its expectation)."""
    monkeypatch.setattr(masks, "_RANDOM_BLOCK", 1000)
    params = {"w": torch.zeros(137, 61)}  # 8357 coordinates: 9 blocks, the last partial
    sizes, randperm = [], torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda n, **kw: sizes.append(n) or randperm(n, **kw))
    m = masks.random(params, density, generator=torch.Generator().manual_seed(3))["w"]
    assert max(sizes, default=0) <= 1000  # no permutation of the whole tensor
    k = round(density * 8357)
    assert m.dtype == torch.int64 and m.numel() == k
    assert torch.equal(m, m.unique()) and (k == 0 or 0 <= int(m.min()) <= int(m.max()) < 8357)
    assert torch.equal(m, masks.random(params, density, generator=torch.Generator().manual_seed(3))["w"])
    hits = torch.zeros(8357)
    for seed in range(200):
        hits[masks.random(params, density, generator=torch.Generator().manual_seed(seed))["w"]] += 1
    per_block = torch.stack([hits[i:i + 1000].mean() for i in range(0, 8000, 1000)]) / 200
    torch.testing.assert_close(per_block, torch.full((8,), float(k / 8357)), rtol=0, atol=0.01)
    assert abs(float(hits[8000:].mean()) / 200 - k / 8357) < 0.02


def test_random_masks_of_small_tensors_are_one_randperm():
    params = {"w": torch.zeros(40, 25)}
    got = masks.random(params, 0.3, generator=torch.Generator().manual_seed(5))["w"]
    want = torch.randperm(1000, generator=torch.Generator().manual_seed(5))[:300].sort().values
    assert torch.equal(got, want)  # masks (and runs) made before the block-wise draw are reproduced


@pytest.mark.parametrize("per", ["tensor", "global"])
def test_smallest_weights(per):
    gen = torch.Generator().manual_seed(2)
    params = _params(gen)
    m = masks.smallest_weights(params, 0.2, per=per)
    if per == "tensor":
        for n, idx in m.items():
            x = params[n].abs().view(-1)
            assert torch.equal(idx, x.topk(idx.numel(), largest=False).indices.sort().values)
    else:
        flat = torch.cat([p.abs().view(-1) for p in params.values()])
        k = round(0.2 * flat.numel())
        thr = flat.kthvalue(k).values
        assert sum(i.numel() for i in m.values()) == k
        assert all((params[n].abs().view(-1)[i] <= thr).all() for n, i in m.items())


@pytest.mark.parametrize("per", ["tensor", "global"])
def test_smallest_weights_refuses_nan_weights_naming_the_tensor(per):
    params = {"ok": torch.ones(3, 5), "bad": torch.tensor([[1.0, NAN, 0.5], [2.0, 3.0, NAN]])}
    with pytest.raises(ValueError, match=r"smallest_weights: bad holds NaN weights \(2 of 6\)"):
        masks.smallest_weights(params, 0.2, per=per)  # NaN counted as 0 and was the first coordinate chosen


def test_smallest_weights_inf_weights_are_the_largest():
    got = masks.smallest_weights({"w": torch.tensor([float("inf"), 0.3, -float("inf"), -0.1])}, 0.5)["w"]
    assert got.tolist() == [1, 3]


def _linear_setup():
    gen = torch.Generator().manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Tanh(), torch.nn.Linear(24, 5))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    batches = [(torch.randn(8, 16, generator=gen), torch.randn(8, 5, generator=gen)) for _ in range(3)]

    def loss_fn(m, batch):
        x, y = batch
        return ((m(x) - y) ** 2).mean()

    return model, batches, loss_fn


@pytest.mark.parametrize("score", ["grad_abs", "grad_sq", "adam_update"])
@pytest.mark.parametrize("per", ["tensor", "global"])
def test_calibrate_against_reference_statistic(score, per):
    model, batches, loss_fn = _linear_setup()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = masks.calibrate(model, loss_fn, batches, 0.1, score=score, per=per)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None

    grads = {n: [] for n, _ in model.named_parameters()}
    for b in batches:
        model.zero_grad()
        loss_fn(model, b).backward()
        for n, p in model.named_parameters():
            grads[n].append(p.grad.double().clone())
    stat = {}
    for n, gs in grads.items():
        if score == "grad_abs":
            stat[n] = sum(g.abs() for g in gs)
        elif score == "grad_sq":
            stat[n] = sum(g * g for g in gs)
        else:
            m = v = 0
            for g in gs:
                m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
            t = len(gs)
            stat[n] = (m / (1 - 0.9**t)).abs() / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
    if per == "tensor":
        for n, s in stat.items():
            k = round(0.1 * s.numel())
            assert torch.equal(got[n], s.view(-1).topk(k).indices.sort().values), n
    else:
        flat = torch.cat([s.view(-1) for s in stat.values()])
        k = round(0.1 * flat.numel())
        thr = flat.topk(k).values[-1]
        assert sum(i.numel() for i in got.values()) == k
        for n, s in stat.items():
            assert torch.equal(got[n], (s.view(-1) >= thr).nonzero().view(-1)), n


def test_calibrate_rejects_bad_arguments():
    model, batches, loss_fn = _linear_setup()
    with pytest.raises(ValueError, match="score"):
        masks.calibrate(model, loss_fn, batches, 0.1, score="fisher")
    with pytest.raises(ValueError, match="per"):
        masks.calibrate(model, loss_fn, batches, 0.1, per="layer")
    with pytest.raises(ValueError, match="batch"):
        masks.calibrate(model, loss_fn, [], 0.1)


def test_save_load_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(4)
    params = _params(gen)
    m = masks.random(params, 0.25, generator=gen)
    m["model.norm.weight"] = torch.rand(16, generator=gen) < 0.5  # bool masks too
    path = str(tmp_path / "m.safetensors")
    masks.save(path, m, shapes={n: p.shape for n, p in params.items()})
    back = masks.load(path)
    for n, mask in m.items():
        want = mask.view(-1).nonzero().view(-1) if mask.dtype == torch.bool else mask
        assert back[n].dtype == torch.int64 and torch.equal(back[n], want)
    meta = masks.load_metadata(path)
    assert meta["format"] == "fastopd.masks.v1"
    assert meta["shapes"]["model.layers.0.mlp.up_proj.weight"] == [40, 16]
    assert meta["kinds"]["model.layers.1.mlp.down_proj.weight"] == "ffn_down"
    # the optimizer takes the loaded file directly
    named = [(n, torch.nn.Parameter(p)) for n, p in params.items()]
    opt = SparseMaskedAdamW(named, masks=back)
    assert opt.state[named[0][1]]["indices"].dtype == torch.int32


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_saved_mask_file_has_the_umasks_permissions(tmp_path, umask):
    """safetensors creates its file 0600; the atomic write gives the file the umask's mode, like any other file
    (a serving process or group-mates can read it)."""
    import os
    import stat

    old = os.umask(umask)
    try:
        path = tmp_path / "m.safetensors"
        masks.save(str(path), {"w": torch.arange(5)})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_interrupted_save_keeps_the_existing_file(tmp_path, monkeypatch):
    import safetensors.torch

    path = str(tmp_path / "m.safetensors")
    old = {"w": torch.tensor([1, 4, 9])}
    masks.save(path, old)
    real_save_file = safetensors.torch.save_file

    def interrupted(tensors, filename, metadata=None):  # killed half way through writing
        real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(20)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        masks.save(path, {"w": torch.arange(50)})
    assert masks.load(path)["w"].tolist() == [1, 4, 9]
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left behind


def test_load_reads_bool_files_and_rejects_others(tmp_path):
    good = str(tmp_path / "bool.safetensors")
    bool_mask = torch.rand(6, 7) < 0.3
    save_file({"w": bool_mask}, good, metadata={"format": "fastopd.masks.v1", "writer": "fastopd analyze"})
    assert torch.equal(masks.load(good)["w"], bool_mask)
    wrong = str(tmp_path / "wrong.safetensors")
    save_file({"w": bool_mask}, wrong, metadata={"format": "other"})
    with pytest.raises(ValueError, match="not a fastopd mask file"):
        masks.load(wrong)
    bad = str(tmp_path / "bad.safetensors")
    save_file({"w": torch.zeros(2, 3, dtype=torch.int64)}, bad, metadata={"format": "fastopd.masks.v1"})
    with pytest.raises(ValueError, match="flat indices"):
        masks.load(bad)


@pytest.mark.parametrize("tensor, why", [
    pytest.param(torch.tensor([0, 3, 35], dtype=torch.int32), "flat index 35, past the end", id="index-past-end"),
    pytest.param(torch.zeros(7, 5, dtype=torch.bool), r"has shape \(7, 5\)", id="bool-other-shape"),
    pytest.param(torch.tensor([[1, 2]]), "flat indices", id="2d-indices"),
])
def test_load_refuses_a_mask_that_does_not_fit_its_recorded_shape(tmp_path, tensor, why):
    """The file records each parameter's shape; a mask that does not fit it was read back as good."""
    path = str(tmp_path / "m.safetensors")
    save_file({"w": tensor}, path, metadata={"format": "fastopd.masks.v1", "shapes": '{"w": [5, 7]}'})
    with pytest.raises(ValueError, match=rf"m.safetensors.*{why}"):
        masks.load(path)
    fits = str(tmp_path / "fits.safetensors")
    save_file({"w": torch.tensor([0, 34], dtype=torch.int32)}, fits,
              metadata={"format": "fastopd.masks.v1", "shapes": '{"w": [5, 7]}'})
    assert masks.load(fits)["w"].tolist() == [0, 34] and masks.recorded_shapes(fits) == {"w": (5, 7)}
    junk = str(tmp_path / "junk.safetensors")
    save_file({"w": torch.tensor([0])}, junk, metadata={"format": "fastopd.masks.v1", "shapes": "[1, 2"})
    with pytest.raises(ValueError, match="metadata 'shapes' is not a JSON object"):
        masks.load(junk)


def test_summary():
    m = {"model.layers.0.mlp.up_proj.weight": torch.arange(64),
         "model.layers.1.mlp.down_proj.weight": torch.zeros(16, 40, dtype=torch.bool),
         "model.layers.0.self_attn.q_proj.weight": torch.arange(10)}
    lines = []
    out = masks.summary(m, NAMES, print_fn=lines.append)
    assert out["by_kind"]["ffn_up"] == {"selected": 64, "numel": 640, "density": 0.1}
    assert out["by_layer"][0]["selected"] == 74 and out["by_layer"][0]["numel"] == 640 + 384
    assert out["total"]["numel"] == 640 + 640 + 384
    assert "ffn_down" in lines[0]
    unknown = masks.summary({"x.weight": torch.arange(3)}, print_fn=None)
    assert unknown["total"] == {"selected": 3, "numel": None, "density": None}


def test_load_reads_analysis_mask_writer_files(tmp_path):
    """Files from `fastopd analyze --mask-out` (fastopd.analysis.masks.MaskWriter, bool per parameter) load."""
    writer_mod = pytest.importorskip("fastopd.analysis.masks")
    path = tmp_path / "analyze.safetensors"
    want = {"model.layers.0.mlp.up_proj.weight": torch.rand(5, 3) < 0.5, "model.norm.weight": torch.rand(3) < 0.5}
    with writer_mod.MaskWriter(path, [(n, tuple(m.shape)) for n, m in want.items()]) as w:
        for n, m in want.items():
            w.begin(n)
            w.write(m)
    got = masks.load(str(path))
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_analysis_mask_writer_is_atomic_and_honours_the_umask(tmp_path):
    """MaskWriter writes through fastopd._io.atomic_path: an incomplete file never replaces the existing one and
    leaves no temporary behind; a complete one gets the umask's mode (not 0600)."""
    import os
    import stat

    from fastopd.analysis.masks import MaskWriter

    path = tmp_path / "m.safetensors"
    entries = [("a.weight", (4, 3)), ("b.weight", (5,))]
    old = os.umask(0o022)
    try:
        with MaskWriter(path, entries) as w:
            w.begin("a.weight")
            w.write(torch.ones(4, 3, dtype=torch.bool))
            w.begin("b.weight")
            w.write(torch.zeros(5, dtype=torch.bool))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    before = path.read_bytes()
    with pytest.raises(ValueError, match="incomplete"):
        with MaskWriter(path, entries) as w:
            w.begin("a.weight")
            w.write(torch.zeros(4, 3, dtype=torch.bool))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


@pytest.mark.parametrize("mask,shape,message", [
    pytest.param((torch.rand(4, 5) < 0.5).float(), None, "bool", id="float-01"),
    pytest.param((torch.rand(4, 5) < 0.5).long(), None, "1-D", id="int-01-2d"),
    pytest.param(torch.ones(4, 5, dtype=torch.uint8), None, "uint8", id="uint8-01"),
    pytest.param(torch.tensor([5, 1, 3, 3]), [4, 5], "duplicated", id="duplicated"),
    pytest.param(torch.tensor([1, 30]), [4, 5], "out of range", id="out-of-range"),
    pytest.param(torch.tensor([-1, 3]), None, "negative", id="negative"),
    pytest.param(torch.ones(4, 5, dtype=torch.bool), [3, 5], "shapes=", id="bool-vs-shapes"),
])
def test_save_refuses_what_the_file_format_cannot_hold(tmp_path, mask, shape, message):
    """The format promises 1-D sorted unique in-range indices: a float or 2-D 0/1 mask was written as "indices"
    0 and 1 (the optimizer then failed on duplicates, far from the save), and bad indices went to disk as given."""
    path = tmp_path / "m.safetensors"
    with pytest.raises(ValueError, match=message):
        masks.save(str(path), {"w": mask}, shapes=None if shape is None else {"w": shape})
    assert not path.exists()


def test_save_writes_unsorted_indices_sorted(tmp_path):
    path = str(tmp_path / "m.safetensors")
    masks.save(path, {"w": torch.tensor([7, 2, 5]), "all": torch.tensor([1, 0])}, shapes={"w": [4, 5]})
    back = masks.load(path)
    assert back["w"].tolist() == [2, 5, 7] and back["all"].tolist() == [0, 1]


def test_out_of_range_budgets_raise_whatever_the_parameters():
    model = torch.nn.Linear(4, 3)  # kind "other": the ffn budget applies to nothing here, and is still wrong
    with pytest.raises(ValueError, match=r"budgets.*\[0, 1\].*ffn"):
        masks.random(model, 0.1, budgets={"ffn": 1.5})


def test_random_masks_of_tensors_above_numpys_hypergeometric_bound():
    """numpy's hypergeometric refuses 10^9 or more items on either side: a tensor of 1.1e9 coordinates (an
    embedding such as 152064 x 8192 has 1.25e9) raised "both ngood and nbad must be less than 1000000000" from
    its first block. The counts there come from binomials conditioned on their sum (exactly hypergeometric)."""
    n, k = 1_100_000_000, 3
    got = masks._random_subset(n, k, torch.Generator().manual_seed(0))
    assert got.dtype == torch.int64 and got.numel() == k and torch.equal(got, got.unique())
    assert 0 <= int(got.min()) and int(got.max()) < n
    rng = np.random.default_rng(1)
    draws = np.array([masks._hypergeometric(rng, 600_000_000, 1_400_000_000, 50) for _ in range(400)])
    assert abs(draws.mean() - 15.0) < 0.6  # mean nsample * good / (good + bad) = 15, sd of the mean ~0.16
    assert masks._hypergeometric(rng, 10**9, 10**9, 0) == 0
    assert masks._hypergeometric(rng, 10**9, 10**9, 2 * 10**9) == 10**9


# ---------------------------------------------------------------------- tied weights and Hugging Face models
def _tied_state():
    w, other = torch.randn(7, 3), torch.randn(5)
    return {"emb.weight": w, "mid.bias": other, "head.weight": w}


@pytest.mark.parametrize("source", ["random", "smallest_weights", "from_delta"])
def test_a_tied_weight_in_a_state_dict_gets_one_mask_under_its_first_name(source):
    """A state dict names a tied weight twice; `random` gave it two different masks (the optimizer holding one
    name then dropped one under strict=False, or refused it), `from_delta` and `smallest_weights` two copies."""
    state = _tied_state()
    if source == "random":
        got = masks.random(state, 0.4, generator=torch.Generator().manual_seed(0))
    elif source == "smallest_weights":
        got = masks.smallest_weights(state, 0.4)
    else:
        tuned = {n: t + 1 for n, t in state.items() if n != "head.weight"}
        tuned["head.weight"] = tuned["emb.weight"]
        got = masks.from_delta(state, tuned)
    assert list(got) == ["emb.weight", "mid.bias"]


@pytest.mark.parametrize("tied", ["base-only", "tuned-only-other-delta"])
def test_from_delta_keeps_both_names_when_their_deltas_differ(tied):
    """One tensor in the tuned model but different deltas under its two names (tied only in the base, or an untied
    base): both masks are returned, not one silently dropped."""
    base = _tied_state()
    if tied == "base-only":
        tuned = {n: t.clone() for n, t in base.items()}
        tuned["head.weight"][0, 0] += 1
    else:
        base = {n: t.clone() for n, t in base.items()}
        base["head.weight"][0, 0] += 1
        tuned = dict(_tied_state())
        tuned["emb.weight"] = tuned["head.weight"] = base["emb.weight"].clone()
    got = masks.from_delta(base, tuned)
    assert got["emb.weight"].numel() == 0 and got["head.weight"].tolist() == [0]


def test_summary_keeps_the_shape_of_a_tied_weights_second_name():
    state = _tied_state()
    out = masks.summary({"head.weight": torch.tensor([0, 2])}, params=list(state.items()), print_fn=None)
    assert out["total"]["numel"] == 21


def test_hf_tied_model_masks_from_state_dicts_save_load_and_train(tmp_path):
    """A tied Llama from transformers: masks from `from_delta` of two state dicts and from `random` of a state
    dict name the tied weight as named_parameters() does, so SparseMaskedAdamW(strict=True) takes them; saved and
    loaded onto the model loaded again, they select the same coordinates."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=37, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    base = {n: t.clone() for n, t in model.state_dict().items()}
    with torch.no_grad():
        model.model.embed_tokens.weight[3, 5] += 1
        model.model.layers[0].mlp.down_proj.weight[1, 2] -= 1
    delta = masks.from_delta(base, model.state_dict())
    assert "lm_head.weight" not in delta and delta["model.embed_tokens.weight"].tolist() == [3 * 16 + 5]
    rnd = masks.random(model.state_dict(), 0.1, generator=torch.Generator().manual_seed(0))
    assert set(rnd) == {n for n, _ in model.named_parameters()}
    for m in (delta, rnd):
        SparseMaskedAdamW(model.named_parameters(), masks=m)
    masks.save(str(tmp_path / "mask.safetensors"), delta)
    model.save_pretrained(tmp_path / "model")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    opt = SparseMaskedAdamW(again.named_parameters(), masks=masks.load(str(tmp_path / "mask.safetensors")))
    assert {n: i.long().tolist() for n, i in opt.mask_indices().items()} == {n: i.tolist() for n, i in delta.items()}


# ---------------------------------------------------------------------------------------------------- review
@pytest.mark.parametrize("keep", [
    pytest.param(lambda n: n - 3, id="data-cut-3-bytes"),
    pytest.param(lambda n: 40, id="header-cut"),
    pytest.param(lambda n: 5, id="no-header-length"),
    pytest.param(lambda n: 0, id="empty-file"),
])
def test_a_truncated_mask_file_is_refused_naming_the_file(tmp_path, keep):
    """safetensors said only "Error while deserializing header: incomplete metadata, file not fully covered", with
    no file name and no word of truncation. The error stays safetensors' SafetensorError (what fastopd distill
    catches for an unreadable masks file) and names the file."""
    from safetensors import SafetensorError

    good = tmp_path / "m.safetensors"
    masks.save(str(good), {"w": torch.tensor([1, 5, 6]), "b": torch.rand(3, 7) < 0.5})
    data = good.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[:keep(len(data))])
    for read in (masks.load, masks.load_metadata):
        with pytest.raises(SafetensorError, match=rf"{bad.name}.*truncated or not a safetensors file"):
            read(str(bad))


def test_the_masks_an_optimizer_holds_save_and_summarize_with_full_masks(tmp_path):
    """`opt.mask_indices()` gives None for a fully selected parameter (and the optimizer takes None back); saving
    or summarizing the masks an optimizer trained raised "must be a tensor, got NoneType" / AttributeError. With
    the parameter's shape known (shapes=, params=), None is every coordinate."""
    w, b = torch.nn.Parameter(torch.randn(5, 7)), torch.nn.Parameter(torch.randn(3))
    opt = SparseMaskedAdamW([("w", w), ("b", b)], masks={"w": torch.tensor([3, 1, 30]), "b": torch.ones(3, dtype=bool)})
    held = opt.mask_indices()
    assert held["b"] is None
    path = str(tmp_path / "held.safetensors")
    shapes = {"w": w.shape, "b": b.shape}
    masks.save(path, held, shapes=shapes)
    back = masks.load(path)
    assert back["w"].tolist() == [1, 3, 30] and back["b"].tolist() == [0, 1, 2]
    assert masks.load_metadata(path)["shapes"] == {"w": [5, 7], "b": [3]}
    out = masks.summary(held, params=shapes, print_fn=None)
    assert out["total"] == {"selected": 6, "numel": 38, "density": 6 / 38}
    with pytest.raises(ValueError, match=r"'b'.*None.*shapes="):
        masks.save(path, held)
    with pytest.raises(ValueError, match=r"'b'.*None.*params="):
        masks.summary(held, print_fn=None)


@pytest.mark.parametrize("tuned_prefix", [pytest.param("_orig_mod.", id="tuned-torch-compile"),
                                          pytest.param("module.", id="tuned-ddp")])
def test_from_delta_of_states_that_share_no_name_is_refused(tuned_prefix):
    """A tuned state dict of a torch.compile'd (or DDP-wrapped) model names every tensor with a prefix: from_delta
    returned {} and SparseMaskedAdamW(masks={}) then trained the whole model densely, without a word."""
    base = {"0.weight": torch.randn(5, 3), "0.bias": torch.randn(5)}
    tuned = {tuned_prefix + n: t + 1 for n, t in base.items()}
    with pytest.raises(ValueError, match=rf"no floating-point tensor name in common.*'{tuned_prefix}0\.(weight|bias)'"):
        masks.from_delta(base, tuned)
    assert masks.from_delta({}, {}) == {} and masks.from_delta({"ids": torch.arange(3)}, {"x": torch.ones(2)}) == {}
