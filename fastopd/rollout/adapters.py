"""Model adapters: one small protocol over the built-in model and Hugging Face causal LMs.

An adapter exposes what rollouts and the fused loss need and nothing more: a decoder forward with explicit
positions, a prepared attention mask and an optional :class:`~fastopd.models.KVCache`, returning final hidden
states (no LM head); the output-embedding weight ``[V, D]`` (and bias); and the shapes needed to size a cache.
The adapter shares the model's parameters (no copies), so a training forward through it has autograd.

Supported: :class:`fastopd.models.Transformer`; Hugging Face ``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
``MistralForCausalLM``, ``Qwen3ForCausalLM`` (sliding windows become the context) through the Llama layer code;
``GPT2LMHeadModel``; and other Hugging Face causal LMs through their own forward (:class:`HFCausalLMAdapter`:
the types of ``HF_GENERIC_TYPES`` verified by the tests, any other after a self-check).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastopd import _dispatch
from fastopd.models.decode_linear import decode_linear
from fastopd.models.decode_linear import pack as pack_decode_weight
from fastopd.models.kv_cache import KVCache, attention, build_attention_mask
from fastopd.models.layers import (
    DecodeBuffers,
    decode_buffers,
    decode_eps,
    decode_rope_tables,
    llama_decode_layer,
    llama_layer,
    normalize,
    pack_llama_layer,
    rope_cos_sin,
)
from fastopd.models.transformer import Transformer

# MKL's packed sgemm (the op behind inductor's CPU "mkl linear"): a weight packed once for a fixed row count.
_HAS_MKL_PACK = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")

DecodeStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, KVCache, int | torch.Tensor], torch.Tensor]


def _storage_key(t: torch.Tensor) -> tuple:
    # Inference tensors have no version counter; the bitwise comparison alone covers them.
    version = None if t.is_inference() else t._version
    return t.data_ptr(), version, t.shape, t.stride(), t.dtype, t.device


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of ``a`` and its contiguous snapshot ``b`` (NaN payloads and signed zeros included)."""
    if not a.is_contiguous():
        return torch.equal(a, b)
    a, b = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    if a.numel() % 8 == 0:
        a, b = a.view(torch.int64), b.view(torch.int64)
    # Not through numpy: Tensor.numpy() marks the storage non-resizable for good, and FSDP2 frees and re-allocates
    # the storage of unsharded parameters by resizing it (reshard after generation would then fail).
    return torch.equal(a, b)


# The attribute under which `fastopd.distributed` installs a per-layer forward method (registered with FSDP2 through
# `register_fsdp_forward_method`, so the layer's own pre/post-forward hooks gather and free its weights).
LAYER_FORWARD = "fastopd_layer_forward"
# Set (True) on the layers of a frozen FSDP2 module (a sharded teacher): they always run through LAYER_FORWARD.
LAYER_ALWAYS_ROUTED = "fastopd_layer_always_routed"


def _checkpointed(fn: Callable[..., torch.Tensor], checkpoint: Callable[..., Any]) -> Callable[..., torch.Tensor]:
    """`fn` run under the Hugging Face layer's activation-checkpoint function (tensors passed positionally, as the
    reentrant variant needs)."""
    return lambda layer, *args, **kwargs: checkpoint(functools.partial(fn, layer, **kwargs), *args)


