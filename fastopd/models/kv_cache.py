"""A preallocated key/value cache with in-place writes, and the attention that reads it.

The cache holds ``keys``/``values`` of shape ``[L, B_max, H_kv, S_max, D_head]``, the two halves of one ``[2, L, B_max,
H_kv, S_max, D_head]`` allocation (a decode step writes a token's key and value in one copy). :meth:`KVCache.reset`
selects the active ``[B, S]`` window (views, no copy) before a forward pass; a cache is reused as long as the window
fits and is grown (reallocated) only when a larger batch or length is asked for. Sequences are left-aligned in time:
column ``c`` of every row holds the token at padded column ``c``, so one integer ``start`` addresses the write position
of the whole batch and padding is expressed by the attention mask alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    """Preallocated per-layer key/value storage ``[L, B_max, H_kv, S_max, D_head]`` (see module docstring)."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_length: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.storage = torch.zeros(2, num_layers, batch_size, num_kv_heads, max_length, head_dim, dtype=dtype,
                                   device=device)
        self.keys, self.values = self.storage.unbind(0)
        self.num_layers = num_layers
        self.batch_size = 0
        self.length = 0
        self._layer_views: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pair_views: list[torch.Tensor] = []
        self.reset(batch_size, max_length)

    @property
    def capacity(self) -> tuple[int, int]:
        """``(B_max, S_max)``: the largest window :meth:`reset` accepts without reallocating."""
        return self.keys.shape[1], self.keys.shape[3]

    @property
    def nbytes(self) -> int:
        """Bytes held by the key and value tensors (the whole allocation, not only the active window)."""
        return self.storage.numel() * self.storage.element_size()

    def fits(self, batch_size: int, length: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
             device: torch.device) -> bool:
        _, b, h, s, d = self.keys.shape
        return (batch_size <= b and length <= s and h == num_kv_heads and d == head_dim and self.keys.dtype == dtype
                and self.keys.device == torch.device(device))

    def reset(self, batch_size: int, length: int) -> None:
        """Make ``[:batch_size, :, :length]`` the active window. Old contents are not cleared: every column a
        forward pass reads is written first or masked out."""
        b_max, s_max = self.capacity
        if batch_size > b_max or length > s_max:
            raise ValueError(f"KVCache window [{batch_size}, {length}] exceeds capacity [{b_max}, {s_max}]")
        self.batch_size, self.length = batch_size, length
        self._pair_views = [self.storage[:, i, :batch_size, :, :length] for i in range(self.num_layers)]
        self._layer_views = [(kv[0], kv[1]) for kv in self._pair_views]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Active ``(keys, values)`` views of one layer, each ``[B, H_kv, S, D_head]``."""
        return self._layer_views[index]

    def write(
        self, index: int, start: int | torch.Tensor, keys: torch.Tensor, values: torch.Tensor, expand: int = 1
    ) -> None:
        """Write ``keys``/``values`` ``[B / expand, H_kv, T, D_head]`` into columns ``start..start+T-1``.

        With ``expand > 1`` each input row fills ``expand`` consecutive cache rows (prefix sharing: a prompt
        prefilled once serves all of its samples) by a broadcasting copy, without materializing the repeat.
        ``start`` may be a 0-d int64 tensor on the cache's device (``expand == 1``): the write is then an
        ``index_copy_`` whose address does not change between calls, as a captured CUDA graph needs.
        """
        k_cache, v_cache = self._layer_views[index]
        t = keys.shape[2]
        if isinstance(start, torch.Tensor):
            if expand != 1:
                raise ValueError("KVCache.write with a tensor start supports expand=1 only")
            cols = start.reshape(1) if t == 1 else start + torch.arange(t, device=start.device)
            k_cache.index_copy_(2, cols, keys)
            v_cache.index_copy_(2, cols, values)
        elif expand == 1:
            k_cache[:, :, start : start + t].copy_(keys)
            v_cache[:, :, start : start + t].copy_(values)
        else:
            k_cache.unflatten(0, (-1, expand))[:, :, :, start : start + t].copy_(keys.unsqueeze(1))
            v_cache.unflatten(0, (-1, expand))[:, :, :, start : start + t].copy_(values.unsqueeze(1))


    def write_token(self, index: int, column: int | torch.Tensor, key_value: torch.Tensor) -> None:
        """Write one token per row: ``key_value`` ``[2, B, H_kv, D_head]`` (keys then values; a transposed view of
        a fused k|v projection's ``[B, 2, H_kv, D_head]`` output) into column ``column``, in one copy. ``column``
        may be a 0-d int64 device tensor (an ``index_copy_``, for CUDA-graph capture)."""
        pair = self._pair_views[index]  # [2, B, H_kv, S, D_head]
        if isinstance(column, torch.Tensor):
            pair.index_copy_(3, column.reshape(1), key_value.unsqueeze(3))
        else:
            pair.select(3, column).copy_(key_value)


def build_attention_mask(key_mask: torch.Tensor, start: int, num_queries: int) -> torch.Tensor:
    """Boolean attention mask ``[B, 1, T, S]`` for ``T = num_queries`` queries at columns ``start..start+T-1``.

    ``key_mask`` ``[B, S]`` marks real (non-padding) key columns. A query sees valid keys at or before its own
    column, and always its own column, so that padding queries attend to themselves instead of to nothing (an
    all-masked row would turn into NaNs that later leak through masked-out values). A single decode query
    (``T == 1``) at the last column needs no causal part: the mask is a view of ``key_mask``.
    """
    key_mask = key_mask.bool()
    s = key_mask.shape[1]
    if num_queries == 1 and start == s - 1:
        return key_mask[:, None, None, :]
    q_cols = torch.arange(start, start + num_queries, device=key_mask.device)[:, None]
    k_cols = torch.arange(s, device=key_mask.device)[None, :]
    causal = k_cols <= q_cols
    return (key_mask[:, None, None, :] & causal) | (k_cols == q_cols)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None = None
) -> torch.Tensor:
    """Scaled dot-product attention ``[B, H_q, T, D]`` with grouped-query keys/values ``[B, H_kv, S, D]``.

    ``mask`` is boolean (True = attend) or additive float, ``[B, 1, T, S']``; one narrower than the keys restricts
    attention to the first ``S'`` columns (a decode step that reads only the filled part of a static cache).
    ``None`` attends to every key."""
    if mask is not None and mask.shape[-1] < k.shape[2]:
        width = mask.shape[-1]
        k, v = k[:, :, :width], v[:, :, :width]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
