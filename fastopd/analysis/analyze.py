"""`analyze_update(base, tuned)`: how an update changed a model's weights, tensor by tensor."""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import torch

from fastopd.analysis.io import CheckpointLike, open_checkpoint, unwrap_names
from fastopd.analysis.masks import MaskWriter, prefix_renamings
from fastopd.analysis.naming import KINDS, layer_index, module_kind
from fastopd.analysis.report import UpdateReport, build_report
from fastopd.analysis.stats import AnalysisConfig, analyze_tensor

__all__ = ["AnalysisInputError", "MismatchError", "analyze_update", "select_null_tensors"]

NULL_MODES = ("sample", "all", "none")
STORAGE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)  # what Delta can be formed in


class MismatchError(ValueError):
    """BASE and TUNED disagree on tensor names or shapes (message lists them)."""


class AnalysisInputError(ValueError):
    """The options leave nothing to analyse or are invalid: an include/exclude pattern that is not a regular
    expression, an unknown null_models, a dtype that is not a 16/32/64-bit float torch.dtype, or no floating-point
    tensor left (filtered out, integer-only)."""


def _compile(pattern: str | None, option: str) -> re.Pattern | None:
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise AnalysisInputError(f"{option} (--{option}) {pattern!r} is not a valid regular expression: {exc}") from exc


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {x}" for x in items[:limit]) + more


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor, chunk: int, as_dtype: torch.dtype | None = None) -> bool:
    """Same shape, dtype and bits (NaN payloads and signed zeros included), compared chunk by chunk; with `as_dtype`,
    the bits of both cast to it (what the analysis calls unchanged in that storage dtype), whatever their dtypes."""
    if a.shape != b.shape or (as_dtype is None and a.dtype != b.dtype):
        return False
    dt = as_dtype or a.dtype
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[dt.itemsize]
    fa, fb = a.reshape(-1), b.reshape(-1)
    return all(torch.equal(fa[i:i + chunk].to(dt).view(ints), fb[i:i + chunk].to(dt).view(ints))
               for i in range(0, fa.numel(), chunk))


def _config_ties(ckpt) -> bool | None:
    """`tie_word_embeddings` of a model folder's config.json (top level, else its text_config); None: no folder, no
    config, or no such key (save_pretrained writes it only where it differs from the class default)."""
    path = Path(ckpt.description) / "config.json"
    try:
        cfg = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    tie = cfg.get("tie_word_embeddings", (cfg.get("text_config") or {}).get("tie_word_embeddings"))
    return tie if isinstance(tie, bool) else None


def _tie_partner(ckpts, name: str, candidates, chunk: int) -> str | None:
    """The first embedding among `candidates` that LM head `name` is tied to: same shape and dtype, bitwise equal in
    every checkpoint of `ckpts` (the tuned side only, when the other one leaves the tied copy out)."""
    if module_kind(name) != "lm_head":
        return None
    for e in candidates:
        if e == name or module_kind(e) != "embed":
            continue
        if all(c.infos[e].shape == c.infos[name].shape and c.infos[e].dtype == c.infos[name].dtype
               for c in ckpts) and all(_bitwise_equal(c.load(name), c.load(e), chunk) for c in ckpts):
            return e
    return None


def _prefix_alignment(only_base: list[str], only_tuned: list[str]) -> tuple[dict[str, str], str] | None:
    """TUNED's names onto BASE's where they differ by one dotted prefix P on every name one side has alone (an HF
    checkpoint's "model.layers.0..." against "layers.0..." of a bare model): {tuned name: base name} and the rule in
    words, or None when no prefix, or more than one, maps all the names of the side with fewer of them onto names
    of the other side (`masks.prefix_renamings`; the names left over stay mismatches)."""
    if not only_base or not only_tuned:
        return None
    few_is_tuned = len(only_tuned) <= len(only_base)
    few, many = (only_tuned, only_base) if few_is_tuned else (only_base, only_tuned)
    fits = prefix_renamings(few, set(many))
    if len(fits) != 1:
        return None
    prefix, strip, out = fits[0]
    strip_from_tuned = strip == few_is_tuned  # TUNED's names have the prefix that BASE's lack
    mapping = out if few_is_tuned else {v: k for k, v in out.items()}
    return mapping, (f"the prefix {prefix!r} is removed from TUNED's names" if strip_from_tuned
                     else f"the prefix {prefix!r} is added to TUNED's names") + " to match BASE's"


