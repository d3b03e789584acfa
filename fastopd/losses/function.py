"""Autograd Functions of the vocab-chunked divergence. They know nothing of backends: the row-wise kernel
arrives as a callable (see fastopd._dispatch), and the GEMMs go through torch (cuBLAS / MKL / oneDNN).

Chunked execution: token rows in chunks of C; per chunk two GEMMs into fp32 buffers [C, V], one fused
row kernel that writes the loss, the per-token stats and dL/dx_s in place, then grad_h = G W_s and
grad_W += G^T h. For reduction "mean"/"sum" the gradient for an upstream gradient of 1 is formed in the
forward and scaled in the backward: four GEMMs in all. For "none" the backward recomputes the chunks.
Nothing of size [N, V] is ever allocated.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

Kernel = Callable[..., None]


@dataclass(frozen=True)
class DivergenceConfig:
    divergence: int        # 0 fkl, 1 rkl, 2 jsd (jsd with beta 0/1 already mapped to fkl/rkl)
    beta: float
    temperature: float
    softcap: float         # <= 0: none
    soft_weight: float
    hard_weight: float
    ignore_index: int
    reduction: str         # "mean" | "sum" | "none"
    chunk_rows: int
    hard_ratio: float = 1.0  # temperature / hard-label temperature: the CE is of z_s * hard_ratio

    def kernel_args(self) -> tuple:
        return (self.divergence, self.beta, self.temperature, self.softcap, self.soft_weight, self.hard_weight,
                self.ignore_index)


def _matmul_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b with fp32 output and fp32 accumulation, whatever the (matching) input dtype.

    bf16/fp16 on CUDA: cuBLAS writes fp32 directly (`out_dtype`), never a rounded low-precision product.
    CPU inputs are upcast once by the public function, so CPU GEMMs here are fp32."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    res = torch.mm(a.float(), b.float())
    return res if out is None else out.copy_(res)


def _logits_into(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """out[C, V] (fp32) = h[C, D] @ w[V, D]^T + b."""
    _matmul_f32(h, w.t(), out=out)
    if b is not None:
        out += b


def _divisor(cfg: DivergenceConfig, labels: torch.Tensor | None, n: int, num_items: torch.Tensor | None,
             device: torch.device) -> torch.Tensor:
    """What "mean" divides by, as a device tensor (no host sync): num_items_in_batch, else the valid count."""
    if num_items is not None:
        return num_items.to(device=device, dtype=torch.float32)
    if labels is None:
        return torch.full((), float(max(n, 1)), device=device)  # a fill: torch.tensor(x, device=) copies and syncs
    return (labels != cfg.ignore_index).sum().clamp_min(1).to(torch.float32)


def reduce_rows(loss_rows: torch.Tensor, cfg: DivergenceConfig, labels: torch.Tensor | None,
                num_items: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reduced loss from per-row losses [N] (0 at ignored rows), and the "mean" divisor tensor."""
    divisor = _divisor(cfg, labels, loss_rows.shape[0], num_items, loss_rows.device)
    if cfg.reduction == "sum":
        return loss_rows.sum(), divisor
    if cfg.reduction == "mean":
        return loss_rows.sum() / divisor, divisor
    return loss_rows, divisor


