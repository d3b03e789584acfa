"""Public divergence losses: validate at the edge, pick the backend through fastopd._dispatch, call one Function."""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

from fastopd import _dispatch
from fastopd._numbers import as_int
from fastopd.losses.function import DivergenceConfig, DivergenceFunction, FusedLinearDivergenceFunction

DIVERGENCES = {"fkl": 0, "rkl": 1, "jsd": 2}
REDUCTIONS = ("mean", "sum", "none")
MODES = ("auto", "chunked", "tiled")
# Byte budget of both models' fp32 logit buffers together. On the CPU 256 MiB keeps the working set small
# at no cost in GEMM efficiency; on a GPU a chunk must be deep enough (~1k rows at V=128k) to fill the SMs
# and to amortize each chunk's read-modify-write of the [V, D] weight gradient.
DEFAULT_CHUNK_BYTES = {"cpu": 256 * 2**20, "cuda": 1024 * 2**20}


class DivergenceStats(NamedTuple):
    """Per-token statistics, each shaped like the labels ([N] or [B, T]), fp32, zero at ignored positions.

    All are of the temperature-scaled (and soft-capped) distributions the loss compares.
    """

    lse_student: torch.Tensor      # log-sum-exp of the student logits
    lse_teacher: torch.Tensor      # log-sum-exp of the teacher logits
    logp_student: torch.Tensor     # log p_student(label); 0 where labels is None
    logp_teacher: torch.Tensor     # log p_teacher(label); 0 where labels is None
    entropy_student: torch.Tensor  # entropy of p_student


def _shape(t: torch.Tensor | None) -> str:
    return "None" if t is None else str(tuple(t.shape))


def _shared_vocab(v_student: int, v_teacher: int, vocab_size: int | None, kind: str, a: torch.Tensor,
                  b: torch.Tensor) -> int:
    """The vocabulary both models share: all of it when sizes agree, else the leading `vocab_size`. The message
    names `kind` and the shapes of `a` and `b`, formatted only on error (Dynamo cannot trace str() of a symbolic
    shape, which torch.compile(dynamic=True) gives)."""
    what = lambda: f"{kind} {_shape(a)} and {_shape(b)}"  # noqa: E731
    if vocab_size is None:
        if v_student != v_teacher:
            raise ValueError(f"student and teacher vocab sizes differ ({v_student} vs {v_teacher}, {what()}); "
                             "pass vocab_size= for the shared leading part")
        if v_student == 0:
            raise ValueError(f"the vocabulary is empty ({what()}): a divergence needs at least one entry")
        return v_student
    size = as_int(vocab_size)  # 2.5 is not truncated, True is not 1
    if size is None or not 0 < size <= min(v_student, v_teacher):
        raise ValueError(f"vocab_size={vocab_size!r} must be an int in [1, {min(v_student, v_teacher)}] for {what()}")
    return size


