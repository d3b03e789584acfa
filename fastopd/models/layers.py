"""Functional pieces of a Llama-style decoder layer, shared by the built-in model and the Hugging Face adapters.

A layer is any module with the Hugging Face Llama names: ``input_layernorm``/``post_attention_layernorm`` (with
``weight`` and ``variance_epsilon``), ``self_attn.{q,k,v,o}_proj`` (optional biases, as in Qwen2) and
``mlp.{gate,up,down}_proj`` (SwiGLU), optionally ``self_attn.{q,k}_norm`` (Qwen3: RMSNorm of each query and key
head over ``head_dim``, before RoPE). :func:`llama_layer` runs one such layer with explicit positions and an
optional :class:`~fastopd.models.kv_cache.KVCache`, so the same code serves ``LlamaForCausalLM``,
``Qwen2ForCausalLM``, ``MistralForCausalLM``, ``Qwen3ForCausalLM`` and :class:`fastopd.models.Transformer`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastopd.models.decode_linear import DecodeWeight, decode_linear, empty_output, pack
from fastopd.models.kv_cache import KVCache, attention


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)``, normalized in fp32 and cast back before the weight (Llama's order)."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables ``[B, 1, T, D_head]`` for integer ``positions`` ``[B, T]`` (half-split layout, fp32 math)."""
    freqs = positions[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scaling != 1.0:
        cos, sin = cos * scaling, sin * scaling
    return cos.to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, H, T, D_head]`` by the tables of :func:`rope_cos_sin` (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def llama_layer(
    layer: nn.Module,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    cache: KVCache | None = None,
    layer_idx: int = 0,
    start: int = 0,
    expand: int = 1,
) -> torch.Tensor:
    """One pre-norm Llama block on ``x`` ``[B, T, D]`` -> ``[B, T, D]``.

    Without a cache (or when ``start == 0``) the queries attend to this call's own keys, with ``mask``
    ``[B, 1, T, T]``; the keys/values are written to ``cache`` (each row ``expand`` times) when one is given. With
    ``start > 0`` they are written at columns ``start..start+T-1`` and the queries attend to the cache's whole
    active window, ``mask`` being ``[B, 1, T, S]``.
    """
    b, t, _ = x.shape
    attn = layer.self_attn
    h = rms_norm(x, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
    q = attn.q_proj(h).view(b, t, num_heads, head_dim)
    k = attn.k_proj(h).view(b, t, num_kv_heads, head_dim)
    v = attn.v_proj(h).view(b, t, num_kv_heads, head_dim).transpose(1, 2)
    q_norm = getattr(attn, "q_norm", None)
    if q_norm is not None:  # Qwen3: each head of q and k RMS-normalized over head_dim, before RoPE
        q = rms_norm(q, q_norm.weight, q_norm.variance_epsilon)
        k = rms_norm(k, attn.k_norm.weight, attn.k_norm.variance_epsilon)
    q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
    if cache is not None:
        cache.write(layer_idx, start, k, v, expand)
        if start > 0:
            k, v = cache.layer(layer_idx)
    o = attention(q, k, v, mask)
    x = x + attn.o_proj(o.transpose(1, 2).reshape(b, t, num_heads * head_dim))
    h = rms_norm(x, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
    mlp = layer.mlp
    return x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``[B, S]`` of left-padded rows: real tokens count 0, 1, ...; padding columns get 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


class PackedLlamaLayer(NamedTuple):
    """Inference-only weights of one Llama layer in the layout a single-token decode step wants: projections
    fused (q|k|v and gate|up), each ``W`` of ``x @ W`` (``[in, out]``) in the layout of
    :func:`fastopd.models.decode_linear.pack` (48-column panels for fastopd's CPU kernel, else transposed and
    contiguous for one ``addmm``), so each is one product, with the RMSNorm weight that precedes them folded into
    their rows (``(n * w) @ W = n @ (diag(w) W)``, folded in
    fp32 and rounded once to the weight dtype). The RMSNorm epsilons are 0-d fp32 tensors on CPU (for the
    four-kernel normalization of :func:`normalize`), floats elsewhere. A layer with per-head q/k RMSNorm (Qwen3)
    keeps their weights unfolded (they normalize each head after the projection, so no projection can absorb
    them) as one ``[H_q + H_kv, 1, D_head]`` tensor, the q weight repeated per query head and the k weight per
    key head, matching the q|k rows of the fused projection; None without them."""

    input_eps: float | torch.Tensor
    qkv: DecodeWeight  # [D, (H_q + 2 H_kv) * D_head], input-norm weight folded in
    qkv_bias: torch.Tensor | None
    o: DecodeWeight  # [H_q * D_head, D]
    o_bias: torch.Tensor | None
    post_eps: float | torch.Tensor
    gate_up: DecodeWeight  # [D, 2 I], post-attention-norm weight folded in
    gate_up_bias: torch.Tensor | None
    down: DecodeWeight  # [I, D]
    down_bias: torch.Tensor | None
    qk_norm: torch.Tensor | None = None  # [H_q + H_kv, 1, D_head], q_norm then k_norm weights (Qwen3)
    qk_norm_eps: float | torch.Tensor | None = None


def _fused_t(*linears: nn.Linear, norm_weight: torch.Tensor | None = None) -> tuple[DecodeWeight, torch.Tensor | None]:
    weight = torch.cat([lin.weight.detach() for lin in linears], 0).t()
    if norm_weight is not None:
        weight = (norm_weight.detach().float()[:, None] * weight.float()).to(weight.dtype)
    weight = pack(weight)
    if all(lin.bias is None for lin in linears):
        return weight, None
    bias = torch.cat([lin.bias.detach() if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                      for lin in linears])
    return weight, bias


def pack_llama_layer(layer: nn.Module) -> PackedLlamaLayer:
    """Copy a Llama-named layer's weights into :class:`PackedLlamaLayer` (detached: for generation only)."""
    attn, mlp = layer.self_attn, layer.mlp
    ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
    qkv, qkv_bias = _fused_t(attn.q_proj, attn.k_proj, attn.v_proj, norm_weight=ln1.weight)
    o, o_bias = _fused_t(attn.o_proj)
    gate_up, gate_up_bias = _fused_t(mlp.gate_proj, mlp.up_proj, norm_weight=ln2.weight)
    down, down_bias = _fused_t(mlp.down_proj)
    device = attn.q_proj.weight.device
    eps_in, eps_post = decode_eps(ln1.variance_epsilon, device), decode_eps(ln2.variance_epsilon, device)
    qk_norm = qk_eps = None
    q_norm = getattr(attn, "q_norm", None)
    if q_norm is not None:
        k_norm = attn.k_norm
        if q_norm.variance_epsilon != k_norm.variance_epsilon:  # one normalization pass serves both
            raise ValueError(f"q_norm eps {q_norm.variance_epsilon} != k_norm eps {k_norm.variance_epsilon}: the "
                             "packed decode step normalizes q and k together")
        head_dim = q_norm.weight.shape[-1]
        qw, kw = q_norm.weight.detach(), k_norm.weight.detach()
        qk_norm = torch.cat([qw.expand(attn.q_proj.out_features // head_dim, head_dim),
                             kw.expand(attn.k_proj.out_features // head_dim, head_dim)])[:, None]
        qk_eps = decode_eps(q_norm.variance_epsilon, device)
    return PackedLlamaLayer(eps_in, qkv, qkv_bias, o, o_bias, eps_post, gate_up, gate_up_bias, down, down_bias,
                            qk_norm, qk_eps)


def decode_eps(eps: float, device: torch.device) -> float | torch.Tensor:
    """An RMSNorm epsilon in the form :func:`normalize` takes on ``device``."""
    return torch.tensor(eps, dtype=torch.float32, device=device) if device.type == "cpu" else eps


def normalize(x: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps)`` in fp32, cast back (the weightless part of :func:`rms_norm`).

    With a 0-d tensor ``eps`` (CPU) the mean of squares comes from the 2-norm: a norm, an ``addcmul`` forming
    ``n^2 / D + eps``, an rsqrt and a product, where ``F.rms_norm`` runs six kernels on CPU (about half the time
    at decode shapes; the result can differ from ``F.rms_norm``'s by an ulp or two). A float ``eps`` uses
    ``F.rms_norm``."""
    xf = x if x.dtype == torch.float32 else x.float()
    if isinstance(eps, torch.Tensor):
        n = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)
        out = xf * torch.addcmul(eps, n, n, value=1.0 / x.shape[-1]).rsqrt_()
    else:
        out = F.rms_norm(xf, (x.shape[-1],), eps=eps)
    return out if out.dtype == x.dtype else out.to(x.dtype)


class DecodeBuffers(NamedTuple):
    """Scratch of :func:`llama_decode_layer` for ``B`` rows, shared by every layer and step: the fused
    projections' outputs and the views the layer reads (made once, not per layer)."""

    qkv: torch.Tensor  # [B, (H_q + 2 H_kv) * D_head]
    q: torch.Tensor  # view [B, H_q, 1, D_head]
    qk: torch.Tensor  # view [B, H_q + H_kv, 1, D_head]
    kv: torch.Tensor  # view [2, B, H_kv, D_head]: k then v, the layout of KVCache.write_token
    gate_up: torch.Tensor  # [B, 2 I]
    gate: torch.Tensor  # view [B, I]
    up: torch.Tensor  # view [B, I]


def decode_buffers(packed: PackedLlamaLayer, batch_size: int, *, num_heads: int, num_kv_heads: int,
                   head_dim: int) -> DecodeBuffers:
    """:class:`DecodeBuffers` for ``batch_size`` rows of layers shaped like ``packed``."""
    b, n_q, n_kv = batch_size, num_heads * head_dim, num_kv_heads * head_dim
    qkv = empty_output(packed.qkv, b)
    gate_up = empty_output(packed.gate_up, b)
    gate, up = gate_up.chunk(2, dim=-1)
    return DecodeBuffers(qkv, qkv[:, :n_q].view(b, num_heads, 1, head_dim),
                         qkv[:, : n_q + n_kv].view(b, num_heads + num_kv_heads, 1, head_dim),
                         qkv[:, n_q:].view(b, 2, num_kv_heads, head_dim).transpose(0, 1), gate_up, gate, up)


def decode_rope_tables(
    length: int, inv_freq: torch.Tensor, dtype: torch.dtype, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables ``(cos, sin_signed)``, each ``[length, D_head]``, for positions ``0..length-1``: the values of
    :func:`rope_cos_sin`, with the sign of rotate-half folded into the sine's first half (see
    :func:`_apply_rope_signed`). A decode step gathers its rows by position instead of recomputing them."""
    cos, sin = rope_cos_sin(torch.arange(length, device=inv_freq.device)[None], inv_freq, dtype, scaling)
    cos, sin = cos[0, 0], sin[0, 0]
    half = sin.shape[-1] // 2
    return cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)


def _apply_rope_signed_(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """``x = x * cos + rotate_half(x) * sin``, in place, as ``x * cos + swap_halves(x) * sin_signed`` (three
    kernels: a roll, a product, an ``addcmul`` writing into ``x``)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed, out=x)


def llama_decode_layer(
    packed: PackedLlamaLayer,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin_signed: torch.Tensor,
    mask: torch.Tensor | None,
    cache: KVCache,
    layer_idx: int,
    column: int | torch.Tensor,
    buffers: DecodeBuffers,
) -> torch.Tensor:
    """One Llama layer for a single new token per row, updating ``x`` ``[B, D]`` in place (and returning it); the
    token's key/value written to cache column ``column``; rotary rows ``cos``/``sin_signed`` ``[B, 1, 1,
    D_head]`` from :func:`decode_rope_tables`; scratch from :func:`decode_buffers`. With an int ``column`` the
    token attends to cache columns ``0..column``, with a 0-d device tensor (CUDA-graph capture) to the cache's
    whole active window; ``mask`` (boolean or additive, ``[B, 1, 1, S]`` over those columns) or None when every
    one of them is valid. Computes what :func:`llama_layer` computes (same math; fused, transposed, norm-folded
    weights; residual adds inside the products). With ``packed.qk_norm`` (Qwen3) the q and k heads are
    RMS-normalized in one pass and weighted, in place, before the rotation (HF's order and rounding)."""
    decode_linear(normalize(x, packed.input_eps), packed.qkv, packed.qkv_bias, buffers.qkv)
    if packed.qk_norm is not None:
        torch.mul(normalize(buffers.qk, packed.qk_norm_eps), packed.qk_norm, out=buffers.qk)
    # q and k rotated together and in place; then k|v goes to the cache in one copy.
    _apply_rope_signed_(buffers.qk, cos, sin_signed)
    cache.write_token(layer_idx, column, buffers.kv)
    k, v = cache.layer(layer_idx)
    if isinstance(column, int):
        k, v = k[:, :, : column + 1], v[:, :, : column + 1]
    o = attention(buffers.q, k, v, mask)
    decode_linear(o.view(x.shape[0], -1), packed.o, packed.o_bias, x, accumulate=True)
    decode_linear(normalize(x, packed.post_eps), packed.gate_up, packed.gate_up_bias, buffers.gate_up)
    return decode_linear(F.silu(buffers.gate, inplace=True).mul_(buffers.up), packed.down, packed.down_bias, x,
                         accumulate=True)