def lift_upstream(upstream: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row upstream gradients u (reduction="none") for gradient GEMMs whose operands are cast to `dtype`.

    fp16 operands flush |G u| below 2^-24 to zero, and a caller's mean (u = 1/N) pushes most of G there (at
    N = 4096 every entry below 2.5e-4 is lost). For fp16 the rows are scaled by u / max|u| instead, and the
    caller multiplies the fp32 results by the returned max|u| (a device scalar: no sync). Returns (u', lift),
    lift None where nothing is rescaled (bf16 and fp32 have fp32's exponent range)."""
    if dtype != torch.float16 or upstream.numel() == 0:
        return upstream, None
    # over finite entries: a NaN/inf upstream row must spoil its own row only, not every row through the lift
    lift = torch.where(torch.isfinite(upstream), upstream.abs(), 0.0).amax().clamp_min(torch.finfo(torch.float32).tiny)
    return upstream / lift, lift


def apply_lift(lift: torch.Tensor | None, *grads: torch.Tensor | None) -> None:
    if lift is not None:
        for g in grads:
            if g is not None:
                g.mul_(lift)


def refuse_double_backward() -> None:
    """Raises in a backward run with create_graph=True (grad mode on). The gradients are closed forms built outside
    autograd (in the forward for "mean"/"sum"), so they carry no graph: a second derivative would silently come out
    as zero instead of failing."""
    if torch.is_grad_enabled():
        raise RuntimeError("fastopd's fused divergence is once differentiable: its backward cannot build a graph "
                           "(create_graph=True, double backward, Hessian-vector products); its gradients are "
                           "closed forms that would differentiate to zero")


def _reduced_grad_hidden(kernel: Kernel, grad_h: torch.Tensor) -> torch.Tensor:
    """grad_h (fp32), summed by the kernel's `reduce_grad_hidden` where it has one: a kernel over one shard of the
    vocabulary yields a partial G W_r per shard, and summing them here, before the cast to the hidden states' dtype,
    rounds a bf16/fp16 gradient once (summing bf16 shares would round each share, then every partial sum)."""
    reduce = getattr(kernel, "reduce_grad_hidden", None)
    if reduce is not None:
        reduce(grad_h)
    return grad_h


def _chunks(n: int, rows: int):
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


class FusedLinearDivergenceFunction(torch.autograd.Function):
    """loss, stats = f(h_s [N, Ds], w_s [V, Ds], b_s [V]?, h_t [N, Dt], w_t [V, Dt], b_t [V]?, labels [N]?).

    Gradients flow to h_s, w_s, b_s only. `stats` [N, 5] is not differentiable.
    """

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, labels, num_items, cfg: DivergenceConfig, kernel: Kernel):
        n, v = h_s.shape[0], w_s.shape[0]
        device = h_s.device
        need = ctx.needs_input_grad
        want_grad = need[0] or need[1] or need[2]
        form_now = want_grad and cfg.reduction != "none"

        rows = max(1, min(cfg.chunk_rows, n))
        xs_buf = torch.empty(rows, v, dtype=torch.float32, device=device)
        xt_buf = torch.empty(rows, v, dtype=torch.float32, device=device)
        loss_rows = torch.empty(n, dtype=torch.float32, device=device)
        stats = torch.empty(n, 5, dtype=torch.float32, device=device)

        grad_h = torch.empty(n, h_s.shape[1], dtype=torch.float32, device=device) if form_now and need[0] else None
        grad_w = torch.zeros(v, w_s.shape[1], dtype=torch.float32, device=device) if form_now and need[1] else None
        grad_b = torch.zeros(v, dtype=torch.float32, device=device) if form_now and need[2] else None

        for start, end in _chunks(n, rows):
            xs, xt = xs_buf[: end - start], xt_buf[: end - start]
            _logits_into(xs, h_s[start:end], w_s, b_s)
            _logits_into(xt, h_t[start:end], w_t, b_t)
            lab = labels[start:end] if labels is not None else None
            kernel(xs, xt, lab, loss_rows[start:end], stats[start:end], *cfg.kernel_args(), form_now, cfg.hard_ratio)
            if form_now:
                _accumulate_grads(xs, h_s[start:end], w_s, grad_h, grad_w, grad_b, start, end)

        loss, divisor = reduce_rows(loss_rows, cfg, labels, num_items)

        ctx.mark_non_differentiable(stats)
        ctx.cfg, ctx.kernel, ctx.form_now = cfg, kernel, form_now
        ctx.dtypes = (h_s.dtype, w_s.dtype, b_s.dtype if b_s is not None else None)
        if form_now:
            ctx.save_for_backward(grad_h, grad_w, grad_b, divisor)
        elif want_grad:
            ctx.save_for_backward(h_s, w_s, b_s, h_t, w_t, b_t, labels)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        refuse_double_backward()
        dt_h, dt_w, dt_b = ctx.dtypes
        if ctx.form_now:
            grad_h, grad_w, grad_b, divisor = ctx.saved_tensors
            scale = grad_loss.to(torch.float32)
            if ctx.cfg.reduction == "mean":
                scale = scale / divisor
            out_h = _reduced_grad_hidden(ctx.kernel, grad_h * scale).to(dt_h) if grad_h is not None else None
            out_w = (grad_w * scale).to(dt_w) if grad_w is not None else None
            out_b = (grad_b * scale).to(dt_b) if grad_b is not None else None
            return out_h, out_w, out_b, None, None, None, None, None, None, None
        return _recompute_backward(ctx, grad_loss)


_ADDMM_FP32_INTO = True  # False once this torch refused an fp32 accumulator beside bf16/fp16 operands
# torch 2.10-2.12 trace addmm(..., out_dtype=) (fake tensors: torch.compile, torch.export) through the plain addmm
# decomposition, which takes out_dtype for beta and fails; 2.13 added this decomposition of its own.
_ADDMM_DTYPE_TRACES = hasattr(importlib.import_module("torch._decomp.decompositions"), "addmm_dtype")


def _addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b for bf16/fp16 CUDA operands, accumulated by cuBLAS in place. Some torch releases with
    `out_dtype` (2.8, 2.9) still check that `self` has the operands' dtype; the refusal is a host-side argument
    check, so it is met once, and from then on the product goes to an fp32 temporary (same numbers, one more
    buffer of the accumulator's size). The temporary is also what a torch.compile trace gets on torch 2.10-2.12,
    whose fake-tensor addmm cannot take `out_dtype` (eager runs there accumulate in place)."""
    global _ADDMM_FP32_INTO
    if _ADDMM_FP32_INTO and (_ADDMM_DTYPE_TRACES or not torch.compiler.is_compiling()):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except RuntimeError as err:
            if "dtype" not in str(err):
                raise
            _ADDMM_FP32_INTO = False
    acc += torch.mm(a, b, out_dtype=torch.float32)


def _accumulate_grads(g: torch.Tensor, h: torch.Tensor, w: torch.Tensor, grad_h, grad_w, grad_b,
                      start: int, end: int) -> None:
    """grad_h[start:end] = G W;  grad_w += G^T h;  grad_b += colsum(G).  G [C, V] fp32."""
    gl = g if h.dtype == torch.float32 else g.to(h.dtype)
    if grad_h is not None:
        _matmul_f32(gl, w, out=grad_h[start:end])
    if grad_w is not None:
        if h.dtype == torch.float32:
            grad_w.addmm_(g.t(), h)
        elif h.is_cuda:  # fp32 accumulator, bf16/fp16 operands, accumulated in place by cuBLAS
            _addmm_f32_(grad_w, gl.t(), h)
        else:
            grad_w.addmm_(gl.t().float(), h.float())
    if grad_b is not None:
        grad_b += g.sum(0)


def _recompute_backward(ctx, grad_loss: torch.Tensor):
    """reduction="none": per-row upstream gradients, so recompute each chunk and scale its rows."""
    h_s, w_s, b_s, h_t, w_t, b_t, labels = ctx.saved_tensors
    cfg, kernel = ctx.cfg, ctx.kernel
    need = ctx.needs_input_grad
    n, v = h_s.shape[0], w_s.shape[0]
    device = h_s.device
    rows = max(1, min(cfg.chunk_rows, n))
    xs_buf = torch.empty(rows, v, dtype=torch.float32, device=device)
    xt_buf = torch.empty(rows, v, dtype=torch.float32, device=device)
    loss_rows = torch.empty(rows, dtype=torch.float32, device=device)
    stats = torch.empty(rows, 5, dtype=torch.float32, device=device)
    grad_h = torch.empty(n, h_s.shape[1], dtype=torch.float32, device=device) if need[0] else None
    grad_w = torch.zeros(v, w_s.shape[1], dtype=torch.float32, device=device) if need[1] else None
    grad_b = torch.zeros(v, dtype=torch.float32, device=device) if need[2] else None
    gl, lift = lift_upstream(grad_loss.to(torch.float32), h_s.dtype)
    for start, end in _chunks(n, rows):
        c = end - start
        xs, xt = xs_buf[:c], xt_buf[:c]
        _logits_into(xs, h_s[start:end], w_s, b_s)
        _logits_into(xt, h_t[start:end], w_t, b_t)
        lab = labels[start:end] if labels is not None else None
        kernel(xs, xt, lab, loss_rows[:c], stats[:c], *cfg.kernel_args(), True, cfg.hard_ratio)
        xs.mul_(gl[start:end, None])
        _accumulate_grads(xs, h_s[start:end], w_s, grad_h, grad_w, grad_b, start, end)
    apply_lift(lift, grad_h, grad_w, grad_b)
    dt_h, dt_w, dt_b = ctx.dtypes
    out_h = _reduced_grad_hidden(kernel, grad_h).to(dt_h) if grad_h is not None else None
    return (out_h, grad_w.to(dt_w) if grad_w is not None else None,
            grad_b.to(dt_b) if grad_b is not None else None, None, None, None, None, None, None, None)


class DivergenceFunction(torch.autograd.Function):
    """loss, stats = f(student_logits [N, V], teacher_logits [N, V], labels [N]?): for callers that hold logits.

    The gradient w.r.t. the student logits [N, V] is formed in the forward (reduction mean/sum) or in the
    backward (none), chunk by chunk through the same row kernel. Teacher logits get no gradient.
    """

    @staticmethod
    def forward(ctx, s_logits, t_logits, labels, num_items, cfg: DivergenceConfig, kernel: Kernel):
        n, v = s_logits.shape
        device = s_logits.device
        want_grad = ctx.needs_input_grad[0]
        form_now = want_grad and cfg.reduction != "none"
        rows = max(1, min(cfg.chunk_rows, n))
        xs_buf = torch.empty(rows, v, dtype=torch.float32, device=device)
        xt_buf = torch.empty(rows, v, dtype=torch.float32, device=device)
        loss_rows = torch.empty(n, dtype=torch.float32, device=device)
        stats = torch.empty(n, 5, dtype=torch.float32, device=device)
        grad = torch.empty(n, v, dtype=s_logits.dtype, device=device) if form_now else None
        for start, end in _chunks(n, rows):
            xs, xt = xs_buf[: end - start], xt_buf[: end - start]
            xs.copy_(s_logits[start:end])
            xt.copy_(t_logits[start:end])
            lab = labels[start:end] if labels is not None else None
            kernel(xs, xt, lab, loss_rows[start:end], stats[start:end], *cfg.kernel_args(), form_now, cfg.hard_ratio)
            if form_now:
                grad[start:end] = xs
        loss, divisor = reduce_rows(loss_rows, cfg, labels, num_items)
        ctx.mark_non_differentiable(stats)
        ctx.cfg, ctx.kernel, ctx.form_now = cfg, kernel, form_now
        if form_now:
            ctx.save_for_backward(grad, divisor)
        elif want_grad:
            ctx.save_for_backward(s_logits, t_logits, labels)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        refuse_double_backward()
        cfg = ctx.cfg
        if ctx.form_now:
            grad, divisor = ctx.saved_tensors
            scale = grad_loss.to(torch.float32)
            if cfg.reduction == "mean":
                scale = scale / divisor
            return (grad * scale).to(grad.dtype), None, None, None, None, None
        s_logits, t_logits, labels = ctx.saved_tensors
        n, v = s_logits.shape
        rows = max(1, min(cfg.chunk_rows, n))
        xs_buf = torch.empty(rows, v, dtype=torch.float32, device=s_logits.device)
        xt_buf = torch.empty_like(xs_buf)
        loss_rows = torch.empty(rows, dtype=torch.float32, device=s_logits.device)
        stats = torch.empty(rows, 5, dtype=torch.float32, device=s_logits.device)
        grad = torch.empty(n, v, dtype=s_logits.dtype, device=s_logits.device)
        gl = grad_loss.to(torch.float32)
        for start, end in _chunks(n, rows):
            c = end - start
            xs, xt = xs_buf[:c], xt_buf[:c]
            xs.copy_(s_logits[start:end])
            xt.copy_(t_logits[start:end])
            lab = labels[start:end] if labels is not None else None
            ctx.kernel(xs, xt, lab, loss_rows[:c], stats[:c], *cfg.kernel_args(), True, cfg.hard_ratio)
            grad[start:end] = xs * gl[start:end, None]
        return grad, None, None, None, None, None
