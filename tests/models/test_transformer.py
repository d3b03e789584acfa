"""The built-in transformer against an independent float64 Llama forward written here, its KV-cache path against
its own full forward, and save/load."""

import math

import pytest
import torch

from fastopd.models import KVCache, Transformer, TransformerConfig, build_attention_mask


def reference_hidden(model: Transformer, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Float64 Llama forward, one sequence at a time, padding dropped: [B, T, D] (zeros at padding)."""
    cfg = model.config
    p = {k: v.detach().double() for k, v in model.state_dict().items()}
    out = torch.zeros(*ids.shape, cfg.hidden_size, dtype=torch.float64)

    def norm(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    def rope(x, pos):  # x [T, H, Dh]
        half = cfg.head_dim // 2
        inv = 1.0 / cfg.rope_theta ** (torch.arange(half, dtype=torch.float64) * 2 / cfg.head_dim)
        ang = pos[:, None, None].double() * inv
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1)

    for b in range(ids.shape[0]):
        keep = mask[b].bool()
        tok = ids[b][keep]
        t = tok.numel()
        pos = torch.arange(t)
        x = p["embed_tokens.weight"][tok]
        for i in range(cfg.num_layers):
            pre = f"layers.{i}."
            h = norm(x, p[pre + "input_layernorm.weight"])
            q = (h @ p[pre + "self_attn.q_proj.weight"].T).view(t, cfg.num_heads, cfg.head_dim)
            k = (h @ p[pre + "self_attn.k_proj.weight"].T).view(t, cfg.num_kv_heads, cfg.head_dim)
            v = (h @ p[pre + "self_attn.v_proj.weight"].T).view(t, cfg.num_kv_heads, cfg.head_dim)
            q, k = rope(q, pos), rope(k, pos)
            rep = cfg.num_heads // cfg.num_kv_heads
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(cfg.head_dim)
            s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
            o = torch.einsum("hqk,khd->qhd", s.softmax(-1), v).reshape(t, -1)
            x = x + o @ p[pre + "self_attn.o_proj.weight"].T
            h = norm(x, p[pre + "post_attention_layernorm.weight"])
            g = h @ p[pre + "mlp.gate_proj.weight"].T
            u = h @ p[pre + "mlp.up_proj.weight"].T
            x = x + (torch.nn.functional.silu(g) * u) @ p[pre + "mlp.down_proj.weight"].T
        out[b, keep] = norm(x, p["norm.weight"])
    return out


CONFIGS = [
    pytest.param(dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_layers=2, num_heads=4),
                 id="V97-D64-MHA"),
    pytest.param(dict(vocab_size=61, hidden_size=48, intermediate_size=80, num_layers=3, num_heads=6, num_kv_heads=2),
                 id="V61-D48-GQA3"),
    pytest.param(dict(vocab_size=50, hidden_size=32, intermediate_size=40, num_layers=1, num_heads=2, num_kv_heads=1,
                      head_dim=24, tie_word_embeddings=True), id="V50-D32-MQA-hd24-tied"),
]


def _model(cfg: dict, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(TransformerConfig(initializer_range=0.2, **cfg)).eval()


def _left_padded(lengths: list[int], vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(0, vocab, (n,), generator=g)
        mask[i, width - n :] = True
    return ids, mask


@pytest.mark.parametrize("cfg", CONFIGS)
def test_forward_matches_float64_reference_with_left_padding(cfg):
    model = _model(cfg)
    ids, mask = _left_padded([7, 3, 11, 1], model.config.vocab_size)
    hidden = model(ids, attention_mask=mask)
    ref = reference_hidden(model, ids, mask)
    assert hidden.shape == (4, 11, model.config.hidden_size)
    torch.testing.assert_close(hidden[mask].double(), ref[mask], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(hidden).all()  # padding rows stay finite (they attend to themselves)
    logits = model.logits(ids, attention_mask=mask)
    torch.testing.assert_close(logits, hidden @ model.lm_head.weight.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_cached_decode_matches_full_forward(cfg):
    """Prefill into a KVCache with prefix sharing (expand=2), then decode token by token: every step's hidden
    state equals the full forward's at that position."""
    model = _model(cfg)
    ids, mask = _left_padded([5, 2, 6], model.config.vocab_size)
    extra = torch.randint(0, model.config.vocab_size, (6, 4), generator=torch.Generator().manual_seed(3))
    full_ids = torch.cat([ids.repeat_interleave(2, 0), extra], 1)
    full_mask = torch.cat([mask.repeat_interleave(2, 0), torch.ones(6, 4, dtype=torch.bool)], 1)
    full = model(full_ids, attention_mask=full_mask)

    cfg_ = model.config
    cache = KVCache(cfg_.num_layers, 8, cfg_.num_kv_heads, 16, cfg_.head_dim, dtype=torch.float32, device="cpu")
    cache.reset(6, 10)
    pre = model(ids, attention_mask=mask, cache=cache, expand=2)
    torch.testing.assert_close(pre.repeat_interleave(2, 0)[full_mask[:, :6]], full[:, :6][full_mask[:, :6]],
                               rtol=1e-5, atol=1e-5)
    key_mask = torch.zeros(6, 10, dtype=torch.bool)
    key_mask[:, :6] = mask.repeat_interleave(2, 0)
    positions = mask.sum(1).repeat_interleave(2, 0)[:, None]
    for t in range(4):
        key_mask[:, 6 + t] = True
        h = model(extra[:, t : t + 1], positions + t, key_mask[:, None, None, :], cache=cache, start=6 + t)
        torch.testing.assert_close(h[:, 0], full[:, 6 + t], rtol=1e-5, atol=1e-5)


def test_multi_token_step_on_cache_matches_full_forward():
    model = _model(CONFIGS[1].values[0])
    ids, mask = _left_padded([4, 6], model.config.vocab_size)
    extra = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(4))
    full_mask = torch.cat([mask, torch.ones(2, 5, dtype=torch.bool)], 1)
    full = model(torch.cat([ids, extra], 1), attention_mask=full_mask)
    cfg = model.config
    cache = KVCache(cfg.num_layers, 2, cfg.num_kv_heads, 11, cfg.head_dim, dtype=torch.float32, device="cpu")
    model(ids, attention_mask=mask, cache=cache)
    h = model(extra, mask.sum(1)[:, None] + torch.arange(5), build_attention_mask(full_mask, 6, 5), cache=cache,
              start=6)
    torch.testing.assert_close(h, full[:, 6:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [pytest.param(False, id="untied"), pytest.param(True, id="tied")])
def test_save_load_roundtrip(tmp_path, tied):
    model = _model(dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                        tie_word_embeddings=tied))
    assert (model.lm_head.weight is model.embed_tokens.weight) == tied
    model.save_pretrained(tmp_path)
    loaded = Transformer.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tied
    ids = torch.randint(0, 40, (2, 9))
    torch.testing.assert_close(loaded.logits(ids), model.logits(ids), rtol=0, atol=0)


