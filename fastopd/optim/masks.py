"""Masks for SparseMaskedAdamW: which coordinates of which parameters to train.

A mask dict maps a parameter name to either a bool tensor of the parameter's shape or a 1-D integer tensor of
sorted flat (row-major) indices. Sources: a finished run's delta (`from_delta`), calibration statistics over a
few batches (`calibrate`), baselines (`random`, `smallest_weights`), optionally under per-module-kind budgets
(`module_kind`, `budgets=`). Files: `save`/`load` (safetensors, format "fastopd.masks.v1", see docs/optim.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from fastopd._io import atomic_path
from fastopd.analysis import naming

FORMAT = "fastopd.masks.v1"
# Module kinds come from the one classifier, fastopd.analysis.naming; the masks' budgets and files have always
# called its "embed" kind "embedding" (docs/optim.md), so that one name is mapped.
_MASK_KIND_NAMES = {"embed": "embedding"}
MODULE_KINDS = tuple(_MASK_KIND_NAMES.get(k, k) for k in naming.KINDS)
# Groups usable as budget keys besides the kinds themselves.
KIND_GROUPS = {
    "attention": ("attn_q", "attn_k", "attn_v", "attn_o", "attn_qkv"),
    "ffn": ("ffn_gate", "ffn_up", "ffn_down", "ffn_gate_up"),
    "embeddings": ("embedding", "lm_head"),
}
layer_index = naming.layer_index


def module_kind(name: str) -> str:
    """The module kind of a parameter from its name: one of MODULE_KINDS (`fastopd.analysis.module_kind`, with
    "embedding" for its "embed").

    >>> module_kind("model.layers.3.mlp.down_proj.weight"), module_kind("model.embed_tokens.weight")
    ('ffn_down', 'embedding')
    """
    kind = naming.module_kind(name)
    return _MASK_KIND_NAMES.get(kind, kind)


def to_indices(mask: torch.Tensor, shape: torch.Size | tuple[int, ...], name: str = "mask") -> torch.Tensor | None:
    """Normalizes a mask for a parameter of `shape` to sorted unique int64 flat indices [k] on the mask's device,
    or None when every coordinate is selected.

    Raises ValueError for a bool mask of another shape, a non-1-D or non-integer index tensor, a uint8 tensor
    (0/1 mask or indices?), out-of-range or duplicated indices. Unsorted indices are sorted. Synchronizes
    (validation reads the values).
    """
    numel = 1
    for s in shape:
        numel *= int(s)
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask {name!r} must be a tensor, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        if tuple(mask.shape) != tuple(shape):
            raise ValueError(f"bool mask {name!r} has shape {tuple(mask.shape)}, parameter has {tuple(shape)}")
        idx = mask.reshape(-1).nonzero().view(-1)
    elif mask.dtype == torch.uint8:
        # torch once indexed with uint8 as with bool: a 0/1 byte mask must not be read as flat indices 0 and 1
        raise ValueError(f"mask {name!r} is uint8, which reads as a 0/1 mask or as flat indices: pass mask.bool() "
                         f"for a 0/1 mask of shape {tuple(shape)}, or int32/int64 flat indices")
    elif not mask.is_floating_point() and not mask.is_complex():
        if mask.dim() != 1:
            raise ValueError(f"index mask {name!r} must be 1-D flat indices, got shape {tuple(mask.shape)}")
        idx = mask.long()
        if idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= numel:
                raise ValueError(f"index mask {name!r} has indices in [{lo}, {hi}], out of range for a parameter "
                                 f"of shape {tuple(shape)} (numel {numel})")
            if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                idx = idx.sort().values
                if bool((idx[1:] == idx[:-1]).any()):
                    raise ValueError(f"index mask {name!r} has duplicated indices")
    else:
        raise ValueError(f"mask {name!r} must be bool (shape {tuple(shape)}) or integer flat indices, got {mask.dtype}")
    return None if idx.numel() == numel else idx


# ---------------------------------------------------------------------------------------------------- helpers
Named = torch.nn.Module | Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


def _alias_key(t: torch.Tensor) -> tuple | None:
    """What makes two tensors views of the same values (a tied weight under two names in a state dict); None for
    tensors without addressable storage (meta, empty, DTensor), which are never treated as aliases."""
    if not isinstance(t, torch.Tensor) or t.device.type == "meta" or t.numel() == 0:
        return None
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return (t.device, t.dtype, ptr, t.storage_offset(), tuple(t.shape), t.stride())


def _named(params: Named) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs; a tensor named twice (tied weights in a state dict) only under its first name, as
    `model.named_parameters()` gives it and as SparseMaskedAdamW holds it."""
    if isinstance(params, torch.nn.Module):
        return [(n, p) for n, p in params.named_parameters() if p.requires_grad]
    items = list(params.items()) if isinstance(params, Mapping) else list(params)
    out, seen = [], set()
    for n, t in items:
        key = _alias_key(t)
        if key is not None and key in seen:
            continue
        seen.add(key)
        out.append((n, t))
    return out


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def to_bool(mask: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """A mask (bool or flat indices) as a bool tensor of `shape`."""
    if mask.dtype == torch.bool:
        return mask.reshape(shape)
    out = torch.zeros(_numel(shape), dtype=torch.bool, device=mask.device)
    out[mask.long()] = True
    return out.view(shape)


def count(mask: torch.Tensor) -> int:
    """Number of selected coordinates of a mask (bool or flat indices)."""
    return int(mask.sum()) if mask.dtype == torch.bool else mask.numel()


def _density_for(name: str, density: float | None, budgets: Mapping[str, float] | None) -> tuple[str, float]:
    """(budget key, density) of a parameter: its kind's budget, else its kind group's, else `density`."""
    kind = module_kind(name)
    if budgets:
        unknown = set(budgets) - set(MODULE_KINDS) - set(KIND_GROUPS)
        if unknown:
            raise ValueError(f"unknown budget keys {sorted(unknown)}; use module kinds {MODULE_KINDS} "
                             f"or groups {tuple(KIND_GROUPS)}")
        bad = {k: v for k, v in budgets.items() if not 0.0 <= float(v) <= 1.0}
        if bad:  # checked whether or not a parameter of that kind is present
            raise ValueError(f"budgets must be densities in [0, 1], got {bad}")
        if kind in budgets:
            return kind, float(budgets[kind])
        for group, kinds in KIND_GROUPS.items():
            if kind in kinds and group in budgets:
                return group, float(budgets[group])
    return "default", 0.0 if density is None else float(density)


def _check_density(d: float) -> None:
    if not 0.0 <= d <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {d}")


def _sortable_keys(score: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered like the non-negative float32 scores (NaN counts as 0)."""
    s = torch.nan_to_num(score.detach().float().reshape(-1), nan=0.0).clamp_min_(0.0)
    return s.view(torch.int32)


_RADIX_LEVELS = ((23, 8), (15, 8), (7, 8), (0, 7))  # (shift, width) over the 31 bits of a non-negative int32


def _kth_largest_key(keys: list[torch.Tensor], k: int) -> tuple[int, int]:
    """Radix select across several int32 key tensors without concatenating or sorting them: 4 streaming
    histogram passes. Returns (the k-th largest key, how many keys equal to it are among the top k)."""
    prefix, prefix_mask, remaining = 0, 0, k
    for shift, width in _RADIX_LEVELS:
        hist = torch.zeros(1 << width, dtype=torch.int64)
        for key in keys:
            sel = key if prefix_mask == 0 else key[(key & prefix_mask) == prefix]
            digit = (sel >> shift) & ((1 << width) - 1)
            hist += torch.bincount(digit.long(), minlength=1 << width).cpu()
        above = 0
        for d in range((1 << width) - 1, -1, -1):
            h = int(hist[d])
            if above + h >= remaining:
                prefix |= d << shift
                prefix_mask |= ((1 << width) - 1) << shift
                remaining -= above
                break
            above += h
    return prefix, remaining


def _top_indices(keys: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Sorted flat indices of the k largest keys across tensors (ties broken by tensor order, then index)."""
    total = sum(x.numel() for x in keys)
    if k >= total:
        return [torch.arange(x.numel(), device=x.device) for x in keys]
    if k <= 0:
        return [torch.zeros(0, dtype=torch.int64, device=x.device) for x in keys]
    thr, ties = _kth_largest_key(keys, k)
    out = []
    for key in keys:
        above = key > thr
        equal = (key == thr).nonzero().view(-1)
        take_eq = equal[:ties]
        ties -= take_eq.numel()
        idx = torch.cat([above.nonzero().view(-1), take_eq]).sort().values
        out.append(idx)
    return out


def _select(named_keys: list[tuple[str, torch.Tensor]], density: float | None, per: str,
            budgets: Mapping[str, float] | None) -> dict[str, torch.Tensor]:
    """Top-density coordinates by int32 key (see _sortable_keys), per tensor or globally per budget class."""
    if per not in ("tensor", "global"):
        raise ValueError(f"per must be 'tensor' or 'global', got {per!r}")
    classes: dict[str, tuple[float, list[tuple[str, torch.Tensor]]]] = {}
    for name, keys in named_keys:
        cls, d = _density_for(name, density, budgets)
        _check_density(d)
        classes.setdefault(cls, (d, []))[1].append((name, keys))
    out: dict[str, torch.Tensor] = {}
    for d, members in classes.values():
        if per == "tensor":
            for name, keys in members:
                out[name] = _top_indices([keys], round(d * keys.numel()))[0]
        else:
            k = round(d * sum(keys.numel() for _, keys in members))
            for (name, _), idx in zip(members, _top_indices([keys for _, keys in members], k)):
                out[name] = idx
    return {name: out[name] for name, _ in named_keys}


# ---------------------------------------------------------------------------------------------------- sources
@torch.no_grad()
def from_delta(base_state: Mapping[str, torch.Tensor], tuned_state: Mapping[str, torch.Tensor],
               atol: float = 0.0) -> dict[str, torch.Tensor]:
    """The coordinates a finished run changed: name -> sorted int64 flat indices where the stored value changed
    and |tuned - base| > atol. Floating-point tensors present in both states only.

    atol = 0: the stored bits differ (an unchanged NaN is unchanged; -0.0 and +0.0 differ), as `fastopd analyze
    --mask-out` decides. atol > 0: the difference is taken in the wider of the dtype and float32 (float64 stays
    float64), and a changed coordinate whose difference is NaN (it became or was NaN) counts as beyond atol.
    A tensor the tuned state names twice (tied weights: `model.embed_tokens.weight` and `lm_head.weight` of a
    tied model's `state_dict()`) gets one mask, under its first name as `model.named_parameters()` gives it, when
    both names changed the same coordinates (else, e.g. against an untied base, both are returned).
    Raises ValueError when a tensor's shapes differ between the two states, or when they share no floating-point
    tensor name at all (a prefixed state dict, e.g. of a torch.compile'd model: its {} would train every parameter
    densely).
    """
    out = {}
    first_name: dict[tuple, str] = {}
    for name, base in base_state.items():
        if name not in tuned_state or not base.is_floating_point():
            continue
        tuned = tuned_state[name]
        alias = _alias_key(tuned)
        if tuned.shape != base.shape:
            raise ValueError(f"{name!r}: base shape {tuple(base.shape)} != tuned shape {tuple(tuned.shape)}")
        common = torch.promote_types(base.dtype, tuned.dtype)  # exact for floating dtypes
        b, t = base.to(common), tuned.to(device=base.device, dtype=common)
        bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[common.itemsize]
        changed = b.view(bits) != t.view(bits)
        if atol > 0:
            comp = torch.promote_types(common, torch.float32)
            changed &= ~((t.to(comp) - b.to(comp)).abs() <= atol)  # "not <=": a NaN difference is beyond atol
        idx = changed.reshape(-1).nonzero().view(-1)
        # A tied weight of the tuned model (named twice in its state_dict()) with the same delta under both names is
        # one tensor to train: kept under its first name, the one model.named_parameters() gives (and
        # SparseMaskedAdamW holds), so the masks load with strict=True.
        earlier = first_name.get(alias) if alias is not None else None
        if earlier is not None and torch.equal(out[earlier], idx.to(out[earlier].device)):
            continue
        if alias is not None:
            first_name.setdefault(alias, name)
        out[name] = idx
    if not out:
        base_float = [n for n, t in base_state.items() if t.is_floating_point()]
        tuned_float = [n for n, t in tuned_state.items() if t.is_floating_point()]
        if base_float and tuned_float and not set(base_float) & set(tuned_float):
            # {} would be taken by SparseMaskedAdamW as "no masks": the whole model trained densely
            raise ValueError(f"base and tuned states have no floating-point tensor name in common (base: "
                             f"{base_float[:3]}, tuned: {tuned_float[:3]}): one of them prefixed, e.g. "
                             "'_orig_mod.' (torch.compile) or 'module.' (DDP)? fastopd.analysis.match_param_names "
                             "renames by a prefix")
    return out


def random(params: Named, density: float | None = None, *, budgets: Mapping[str, float] | None = None,
           generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Uniformly random coordinates: exactly round(density * numel) per tensor (per-kind `budgets` override
    `density`; tensors with neither get an empty mask, i.e. frozen). name -> sorted int64 flat indices. A tensor
    named twice (tied weights in a state dict) gets one mask, under its first name."""
    out = {}
    for name, p in _named(params):
        _, d = _density_for(name, density, budgets)
        _check_density(d)
        k = round(d * p.numel())
        out[name] = _random_subset(p.numel(), k, generator).to(p.device)
    return out


_RANDOM_BLOCK = 1 << 24  # above this many coordinates, `random` draws block by block


def _random_subset(n: int, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """k distinct indices of range(n), uniformly at random, sorted (int64, CPU).

    Up to `_RANDOM_BLOCK` coordinates: one `randperm`. Beyond (a 600M-element embedding's randperm alone is
    4.8 GB), block by block: the count of each block is drawn from the hypergeometric law of what is left (so
    the counts are those of a uniform k-subset, exactly k in all), then that many of the block's coordinates by a
    `randperm` of the block: memory of one block beside the result."""
    if n <= _RANDOM_BLOCK:
        return torch.randperm(n, generator=generator)[:k].sort().values
    import numpy as np

    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    counts_rng = np.random.default_rng(seed)
    parts, left, start = [], k, 0
    while start < n and left > 0:
        size = min(_RANDOM_BLOCK, n - start)
        rest = n - start - size
        take = _hypergeometric(counts_rng, size, rest, left) if rest else left
        if take:
            parts.append(torch.randperm(size, generator=generator)[:take].sort().values + start)
        left -= take
        start += size
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


_NUMPY_HYPERGEOMETRIC_MAX = 10**9  # numpy's Generator.hypergeometric takes ngood and nbad below this


def _hypergeometric(rng, good: int, bad: int, nsample: int) -> int:
    """How many of `nsample` draws without replacement from `good` + `bad` items are good.

    numpy refuses populations of 10^9 or more on either side (a 1.2B-element embedding, e.g. 152064 x 8192, has
    that many after its first block); there X ~ Binomial(good, p) and Y ~ Binomial(bad, p) conditioned on
    X + Y = nsample, which is exactly hypergeometric, drawn by rejection in batches."""
    if good < _NUMPY_HYPERGEOMETRIC_MAX and bad < _NUMPY_HYPERGEOMETRIC_MAX:
        return int(rng.hypergeometric(good, bad, nsample))
    import numpy as np

    p = nsample / (good + bad)
    while True:  # acceptance about 1 / sqrt(2 pi nsample (1 - p)) per pair: a few batches even at nsample = 1e9
        x, y = rng.binomial(good, p, size=1 << 16), rng.binomial(bad, p, size=1 << 16)
        hit = np.flatnonzero(x + y == nsample)
        if hit.size:
            return int(x[hit[0]])


@torch.no_grad()
def smallest_weights(params: Named, density: float | None = None, *, per: str = "tensor",
                     budgets: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
    """The near-zero weights: the round(density * numel) coordinates of smallest |w| per tensor (or globally
    within each budget class with per="global"). name -> sorted int64 flat indices."""
    # Smallest |w| == largest (key(inf) - key(|w|)): float32 bit patterns of non-negative values are ordered like
    # the values, so the inverted integer keys are too, exactly (no float cancellation) and stay non-negative.
    inf_key = int(torch.tensor(float("inf")).view(torch.int32))
    named = _named(params)
    for n, p in named:  # a NaN weight has no size: it would count as 0, the first coordinate chosen
        if p.is_floating_point() and bool(torch.isnan(p).any()):
            raise ValueError(f"smallest_weights: {n} holds NaN weights ({int(torch.isnan(p).sum())} of "
                             f"{p.numel()}); a weight's size is undefined there")
    keys = [(n, inf_key - _sortable_keys(p.detach().abs())) for n, p in named]
    return _select(keys, density, per, budgets)


def calibrate(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
              batches: Iterable[Any], density: float | None = None, *, score: str = "grad_abs", per: str = "tensor",
              budgets: Mapping[str, float] | None = None, betas: tuple[float, float] = (0.9, 0.999),
              eps: float = 1e-8) -> dict[str, torch.Tensor]:
    """Calibration masks: accumulate a per-coordinate statistic over a few batches, keep the top fraction.

    For each batch, `loss_fn(model, batch)` returns a scalar loss; its gradients update one running fp32
    statistic per trainable parameter (two for "adam_update"): "grad_abs" sum |g|, "grad_sq" sum g^2,
    "adam_update" |m_hat| / (sqrt(v_hat) + eps), the size of the first AdamW steps. Selection is streamed:
    per tensor (top round(density*numel) of each) or per="global" (one threshold per budget class found by a
    4-pass radix select over all tensors, no concatenation or full sort). Weights are not modified; gradients
    are reset to None. Returns name -> sorted int64 flat indices.
    """
    if score not in ("grad_abs", "grad_sq", "adam_update"):
        raise ValueError(f"score must be 'grad_abs', 'grad_sq' or 'adam_update', got {score!r}")
    named = _named(model)
    stats = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named}
    second = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named} if score == "adam_update" else {}
    b1, b2 = betas
    steps = 0
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        steps += 1
        with torch.no_grad():
            for n, p in named:
                if p.grad is None:
                    continue
                g = p.grad.float()
                if score == "grad_abs":
                    stats[n].add_(g.abs())
                elif score == "grad_sq":
                    stats[n].addcmul_(g, g)
                else:
                    stats[n].lerp_(g, 1 - b1)
                    second[n].mul_(b2).addcmul_(g, g, value=1 - b2)
    model.zero_grad(set_to_none=True)
    if steps == 0:
        raise ValueError("calibrate needs at least one batch")
    if score == "adam_update":
        for n in stats:
            m_hat = stats[n].abs_().div_(1 - b1**steps)
            stats[n] = m_hat.div_(second[n].div_(1 - b2**steps).sqrt_().add_(eps))
            del second[n]
    return _select([(n, _sortable_keys(s)) for n, s in stats.items()], density, per, budgets)


def _index_shape(mask: torch.Tensor, name: str) -> tuple[int, ...]:
    """The shape to check an index mask against when its parameter's is unknown: (one past its largest index,);
    for anything that is not 1-D integer indices the mask's own shape (`to_indices` then names the problem).
    Negative indices raise."""
    if mask.dim() != 1 or mask.is_floating_point() or mask.is_complex() or mask.dtype == torch.uint8:
        return tuple(mask.shape)
    if not mask.numel():
        return (0,)
    lo, hi = int(mask.min()), int(mask.max())
    if lo < 0:
        raise ValueError(f"index mask {name!r} has negative indices (min {lo})")
    return (hi + 1,)


# ---------------------------------------------------------------------------------------------------- files
def save(path: str, masks: Mapping[str, torch.Tensor | None], *,
         shapes: Mapping[str, Iterable[int]] | None = None, metadata: Mapping[str, str] | None = None) -> None:
    """Writes masks to a safetensors file (format "fastopd.masks.v1"): bool masks become sorted flat indices,
    int32 when they fit; None (every coordinate, as `SparseMaskedAdamW.mask_indices()` gives a full mask) needs
    its shape in `shapes` and is written as all indices; metadata records each tensor's parameter shape (from bool
    masks or `shapes`) and module kind as JSON. Written to a temporary file beside `path` and renamed over it when
    complete (`fastopd._io.atomic_path`), so an interrupted save leaves an existing file at `path` intact."""
    from safetensors.torch import save_file

    tensors, shape_meta = {}, {}
    for name, mask in masks.items():
        shape = [int(s) for s in shapes[name]] if shapes and name in shapes else None
        if mask is None:  # every coordinate, as SparseMaskedAdamW.mask_indices() gives a full mask
            if shape is None:
                raise ValueError(f"mask {name!r} is None (every coordinate): its parameter's shape is needed, "
                                 "pass it in shapes=")
            mask = torch.arange(_numel(shape))
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"mask {name!r} must be a tensor, got {type(mask).__name__}")
        if mask.dtype == torch.bool:
            if shape is not None and _numel(shape) != mask.numel():
                raise ValueError(f"bool mask {name!r} has shape {tuple(mask.shape)}, shapes= gives {tuple(shape)}")
            shape = shape if shape is not None else list(mask.shape)
            check = tuple(mask.shape)
        else:
            check = tuple(shape) if shape is not None else _index_shape(mask, name)
        # The file holds what the format promises, validated (and sorted) as the optimizer does: a float or 2-D
        # 0/1 mask, duplicated or out-of-range indices are refused rather than written as "indices".
        idx = to_indices(mask, check, name=name)
        numel = _numel(check)
        if idx is None:
            idx = torch.arange(numel, device=mask.device)
        if shape is not None:
            shape_meta[name] = shape
        tensors[name] = idx.to(device="cpu", dtype=torch.int32 if numel < 2**31 else torch.int64).contiguous()
    meta = {"format": FORMAT, "shapes": json.dumps(shape_meta),
            "kinds": json.dumps({n: module_kind(n) for n in masks})}
    meta.update(metadata or {})
    with atomic_path(path) as tmp:  # an interrupted save leaves the existing file as it was
        save_file(tensors, os.fspath(tmp), metadata=meta)


def _open_mask_file(path: str, device: torch.device | str = "cpu"):
    """`safe_open`, whose error for a truncated or corrupt file names neither the file nor the cause: re-raised as
    a SafetensorError (the type callers catch for an unreadable file) that does."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, framework="pt", device=str(device))
    except SafetensorError as exc:
        raise SafetensorError(f"{path}: cannot read the mask file, truncated or not a safetensors file ({exc})"
                              ) from None


def load(path: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Reads a "fastopd.masks.v1" safetensors file: name -> bool mask (kept as stored) or sorted int64 flat
    indices. Raises ValueError for another format, a tensor that is neither bool nor 1-D integer indices, or one
    that does not fit the parameter shape the file records for it (a bool mask of another shape, an index past its
    end), and safetensors' SafetensorError, naming the file, for a truncated or corrupt one."""
    out = {}
    with _open_mask_file(path, device) as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a fastopd mask file (metadata format {meta.get('format')!r}, "
                             f"expected {FORMAT!r})")
        shapes = _recorded_shapes(path, meta)
        for name in f.keys():
            t = f.get_tensor(name)
            shape = shapes.get(name)
            if t.dtype == torch.bool:
                if shape is not None and tuple(t.shape) != shape:
                    raise ValueError(f"{path}: bool mask {name!r} has shape {tuple(t.shape)}, the file records its "
                                     f"parameter's shape as {shape}")
                out[name] = t
            elif t.dtype in (torch.int32, torch.int64) and t.dim() == 1:
                if shape is not None and t.numel() and int(t.max()) >= _numel(shape):
                    raise ValueError(f"{path}: mask {name!r} holds flat index {int(t.max())}, past the end of its "
                                     f"parameter's recorded shape {shape} (numel {_numel(shape)})")
                out[name] = t.long()
            else:
                raise ValueError(f"{path}: mask {name!r} has dtype {t.dtype} and shape {tuple(t.shape)}; expected "
                                 "bool or 1-D int32/int64 flat indices")
    return out


def _recorded_shapes(path: str, meta: Mapping[str, str]) -> dict[str, tuple[int, ...]]:
    """The parameter shapes a mask file's metadata records (`save` writes those it knows), name -> shape."""
    try:
        shapes = json.loads(meta.get("shapes", "{}"))
        return {str(n): tuple(int(s) for s in v) for n, v in shapes.items()}
    except (ValueError, TypeError, AttributeError):
        raise ValueError(f"{path}: the mask file's metadata 'shapes' is not a JSON object of name -> shape "
                         f"({meta.get('shapes')!r:.80})") from None


def recorded_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """The parameter shapes a mask file records, name -> shape (names whose shape was not known when it was
    saved are absent)."""
    with _open_mask_file(path) as f:
        return _recorded_shapes(path, f.metadata() or {})


def load_metadata(path: str) -> dict[str, Any]:
    """The metadata of a mask file, JSON fields ("shapes", "kinds") decoded."""
    with _open_mask_file(path) as f:
        meta = dict(f.metadata() or {})
    for key in ("shapes", "kinds"):
        if key in meta:
            meta[key] = json.loads(meta[key])
    return meta


# ---------------------------------------------------------------------------------------------------- summary
def summary(masks: Mapping[str, torch.Tensor | None], params: Named | Mapping[str, Iterable[int]] | None = None,
            print_fn: Callable[[str], Any] | None = print) -> dict[str, Any]:
    """Density per module kind and per layer (printed as a table through `print_fn` unless it is None).

    `params` gives the parameter shapes of index masks and of None masks (every coordinate, as
    `SparseMaskedAdamW.mask_indices()` gives a full mask) (a model, a state dict, or name -> shape); bool masks
    carry their own. Returns {"total": row, "by_kind": {kind: row}, "by_layer": {layer: row}} with
    row = {"selected", "numel", "density"} (numel/density None when a shape is unknown)."""
    shapes: dict[str, tuple[int, ...]] = {}
    if params is not None:
        # every name's shape, a tied weight's second name included (`_named` would keep only the first)
        items = _named(params) if isinstance(params, torch.nn.Module) else (
            params.items() if isinstance(params, Mapping) else list(params))
        for n, v in items:
            shapes[n] = tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(int(s) for s in v)

    def row() -> dict[str, Any]:
        return {"selected": 0, "numel": 0, "density": None}

    total, by_kind, by_layer = row(), {}, {}
    for name, mask in masks.items():
        if mask is None:  # every coordinate (SparseMaskedAdamW.mask_indices() of a full mask)
            if name not in shapes:
                raise ValueError(f"mask {name!r} is None (every coordinate): pass its parameter's shape in params=")
            sel = numel = _numel(shapes[name])
        else:
            sel = count(mask)
            numel = mask.numel() if mask.dtype == torch.bool else (_numel(shapes[name]) if name in shapes else None)
        layer = layer_index(name)
        for r in (total, by_kind.setdefault(module_kind(name), row()),
                  by_layer.setdefault("-" if layer is None else layer, row())):
            r["selected"] += sel
            r["numel"] = None if numel is None or r["numel"] is None else r["numel"] + numel
    for r in (total, *by_kind.values(), *by_layer.values()):
        r["density"] = r["selected"] / r["numel"] if r["numel"] else None
    result = {"total": total, "by_kind": by_kind, "by_layer": by_layer}
    if print_fn is not None:
        def fmt(label: str, r: dict[str, Any]) -> str:
            dens = "?" if r["density"] is None else f"{100 * r['density']:.3f}%"
            numel = "?" if r["numel"] is None else f"{r['numel']:,}"
            return f"{label:<16} {r['selected']:>14,} {numel:>16} {dens:>10}"

        lines = [f"{'':<16} {'selected':>14} {'numel':>16} {'density':>10}", fmt("total", total), "by module kind:"]
        lines += [fmt(f"  {k}", by_kind[k]) for k in sorted(by_kind)]
        lines.append("by layer:")
        lines += [fmt(f"  {k}", by_layer[k]) for k in sorted(by_layer, key=lambda x: (isinstance(x, str), x))]
        print_fn("\n".join(lines))
    return result