def call_layer(fn: Callable[..., torch.Tensor], layer: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """`fn(layer, *args, **kwargs)`: through the layer's installed forward method when it has one and autograd is
    on (the training forward of a per-layer FSDP2 student) or the layer is always routed (a sharded teacher, whose
    layers gather their weights one at a time also when scoring); directly otherwise (one process, or generation
    and self-scoring, which run on weights already gathered).

    A Hugging Face layer with activation checkpointing on (``model.gradient_checkpointing_enable()``, in train mode,
    autograd on: the conditions of Hugging Face's own forward) runs ``fn`` under the checkpoint function the model
    configured (reentrant or not, offloading, every n-th layer), inside the routed forward so that FSDP2's hooks
    stay outside the recomputation, as in Hugging Face."""
    checkpoint = layer.__dict__.get("_gradient_checkpointing_func")
    if (checkpoint is not None and getattr(layer, "gradient_checkpointing", False) and layer.training
            and torch.is_grad_enabled()):
        fn = _checkpointed(fn, checkpoint)
    routed = layer.__dict__.get(LAYER_FORWARD)
    if routed is not None and (torch.is_grad_enabled() or layer.__dict__.get(LAYER_ALWAYS_ROUTED, False)):
        return routed(fn, *args, **kwargs)
    return fn(layer, *args, **kwargs)


class DerivedWeights:
    """A value derived from parameters (packed, transposed copies), rebuilt only when a source changed.

    :meth:`get` returns ``build(*sources)``, built again when a source has another storage, shape, stride, dtype
    or device, a moved version counter (in-place updates through autograd-visible ops: ``torch.optim`` for-loop
    and foreach steps, ``load_state_dict``, ``copy_``), or other bits than the snapshot kept from the last build.
    The bitwise comparison is what keeps a training model current: some in-place updates leave the version
    counter alone (``torch.optim.AdamW(fused=True)``, fastopd's C++ ``SparseMaskedAdamW`` step, writes through
    ``.data``). It reads every source once per call (about 3 ms for 21 MB of fp32 weights on one CPU core, where
    re-packing costs about 15 ms) and holds one copy of the sources.

    On CUDA nothing is kept: the value is built at every call (as before this cache existed), because the snapshot
    and the kept copy would hold two more copies of the weights in GPU memory, where re-packing is cheap.
    """

    def __init__(self, build: Callable[..., Any]) -> None:
        self._build = build
        self._keys: list[tuple] | None = None
        self._snapshot: list[torch.Tensor] = []
        self._value: Any = None

    def get(self, sources: Sequence[torch.Tensor]) -> Any:
        sources = [s.detach() for s in sources]
        if any(s.is_cuda for s in sources):
            self.clear()
            return self._build(*sources)
        keys = [_storage_key(s) for s in sources]
        if keys != self._keys or not all(_same_bits(s, c) for s, c in zip(sources, self._snapshot)):
            self._value = None  # free the old copies before building new ones
            self._value = self._build(*sources)
            self._snapshot = [s.clone(memory_format=torch.contiguous_format) for s in sources]
            self._keys = keys
        return self._value

    def clear(self) -> None:
        """Drop the derived value and the snapshot (the next :meth:`get` rebuilds)."""
        self._keys, self._snapshot, self._value = None, [], None


class ModelAdapter:
    """Protocol of the rollout engine's models. Subclasses set the shape attributes and implement ``forward``."""

    model: nn.Module
    vocab_size: int  # rows of the input embedding: token ids must be below it
    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    sliding_window: int | None = None  # set when max_positions is an attention window, not the trained context
    # The model's logits are softcap(logit_scale * (hidden @ W^T + b)) with softcap(z) = c * tanh(z / c) (Gemma 2's
    # final_logit_softcapping, Granite's 1 / logits_scaling, Cohere's logit_scale); 1 and None for most models.
    logit_scale: float = 1.0
    logit_softcap: float | None = None

    @property
    def device(self) -> torch.device:
        return self.output_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.output_weight.dtype

    @property
    def output_weight(self) -> torch.Tensor:
        """``[V, D]`` output-embedding (LM head) weight, the model's own parameter."""
        raise NotImplementedError

    @property
    def output_bias(self) -> torch.Tensor | None:
        """``[V]`` LM-head bias, or None."""
        return None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache: KVCache | None = None,
        start: int = 0,
        expand: int = 1,
    ) -> torch.Tensor:
        """Final hidden states ``[B, T, D]`` for ``input_ids``/``positions`` ``[B, T]`` and a boolean ``mask``
        ``[B, 1, T, S]`` (see :func:`fastopd.models.build_attention_mask`); cache semantics as in
        :meth:`fastopd.models.Transformer.forward`."""
        raise NotImplementedError

    def layer_modules(self) -> list[nn.Module]:
        """The decoder layers :meth:`forward` runs, in order (each goes through :func:`call_layer`), so that data
        parallelism can shard them one by one."""
        return []

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., V]`` logits of hidden states ``[..., D]`` (scaled and soft-capped as the model's are)."""
        return self._post_head(F.linear(hidden, self.output_weight, self.output_bias))

    def _post_head(self, z: torch.Tensor) -> torch.Tensor:
        """``softcap(logit_scale * z)`` of head outputs ``z`` (``z`` itself for most models)."""
        if self.logit_scale != 1.0:
            z = z * self.logit_scale
        if self.logit_softcap is not None:
            z = torch.tanh(z / self.logit_softcap) * self.logit_softcap
        return z

    def decode_head(self, batch_size: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """Logits function ``[B, D] -> [B, V]`` of final hidden states, for generation, with the current weights.

        On CPU the head is multiplied in a layout prepared once and kept while the head is unchanged (see
        :class:`DerivedWeights`): for fp32, fastopd's decode kernel over 48-column panels
        (:mod:`fastopd.models.decode_linear`; ~3x MKL at the benchmark's 8192 x 256 head on an AMD EPYC); where
        that backend is unavailable or ``FASTOPD_IMPL=torch``, for fp32 with MKL and a known ``batch_size``, packed
        by ``cblas_sgemm_pack`` for ``B = batch_size`` (the same product, bit for bit, with the packing of the
        weight done once instead of on every call; the packed buffer takes ~3.5x the head's bytes at that size,
        less for larger heads); otherwise a contiguous transposed copy (MKL is about 2x faster with ``[D, V]`` than
        with ``[V, D]^T`` at decode shapes). Another batch size re-packs. A model's logit scale and soft-cap are
        applied after the product."""
        head = self._linear_head(batch_size)
        if self.logit_scale == 1.0 and self.logit_softcap is None:
            return head
        return lambda h: self._post_head(head(h))

    def _linear_head(self, batch_size: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
        w, bias = self.output_weight.detach(), self.output_bias
        if w.device.type != "cpu":
            return lambda h: F.linear(h, w, bias)
        bias = bias.detach() if bias is not None else None
        if not hasattr(self, "_head_t"):
            self._head_t = DerivedWeights(lambda weight: pack_decode_weight(weight.t()))  # panels or [D, V]
            self._head_mkl = DerivedWeights(lambda weight: torch.ops.mkl._mkl_reorder_linear_weight(
                weight, self._head_mkl_rows))
            self._head_mkl_rows = None
        own_kernel = w.dtype == torch.float32 and _dispatch.resolve("decode_linear", "auto", w.device) == "cpu"
        if batch_size is not None and w.dtype == torch.float32 and _HAS_MKL_PACK and not own_kernel:
            if batch_size != self._head_mkl_rows:
                self._head_mkl_rows = batch_size
                self._head_mkl.clear()
            packed = self._head_mkl.get([w])
            return lambda h: torch.ops.mkl._mkl_linear(h, packed, w, bias, batch_size)
        w_t = self._head_t.get([w])
        return lambda h: decode_linear(h, w_t, bias)

    def prepare_decode(self, length: int | None = None, batch_size: int | None = None) -> DecodeStep:
        """A one-token decode step ``(tokens [B], positions [B, 1], mask, cache, column) -> logits [B, V]`` for the
        current weights (no autograd; call again after the weights change: derived copies are rebuilt only if
        they did). ``column`` is the cache column of the new token: an int (attend to columns ``0..column``) or a
        0-d device tensor (attend to the whole active window, for CUDA-graph capture); ``mask`` is ``[B, 1, 1,
        S]`` over those columns (boolean, or additive float), or None when all are valid. Positions stay below
        ``length`` (default: the model's context); ``batch_size``, when given, is ``B`` (the head may be laid out
        for it, see :meth:`decode_head`). The step's ``head`` attribute is the :meth:`decode_head` it uses (for
        the logits of the prefill's last state). This default runs :meth:`forward` under the boolean mask that
        :meth:`forward` takes, over the cache's whole active window as with any ``start > 0`` (None becomes True
        up to ``column``, an additive one True where it is above -inf; columns past the given mask are False);
        adapters override it with faster weight layouts."""
        head = self.decode_head(batch_size)

        def step(tokens, positions, mask, cache, column):
            if mask is None:
                width = column + 1 if isinstance(column, int) else cache.length
                mask = torch.ones(tokens.shape[0], 1, 1, width, dtype=torch.bool, device=tokens.device)
            elif mask.dtype != torch.bool:
                mask = mask > float("-inf")
            if mask.shape[-1] < cache.length:  # keys are the cache's active window (cache.layer), as in scoring
                rest = mask.new_zeros(*mask.shape[:-1], cache.length - mask.shape[-1])
                mask = torch.cat([mask, rest], -1)
            return head(self.forward(tokens[:, None], positions, mask, cache, column)[:, 0])

        step.head = head
        return step

    def release_decode_weights(self) -> None:
        """Free the derived decode copies (transposed head, packed layers, rotary table) and their snapshots; the
        next call rebuilds them."""
        for value in vars(self).values():
            for derived in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(derived, DerivedWeights):
                    derived.clear()

    def new_cache(self, batch_size: int, length: int) -> KVCache:
        return KVCache(self.num_layers, batch_size, self.num_kv_heads, length, self.head_dim, dtype=self.dtype,
                       device=self.device)


class LlamaFamilyAdapter(ModelAdapter):
    """Shared forward and decode step of Llama-named decoders; subclasses point at the modules."""

    model: nn.Module
    num_heads: int
    embed: nn.Embedding
    layers: nn.ModuleList
    norm: nn.Module
    # [D_head / 2] rotary frequencies. The built-in adapters read the model's buffer at each use (a property): a
    # reference kept at construction goes stale when `model.to(dtype)` or a device move replaces the buffer.
    inv_freq: torch.Tensor
    rope_scaling: float = 1.0

    def forward(self, input_ids, positions, mask, cache=None, start=0, expand=1):
        x = self.embed(input_ids)
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype, self.rope_scaling)
        for i, layer in enumerate(self.layers):
            x = call_layer(llama_layer, layer, x, cos, sin, mask, num_heads=self.num_heads,
                           num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, cache=cache, layer_idx=i,
                           start=start, expand=expand)
        return self.norm(x)

    def layer_modules(self) -> list[nn.Module]:
        return list(self.layers)

    def _layer_sources(self, layer: nn.Module) -> list[torch.Tensor]:
        """The tensors :func:`pack_llama_layer` reads (biases and Qwen3's q/k norms where present)."""
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        sources = ([lin.weight for lin in linears] + [lin.bias for lin in linears if lin.bias is not None]
                   + [layer.input_layernorm.weight, layer.post_attention_layernorm.weight])
        if getattr(attn, "q_norm", None) is not None:
            sources += [attn.q_norm.weight, attn.k_norm.weight]
        return sources

    def prepare_decode(self, length: int | None = None, batch_size: int | None = None) -> DecodeStep:
        """Decode step over packed weights (fused q|k|v and gate|up, transposed, contiguous, norm weights folded
        in): one ``mm``/``addmm`` per projection into per-batch scratch, residuals added in place, q and k rotated
        in one pass with rotary rows gathered from a table, k|v written to the cache in one copy, and the head of
        :meth:`decode_head`. The packed copies and the rotary table are kept between calls and rebuilt only for
        the layers whose weights changed (:class:`DerivedWeights`)."""
        length = self.max_positions if length is None else length
        if not hasattr(self, "_packed"):
            self._packed = [DerivedWeights(lambda *_, layer=layer: pack_llama_layer(layer)) for layer in self.layers]
            self._rope = DerivedWeights(lambda inv_freq: decode_rope_tables(
                self._rope_key[0], inv_freq, self._rope_key[1], self.rope_scaling))
            self._rope_key = (0, None, None)
        packed = [d.get(self._layer_sources(layer)) for d, layer in zip(self._packed, self.layers)]
        # The table's length grows like the KV cache (a longer generation rebuilds it); its dtype and device are
        # the model's, which inv_freq alone does not tell (a kept fp32 buffer under bf16 weights).
        rope_key = (max(length, self._rope_key[0]), self.dtype, self.device)
        if rope_key != self._rope_key:
            self._rope_key = rope_key
            self._rope.clear()
        cos_table, sin_table = self._rope.get([self.inv_freq])
        embed = self.embed.weight.detach()
        norm_w, norm_eps = self.norm.weight.detach(), decode_eps(self.norm.variance_epsilon, self.device)
        head = self.decode_head(batch_size)
        shapes = dict(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim)
        rope_shape = (-1, 1, 1, self.head_dim)
        buffers: dict[int, DecodeBuffers] = {}  # per batch size, for every step of this preparation

        def step(tokens, positions, mask, cache, column):
            x = F.embedding(tokens, embed)
            bufs = buffers.get(x.shape[0])
            if bufs is None:
                bufs = buffers[x.shape[0]] = decode_buffers(packed[0], x.shape[0], **shapes)
            rows = positions.view(-1)
            cos = cos_table.index_select(0, rows).view(rope_shape)
            sin = sin_table.index_select(0, rows).view(rope_shape)
            for i, pk in enumerate(packed):
                llama_decode_layer(pk, x, cos, sin, mask, cache, i, column, bufs)
            return head(norm_w * normalize(x, norm_eps))

        step.head = head
        return step


class BuiltinAdapter(LlamaFamilyAdapter):
    """Adapter of :class:`fastopd.models.Transformer`."""

    def __init__(self, model: Transformer) -> None:
        cfg = model.config
        self.model = model
        self.embed, self.layers, self.norm = model.embed_tokens, model.layers, model.norm
        self.vocab_size = cfg.vocab_size
        self.hidden_size = cfg.hidden_size
        self.num_layers = cfg.num_layers
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.max_positions = cfg.max_position_embeddings

    @property
    def inv_freq(self) -> torch.Tensor:
        return self.model.inv_freq

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.lm_head.weight


def _sliding_window(cfg: Any) -> int | None:
    """The attention window of a Hugging Face config with sliding-window layers (Mistral's ``sliding_window``;
    Qwen2's and Qwen3's, set only under ``use_sliding_window``, for the ``layer_types`` that say so), else None.
    Mistral's modeling ignores ``layer_types`` (a Ministral-style config loaded as Mistral may carry them): its
    window applies to every layer."""
    window = getattr(cfg, "sliding_window", None)
    layer_types = None if getattr(cfg, "model_type", None) == "mistral" else getattr(cfg, "layer_types", None)
    if not window or (layer_types is not None and "sliding_attention" not in layer_types[: cfg.num_hidden_layers]):
        return None
    return int(window)


class HFLlamaAdapter(LlamaFamilyAdapter):
    """Adapter of Hugging Face Llama-family causal LMs (Llama, Qwen2, Mistral, Qwen3).

    The layers run through :func:`fastopd.models.layers.llama_layer` on the model's own modules (Qwen3's per-head
    ``q_norm``/``k_norm`` included, in prefill, training and the packed decode step); rotary
    frequencies come from the model's ``rotary_emb`` (so static RoPE scalings such as llama3/linear/yarn carry
    over). Dropout is not applied (rollouts and scoring are deterministic forwards). A model with sliding-window
    attention gets the window as its context (``max_positions``): within it, the attention is the full one.
    """

    def __init__(self, model: nn.Module) -> None:
        cfg = model.config
        base = model.model
        rope_type = getattr(base.rotary_emb, "rope_type", "default")
        if rope_type in ("dynamic", "longrope"):
            raise ValueError(f"{type(model).__name__}: rope_type={rope_type!r} depends on sequence length and is "
                             "not supported by the rollout adapter")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"{type(model).__name__}: hidden_act={cfg.hidden_act!r}, the adapter implements silu")
        self.model = model
        self.embed, self.norm = base.embed_tokens, base.norm
        self.layers = base.layers[: cfg.num_hidden_layers]
        self.rope_scaling = float(getattr(base.rotary_emb, "attention_scaling", 1.0))
        self.vocab_size = base.embed_tokens.num_embeddings
        self.hidden_size = cfg.hidden_size
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.max_positions = cfg.max_position_embeddings
        # Sliding-window attention equals full attention while every sequence fits in the window: the window is
        # the context the engine fills (prompt + horizon capped to it), so such models run exactly.
        self.sliding_window = _sliding_window(cfg)
        if self.sliding_window is not None:
            self.max_positions = min(self.max_positions, self.sliding_window)

    @property
    def inv_freq(self) -> torch.Tensor:
        return self.model.model.rotary_emb.inv_freq

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.lm_head.weight

    @property
    def output_bias(self) -> torch.Tensor | None:
        return self.model.lm_head.bias


class HFGPT2Adapter(ModelAdapter):
    """Adapter of Hugging Face ``GPT2LMHeadModel`` (learned positions, LayerNorm, GELU MLP, tied head)."""

    def __init__(self, model: nn.Module) -> None:
        cfg = model.config
        if getattr(cfg, "reorder_and_upcast_attn", False):
            raise ValueError("GPT-2 with reorder_and_upcast_attn=True is not supported by the rollout adapter")
        self.model = model
        tr = model.transformer
        self.vocab_size = tr.wte.num_embeddings
        self.hidden_size = cfg.n_embd
        self.num_layers = cfg.n_layer
        self.num_heads = cfg.n_head
        self.num_kv_heads = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.max_positions = cfg.n_positions
        base_scale = self.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        self._scales = [base_scale / (i + 1) if cfg.scale_attn_by_inverse_layer_idx else base_scale
                        for i in range(self.num_layers)]

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.lm_head.weight

    @property
    def output_bias(self) -> torch.Tensor | None:
        return self.model.lm_head.bias

    def forward(self, input_ids, positions, mask, cache=None, start=0, expand=1):
        tr = self.model.transformer
        x = tr.wte(input_ids) + tr.wpe(positions)
        for i, block in enumerate(tr.h):
            x = call_layer(self._block, block, x, mask, cache, i, start, expand)
        return tr.ln_f(x)

    def _block(self, block: nn.Module, x: torch.Tensor, mask, cache, i: int, start: int, expand: int) -> torch.Tensor:
        b, t, _ = x.shape
        hd, nh = self.head_dim, self.num_heads
        h = block.ln_1(x)
        q, k, v = block.attn.c_attn(h).view(b, t, 3, nh, hd).permute(2, 0, 3, 1, 4).unbind(0)
        if cache is not None:
            cache.write(i, start, k, v, expand)
            if start > 0:
                k, v = cache.layer(i)
        o = attention(q, k, v, mask, scale=self._scales[i])
        x = x + block.attn.c_proj(o.transpose(1, 2).reshape(b, t, nh * hd))
        return x + block.mlp.c_proj(block.mlp.act(block.mlp.c_fc(block.ln_2(x))))

    def layer_modules(self) -> list[nn.Module]:
        return list(self.model.transformer.h)


_HF_LLAMA_TYPES = ("llama", "qwen2", "mistral", "qwen3")


class _CacheView:
    """The Hugging Face ``Cache`` protocol over a :class:`KVCache`, for one forward that writes columns
    ``start..start+T-1``: each attention layer's ``update(k, v, layer_idx)`` writes its new keys/values (expanded
    to ``expand`` rows per input row: prefix sharing) and returns what the layer attends to, as the built-in layers
    do: the new keys/values themselves when ``start == 0`` (a prefill), else the cache's active window (the mask
    covers it). Made a subclass of ``transformers.Cache`` on first use (see :func:`_cache_view_class`)."""

    def __init__(self, cache: KVCache, start: int, expand: int, owner: str) -> None:
        self.layers: list = []  # no HF cache layers: is_sliding / is_linear of the Cache base class are then empty
        self.offloading = False
        self._cache, self._start, self._expand, self._owner = cache, start, expand, owner

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, h, _, d = self._cache.keys.shape
        if (key_states.shape != value_states.shape or key_states.shape[1] != h or key_states.shape[3] != d
                or not 0 <= layer_idx < self._cache.num_layers):
            raise ValueError(
                f"{self._owner}: layer {layer_idx} caches keys {tuple(key_states.shape)} and values "
                f"{tuple(value_states.shape)}, where the rollout KV cache holds {self._cache.num_layers} layers of "
                f"[B, {h}, S, {d}] (num_key_value_heads x head_dim of the config): this architecture's attention "
                "does not fit fastopd's KV cache")
        self._cache.write(layer_idx, self._start, key_states, value_states, self._expand)
        if self._start == 0:
            return key_states, value_states
        return self._cache.layer(layer_idx)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._start

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self._cache.length

    get_max_length = get_max_cache_shape
    is_compileable = False


@functools.cache
def _cache_view_class() -> type:
    from transformers.cache_utils import Cache  # a subclass: models and masking code test isinstance(..., Cache)

    return type("FastopdCacheView", (_CacheView, Cache), {})


def _signature_names(fn: Callable[..., Any]) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def _mentions_sliding_window(decoder: nn.Module) -> bool:
    """Whether the source of the module defining ``decoder``'s class names ``sliding_window`` (True when the source
    cannot be read): code that never reads the config's ``sliding_window`` attends to every earlier key."""
    try:
        source = inspect.getsource(sys.modules[type(decoder).__module__])
    except (KeyError, OSError, TypeError):
        return True
    return "sliding_window" in source


def _longrope_context(cfg: Any) -> int | None:
    """``original_max_position_embeddings`` of a config whose RoPE (of any layer type) is ``longrope``, else None."""
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        return None
    ropes = [rope] if "rope_type" in rope or "type" in rope else [r for r in rope.values() if isinstance(r, dict)]
    lengths = [r.get("original_max_position_embeddings") or getattr(cfg, "original_max_position_embeddings", None)
               for r in ropes if r.get("rope_type", r.get("type")) == "longrope"]
    lengths = [int(n) for n in lengths if n]
    return min(lengths) if lengths else None


class HFCausalLMAdapter(ModelAdapter):
    """Adapter of any Hugging Face causal LM through its own forward (Gemma, Gemma 2, Gemma 3, Phi-3, OLMo 2,
    Qwen3-MoE, Mixtral, ...): the decoder (``model.get_decoder()``, else ``model.base_model``) runs with explicit
    ``position_ids``, the engine's attention mask as a custom 4D mask (additive; per layer type where the model has
    sliding-window layers, whose window is applied exactly) and a view of the engine's :class:`KVCache` as its
    ``Cache``; the head is ``model.get_output_embeddings()``, with the model's logit multiplier and final soft-cap
    (``logit_scale``, ``logit_softcap``: Gemma 2's ``final_logit_softcapping``, Granite's ``1 / logits_scaling``,
    Cohere's ``logit_scale``) read as :mod:`fastopd.integrations.hf` reads them. Slower than the Llama-family
    adapter's packed decode step (one full Hugging Face forward per token), and exact wherever the model's
    attention takes a custom 4D mask.

    :func:`as_adapter` uses it for the model types the tests verify (``HF_GENERIC_TYPES``); other causal LMs are
    adapted only after a self-check (a left-padded prefill, a decode step through the cache and the head, against
    the model's plain forward, see :meth:`check`). Generation and scoring run the model in eval mode (no dropout,
    no activation checkpointing); the training forward (no cache) runs it in its own mode, so Hugging Face's
    activation checkpointing and any configured dropout apply as in its own training forward.

    Raises:
        ValueError: an attention implementation that ignores custom masks (use ``attn_implementation="sdpa"`` or
            ``"eager"``), layer types other than full and sliding-window attention, or a model without a decoder
            / linear output embeddings.
    """

    def __init__(self, model: nn.Module) -> None:
        from fastopd.integrations.hf import _logit_multiplier, _text_config, final_softcap

        name = type(model).__name__
        get_decoder = getattr(model, "get_decoder", None)
        self.decoder = get_decoder() if callable(get_decoder) else getattr(model, "base_model", None)
        if self.decoder is model:  # older transformers: a PreTrainedModel's base_model is itself when it has none
            self.decoder = None
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if self.decoder is None or not isinstance(head, nn.Linear):
            raise ValueError(f"{name}: the rollout adapter needs a causal LM with a decoder (get_decoder() or "
                             "base_model) and a linear output embedding (get_output_embeddings())")
        cfg = _text_config(model.config)
        attn = getattr(cfg, "_attn_implementation", None) or "eager"
        if attn not in ("sdpa", "eager"):
            raise ValueError(f"{name}: attn_implementation={attn!r} ignores custom 4D attention masks, which the "
                             "rollout engine passes (left padding, prefix sharing); load the model with "
                             'attn_implementation="sdpa" (or "eager")')
        for field in ("hidden_size", "num_hidden_layers", "num_attention_heads"):  # what sizes the KV cache
            if getattr(cfg, field, None) is None:
                raise ValueError(f"{name}: its config has no {field}, which the rollout adapter sizes the KV cache "
                                 "by (an architecture without attention heads, such as RWKV, is not supported)")
        layer_types = getattr(cfg, "layer_types", None)
        layer_types = list(layer_types[: cfg.num_hidden_layers]) if layer_types is not None else None
        unknown = sorted(set(layer_types or ()) - {"full_attention", "sliding_attention"})
        if unknown:
            raise ValueError(f"{name}: layer types {unknown} are not supported by the rollout adapter (full and "
                             "sliding-window attention are)")
        self.logit_scale = _logit_multiplier(model.config)
        self.logit_softcap = final_softcap(model)
        self.model = model
        self._head = head
        self._name = name
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.hidden_size = head.in_features  # what the decoder returns (OPT may project it below the config's)
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.max_positions = getattr(cfg, "max_position_embeddings", None)
        if self.max_positions is None:
            raise ValueError(f"{name}: its config has no max_position_embeddings (the context the rollout KV cache "
                             "is checked against)")
        window = getattr(cfg, "sliding_window", None) or None
        # Per layer type: the window of its keys (None: full attention). A model without layer types applies
        # its config's sliding_window (if any) to every layer, as Mistral-style masks do, if its code has sliding
        # windows at all: a config may carry one its architecture ignores (Gemma, OLMo 2, GPT-NeoX).
        if layer_types is None:
            self._windows: dict[str, int | None] | None = None
            self._window = window if window is not None and _mentions_sliding_window(self.decoder) else None
        else:
            self._windows = {kind: window if kind == "sliding_attention" else None for kind in set(layer_types)}
            self._window = None
        # A longrope RoPE switches every position to its long factors once a forward's positions pass its original
        # context: keys cached under the short ones would meet long-factor queries. Within it, the RoPE is fixed.
        self.longrope_context = _longrope_context(cfg)
        if self.longrope_context is not None:
            self.max_positions = min(self.max_positions, self.longrope_context)
        params = _signature_names(self.decoder.forward)
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._cache_position = "cache_position" in params

    @property
    def output_weight(self) -> torch.Tensor:
        return self._head.weight

    @property
    def output_bias(self) -> torch.Tensor | None:
        return self._head.bias

    def _masks(self, mask: torch.Tensor, start: int) -> torch.Tensor | dict[str, torch.Tensor]:
        """The boolean mask ``[B, 1, T, S]`` as Hugging Face's additive 4D mask(s) in the model's dtype."""
        t, s = mask.shape[-2:]
        dtype = self.dtype if self.dtype.is_floating_point else torch.float32
        low = torch.finfo(dtype).min

        def additive(window: int | None) -> torch.Tensor:
            keep = mask
            if window is not None:
                q = torch.arange(start, start + t, device=mask.device)[:, None]
                keep = keep & (q - torch.arange(s, device=mask.device)[None, :] < window)
            return torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill_(~keep, low)

        if self._windows is None:
            return additive(self._window)
        return {kind: additive(window) for kind, window in self._windows.items()}

    def forward(self, input_ids, positions, mask, cache=None, start=0, expand=1):
        kwargs: dict[str, Any] = dict(input_ids=input_ids, position_ids=positions,
                                      attention_mask=self._masks(mask, start), use_cache=cache is not None)
        if cache is not None:
            kwargs[self._cache_kwarg] = _cache_view_class()(cache, start, expand, self._name)
            if self._cache_position:
                kwargs["cache_position"] = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
            with _eval_mode(self.model):
                out = self.decoder(**kwargs)
        else:
            out = self.decoder(**kwargs)
        return out[0]

    def layer_modules(self) -> list[nn.Module]:
        return []

    @torch.no_grad()
    def check(self, atol: float | None = None) -> None:
        """Raise ValueError unless a left-padded 3-token prompt prefilled through the KV cache, then one decode
        step, give the final hidden states of the model's own forward over the unpadded 4 tokens: the contract of
        :meth:`forward` (custom mask honoured, positions taken as given, cache read back), checked cheaply for
        architectures the tests do not cover. Tolerance: relative error 1e-4 (fp32) or 3e-2 (16-bit weights)."""
        device = self.device
        ids = torch.tensor([[1, 2, 3, 4]], device=device) % self.vocab_size
        pad = torch.tensor([[5]], device=device) % self.vocab_size
        key_mask = torch.tensor([[False, True, True, True, True]], device=device)
        with _eval_mode(self.model):
            cache = self.new_cache(1, 5)
            try:
                positions = torch.arange(4, device=device)[None]
                ref = self.decoder(input_ids=ids, position_ids=positions, use_cache=False)[0]
                logits = self.model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
                got = [self.forward(torch.cat([pad, ids[:, :3]], 1), torch.tensor([[0, 0, 1, 2]], device=device),
                                    build_attention_mask(key_mask[:, :4], 0, 4), cache, 0)[:, 1:],
                       self.forward(ids[:, 3:], torch.tensor([[3]], device=device),
                                    build_attention_mask(key_mask, 4, 1), cache, 4)]
            except (RuntimeError, TypeError, ValueError, IndexError, AttributeError, KeyError) as e:
                raise ValueError(f"{self._name}: the rollout adapter's cached forward failed ({type(e).__name__}: "
                                 f"{e}): this architecture does not follow the custom-mask and cache protocol the "
                                 "adapter relies on") from e
        tol = atol if atol is not None else (1e-4 if self.dtype == torch.float32 else 3e-2)

        def error(a: torch.Tensor, b: torch.Tensor) -> float:
            a, b = a.float(), b.float()
            return float((a - b).norm() / b.norm().clamp_min(1e-30))

        err = error(torch.cat(got, 1), ref)
        if not err <= tol:
            raise ValueError(f"{self._name}: the rollout adapter's cached forward differs from the model's own "
                             f"(relative error {err:.3g} > {tol:g}): this architecture does not follow the custom-mask "
                             "and cache protocol the adapter relies on")
        err = error(self.logits(ref[0]), logits)
        if not err <= tol:
            raise ValueError(f"{self._name}: its logits are not softcap(scale * (hidden @ W^T + b)) of its output "
                             f"embedding (scale {self.logit_scale:g}, softcap {self.logit_softcap}; relative error "
                             f"{err:.3g} > {tol:g}: a head with more layers, or an unknown scale or cap), which the "
                             "rollout engine's sampling and the fused loss compute")


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """``model`` in eval mode for the block, each module's own mode restored after."""
    training = [m for m in model.modules() if m.training]
    for m in training:
        m.training = False
    try:
        yield
    finally:
        for m in training:
            m.training = True


# Hugging Face model types whose generation, scoring and training forward through HFCausalLMAdapter the tests check
# against the model's own generate and forward (tests/rollout/test_hf_generic.py).
HF_GENERIC_TYPES = ("gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "qwen3_moe", "mixtral", "qwen2_moe", "gpt_neox")


def as_adapter(model: nn.Module | ModelAdapter) -> ModelAdapter:
    """The adapter of ``model`` (adapters pass through).

    Raises:
        ValueError: a model the rollout engine does not know, or a Hugging Face model :class:`HFCausalLMAdapter`
            refuses or whose self-check fails.
    """
    if isinstance(model, ModelAdapter):
        return model
    # torch.compile's wrapper: the adapter runs the original module's layers (it shares its parameters). Only a
    # process that imported dynamo can hold one; importing it here would cost seconds.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    while eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        model = model._orig_mod
    if isinstance(model, Transformer):
        return BuiltinAdapter(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _HF_LLAMA_TYPES and hasattr(model, "model") and hasattr(model, "lm_head"):
        return HFLlamaAdapter(model)
    if model_type == "gpt2" and hasattr(model, "transformer") and hasattr(model, "lm_head"):
        return HFGPT2Adapter(model)
    if model_type is not None and (hasattr(model, "get_decoder") or hasattr(model, "base_model")):
        adapter = HFCausalLMAdapter(model)
        if model_type not in HF_GENERIC_TYPES:
            adapter.check()
        return adapter
    raise ValueError(
        f"no rollout adapter for {type(model).__name__} (model_type={model_type!r}); supported: "
        "fastopd.models.Transformer, Hugging Face causal LMs (a decoder and output embeddings), "
        "or a fastopd.rollout.ModelAdapter subclass"
    )