def chunk_rows_for(vocab: int, chunk_size: int | None, device_type: str = "cpu") -> int:
    """Rows per chunk: `chunk_size` if given, else from the byte budget FASTOPD_CHUNK_BYTES
    (default 256 MiB on the CPU, 1 GiB on CUDA)."""
    if chunk_size is not None:
        rows = as_int(chunk_size)  # 2.5 is not truncated, True is not 1
        if rows is None or rows < 1:
            raise ValueError(f"chunk_size must be an int >= 1 (token rows per chunk), got {chunk_size!r}")
        return rows
    default = DEFAULT_CHUNK_BYTES.get(device_type, DEFAULT_CHUNK_BYTES["cpu"])
    budget = _chunk_bytes_from_env(default)
    rows = max(1, budget // max(1, vocab * 4 * 2))
    return rows - rows % 16 if rows >= 32 else rows


def _chunk_bytes_from_env(default: int) -> int:
    raw = os.environ.get("FASTOPD_CHUNK_BYTES")
    if raw is None:
        return default
    try:
        budget = int(raw)
    except ValueError:
        budget = 0
    if budget < 1:
        raise ValueError(f"FASTOPD_CHUNK_BYTES must be a positive number of bytes (e.g. {default}), got {raw!r}")
    return budget


def _finite(x: float) -> bool:
    """math.isfinite(x), by comparisons: under torch.compile(dynamic=True) Dynamo passes float options as symbolic
    floats, which math.isfinite cannot take (comparisons it traces as guards)."""
    return -math.inf < x < math.inf


def _config(divergence: str, beta: float, temperature: float, softcap: float | None, hard_label_weight: float,
            soft_label_weight: float, ignore_index: int, reduction: str, vocab: int,
            chunk_size: int | None, device_type: str, hard_label_temperature: float | None = None) -> DivergenceConfig:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {tuple(DIVERGENCES)}, got {divergence!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta}")
    if not (temperature > 0.0 and _finite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    if hard_label_temperature is not None and not (hard_label_temperature > 0.0
                                                   and _finite(hard_label_temperature)):
        raise ValueError(f"hard_label_temperature must be None or a positive finite number, got "
                         f"{hard_label_temperature}")
    if softcap is not None and not (softcap > 0.0 and _finite(softcap)):
        raise ValueError(f"softcap must be None (no cap) or a positive finite number, got {softcap}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    index = as_int(ignore_index)
    if index is None or not -(2**63) <= index < 2**63:
        raise ValueError(f"ignore_index must be an int in int64's range, got {ignore_index!r}")
    if not all(w >= 0 and _finite(w) for w in (hard_label_weight, soft_label_weight)):
        raise ValueError(f"loss weights must be finite and >= 0, got hard_label_weight={hard_label_weight}, "
                         f"soft_label_weight={soft_label_weight}")
    code = DIVERGENCES[divergence]
    if divergence == "jsd" and beta == 0.0:
        code = DIVERGENCES["fkl"]  # TRL's convention: beta=0 is forward KL, beta=1 reverse KL
    elif divergence == "jsd" and beta == 1.0:
        code = DIVERGENCES["rkl"]
    return DivergenceConfig(divergence=code, beta=float(beta), temperature=float(temperature),
                            softcap=float(softcap) if softcap is not None else 0.0,
                            soft_weight=float(soft_label_weight), hard_weight=float(hard_label_weight),
                            ignore_index=int(ignore_index), reduction=reduction,
                            chunk_rows=chunk_rows_for(vocab, chunk_size, device_type),
                            hard_ratio=(float(temperature) / float(hard_label_temperature)
                                        if hard_label_temperature is not None else 1.0))


# Every integer dtype (token ids saved as uint16/uint32 arrays arrive so through torch.from_numpy); the values are
# taken as int64 (a uint64 id of 2^63 or more reads negative and is refused as out of range).
_LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32,
                 torch.uint64)


def _check_labels(labels: torch.Tensor | None, lead: torch.Size, vocab: int, ignore_index: int,
                  device: torch.device, hard_label_weight: float) -> torch.Tensor | None:
    if labels is None:
        if hard_label_weight != 0:
            raise ValueError("hard_label_weight > 0 needs labels")
        return None
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a tensor (or None), got {type(labels).__name__}")
    if tuple(labels.shape) != tuple(lead):
        raise ValueError(f"labels must have shape {tuple(lead)} (the hidden states' leading dims), "
                         f"got {_shape(labels)}")
    if labels.dtype not in _LABEL_DTYPES:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the hidden states on {device}")
    labels = labels.reshape(-1).to(torch.int64).contiguous()
    if labels.numel() == 0:
        return labels
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():  # a free check on the CPU
        if bool(bad.any()):
            first = int(labels[bad][0])
            raise ValueError(f"labels hold {first}, outside [0, {vocab}) and not ignore_index={ignore_index}")
    else:
        # On a GPU a host check would synchronize; a device-side assert does not (and is graph-capturable; under
        # torch.compile, where a data-dependent branch cannot be traced, it serves the CPU too). The
        # kernels cannot be trusted with it: Triton drops tl.device_assert outside debug mode, and the tiled and
        # vocab-parallel paths would silently read such a label as a logit of 0.
        torch._assert_async(~bad.any(), f"fastopd: labels outside [0, {vocab}) that are not ignore_index="
                                        f"{ignore_index}")
    return labels


def _num_items(num_items_in_batch, device) -> torch.Tensor | None:
    if num_items_in_batch is None:
        return None
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() == 0:
            raise ValueError("num_items_in_batch is an empty tensor; give the token count as a number or a "
                             "one-element tensor")
        # One count, or HF Trainer's copies of it under DataParallel ([n_gpu, 1], all equal): the first is taken
        # (on the device, no host sync).
        return num_items_in_batch.reshape(-1)[0]
    if not (num_items_in_batch > 0 and _finite(num_items_in_batch)):
        raise ValueError(f"num_items_in_batch must be a positive finite number, got {num_items_in_batch}")
    return torch.full((), float(num_items_in_batch), device=device)  # a fill kernel, no host-to-device copy


def _finish(loss: torch.Tensor, stats: torch.Tensor, lead: torch.Size, reduction: str, return_stats: bool):
    if reduction == "none":
        loss = loss.reshape(lead)
    if not return_stats:
        return loss
    per = [stats[:, i].reshape(lead) for i in range(5)]
    return loss, DivergenceStats(*per)


def _plain_heads(ws, wt, bs, bt, group):
    """The heads as plain tensors. A DTensor head is taken shard-locally (`to_local()`, differentiable) under
    `vocab_parallel_group`; without one it is refused, never silently used as if its local shard were the head."""
    from fastopd.distributed.data_parallel import is_dtensor

    out = []
    for name, t in (("student_weight", ws), ("teacher_weight", wt), ("student_bias", bs), ("teacher_bias", bt)):
        if t is not None and is_dtensor(t):
            if group is None:
                raise ValueError(
                    f"{name} is a DTensor (placements {tuple(t.placements)}, local shard {_shape(t.to_local())} of "
                    f"{_shape(t)}): pass the gathered head (`.full_tensor()`, or compute the loss inside the "
                    "FSDP module's forward, where its parameters are unsharded), or its row shards with "
                    "vocab_parallel_group= (tensor-parallel heads, hidden states replicated over the group)")
            _check_row_shards(name, t, group)
            t = t.to_local()
        out.append(t)
    return out


def _check_row_shards(name: str, t, group) -> None:
    """A DTensor head under `vocab_parallel_group` must be row shards over a mesh of that group's size (one mesh
    dimension, Shard(0)): a replicated head's local tensor is the whole head, which the loss would take as one
    shard of a vocabulary `world` times as large (silently wrong losses and gradients)."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    placements = tuple(t.placements)
    mesh = t.device_mesh
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise ValueError(f"{name} is a DTensor with placements {placements}: vocab_parallel_group= takes row shards "
                         "of the head (a one-dimensional mesh, placements (Shard(dim=0),)); pass a replicated head "
                         "as a plain tensor without vocab_parallel_group, or its row shards")
    if mesh.size() != dist.get_world_size(group):
        raise ValueError(f"{name} is sharded over a mesh of {mesh.size()} ranks, vocab_parallel_group has "
                         f"{dist.get_world_size(group)}: the head's row shards must be those of the group")


def _autocast_inputs(device_type: str, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The tensors as autocast hands them to `F.linear` inside an autocast region for `device_type`: every floating
    tensor but float64 in the autocast dtype (differentiable casts: the gradients come back in each input's dtype).
    Outside a region, unchanged."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta): no region can be open for it
        enabled = False
    if not enabled:
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.dtype != torch.float64 else t for t in tensors)


def fused_linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    divergence: str = "fkl",
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    vocab_size: int | None = None,
    softcap: float | None = None,
    hard_label_weight: float = 0.0,
    soft_label_weight: float = 1.0,
    hard_label_temperature: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    return_stats: bool = False,
    impl: str = "auto",
    chunk_size: int | None = None,
    mode: str = "auto",
    vocab_parallel_group=None,
):
    """Teacher-student divergence from hidden states and LM-head weights, without [N, V] logits.

    Args:
        student_hidden: [N, Ds] or [B, T, Ds] (fp32/bf16/fp16; float64 is taken in fp32); gets a gradient.
        student_weight: [V_s, Ds], same dtype as student_hidden; gets a gradient.
        teacher_hidden: [N, Dt] or [B, T, Dt]; detached, never gets a gradient (Dt may differ from Ds).
        teacher_weight: [V_t, Dt], same dtype as teacher_hidden; detached. The two models' dtypes may differ.
            Inside torch.autocast all hidden states, weights and biases are first cast to the autocast dtype
            (float64 aside), as F.linear would be there. Any strides (slices, transposes, expands) are taken.
        labels: [N] or [B, T] tensor of any integer dtype; positions equal to `ignore_index` are masked. Needed for
            `hard_label_weight` > 0 and for the label stats.
        divergence: "fkl" = KL(teacher||student), "rkl" = KL(student||teacher), "jsd" = generalized JSD with
            M = beta*p_teacher + (1-beta)*p_student (TRL's convention; beta=0 is fkl, beta=1 is rkl).
        temperature: divides both models' logits. softcap: c*tanh(x/c) on both models' logits first.
        vocab_size: only the first `vocab_size` rows of each head count (the rest is padding).
        reduction: "mean" (over valid tokens, or / num_items_in_batch), "sum", or "none" (per token, [N]
            or [B, T], 0 at ignored positions).
        num_items_in_batch: what "mean" divides by (Hugging Face's name): a positive number (checked), or a
            tensor holding it, used as it is (checking its value would synchronize with the device); of a tensor
            of several entries (HF's Trainer under DataParallel passes ``[n_gpu, 1]`` copies) the first is used.
        hard_label_weight, soft_label_weight: loss = soft * divergence + hard * CE(labels).
        hard_label_temperature: the temperature of the hard-label CE (softcap(x_s) / hard_label_temperature);
            None: `temperature`, as the divergence. Liger-Kernel takes it at 1 whatever `temperature` is; one
            fused pass either way.
        return_stats: also return a DivergenceStats of per-token tensors.
        impl: "auto" | "torch" | "cpu" | "triton" | "cuda" (FASTOPD_IMPL overrides "auto").
        chunk_size: token rows per chunk (default: from a byte budget for both models' fp32 logit buffers,
            256 MiB on the CPU and 1 GiB on CUDA; FASTOPD_CHUNK_BYTES overrides it).
        mode: "auto" | "chunked" | "tiled". "chunked" materializes one chunk of fp32 logits per model;
            "tiled" (Triton, CUDA or the interpreter; impl "auto" or "triton") keeps logit tiles on chip. "auto"
            is "chunked".
        vocab_parallel_group: a torch.distributed process group over which both heads are row-sharded (as
            tensor-parallel LM heads are): this rank holds a contiguous vocabulary shard of each head (shards in
            rank order, sizes may differ; weights may be plain tensors or DTensors), the hidden states and labels
            are replicated over the group. Ranks exchange only per-token statistics; the loss and stats are the
            single-process ones on every rank, the weights get their shard's gradient and the hidden states the
            full one. Chunked mode; the row math runs in phases with the all-reduces between them, as Triton
            kernels on CUDA ("auto"/"triton") or torch ops ("torch", and on the CPU); every rank of the group
            must call it with the same token rows. `vocab_size` counts the whole (global) vocabulary.

    Returns:
        The loss (fp32), and a DivergenceStats when `return_stats`. Once differentiable: a backward with
        create_graph=True raises RuntimeError.

    Raises:
        ValueError: on mismatched shapes, vocab sizes, dtypes or devices, an empty vocabulary, or an option out of
            range.
    """
    hs, ws, ht, wt = student_hidden, student_weight, teacher_hidden, teacher_weight
    ws, wt, student_bias, teacher_bias = _plain_heads(ws, wt, student_bias, teacher_bias, vocab_parallel_group)
    for name, t in (("student_hidden", hs), ("student_weight", ws), ("teacher_hidden", ht), ("teacher_weight", wt)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    for name, b in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if b is not None and not isinstance(b, torch.Tensor):
            raise ValueError(f"{name} must be a tensor (or None), got {type(b).__name__}")
    # Inside torch.autocast the two heads are matmuls, so they follow F.linear's autocast rule (bf16/fp16 operands,
    # fp32 accumulation here): a bf16 hidden state beside an fp32 head works there, as `lm_head(hidden)` does.
    hs, ws, ht, wt, student_bias, teacher_bias = _autocast_inputs(hs.device.type, hs, ws, ht, wt, student_bias,
                                                                  teacher_bias)
    if hs.dim() not in (2, 3) or ht.dim() != hs.dim():
        raise ValueError(f"hidden states must both be [N, D] or both [B, T, D], got student {_shape(hs)} and "
                         f"teacher {_shape(ht)}")
    if hs.shape[:-1] != ht.shape[:-1]:
        raise ValueError(f"student and teacher hidden states must share their token dims, got student {_shape(hs)} "
                         f"and teacher {_shape(ht)}")
    if ws.dim() != 2 or wt.dim() != 2:
        raise ValueError(f"weights must be [V, D], got student {_shape(ws)} and teacher {_shape(wt)}")
    if ws.shape[1] != hs.shape[-1] or wt.shape[1] != ht.shape[-1]:
        raise ValueError(f"hidden size mismatch: student hidden {_shape(hs)} vs weight {_shape(ws)}, "
                         f"teacher hidden {_shape(ht)} vs weight {_shape(wt)}")
    if hs.dtype != ws.dtype or ht.dtype != wt.dtype:
        raise ValueError(f"dtype mismatch: student hidden {hs.dtype} vs weight {ws.dtype}, teacher hidden {ht.dtype} "
                         f"vs weight {wt.dtype}")
    device = hs.device
    for name, t in (("student_weight", ws), ("teacher_hidden", ht), ("teacher_weight", wt),
                    ("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but student_hidden on {device}")
    if vocab_parallel_group is None:
        vocab = local_vocab = _shared_vocab(ws.shape[0], wt.shape[0], vocab_size, "weights", ws, wt)
    else:
        from fastopd.distributed.vocab_parallel import vocab_layout

        if mode not in ("auto", "chunked"):
            raise ValueError(f"vocab_parallel_group runs in chunked mode; got mode={mode!r} (use 'auto' or "
                             "'chunked')")
        vp_backend = _dispatch.resolve("vocab_parallel_chunk", impl, device)
        vocab, vocab_start, local_vocab = vocab_layout(ws.shape[0], wt.shape[0], vocab_size, vocab_parallel_group)
    for name, b, w in (("student_bias", student_bias, ws), ("teacher_bias", teacher_bias, wt)):
        if b is not None and (b.dim() != 1 or b.shape[0] != w.shape[0] or b.dtype != w.dtype):
            raise ValueError(f"{name} must be [{w.shape[0]}] of dtype {w.dtype}, got {_shape(b)} {b.dtype}")

    cfg = _config(divergence, beta, temperature, softcap, hard_label_weight, soft_label_weight, ignore_index,
                  reduction, vocab, chunk_size, device.type, hard_label_temperature)
    lead = hs.shape[:-1]
    lab = _check_labels(labels, lead, vocab, ignore_index, device, hard_label_weight)
    num_items = _num_items(num_items_in_batch, device)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "tiled" and impl not in ("auto", "triton"):
        raise ValueError(f"mode='tiled' runs the Triton tiled kernels only; got impl={impl!r} (use 'auto' or "
                         "'triton', or mode='chunked' for the other backends)")

    h2s = hs.flatten(0, -2)  # not reshape(-1, D): that is ambiguous for D = 0
    h2t = ht.detach().flatten(0, -2)
    ws_v, wt_v = ws[:local_vocab], wt.detach()[:local_vocab]
    bs_v = student_bias[:local_vocab] if student_bias is not None else None
    bt_v = teacher_bias.detach()[:local_vocab] if teacher_bias is not None else None
    # CPU GEMMs run in fp32, and so does float64 everywhere (cuBLAS writes fp32 only from bf16/fp16 operands): cast
    # once (autograd casts the gradients back)
    if device.type == "cpu" or h2s.dtype == torch.float64:
        h2s, ws_v = h2s.float(), ws_v.float()
        bs_v = bs_v.float() if bs_v is not None else None
    if device.type == "cpu" or h2t.dtype == torch.float64:
        h2t, wt_v = h2t.float(), wt_v.float()
        bt_v = bt_v.float() if bt_v is not None else None
    args = (h2s.contiguous(), ws_v.contiguous(), bs_v, h2t.contiguous(), wt_v.contiguous(), bt_v, lab, num_items, cfg)
    if vocab_parallel_group is not None:
        from fastopd.distributed.vocab_parallel import check_replicated_rows, vocab_parallel_kernel

        # the kernel sums the shards' partial hidden-state gradients in fp32 (its reduce_grad_hidden), so a bf16
        # gradient is rounded once, after the sum
        check_replicated_rows(args[0], vocab_parallel_group)
        kernel = vocab_parallel_kernel(vocab_parallel_group, vocab_start,
                                       _dispatch.kernel("vocab_parallel_chunk", vp_backend))
        loss, stats = FusedLinearDivergenceFunction.apply(*args, kernel)
    elif mode == "tiled":
        from fastopd.losses.tiled import tiled_linear_divergence

        loss, stats = tiled_linear_divergence(*args)
    else:
        backend = _dispatch.resolve("divergence_chunk", impl, device)
        loss, stats = FusedLinearDivergenceFunction.apply(*args, _dispatch.kernel("divergence_chunk", backend))
    return _finish(loss, stats, lead, reduction, return_stats)


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    divergence: str = "fkl",
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    vocab_size: int | None = None,
    softcap: float | None = None,
    hard_label_weight: float = 0.0,
    soft_label_weight: float = 1.0,
    hard_label_temperature: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    return_stats: bool = False,
    impl: str = "auto",
    chunk_size: int | None = None,
):
    """The same divergence for callers that already hold logits: [N, V] or [B, T, V] each.

    Options as in `fused_linear_divergence`; the student logits get a gradient ([N, V], their dtype). -inf
    logits are masked entries (probability 0, gradient 0), but `softcap` is applied first and maps -inf to
    -softcap, as c*tanh(x/c) does (Gemma-2 caps inside the model, before any mask): to keep a mask under a cap,
    pass logits already capped and masked, with softcap=None.
    """
    sl, tl = student_logits, teacher_logits
    for name, t in (("student_logits", sl), ("teacher_logits", tl)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor")
    if sl.dim() not in (2, 3) or tl.dim() != sl.dim() or sl.shape[:-1] != tl.shape[:-1]:
        raise ValueError(f"logits must both be [N, V] or [B, T, V] with the same token dims, got student "
                         f"{_shape(sl)} and teacher {_shape(tl)}")
    if sl.device != tl.device:
        raise ValueError(f"student logits on {sl.device}, teacher logits on {tl.device}")
    vocab = _shared_vocab(sl.shape[-1], tl.shape[-1], vocab_size, "logits", sl, tl)
    cfg = _config(divergence, beta, temperature, softcap, hard_label_weight, soft_label_weight, ignore_index,
                  reduction, vocab, chunk_size, sl.device.type, hard_label_temperature)
    lead = sl.shape[:-1]
    lab = _check_labels(labels, lead, vocab, ignore_index, sl.device, hard_label_weight)
    num_items = _num_items(num_items_in_batch, sl.device)
    backend = _dispatch.resolve("divergence_chunk", impl, sl.device)
    kernel = _dispatch.kernel("divergence_chunk", backend)
    s2 = sl.reshape(-1, sl.shape[-1])[:, :vocab]
    t2 = tl.detach().reshape(-1, tl.shape[-1])[:, :vocab]
    loss, stats = DivergenceFunction.apply(s2, t2, lab, num_items, cfg, kernel)
    return _finish(loss, stats, lead, reduction, return_stats)
