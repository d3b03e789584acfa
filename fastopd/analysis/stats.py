"""Per-tensor update statistics, computed in a few streaming passes over row chunks.

Delta = tuned - base is formed from the values in the storage dtype (bitwise comparison for "unchanged";
the difference itself in fp32 for 16-bit storage and fp64 otherwise, which is exact for the usual
exponent gaps). Non-finite values (a weight that is or became NaN/Inf) are counted and taken as 0 in every
sum: `nonfinite_delta` counts the changed coordinates with a non-finite Delta (changed, and beyond every
atol), `nonfinite_base` the NaN/Inf base values (0 in RMS(base), the base Gram and the rounding null); an
unchanged NaN weight has Delta 0, its bits being equal. Passes, for a tensor viewed as a matrix X [m', n'],
m' >= n' (transposed if wide; 1-D as a column, >= 4-D as [dim0, rest]):

1. Gram pass: G_delta = D^T D in float64 (rows of X in chunks): its eigenvalues are the squared
   singular values, the full spectrum, not a truncation. G_base = X^T X in float32 (only its top
   eigenvectors are used, for the geometry).
2. Elementwise pass (native row order): bitwise-changed count and mask, |Delta| <= atol and
   |Delta| < tau*RMS(base) counts (one bucketize), histograms keyed by the top 16 bits of the fp32
   pattern of |Delta| (energy by magnitude) and of |base| (magnitude buckets at bf16 resolution, for
   enrichment), and a joint histogram of (exponent of |base|, log2 |Delta|/ulp(base)).
3. Geometry pass: energy of Delta in the base's top-k singular subspaces (U_k = X V_k / sigma_k from the
   base Gram's eigenvectors); the coordinates in the histogram bins holding the top-p% energy boundaries
   are histogrammed again by their low 16 bits (exact top-p% energy); the null models (shuffled Delta,
   bf16 rounding of a dense update of approximately matched energy) get their Gram, geometry and enrichment here
   too.

A 3-D tensor [B, m, n] (a stack of MoE experts) is a batch of B matrices for everything spectral (`_stacked_spectra`):
its spectrum is that of the block-diagonal matrix diag(X_1, ..., X_B), the union of the matrices' singular values
(B min(m, n) of them: a rank-1-per-expert update has rank B), and its subspace energy is the energy each Delta_b has
in its own base matrix's top-k subspaces (k a fraction of min(m, n)), summed over the stack. Viewed as [B, m n]
instead, it would have at most B singular values, which say nothing about the matrices. Its null models keep their
densities, energies and enrichments (elementwise) but get no spectra, so stacks are left out of the spectral
findings (`spectral_layout` says so).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["AnalysisConfig", "analyze_tensor", "spectrum_metrics"]

_NBINS = 1 << 15          # hi16 keys of non-negative fp32 patterns: sign bit 0
_R_LO, _R_HI = -2, 9      # log2(|Delta|/ulp) histogram range (clipped), per exponent bucket
_NEXP = 256               # fp32 biased exponents
_NULL_FIT_ELEMS = 1 << 16  # row sample the rounding null's scale is fitted on (about 0.1 s per tensor)


@dataclass(frozen=True)
class AnalysisConfig:
    """What to measure. Fractions are in [0, 1]; keys in the report print them as percentages."""

    atols: tuple[float, ...] = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4)
    taus: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
    energy_fracs: tuple[float, ...] = (0.001, 0.01, 0.05)
    rank_tols: tuple[float, ...] = (1e-6, 1e-5, 1e-4)
    topk_max: int = 64
    topk_fracs: tuple[float, ...] = (0.01, 0.05, 0.10)
    subspace_fracs: tuple[float, ...] = (0.01, 0.05, 0.10, 0.20)
    small_fracs: tuple[float, ...] = (0.01, 0.05, 0.10, 0.25)
    dtype: torch.dtype | None = None      # storage dtype to compare in; None: the checkpoints' own
    null_rank: int = 16                   # rank of the dense update in the bf16-rounding null model
    null_dtype: torch.dtype | None = None  # dtype the rounding null rounds to; None: the storage dtype
    seed: int = 0
    chunk_elems: int = 1 << 22
    exact_shuffle_max: int = 1 << 25      # above this numel the shuffle samples coordinates with replacement
    mask_atol: float | None = None        # mask = |Delta| > mask_atol; None: bitwise changed


def pct(f: float) -> str:
    return f"{f * 100:g}%"


def _int_dtype(dt: torch.dtype) -> torch.dtype:
    return {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[dt.itemsize]


def _mant_digits(dt: torch.dtype) -> int:
    return round(-math.log2(torch.finfo(dt).eps)) + 1


def _hi16(x_abs: torch.Tensor) -> torch.Tensor:
    """Top 16 bits of the fp32 pattern of a non-negative tensor: monotone in the value, bf16 resolution."""
    return x_abs.to(torch.float32).view(torch.int32) >> 16


def _finite(x: torch.Tensor) -> torch.Tensor:
    """x with NaN and +-Inf replaced by 0 (a new tensor: `x` may be the caller's or a memory map)."""
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def _strictly_below(x: float, dtype: torch.dtype) -> float:
    """The bound b with |Delta| <= b  <=>  |Delta| < x, for the "<=" counts of the elementwise pass: the largest
    value of `dtype` below x (x's own rounding when it rounds down), or -inf for x <= 0 (no |Delta| is below 0;
    nextafter(0, 0) would be 0 itself)."""
    if x <= 0:
        return -math.inf
    xt = torch.tensor(x, dtype=dtype)
    if float(xt) < x:  # x rounded down: that value is itself below x (a float32 bound for 16-bit storage)
        return float(xt)
    return float(torch.nextafter(xt, torch.tensor(0.0, dtype=dtype)))


def _gen(seed: int, name: str, salt: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{name}/{salt}".encode()))


def spectrum_metrics(sigma: np.ndarray, cfg: AnalysisConfig) -> dict:
    """Spectral metrics of a matrix from its singular values (descending, float64, length min(m, n))."""
    sq = sigma ** 2
    energy = float(sq.sum())
    if energy == 0.0:
        return {"numerical_rank": {f"{t:g}": 0 for t in cfg.rank_tols}, "stable_rank": None,
                "effective_rank": None, "topk_energy": None, "sigma_max": 0.0}
    s1 = float(sigma[0])
    q = sigma / sigma.sum()
    q = q[q > 0]
    cum = np.cumsum(sq) / energy
    n = len(sigma)
    topk = {str(k): float(cum[k - 1]) for k in range(1, min(cfg.topk_max, n) + 1)}
    for f in cfg.topk_fracs:
        topk[pct(f)] = float(cum[max(1, math.ceil(f * n)) - 1])
    return {"numerical_rank": {f"{t:g}": int((sigma > t * s1).sum()) for t in cfg.rank_tols},
            "stable_rank": energy / s1 ** 2, "effective_rank": float(np.exp(-(q * np.log(q)).sum())),
            "topk_energy": topk, "sigma_max": s1}


def _eig(gram: torch.Tensor, vectors: bool):
    """eigvalsh/eigh of a Gram scaled to unit max diagonal first: an update's Gram can be ~1e-10 in size, and
    LAPACK on such inputs runs into subnormal arithmetic (100x slower); the scaling is exact in float64.
    Runs on one thread: MKL's multithreaded tridiagonal eigensolver is no faster at these sizes and slows
    down by 10-100x when the cores are shared with other processes (measured on the 2-core dev machine)."""
    scale = gram.diagonal().max()
    scale = scale if scale > 0 else torch.ones((), dtype=gram.dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if vectors:
            lam, vec = torch.linalg.eigh(gram / scale)
            return lam * scale, vec
        return torch.linalg.eigvalsh(gram / scale) * scale
    finally:
        torch.set_num_threads(threads)


def _sigma_from_gram(gram: torch.Tensor, rows: int) -> np.ndarray:
    """Singular values (descending) from the eigenvalues of a float64 Gram over `rows` rows.

    Eigenvalues below rows * 2^-53 * lambda_max are at the Gram's rounding floor (the Gram of an exactly
    rank-r matrix has noise eigenvalues of that size) and are set to zero: singular values are resolved down
    to about sqrt(rows * 2^-53) * sigma_max (1e-6 at rows = 8192), reported as `sigma_floor_rel`.
    """
    lam = _eig(gram, vectors=False).flip(0)
    lam = torch.where(lam > rows * 2.0 ** -53 * lam[0].clamp_min(0), lam, 0.0)
    return lam.sqrt().numpy()


def _enrichment(hist_all: torch.Tensor, hist_upd: torch.Tensor, fracs) -> tuple[dict, list]:
    """Enrichment of updated coordinates among the smallest |base| from hi16 histograms of |base|.

    small_q = {|base| <= t_q}, t_q the smallest bin edge with P(small_q) >= q; enrichment =
    P(small_q | updated) / P(small_q). By decile: P(updated | decile) / P(updated).
    """
    total, upd = float(hist_all.sum()), float(hist_upd.sum())
    if upd == 0 or total == 0:
        return {pct(f): None for f in fracs}, [None] * 10
    cum_all = torch.cumsum(hist_all.double(), 0) / total
    cum_upd = torch.cumsum(hist_upd.double(), 0) / upd
    out = {}
    for f in fracs:
        k = int(torch.searchsorted(cum_all, torch.tensor([f - 1e-12], dtype=torch.float64)).item())
        k = min(k, len(cum_all) - 1)
        out[pct(f)] = float(cum_upd[k] / cum_all[k])
    # decile of each bin by its midpoint rank (ties keep a bin in one decile)
    mid = cum_all - hist_all.double() / (2 * total)
    dec = (mid * 10).floor().clamp(0, 9).long()
    a = torch.zeros(10, dtype=torch.float64).index_add_(0, dec, hist_all.double())
    u = torch.zeros(10, dtype=torch.float64).index_add_(0, dec, hist_upd.double())
    p_upd = upd / total
    by_dec = [float(u[i] / a[i] / p_upd) if a[i] > 0 else None for i in range(10)]
    return out, by_dec


def _ulp_buckets(joint: torch.Tensor, hist_b: torch.Tensor, hist_upd: torch.Tensor, p: int, emin: int) -> list[dict]:
    """Per exponent bucket of |base|: count, fraction changed, histogram of floor(log2(|Delta|/ulp(base))).

    `joint` [256 x 256] counts coordinates by (fp32 biased exponent of |Delta|, of |base|); for |base| with
    exponent E_b (storage ulp = 2^(max(E_b, emin) - 127 - (p - 1))) and |Delta| with exponent E_d > 0,
    floor(log2(|Delta| / ulp)) = E_d - max(E_b, emin) + p - 1. Row E_d = 0 holds Delta = 0.
    """
    joint = joint.view(_NEXP, _NEXP)
    count_by_exp = hist_b.view(_NEXP, -1).sum(1)   # hi16 key >> 7 is the fp32 biased exponent
    changed_by_exp = hist_upd.view(_NEXP, -1).sum(1)
    e_d = torch.arange(1, _NEXP)
    out = []
    for e in torch.nonzero(count_by_exp[: _NEXP - 1]).flatten().tolist():  # exponent 255: NaN/Inf, not a range
        n, ch = int(count_by_exp[e]), int(changed_by_exp[e])
        r = (e_d - max(e, emin) + p - 1).clamp(_R_LO, _R_HI) - _R_LO
        h = torch.zeros(_R_HI - _R_LO + 1, dtype=torch.int64).index_add_(0, r, joint[1:, e])
        nz = int(h.sum())
        lo = 0.0 if e == 0 else 2.0 ** (e - 127)
        out.append({"abs_base_range": [lo, 2.0 ** (e - 126)], "count": n, "frac_changed": ch / n,
                    "frac_changed_lt_2ulp": (float(h[: 1 - _R_LO].sum()) / nz) if nz else None,
                    "log2_ulps_hist": {"lo": _R_LO, "counts": [int(c) for c in h]}})
    return out


class _TensorView:
    """A tensor as a matrix [m, n] (dim 0 by the rest; 1-D as a column) and as X [m', n'], m' >= n'."""

    def __init__(self, t: torch.Tensor):
        self.t2 = t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(-1, 1)
        m, n = self.t2.shape
        self.transposed = m < n
        self.mx, self.nx = (n, m) if self.transposed else (m, n)

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows r0:r1 of X (a view)."""
        return self.t2[:, r0:r1].t() if self.transposed else self.t2[r0:r1]

    def take_rows(self, idx: torch.Tensor) -> torch.Tensor:
        return self.t2[:, idx].t() if self.transposed else self.t2[idx]


def _chunks(n_rows: int, row_len: int, chunk_elems: int):
    step = max(1, chunk_elems // max(1, row_len))
    for r0 in range(0, n_rows, step):
        yield r0, min(n_rows, r0 + step)


class _RoundingNull:
    """Null model (b): the storage-dtype rounding of a dense rank-r update of matched energy.

    U = A B^T (A [m', r], B [n', r] standard normal; an iid Gaussian for columns, n' = 1), scaled by s chosen by
    bisection on a row sample (about 2^16 elements) so that ||round(base + sU) - base||^2 per element matches the
    observed ||Delta||^2 per element there: over the whole tensor it matches approximately (rounding is not linear
    in s, so an exact match would take a full pass per bisection step); the achieved ratio is reported
    (`energy_ratio`).
    """

    def __init__(self, xb: _TensorView, name: str, cfg: AnalysisConfig, storage: torch.dtype, comp: torch.dtype,
                 target_energy_per_elem: float, nonfinite: bool):
        self.storage, self.comp = storage, comp
        self.round_to = cfg.null_dtype or storage
        r = max(1, min(cfg.null_rank, xb.nx))
        g = _gen(cfg.seed, name, "rounding")
        self.a = torch.randn(xb.mx, r, generator=g, dtype=comp)
        self.b = torch.randn(xb.nx, r, generator=g, dtype=comp) / math.sqrt(r)
        k = max(1, min(xb.mx, _NULL_FIT_ELEMS // xb.nx))
        idx = torch.randperm(xb.mx, generator=g)[:k].sort().values
        base = xb.take_rows(idx).to(storage).to(comp)
        base = _finite(base) if nonfinite else base
        u = self.a[idx] @ self.b.T
        lo, hi = -30.0, 30.0
        rms = math.sqrt(target_energy_per_elem)
        for _ in range(20):  # bisection on log2(s / rms); energy grows with s
            mid = (lo + hi) / 2
            e = float(self._delta(base, u * (rms * 2.0 ** mid)).double().pow(2).mean())
            lo, hi = (mid, hi) if e < target_energy_per_elem else (lo, mid)
        self.scale = rms * 2.0 ** hi

    def _delta(self, base_c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return (base_c + u).to(self.round_to).to(self.comp) - base_c

    def chunk(self, base_c: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        return self._delta(base_c, (self.a[r0:r1] @ self.b.T) * self.scale)


class _Accum:
    """Gram, geometry projection and enrichment histograms of one update (observed or null)."""

    def __init__(self, n: int, kmax: int, with_gram: bool, track_energy: bool = True):
        self.track_energy = track_energy
        self.gram = torch.zeros(n, n, dtype=torch.float64) if with_gram else None
        self.proj = torch.zeros(kmax, kmax, dtype=torch.float64) if kmax else None
        self.energy = 0.0
        self.changed = 0
        self.hist_upd = torch.zeros(_NBINS, dtype=torch.int64)

    def add(self, d: torch.Tensor, ub: torch.Tensor | None, vk: torch.Tensor | None, key_b: torch.Tensor | None,
            changed: torch.Tensor | None) -> None:
        if self.gram is not None or self.track_energy:
            d64 = d.to(torch.float64)
            self.energy += float(torch.dot(d64.flatten(), d64.flatten()))
            if self.gram is not None:
                self.gram.addmm_(d64.T, d64)
        if self.proj is not None:
            self.proj.addmm_(ub.T.to(torch.float64), (d @ vk).to(torch.float64))
        if key_b is not None:
            self.hist_upd += torch.bincount(key_b[changed], minlength=_NBINS)
            self.changed += int(changed.sum())


def _subspace(acc: _Accum, ks: dict[str, int], base_rank: int) -> dict | None:
    if acc.proj is None or acc.energy == 0:
        return None
    return {key: float(acc.proj[: min(k, base_rank), : min(k, base_rank)].pow(2).sum() / acc.energy)
            for key, k in ks.items()}


def _stacked_spectra(base: torch.Tensor, tuned: torch.Tensor, cfg: AnalysisConfig, storage: torch.dtype,
                     comp: torch.dtype) -> tuple[dict, dict[str, np.ndarray]]:
    """Spectral metrics of a stack [B, m, n] as the block-diagonal matrix of its B matrices (module docstring).

    Per matrix: Delta's float64 Gram (its singular values), the base's float32 Gram (top-k directions), and a
    projection pass for the subspace energy; two passes over each matrix. Returns (metrics, {"delta", "base"}).
    """
    n_mat, m, n = base.shape
    ks = {pct(f): max(1, math.ceil(f * min(m, n))) for f in cfg.subspace_fracs}
    sig_d, sig_b, proj = [], [], dict.fromkeys(ks, 0.0)
    energy, base_rank, random_share = 0.0, 0, dict.fromkeys(ks, 0.0)
    for i in range(n_mat):
        xb, xt = _TensorView(base[i]), _TensorView(tuned[i])
        gb = torch.zeros(xb.nx, xb.nx, dtype=torch.float32)
        gd = torch.zeros(xb.nx, xb.nx, dtype=torch.float64)
        for r0, r1 in _chunks(xb.mx, xb.nx, cfg.chunk_elems):
            b64 = xb.rows(r0, r1).to(storage).to(torch.float64)
            d64 = xt.rows(r0, r1).to(storage).to(torch.float64) - b64
            if not bool(d64.isfinite().all()):
                d64, b64 = _finite(d64), _finite(b64)
            b32 = b64.to(torch.float32)
            gb.addmm_(b32.T, b32)
            gd.addmm_(d64.T, d64)
        energy += float(gd.diagonal().sum())
        sig_d.append(_sigma_from_gram(gd, xb.mx))
        lam_b, vec_b = _eig(gb, vectors=True)
        sb = lam_b.clamp_min(0).flip(0).sqrt()
        sig_b.append(sb.double().numpy())
        rank = int((sb > 1e-3 * sb[0]).sum()) if sb[0] > 0 else 0
        base_rank += rank
        for key, k in ks.items():
            random_share[key] += min(k, rank) ** 2 / (xb.mx * xb.nx) / n_mat
        kmax = min(max(ks.values()), rank)
        if not kmax or not bool(gd.diagonal().sum() > 0):
            continue
        vk = vec_b.flip(1)[:, :kmax].to(comp).contiguous()
        inv_s = (1.0 / sb[:kmax].double()).to(comp)
        acc = torch.zeros(kmax, kmax, dtype=torch.float64)
        for r0, r1 in _chunks(xb.mx, xb.nx, cfg.chunk_elems):
            b_raw = xb.rows(r0, r1).to(storage).to(comp)
            d, bc = _finite(xt.rows(r0, r1).to(storage).to(comp) - b_raw), _finite(b_raw)
            acc.addmm_(((bc @ vk) * inv_s).T.to(torch.float64), (d @ vk).to(torch.float64))
        for key, k in ks.items():
            proj[key] += float(acc[: min(k, rank), : min(k, rank)].pow(2).sum())
    delta = np.sort(np.concatenate(sig_d))[::-1].copy()
    out = spectrum_metrics(delta, cfg)
    out.update({"sigma_floor_rel": math.sqrt(max(m, n) * 2.0 ** -53), "base_numerical_rank": base_rank,
                "subspace_energy_random": random_share,
                "subspace_energy": {key: v / energy for key, v in proj.items()} if energy > 0 else None,
                "spectral_min_dim": n_mat * min(m, n),
                "spectral_layout": f"stack of {n_mat} matrices [{m}, {n}]: the spectrum is the block-diagonal "
                "matrix's (the union of the matrices' singular values); no null-model spectra, so the tensor is "
                "left out of the full_rank and spectrally_concentrated findings"})
    return out, {"delta": delta, "base": np.sort(np.concatenate(sig_b))[::-1].copy()}


def analyze_tensor(name: str, base: torch.Tensor, tuned: torch.Tensor, cfg: AnalysisConfig, *,
                   null_models: bool = False, mask_sink: Callable[[torch.Tensor], None] | None = None
                   ) -> tuple[dict, dict[str, np.ndarray]]:
    """Metrics of Delta = tuned - base for one floating-point tensor.

    Args:
        name: parameter name (seeds the null models reproducibly).
        base, tuned: same shape, floating dtypes (memory-mapped is fine: only row chunks are materialized).
        cfg: what to measure.
        null_models: also compute the shuffled and rounding null models.
        mask_sink: called with bool chunks of the update mask in row-major order (concatenated: the mask).

    Returns:
        (metrics dict, spectra {"delta", "base", "null_shuffled", "null_rounding"} -> singular values).
    """
    storage = cfg.dtype or tuned.dtype
    comp = torch.float32 if storage.itemsize <= 2 else torch.float64
    numel = base.numel()
    xb, xt = _TensorView(base), _TensorView(tuned)
    stacked = base.dim() == 3  # a stack of matrices (MoE experts): spectra per matrix, see _stacked_spectra
    spectral = base.dim() >= 2 and xb.nx >= 2 and not stacked
    out: dict = {"shape": list(base.shape), "dtype": str(tuned.dtype).replace("torch.", ""),
                 "storage_dtype": str(storage).replace("torch.", ""), "numel": numel}
    spectra: dict[str, np.ndarray] = {}

    def rows(r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
        return xb.rows(r0, r1).to(storage), xt.rows(r0, r1).to(storage)

    # ---- pass 1: Grams (float64), ||base||^2, ||Delta||^2
    # The base Gram only feeds the geometry (its top-k singular subspaces), which needs no float64: it is
    # accumulated and eigendecomposed in float32 (half the cost). Delta's Gram is the spectrum: float64.
    gb = torch.zeros(xb.nx, xb.nx, dtype=torch.float32) if spectral else None
    gd = torch.zeros(xb.nx, xb.nx, dtype=torch.float64) if spectral else None
    base_sq = delta_sq = 0.0
    nonfinite = False  # any NaN/Inf Delta in this tensor (a NaN/Inf base value gives one): later passes sanitize
    for r0, r1 in _chunks(xb.mx, xb.nx, cfg.chunk_elems):
        b, t = rows(r0, r1)
        b64 = b.to(torch.float64)
        d64 = t.to(torch.float64) - b64
        if not bool(d64.isfinite().all()):  # a NaN/Inf base value makes Delta non-finite as well
            nonfinite = True
            d64, b64 = _finite(d64), _finite(b64)
        base_sq += float(torch.dot(b64.flatten(), b64.flatten()))
        if spectral:
            b32 = b64.to(torch.float32)
            gb.addmm_(b32.T, b32)
            if d64.any():
                gd.addmm_(d64.T, d64)
        else:
            delta_sq += float(torch.dot(d64.flatten(), d64.flatten()))
    if spectral:
        delta_sq = float(gd.diagonal().sum())
    rms_base = math.sqrt(base_sq / numel) if numel else 0.0
    out["rms_base"], out["energy"] = rms_base, delta_sq
    out["rms_delta"] = math.sqrt(delta_sq / numel) if numel else 0.0

    # ---- pass 2: elementwise, native row order
    ibits = _int_dtype(storage)
    thresholds = [(f"atol:{a:g}", a) for a in cfg.atols]
    thresholds += [(f"tau:{t:g}", _strictly_below(t * rms_base, comp)) for t in cfg.taus]
    order = sorted(range(len(thresholds)), key=lambda i: thresholds[i][1])
    bounds = torch.tensor([thresholds[i][1] for i in order], dtype=comp)
    le_counts = torch.zeros(len(bounds) + 1, dtype=torch.int64)
    hist_d = torch.zeros(_NBINS, dtype=torch.int64)
    hist_dw = torch.zeros(_NBINS, dtype=torch.float64)
    hist_b2 = torch.zeros(2 * _NBINS, dtype=torch.int64)   # [unchanged | changed] by |base| key
    joint = torch.zeros(_NEXP * _NEXP, dtype=torch.int64)  # (exponent of |Delta|, exponent of |base|)
    p = _mant_digits(storage)
    emin = int(math.log2(torch.finfo(storage).tiny)) + 127  # biased exponent of the smallest normal
    rows_native = xb.t2.shape[0]
    row_len = xb.t2.shape[1]
    n_nonfinite = 0
    for r0, r1 in _chunks(rows_native, row_len, cfg.chunk_elems):
        b, t = xb.t2[r0:r1].to(storage), xt.t2[r0:r1].to(storage)
        changed = b.view(ibits) != t.view(ibits)
        bc = b.to(comp)
        d = t.to(comp) - bc
        ad_thr = ad = d.abs()
        bad = ~d.isfinite()
        if bool(bad.any()):
            nonfinite = True
            ad = _finite(ad)
            bad &= changed                       # an unchanged NaN/Inf weight: Delta 0, not counted
            n_nonfinite += int(bad.sum())
            ad_thr = ad.masked_fill(bad, math.inf)  # beyond every atol, below no tau
        le_counts += torch.bincount(torch.bucketize(ad_thr.flatten(), bounds).flatten(), minlength=len(bounds) + 1)
        key_d = _hi16(ad)
        hist_d += torch.bincount(key_d.flatten(), minlength=_NBINS)
        hist_dw += torch.bincount(key_d.flatten(), weights=ad.flatten().to(torch.float64).square(), minlength=_NBINS)
        key_b = _hi16(bc.abs())
        hist_b2 += torch.bincount((key_b | (changed.to(torch.int32) << 15)).flatten(), minlength=2 * _NBINS)
        joint += torch.bincount((((key_d >> 7) << 8) | (key_b >> 7)).flatten(), minlength=_NEXP * _NEXP)
        if mask_sink is not None:
            mask_sink(changed if cfg.mask_atol is None else ad_thr > cfg.mask_atol)
    n_changed = int(hist_b2[_NBINS:].sum())
    out["changed"] = n_changed
    out["nonfinite_delta"] = n_nonfinite
    out["nonfinite_base"] = int(hist_b2.view(2, _NEXP, -1)[:, _NEXP - 1].sum())  # fp32 exponent 255: NaN/Inf
    out["density_exact"] = n_changed / numel if numel else 0.0
    le_cum = torch.cumsum(le_counts, 0)  # le_cum[j] = #(|Delta| <= bounds[j])
    below = {thresholds[i][0]: int(le_cum[j]) for j, i in enumerate(order)}
    out["density_atol"] = {f"{a:g}": 1.0 - below[f"atol:{a:g}"] / numel for a in cfg.atols}
    out["frac_below_tau_rms"] = {f"{t:g}": below[f"tau:{t:g}"] / numel for t in cfg.taus}
    hist_b_all = hist_b2[:_NBINS] + hist_b2[_NBINS:]
    hist_b_upd = hist_b2[_NBINS:]
    out["enrichment_small"], out["enrichment_by_decile"] = _enrichment(hist_b_all, hist_b_upd, cfg.small_fracs)
    out["ulp_buckets"] = _ulp_buckets(joint, hist_b_all, hist_b_upd, p, emin)


    # ---- spectra
    ks = {pct(f): max(1, math.ceil(f * xb.nx)) for f in cfg.subspace_fracs}
    if spectral:
        sig_d = _sigma_from_gram(gd, xb.mx)
        spectra["delta"] = sig_d
        out.update(spectrum_metrics(sig_d, cfg))
        out["sigma_floor_rel"] = math.sqrt(xb.mx * 2.0 ** -53)
        lam_b, vec_b = _eig(gb, vectors=True)
        sig_b = lam_b.clamp_min(0).flip(0).sqrt()
        spectra["base"] = sig_b.double().numpy()
        # directions resolved by a float32 Gram (sigma^2 above ~1e-6 of the top): U_k = X V_k / sigma_k is stable
        base_rank = int((sig_b > 1e-3 * sig_b[0]).sum()) if sig_b[0] > 0 else 0
        kmax = min(max(ks.values()), base_rank)
        vk = vec_b.flip(1)[:, :kmax].to(comp).contiguous()
        inv_s = (1.0 / sig_b[:kmax].double()).to(comp)
        out["base_numerical_rank"] = base_rank
        out["subspace_energy_random"] = {key: min(k, base_rank) ** 2 / (xb.mx * xb.nx) for key, k in ks.items()}
        out["spectral_min_dim"] = xb.nx
        del gb, gd
    else:
        kmax, vk, inv_s, base_rank = 0, None, None, 0
        out.update({"numerical_rank": None, "stable_rank": None, "effective_rank": None, "topk_energy": None})
        if stacked and min(base.shape[1:]) >= 2:
            stacked_out, stacked_spectra = _stacked_spectra(base, tuned, cfg, storage, comp)
            out.update(stacked_out)
            spectra.update(stacked_spectra)

    # ---- pass 4: geometry (observed) and null models
    if delta_sq == 0.0:
        out["energy_top"] = {pct(f): None for f in cfg.energy_fracs}
        out["subspace_energy"] = None
        if null_models:
            out["null"] = None
        return out, spectra
    top = _TopEnergy(hist_d, hist_dw, delta_sq, numel, cfg)
    fin = _finite if nonfinite else (lambda x: x)
    obs = _Accum(xb.nx, kmax, with_gram=False, track_energy=False)
    obs.energy = delta_sq
    shuf = rnd = None
    if null_models:
        shuf = _Accum(xb.nx, kmax, with_gram=spectral)
        rnd = _Accum(xb.nx, kmax, with_gram=spectral)
        rounding = _RoundingNull(xb, name, cfg, storage, comp, delta_sq / numel, nonfinite)
        g_shuf = _gen(cfg.seed, name, "shuffle")
        exact = numel <= cfg.exact_shuffle_max
        if exact:
            dflat = fin(tuned.reshape(-1).to(storage).to(comp) - base.reshape(-1).to(storage).to(comp))
            perm = torch.randperm(numel, generator=g_shuf)
        bflat, tflat = base.reshape(-1), tuned.reshape(-1)
    for r0, r1 in _chunks(xb.mx, xb.nx, cfg.chunk_elems):
        b, t = rows(r0, r1)
        b_raw = b.to(comp)
        d, bc = fin(t.to(comp) - b_raw), fin(b_raw)
        ub = (bc @ vk) * inv_s if kmax else None
        top.add(d.abs())
        obs.add(d, ub, vk, None, None)
        if not null_models:
            continue
        key_b = _hi16(b_raw.abs())  # binned as in the elementwise pass (NaN/Inf base: exponent 255)
        if exact:
            s = dflat[perm[r0 * xb.nx: r1 * xb.nx]].view(r1 - r0, xb.nx)
        else:
            idx = torch.randint(numel, ((r1 - r0) * xb.nx,), generator=g_shuf)
            s = fin(tflat[idx].to(storage).to(comp) - bflat[idx].to(storage).to(comp)).view(r1 - r0, xb.nx)
        shuf.add(s, ub, vk, key_b, s != 0)
        dn = rounding.chunk(bc, r0, r1)
        rnd.add(dn, ub, vk, key_b, dn != 0)
    out["energy_top"] = top.result()
    if "subspace_energy" not in out:  # a stack's is its matrices' (_stacked_spectra)
        out["subspace_energy"] = _subspace(obs, ks, base_rank)
    if null_models:
        out["null"] = {"shuffled": _null_summary(shuf, hist_b_all, spectral, ks, base_rank, cfg, numel),
                       "rounding": _null_summary(rnd, hist_b_all, spectral, ks, base_rank, cfg, numel)}
        out["null"]["shuffled"]["method"] = "permutation" if exact else "sampled with replacement"
        out["null"]["rounding"].update(scale=rounding.scale, rank=rounding.a.shape[1],
                                       dtype=str(rounding.round_to).replace("torch.", ""),
                                       energy_ratio=rnd.energy / delta_sq)  # fitted on a sample: about 1
        if spectral:
            spectra["null_shuffled"] = _sigma_from_gram(shuf.gram, xb.mx)
            spectra["null_rounding"] = _sigma_from_gram(rnd.gram, xb.mx)
            out["null"]["shuffled"].update(spectrum_metrics(spectra["null_shuffled"], cfg))
            out["null"]["rounding"].update(spectrum_metrics(spectra["null_rounding"], cfg))
    return out, spectra


def _null_summary(acc: _Accum, hist_b_all: torch.Tensor, spectral: bool, ks: dict, base_rank: int,
                  cfg: AnalysisConfig, numel: int) -> dict:
    enr, by_dec = _enrichment(hist_b_all, acc.hist_upd, cfg.small_fracs)
    return {"density_exact": acc.changed / numel, "energy": acc.energy, "enrichment_small": enr,
            "enrichment_by_decile": by_dec, "subspace_energy": _subspace(acc, ks, base_rank) if spectral else None}


class _TopEnergy:
    """Share of ||Delta||^2 held by the top ceil(p * numel) coordinates by |Delta|, for p in cfg.energy_fracs.

    The hi16 histogram of the elementwise pass gives the bin holding each boundary; `add` then histograms
    the coordinates in those bins by their low 16 bits, inside which all fp32 values are equal: exact.
    """

    def __init__(self, hist_d: torch.Tensor, hist_dw: torch.Tensor, total: float, numel: int, cfg: AnalysisConfig):
        self.total, self.fracs = total, cfg.energy_fracs
        cnt_desc = torch.cumsum(hist_d.flip(0), 0)      # coordinates in bins >= key, by descending key
        w_desc = torch.cumsum(hist_dw.flip(0), 0)
        self.need: dict[str, tuple[int, int, float]] = {}  # frac -> (boundary key, count still needed, energy above)
        for f in cfg.energy_fracs:
            k = min(numel, max(1, math.ceil(f * numel)))
            j = int(torch.searchsorted(cnt_desc, torch.tensor([k])).item())
            above_cnt = int(cnt_desc[j - 1]) if j else 0
            above_w = float(w_desc[j - 1]) if j else 0.0
            self.need[pct(f)] = (_NBINS - 1 - j, k - above_cnt, above_w)
        self.keys = sorted({v[0] for v in self.need.values()})
        self.lo_cnt = {key: torch.zeros(1 << 16, dtype=torch.int64) for key in self.keys}
        self.lo_w = {key: torch.zeros(1 << 16, dtype=torch.float64) for key in self.keys}

    def add(self, ad: torch.Tensor) -> None:
        """Feed |Delta| of a chunk (any order)."""
        bits = ad.flatten().to(torch.float32).view(torch.int32)
        hi = bits >> 16
        hit = (hi >= self.keys[0]) & (hi <= self.keys[-1])
        if not bool(hit.any()):
            return
        bits, vals = bits[hit], ad.flatten()[hit].to(torch.float64).square()
        hi = bits >> 16
        for key in self.keys:
            sel = hi == key
            lo = bits[sel] & 0xFFFF
            self.lo_cnt[key] += torch.bincount(lo, minlength=1 << 16)
            self.lo_w[key] += torch.bincount(lo, weights=vals[sel], minlength=1 << 16)

    def result(self) -> dict:
        out = {}
        for f_key, (key, rem, above_w) in self.need.items():
            c, w = self.lo_cnt[key].flip(0), self.lo_w[key].flip(0)
            cc = torch.cumsum(c, 0)
            j = int(torch.searchsorted(cc, torch.tensor([rem])).item())
            got_c = int(cc[j - 1]) if j else 0
            got_w = float(w[:j].sum())
            partial = (rem - got_c) * (float(w[j]) / int(c[j])) if rem > got_c else 0.0
            out[f_key] = (above_w + got_w + partial) / self.total
        return out