def test_save_pretrained_interrupted_keeps_the_saved_model(tmp_path, monkeypatch):
    """A save that fails half-way (a full disk) leaves the folder's earlier model loadable, not truncated."""
    import safetensors.torch

    model = _model(dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4))
    model.save_pretrained(tmp_path)
    before = sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir())
    real = safetensors.torch.save_file

    def half(state, filename, metadata=None):
        real(state, filename, metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", half)
    with torch.no_grad():
        model.embed_tokens.weight.add_(1.0)
    with pytest.raises(OSError, match="No space"):
        model.save_pretrained(tmp_path)
    assert sorted((p.name, p.read_bytes()) for p in tmp_path.iterdir()) == before
    Transformer.from_pretrained(tmp_path)


def test_backward_reaches_every_parameter():
    model = _model(CONFIGS[1].values[0])
    ids, mask = _left_padded([5, 3], model.config.vocab_size)
    model.logits(ids, attention_mask=mask)[mask].logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "kwargs,match",
    [
        pytest.param(dict(hidden_size=30, num_heads=4), "divisible", id="indivisible-heads"),
        pytest.param(dict(num_heads=4, num_kv_heads=3), "multiple", id="bad-gqa"),
        pytest.param(dict(num_layers=0), "positive", id="zero-layers"),
        pytest.param(dict(hidden_size=30, num_heads=2, head_dim=15), "even", id="odd-head-dim"),
        pytest.param(dict(rope_theta=0.0), "rope_theta", id="rope-theta-zero"),
        pytest.param(dict(rope_theta=float("nan")), "rope_theta", id="rope-theta-nan"),
        pytest.param(dict(rms_norm_eps=-1e-6), "rms_norm_eps", id="negative-eps"),
        pytest.param(dict(initializer_range=float("inf")), "initializer_range", id="infinite-init"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig(**kwargs)


def test_forward_rejects_non_2d_ids():
    model = _model(CONFIGS[0].values[0])
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model(torch.zeros(5, dtype=torch.long))


def test_rope_frequencies_stay_float32_under_dtype_casts(tmp_path):
    """`.to(bf16)`, `.half()` and `from_pretrained(dtype=bf16)` cast the weights but not the RoPE frequencies (in
    bf16 they were rounded by up to 0.4%: 2.5 rad of rotary angle at position 2048), as Hugging Face keeps them."""
    model = Transformer(TransformerConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=2,
                                          max_position_embeddings=64))
    want = model.inv_freq.clone()
    model.save_pretrained(tmp_path)
    for cast in (model.to(torch.bfloat16), model.half(),
                 Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16)):
        assert cast.embed_tokens.weight.dtype != torch.float32
        assert cast.inv_freq.dtype == torch.float32 and torch.equal(cast.inv_freq, want)


def test_save_pretrained_stopped_between_files_is_not_read_back_as_good(tmp_path, monkeypatch):
    """Overwriting a tied model by an untied one and stopping after the weights, before config.json: the folder
    held new weights under the old config, and from_pretrained silently built a model matching neither."""
    import fastopd._io

    shape = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4)
    _model(dict(shape, tie_word_embeddings=True)).save_pretrained(tmp_path)
    new = _model(dict(shape, tie_word_embeddings=False), seed=1)

    def crash(path, text):
        raise KeyboardInterrupt
    monkeypatch.setattr(fastopd._io, "write_text_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not match"):
        Transformer.from_pretrained(tmp_path)


