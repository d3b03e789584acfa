"""The built-in decoder-only transformer: Llama-like (RMSNorm, RoPE, SwiGLU, optional GQA), small and explicit.

It is the model of fastopd's demo task and tests. Module names follow Hugging Face Llama, so the rollout engine
runs it and ``LlamaForCausalLM`` through the same layer code (:func:`fastopd.models.layers.llama_layer`).
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from fastopd.models.config import TransformerConfig
from fastopd.models.kv_cache import KVCache, build_attention_mask
from fastopd.models.layers import llama_layer, positions_from_mask, rms_norm, rope_cos_sin

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CONFIG_METADATA_KEY = "fastopd_config"


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.variance_epsilon)


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        d, dh = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(d, config.num_heads * dh, bias=False)
        self.k_proj = nn.Linear(d, config.num_kv_heads * dh, bias=False)
        self.v_proj = nn.Linear(d, config.num_kv_heads * dh, bias=False)
        self.o_proj = nn.Linear(config.num_heads * dh, d, bias=False)


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)


class DecoderLayer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)


class Transformer(nn.Module):
    """Decoder-only transformer returning final (normed) hidden states; ``lm_head.weight`` is ``[V, D]``.

    Example::

        model = Transformer(TransformerConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4))
        hidden = model(ids)                 # [B, T, D]
        logits = model.logits(ids)          # [B, T, V]
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", self._rope_inv_freq(), persistent=False)
        self.reset_parameters()

    def _rope_inv_freq(self, device: torch.device | str | None = None) -> torch.Tensor:
        exponents = torch.arange(0, self.config.head_dim, 2, dtype=torch.float, device=device) / self.config.head_dim
        return 1.0 / (self.config.rope_theta**exponents)

    def _apply(self, fn, recurse: bool = True):
        # `.to(dtype)`/`.half()` cast every floating buffer; the RoPE frequencies stay float32, as Hugging Face
        # keeps them (in bf16 they would misplace the rotary angle by up to 2.5 rad at position 2048).
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = self._rope_inv_freq(self.inv_freq.device)
        return self

    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for matrices, ones for norms; re-ties the head if configured."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        start: int = 0,
        expand: int = 1,
    ) -> torch.Tensor:
        """Final hidden states ``[B, T, D]`` of ``input_ids`` ``[B, T]`` (int64).

        Args:
            positions: ``[B, T]`` rotary positions; default: counted from ``attention_mask`` (left padding).
            attention_mask: ``[B, S]`` (1 = real token) over key columns ``0..S-1``, where ``S = T`` without a
                cache or with ``start == 0``, else the cache's active length; or a prepared boolean ``[B, 1, T, S]``
                mask (see :func:`~fastopd.models.kv_cache.build_attention_mask`). Default: no padding.
            cache: a :class:`KVCache` reset to this batch: keys/values are written at ``start..start+T-1``.
            start: first column of ``input_ids`` in the cache; ``start > 0`` attends to the cached columns.
            expand: with ``start == 0``, each input row is written to ``expand`` cache rows (prefix sharing).
        Raises:
            ValueError: ``input_ids`` not 2-D.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        if attention_mask is None:
            s = t if (cache is None or start == 0) else cache.length
            attention_mask = torch.ones(b, s, dtype=torch.bool, device=input_ids.device)
        if positions is None:
            positions = positions_from_mask(attention_mask)[:, start : start + t] if attention_mask.dim() == 2 else \
                torch.arange(start, start + t, device=input_ids.device).expand(b, t)
        mask = build_attention_mask(attention_mask, start, t) if attention_mask.dim() == 2 else attention_mask
        cfg = self.config
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.inv_freq, x.dtype)
        for i, layer in enumerate(self.layers):
            x = llama_layer(layer, x, cos, sin, mask, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                            head_dim=cfg.head_dim, cache=cache, layer_idx=i, start=start, expand=expand)
        return self.norm(x)

    def logits(self, input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``[B, T, V]`` logits (``forward`` then ``lm_head``), for convenience; training uses the hidden states."""
        return self.lm_head(self(input_ids, *args, **kwargs))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` (a tied head is stored once, as the embedding)."""
        from safetensors.torch import save_file

        from fastopd._io import atomic_path, write_text_atomic

        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight")
        config_text = json.dumps(self.config.to_dict(), indent=2)
        with atomic_path(os.path.join(directory, WEIGHTS_NAME)) as tmp:  # each file whole or as it was
            # the weights carry their config, so a save stopped between the two files is caught on load
            save_file(state, str(tmp), metadata={CONFIG_METADATA_KEY: config_text})
        write_text_atomic(os.path.join(directory, CONFIG_NAME), config_text)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> Transformer:
        """Load a model written by :meth:`save_pretrained`, cast to ``dtype`` (None: float32, the module's default,
        whatever dtype the weights were saved in). Raises ValueError naming the file on a ``config.json`` that is not
        a JSON object of config fields, weights that are not a readable safetensors file, missing, unexpected or
        misshapen tensors, or when ``config.json`` differs from the config the weights were saved with (a save that
        stopped between the two files)."""
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        config_path, weights = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
        with open(config_path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{config_path} is not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise ValueError(f"{config_path} holds a JSON {type(data).__name__}, not an object of config fields")
        try:
            config = TransformerConfig.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{config_path}: {e}") from e
        try:
            with safe_open(weights, framework="pt") as f:
                saved = (f.metadata() or {}).get(CONFIG_METADATA_KEY)  # absent in folders of older fastopd
            # fields that do not change what the weights compute may be edited in config.json by hand
            loose = {"max_position_embeddings", "initializer_range"}
            if saved is not None and ({k: v for k, v in json.loads(saved).items() if k not in loose}
                                      != {k: v for k, v in config.to_dict().items() if k not in loose}):
                raise ValueError(f"{directory}: {CONFIG_NAME} does not match the config saved with {WEIGHTS_NAME} "
                                 "(a save_pretrained that stopped part-way?)")
            state = load_file(weights, device=str(device))
        except SafetensorError as e:
            raise ValueError(f"{weights} is not a readable safetensors file ({e})") from e
        model = cls(config)
        if config.tie_word_embeddings and "embed_tokens.weight" in state:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        expected = model.state_dict()
        misshapen = {k: (tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items()
                     if k in expected and v.shape != expected[k].shape}
        if misshapen:
            raise ValueError(f"{weights}: tensors whose shapes do not match {CONFIG_NAME} (saved, expected): "
                             f"{misshapen}")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{weights}: missing tensors {missing}, unexpected tensors {unexpected}")
        if config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        return model.to(device=device, dtype=dtype)