SAMPLE_MAX_NUMEL = 1 << 26  # "sample" skips bigger tensors (embeddings, LM heads: half the cost of a 1B model)


def select_null_tensors(names: list[str], mode: str, numels: dict[str, int] | None = None) -> set[str]:
    """Tensors that get null models: all, none, or a sample (per module kind: first, middle and last layer,
    among tensors of at most SAMPLE_MAX_NUMEL elements when `numels` is given). `analyze_update` passes only the
    tensors that changed for "sample" (an unchanged tensor has no null models)."""
    if mode == "all":
        return set(names)
    if mode == "none":
        return set()
    chosen: set[str] = set()
    by_kind: dict[str, list[str]] = {}
    for n in names:
        if numels is None or numels[n] <= SAMPLE_MAX_NUMEL:
            by_kind.setdefault(module_kind(n), []).append(n)
    for group in by_kind.values():
        group = sorted(group, key=lambda n: (layer_index(n) is None, layer_index(n) or 0, n))
        chosen.update({group[0], group[len(group) // 2], group[-1]})
    return chosen


def analyze_update(base: CheckpointLike, tuned: CheckpointLike, *, dtype: torch.dtype | None = None,
                   config: AnalysisConfig | None = None, null_models: str = "sample", allow_partial: bool = False,
                   include: str | None = None, exclude: str | None = None,
                   mask_out: str | os.PathLike | None = None, progress: bool = True) -> UpdateReport:
    """Measure Delta = tuned - base for every floating-point tensor the two checkpoints share.

    An LM head bitwise equal to an embedding of its shape and dtype in both checkpoints (or, where one checkpoint
    leaves the tied copy out, in the other) is skipped as "tied to <embedding>": counted once, not in the mask;
    a model folder's config.json with tie_word_embeddings false turns this off (docs/analysis.md, "Tied weights").

    Names are compared without what wrappers add (`io.unwrap_names`: "_orig_mod.", "module.", FSDP's) and, where the
    two sides still differ by one dotted prefix ("model." against none), under BASE's names; `meta["renamed"]` says
    what was renamed (docs/analysis.md, "Names").

    Args:
        base, tuned: model folders, safetensors files, torch state-dict files, `{name: tensor}` dicts,
            or `Checkpoint`s. Read tensor by tensor (safetensors: memory-mapped), so memory stays bounded.
        dtype: storage dtype to form Delta in (both sides cast to it first); None: the checkpoints' own
            (they must then agree per tensor).
        config: metric options (`AnalysisConfig`); its `dtype` is overridden by `dtype` when given.
        null_models: "sample" (per module kind: first, middle, last layer among the tensors that changed;
            tensors above 2^26 elements such as embeddings only with "all"), "all", or "none" (no findings).
        allow_partial: analyse the common tensors when names or shapes differ, instead of raising.
        include, exclude: regular expressions on tensor names (search semantics).
        mask_out: write the update mask (fastopd.masks.v1 safetensors, bool per parameter) there.
        progress: show a tqdm progress bar over tensors (on stderr).

    Raises:
        MismatchError: names/shapes/dtypes differ (names/shapes: unless allow_partial).
        CheckpointError: a file is unreadable or truncated (names the file), a shard of an index-less folder is
            missing, or removing wrapper prefixes gives two tensors one name.
        AnalysisInputError: an invalid include/exclude regex, null_models or dtype, or no floating-point tensor
            left to analyse (a ValueError).
    """
    cfg = config or AnalysisConfig()
    if dtype is not None:
        cfg = AnalysisConfig(**{**cfg.__dict__, "dtype": dtype})
    if cfg.dtype is not None and cfg.dtype not in STORAGE_DTYPES:
        raise AnalysisInputError(f"dtype must be None or one of {', '.join(map(str, STORAGE_DTYPES))}, "
                                 f"got {cfg.dtype!r}")
    if null_models not in NULL_MODES:
        raise AnalysisInputError(f"null_models must be one of {NULL_MODES}, got {null_models!r}")
    inc, exc = _compile(include, "include"), _compile(exclude, "exclude")
    t0 = time.perf_counter()
    # names are compared without what wrappers add (torch.compile's "_orig_mod.", DDP's "module.", FSDP's), and
    # where the two sides still differ by one prefix ("model." against none), under BASE's names
    bc, tc = unwrap_names(open_checkpoint(base)), unwrap_names(open_checkpoint(tuned))
    only_base = sorted(set(bc.infos) - set(tc.infos))
    only_tuned = sorted(set(tc.infos) - set(bc.infos))
    if (aligned := _prefix_alignment(only_base, only_tuned)) is not None:
        tc = tc.renamed(*aligned)
        only_base = sorted(set(bc.infos) - set(tc.infos))
        only_tuned = sorted(set(tc.infos) - set(bc.infos))
    common = [n for n in bc.names() if n in tc.infos]
    # Tied LM heads (see docs/analysis.md, "Tied weights"): an LM-head tensor bitwise equal, in each checkpoint that
    # has it, to an embedding of the same shape is the embedding itself, saved twice (fastopd's step checkpoints
    # clone it) or once (save_pretrained leaves it out): analysed once, under the embedding's name, and left out of
    # the mask (the optimizer holds one parameter). A config.json saying tie_word_embeddings false turns this off.
    ties_off = False in (_config_ties(bc), _config_ties(tc))
    skipped: dict[str, str] = {}
    for only, ckpt, side, other in ((only_tuned, tc, "TUNED", "BASE"), (only_base, bc, "BASE", "TUNED")):
        for n in list(only) if not ties_off else []:
            partner = _tie_partner([ckpt], n, [e for e in common if bc.infos[e].shape == tc.infos[e].shape],
                                   cfg.chunk_elems)
            if partner is not None:
                only.remove(n)
                skipped[n] = f"tied to {partner} (only in {side}: {other} leaves the tied copy out)"
    shape_mismatch = [n for n in common if bc.infos[n].shape != tc.infos[n].shape]
    problems = []
    if only_base:
        problems.append(_listing("only in BASE", only_base))
    if only_tuned:
        problems.append(_listing("only in TUNED", only_tuned))
    if shape_mismatch:
        problems.append(_listing("shape differs (BASE vs TUNED)", [
            f"{n}: {list(bc.infos[n].shape)} vs {list(tc.infos[n].shape)}" for n in shape_mismatch]))
    if problems and not allow_partial:
        raise MismatchError(f"BASE ({bc.description}) and TUNED ({tc.description}) do not match:\n"
                            + "\n".join(problems) + "\n(pass --allow-partial / allow_partial=True to analyse "
                            "the common tensors only)")
    if not common or len(shape_mismatch) == len(common):
        raise MismatchError(f"BASE ({bc.description}) and TUNED ({tc.description}) share no tensor of equal shape")
    names = []
    mask_names: dict[str, str] = {}  # a tied head analysed in place of its filtered-out embedding: its mask's name
    filtered = lambda e: bool((inc and not inc.search(e)) or (exc and exc.search(e)))  # noqa: E731
    for n in common:
        if n in shape_mismatch:
            continue
        if filtered(n):
            skipped[n] = "filtered by include/exclude"
            continue
        bd, td = bc.infos[n].dtype, tc.infos[n].dtype
        if not (bd.is_floating_point and td.is_floating_point) or bd.itemsize == 1 or td.itemsize == 1:
            skipped[n] = f"not a 16/32/64-bit floating-point tensor ({bd} / {td})"
            continue
        if bd != td and cfg.dtype is None:
            raise MismatchError(f"{n}: dtype {bd} in BASE ({bc.infos[n].source}) but {td} in TUNED "
                                f"({tc.infos[n].source}); pass --dtype to compare both in one storage dtype")
        if bc.infos[n].shape and 0 in bc.infos[n].shape:
            skipped[n] = "empty tensor"
            continue
        # every common embedding is a candidate, not only those already taken: the order of names is the files'
        # (safetensors sorts, and "lm_head.weight" comes before "model.embed_tokens.weight")
        partner = None if ties_off else _tie_partner([bc, tc], n, [e for e in common if e not in shape_mismatch],
                                                     cfg.chunk_elems)
        if partner is not None and not filtered(partner):
            skipped[n] = f"tied to {partner}"
            continue
        if partner is not None:  # --include/--exclude keeps the head and not its embedding: the head stands for it,
            mask_names[n] = partner  # and its mask carries the name the optimizer holds the one parameter under
        names.append(n)
    if not names:
        reasons: dict[str, int] = {}
        for why in skipped.values():
            reasons[why] = reasons.get(why, 0) + 1
        filters = "".join(f", {o} {p!r}" for o, p in (("include", include), ("exclude", exclude)) if p)
        raise AnalysisInputError(f"no floating-point tensor left to analyse among the {len(common)} that BASE and "
                                 f"TUNED share{filters}: " + "; ".join(f"{n} {why}" for why, n in reasons.items()))
    numels = {n: math.prod(bc.infos[n].shape) for n in names}
    if null_models == "sample":
        # drawn among the tensors that changed (in the storage dtype analysed): an unchanged tensor has no null
        # models, so an update confined to a few layers would otherwise get none, and no findings (one bitwise pass)
        candidates = [n for n in names if numels[n] <= SAMPLE_MAX_NUMEL and not _bitwise_equal(
            bc.load(n), tc.load(n), cfg.chunk_elems, cfg.dtype or bc.infos[n].dtype)]
    else:
        candidates = names
    with_null = select_null_tensors(candidates, null_models, numels)

    writer = None
    if mask_out is not None:
        from fastopd.optim.masks import module_kind as mask_kind  # the mask files' kind names ("embedding")

        Path(mask_out).parent.mkdir(parents=True, exist_ok=True)
        as_mask = {n: mask_names.get(n, n) for n in names}
        writer = MaskWriter(mask_out, [(as_mask[n], bc.infos[n].shape) for n in names],
                            {"source": "fastopd.analysis", "base": str(bc.description), "tuned": str(tc.description),
                             "shapes": json.dumps({as_mask[n]: list(bc.infos[n].shape) for n in names}),
                             "kinds": json.dumps({as_mask[n]: mask_kind(as_mask[n]) for n in names}),
                             "rule": "bitwise changed" if cfg.mask_atol is None else f"|delta| > {cfg.mask_atol:g}"})
    tensors: dict[str, dict] = {}
    spectra = {}
    try:
        from tqdm.auto import tqdm

        bar = tqdm(names, desc="fastopd analyze", unit="tensor", disable=not progress, dynamic_ncols=True)
        for n in bar:
            bar.set_postfix_str(n[-48:], refresh=False)
            b, t = bc.load(n), tc.load(n)
            if writer is not None:
                writer.begin(as_mask[n])
            metrics, spec = analyze_tensor(n, b, t, cfg, null_models=n in with_null,
                                           mask_sink=writer.write if writer is not None else None)
            del b, t
            tensors[n] = {"module_kind": module_kind(n), "layer": layer_index(n), **metrics}
            if spec:
                spectra[n] = spec
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    meta = {"base": bc.description, "tuned": tc.description, "null_models": null_models,
            "storage_dtype": None if cfg.dtype is None else str(cfg.dtype).replace("torch.", ""),
            "config": {k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v)
                       for k, v in cfg.__dict__.items()},
            "module_kinds": list(KINDS), "seconds": time.perf_counter() - t0, "torch_threads": torch.get_num_threads(),
            "mask_out": None if mask_out is None else str(mask_out),
            "renamed": {side: c.renames for side, c in (("base", bc), ("tuned", tc)) if c.renames}}
    mismatches = {"only_in_base": only_base, "only_in_tuned": only_tuned, "shape_differs": shape_mismatch}
    return build_report(tensors, meta, {k: v for k, v in mismatches.items() if v}, skipped, spectra)