def test_from_pretrained_accepts_hand_edited_context_length_and_old_folders(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    model = _model(dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4))
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["max_position_embeddings"] = 4096
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert Transformer.from_pretrained(tmp_path).config.max_position_embeddings == 4096
    cfg["rope_theta"] = 500000.0  # a folder of an older fastopd: weights without a saved config
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file(load_file(tmp_path / "model.safetensors"), tmp_path / "model.safetensors")
    assert Transformer.from_pretrained(tmp_path).config.rope_theta == 500000.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        pytest.param(dict(num_heads=0), "num_heads must be positive", id="zero-heads"),
        pytest.param(dict(num_layers=1.5), "must be an int", id="fractional-layers"),
        pytest.param(dict(hidden_size=64.5, num_heads=2, head_dim=32), "must be an int", id="fractional-width"),
        pytest.param(dict(tie_word_embeddings="false"), "must be a bool", id="string-tie"),
    ],
)
def test_bad_config_types_raise_value_error(kwargs, match):
    """num_heads=0 raised ZeroDivisionError; fractional sizes and a string tie flag (truthy "false") passed."""
    with pytest.raises(ValueError, match=match):
        TransformerConfig(**kwargs)


def _write_config(path, **changes):
    import json

    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **changes}))


@pytest.mark.parametrize(
    "damage,match",
    [
        pytest.param(lambda p: (p / "config.json").write_text('{"vocab_size": 40,'), r"config\.json is not valid JSON",
                     id="truncated-config-json"),
        pytest.param(lambda p: (p / "config.json").write_text("[1, 2]"), r"config\.json holds a JSON list",
                     id="config-json-not-an-object"),
        pytest.param(lambda p: _write_config(p, num_experts=4), r"config\.json: unknown TransformerConfig keys",
                     id="config-json-unknown-key"),
        pytest.param(lambda p: (p / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{"),
                     r"model\.safetensors is not a readable safetensors file", id="corrupt-weights"),
        pytest.param(lambda p: (p / "model.safetensors").write_bytes(
            (p / "model.safetensors").read_bytes()[:-64]), r"model\.safetensors is not a readable safetensors file",
            id="truncated-weights"),
    ],
)
def test_from_pretrained_names_the_damaged_file(tmp_path, damage, match):
    """A corrupt config.json raised a bare JSONDecodeError, corrupt weights a SafetensorError: neither named the
    file."""
    _model(dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4)).save_pretrained(
        tmp_path)
    damage(tmp_path)
    with pytest.raises(ValueError, match=match):
        Transformer.from_pretrained(tmp_path)


def test_from_pretrained_names_misshapen_tensors_of_an_old_folder(tmp_path):
    """A folder without the saved config (an older fastopd) whose config.json was edited to another width: a
    RuntimeError from load_state_dict that named neither the file nor the cause."""
    from safetensors.torch import load_file, save_file

    _model(dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4)).save_pretrained(
        tmp_path)
    save_file(load_file(tmp_path / "model.safetensors"), tmp_path / "model.safetensors")  # no config metadata
    _write_config(tmp_path, intermediate_size=64)
    with pytest.raises(ValueError, match=r"model\.safetensors: tensors whose shapes do not match config\.json.*"
                                         r"layers\.0\.mlp"):
        Transformer.from_pretrained(tmp_path)
