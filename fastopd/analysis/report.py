"""`UpdateReport`: per-tensor metrics, aggregation by layer and module kind, null-model findings, output files."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastopd._io import atomic_path, write_text_atomic
from fastopd.analysis.naming import FFN_KINDS
from fastopd.analysis.plots import PLOT_FILES

__all__ = ["UpdateReport", "build_report"]

RANK_TOL = "0.0001"   # tolerance key used for "full-rank" statements (the loosest of the defaults)
SMALL_Q = "10%"       # smallest-magnitude fraction used for "near-zero-heavy" statements
TOPK_KEY = "1%"       # top-k fraction of min(m, n) used for "spectrally concentrated" statements


def _median(xs) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.median(xs)) if xs else None


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _group(tensors: dict[str, dict], key) -> dict[str, dict]:
    groups: dict[str, dict] = {}
    for t in tensors.values():
        g = groups.setdefault(str(key(t)), {"tensors": 0, "numel": 0, "changed": 0, "energy": 0.0,
                                             "_rank": [], "_eff": [], "_top": [], "_enr": []})
        g["tensors"] += 1
        g["numel"] += t["numel"]
        g["changed"] += t["changed"]
        g["energy"] += t["energy"]
        if t.get("numerical_rank") is not None and t["shape"]:
            mn = _min_dim(t)
            g["_rank"].append(t["numerical_rank"][RANK_TOL] / mn if RANK_TOL in t["numerical_rank"] else None)
            g["_eff"].append(t["effective_rank"] / mn if t.get("effective_rank") is not None else None)
            g["_top"].append((t.get("topk_energy") or {}).get(TOPK_KEY))
        g["_enr"].append((t.get("enrichment_small") or {}).get(SMALL_Q))
    tot_n = sum(g["numel"] for g in groups.values())
    tot_c = sum(g["changed"] for g in groups.values())
    tot_e = sum(g["energy"] for g in groups.values())
    for g in groups.values():
        g["density_exact"] = _ratio(g["changed"], g["numel"])
        g["share_params"] = _ratio(g["numel"], tot_n)
        g["share_updated"] = _ratio(g["changed"], tot_c)
        g["share_energy"] = _ratio(g["energy"], tot_e)
        g["median_rank_fraction"] = _median(g.pop("_rank"))
        g["median_effective_rank_fraction"] = _median(g.pop("_eff"))
        g[f"median_top{TOPK_KEY}_energy"] = _median(g.pop("_top"))
        g[f"median_enrichment_{SMALL_Q}"] = _median(g.pop("_enr"))
    return groups


def _min_dim(t: dict) -> int:
    """The number of singular values of a tensor's spectrum: min(m, n), B min(m, n) for a stack [B, m, n]."""
    return t.get("spectral_min_dim") or min(t["shape"][0], t["numel"] // max(1, t["shape"][0]))


def _not_computed(fid: str, claim: str, metric: str, why: str) -> dict:
    """A finding whose metric the AnalysisConfig did not compute (its verdict says which option lacks it)."""
    return {"id": fid, "claim": claim, "metric": metric, "observed": None, "null_shuffled": None,
            "null_rounding": None, "holds": None, "survives_shuffled": None, "survives_rounding": None,
            "test": None, "verdict": f"not computed: {why}"}


def _findings(tensors: dict[str, dict], summary: dict) -> list[dict]:
    """The study's four claims, each against the null models it could be an artefact of."""
    nulled = {n: t for n, t in tensors.items() if t.get("null")}
    spectral = {n: t for n, t in nulled.items()  # stacks [B, m, n] have no null spectra (stats._stacked_spectra)
                if t.get("numerical_rank") is not None and t["null"]["rounding"].get("numerical_rank") is not None}
    out = []

    def verdict(holds, *survives) -> str:
        if not holds:
            return "does not hold"
        known = [s for s in survives if s is not None]
        if not known:
            return "holds (no null model tested)"
        return "holds and survives the null models" if all(known) else "holds, but is explained by a null model"

    if nulled:
        # the verdict is the whole update's (summary); the null compares like with like, on the null-model tensors
        n = sum(t["numel"] for t in nulled.values())
        obs_n = sum(t["changed"] for t in nulled.values()) / n
        rnd = sum(t["null"]["rounding"]["density_exact"] * t["numel"] for t in nulled.values()) / n
        obs = summary["density_exact"]
        holds = obs < 0.5
        surv = obs_n < 0.5 * rnd
        out.append({"id": "coordinate_sparse",
                    "claim": "the update is coordinate-sparse (fewer than half the coordinates change)",
                    "metric": "fraction of coordinates changed (bitwise)", "observed": obs,
                    "observed_on_null_tensors": obs_n, "null_shuffled": obs_n, "null_rounding": rnd, "holds": holds,
                    "survives_shuffled": None, "survives_rounding": surv,
                    "test": "holds if the summary's density < 0.5; survives rounding if the density on the null-model "
                    "tensors < 0.5 x the rounding null's density there", "verdict": verdict(holds, surv)})
    rank_claim = (f"2-D updates are numerically full-rank (rank at tol {RANK_TOL} of at least half of min(m, n))",
                  "median numerical rank / min(m, n)")
    topk_claim = (f"2-D updates are spectrally concentrated (top {TOPK_KEY} of singular directions hold at least 2x "
                  "the energy they hold in the shuffled update)", f"median top-{TOPK_KEY} singular energy")
    if spectral and not all(RANK_TOL in t["numerical_rank"] for t in spectral.values()):
        out.append(_not_computed("full_rank", *rank_claim, f"AnalysisConfig.rank_tols has no {RANK_TOL}"))
    elif spectral:
        obs = _median([t["numerical_rank"][RANK_TOL] / _min_dim(t) for t in spectral.values()])
        shf = _median([t["null"]["shuffled"]["numerical_rank"][RANK_TOL] / _min_dim(t) for t in spectral.values()])
        rnd = _median([t["null"]["rounding"]["numerical_rank"][RANK_TOL] / _min_dim(t) for t in spectral.values()])
        holds = obs >= 0.5
        surv = rnd < 0.5 * obs
        out.append({"id": "full_rank", "claim": rank_claim[0], "metric": rank_claim[1],
                    "observed": obs, "null_shuffled": shf, "null_rounding": rnd, "holds": holds,
                    "survives_shuffled": None, "survives_rounding": surv,
                    "test": "survives rounding if the rounded dense low-rank null stays below 0.5 x observed rank",
                    "verdict": verdict(holds, surv)})
    if spectral and not all(TOPK_KEY in (t["topk_energy"] or {}) for t in spectral.values()):
        out.append(_not_computed("spectrally_concentrated", *topk_claim,
                                 f"AnalysisConfig.topk_fracs has no {float(TOPK_KEY[:-1]) / 100:g}"))
    elif spectral:
        obs = _median([t["topk_energy"][TOPK_KEY] for t in spectral.values()])
        shf = _median([t["null"]["shuffled"]["topk_energy"][TOPK_KEY] for t in spectral.values()])
        rnd = _median([t["null"]["rounding"]["topk_energy"][TOPK_KEY] for t in spectral.values()])
        holds = obs >= 2 * shf
        out.append({"id": "spectrally_concentrated", "claim": topk_claim[0], "metric": topk_claim[1],
                    "observed": obs, "null_shuffled": shf,
                    "null_rounding": rnd, "holds": holds, "survives_shuffled": holds, "survives_rounding": None,
                    "test": "holds if observed >= 2 x shuffled (the shuffled update keeps the values, loses structure)",
                    "verdict": verdict(holds, holds)})
    enr = {n: t for n, t in nulled.items() if (t.get("enrichment_small") or {}).get(SMALL_Q) is not None}
    if nulled and not any(SMALL_Q in (t.get("enrichment_small") or {}) for t in nulled.values()):
        out.append(_not_computed("near_zero_heavy", f"updated coordinates are enriched among the {SMALL_Q} "
                                 "smallest-magnitude base weights (enrichment > 1.5)",
                                 f"median P(small_{SMALL_Q} | updated) / P(small_{SMALL_Q})",
                                 f"AnalysisConfig.small_fracs has no {float(SMALL_Q[:-1]) / 100:g}"))
    if enr:
        obs = _median([t["enrichment_small"][SMALL_Q] for t in enr.values()])
        shf = _median([t["null"]["shuffled"]["enrichment_small"][SMALL_Q] for t in enr.values()])
        rnd = _median([t["null"]["rounding"]["enrichment_small"][SMALL_Q] for t in enr.values()])
        holds = obs > 1.5
        s_shf = shf is not None and obs > 1.5 * shf
        s_rnd = rnd is not None and obs > 1.5 * rnd
        out.append({"id": "near_zero_heavy", "claim": f"updated coordinates are enriched among the {SMALL_Q} "
                    "smallest-magnitude base weights (enrichment > 1.5)",
                    "metric": f"median P(small_{SMALL_Q} | updated) / P(small_{SMALL_Q})", "observed": obs,
                    "null_shuffled": shf, "null_rounding": rnd, "holds": holds, "survives_shuffled": s_shf,
                    "survives_rounding": s_rnd, "test": "survives a null if observed > 1.5 x that null's enrichment",
                    "verdict": verdict(holds, s_shf, s_rnd)})
    if nulled:
        ffn = [t for t in nulled.values() if t["module_kind"] in FFN_KINDS]
        tot_c = sum(t["changed"] for t in nulled.values())
        tot_r = sum(t["null"]["rounding"]["density_exact"] * t["numel"] for t in nulled.values())
        obs_n = _ratio(sum(t["changed"] for t in ffn), tot_c)
        rnd_n = _ratio(sum(t["null"]["rounding"]["density_exact"] * t["numel"] for t in ffn), tot_r)
        params = summary["ffn_share_params"]
        holds = summary["ffn_share_updated"] is not None and params > 0 and summary["ffn_share_updated"] > 1.1 * params
        surv = None if obs_n is None or rnd_n is None or not ffn else obs_n > 1.1 * rnd_n
        out.append({"id": "ffn_heavy", "claim": "FFN tensors take a larger share of the updated coordinates than "
                    "of the parameters (> 1.1x)", "metric": "FFN share of updated coordinates",
                    "observed": summary["ffn_share_updated"], "params_share": params,
                    "observed_on_null_tensors": obs_n, "null_shuffled": obs_n, "null_rounding": rnd_n,
                    "holds": holds, "survives_shuffled": None, "survives_rounding": surv,
                    "test": "survives rounding if the FFN share on the null-model tensors exceeds the rounding null's "
                    "by 1.1x", "verdict": verdict(holds, surv)})
    return out


@dataclass
class UpdateReport:
    """Everything `analyze_update` measured. `to_dict()` is what `report.json` holds."""

    tensors: dict[str, dict]
    summary: dict
    by_layer: dict[str, dict]
    by_kind: dict[str, dict]
    findings: list[dict]
    meta: dict
    mismatches: dict = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    spectra: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {"meta": self.meta, "summary": self.summary, "findings": self.findings, "by_kind": self.by_kind,
                "by_layer": self.by_layer, "mismatches": self.mismatches, "skipped": self.skipped,
                "tensors": self.tensors}

    def write(self, out_dir: str | Path, plots: bool = True) -> list[Path]:
        """Write report.json (strict JSON: NaN/Inf numbers as null), report.md, spectra.safetensors and (with
        matplotlib) PNG plots into `out_dir`. Each file is written atomically (`fastopd._io.atomic_path`): an
        interrupted write leaves the file of an earlier run or none, never a truncated one. Once all are written,
        the spectra and plot files of an earlier run that this one does not write (`plots=False`, no spectrum) are
        removed, so that none passes for this pair's; other files in `out_dir` are left alone."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = [out / "report.json", out / "report.md"]
        # strict JSON: NaN/Inf statistics are written as null (json's default would write the invalid NaN)
        write_text_atomic(written[0], json.dumps(_json_ready(self.to_dict()), indent=1, allow_nan=False))
        write_text_atomic(written[1], self.markdown())
        if self.spectra:
            import torch
            from safetensors.torch import save_file

            flat = {f"{name}/{which}": torch.from_numpy(np.ascontiguousarray(s))
                    for name, d in self.spectra.items() for which, s in d.items()}
            with atomic_path(out / "spectra.safetensors") as tmp:
                save_file(flat, str(tmp), metadata={"format": "fastopd.spectra.v1"})
            written.append(out / "spectra.safetensors")
        if plots:
            from fastopd.analysis.plots import make_plots

            written += make_plots(self, out)
        for name in ("spectra.safetensors", *PLOT_FILES):
            if out / name not in written:
                (out / name).unlink(missing_ok=True)
        return written

    def markdown(self) -> str:
        s = self.summary
        lines = ["# fastopd update analysis", "",
                 f"- base: `{self.meta.get('base')}`", f"- tuned: `{self.meta.get('tuned')}`",
                 f"- tensors analysed: {s['tensors']} ({s['numel']:,} parameters); null models on "
                 f"{s['null_tensors']} tensors ({self.meta.get('null_models')})",
                 f"- changed coordinates (bitwise): {s['changed']:,} = **{_f(s['density_exact'])}** of parameters",
                 f"- FFN share: {_f(s['ffn_share_params'])} of parameters, **{_f(s['ffn_share_updated'])}** of "
                 f"changed coordinates, **{_f(s['ffn_share_energy'])}** of update energy", ""]
        if s.get("nonfinite_tensors"):
            lines[-1:-1] = [f"- **non-finite values** (taken as 0 in energies and spectra): {nonfinite_line(s)}"]
        if s["changed"] == 0:
            lines[-1:-1] = [f"- **{NO_UPDATE}**"]
        elif (why := no_null_line(self)) is not None:
            lines[-1:-1] = [f"- **{why}**"]
        for side, why in (self.meta.get("renamed") or {}).items():
            lines[-1:-1] = [f"- {side.upper()} names: {'; '.join(why)}"]
        if self.mismatches:
            lines += ["**Mismatches (analysed the common tensors only):** " + ", ".join(
                f"{k}: {len(v)}" for k, v in self.mismatches.items() if v), ""]
        lines += ["## Findings and null models", "",
                  "| claim | metric | observed | shuffled null | rounding null | verdict |",
                  "|---|---|---|---|---|---|"]
        for f in self.findings:
            claim, metric = (x.replace("|", "\\|") for x in (f["claim"], f["metric"]))
            lines.append(f"| {claim} | {metric} | {_f(f['observed'])} | {_f(f['null_shuffled'])} | "
                         f"{_f(f['null_rounding'])} | {f['verdict']} |")
        lines += ["", "Shuffled null: the same Delta values at random coordinates. Rounding null: a dense "
                  "low-rank update of matched energy, added to the base and rounded to the storage dtype.", "",
                  "## By module kind", "", _table(self.by_kind, "kind"), "", "## By layer", "",
                  _table(self.by_layer, "layer"), "", "## Largest tensors by update energy", "",
                  "| tensor | kind | density | energy share top 1% coords | rank@1e-4 / min dim | stable rank | "
                  f"top-{TOPK_KEY} sv energy | enrichment {SMALL_Q} |", "|---|---|---|---|---|---|---|---|"]
        tot_e = sum(t["energy"] for t in self.tensors.values()) or 1.0
        top = sorted(self.tensors.items(), key=lambda kv: -kv[1]["energy"])[:15]
        for name, t in top:
            rank = (f"{t['numerical_rank'][RANK_TOL]}/{_min_dim(t)}"
                    if RANK_TOL in (t.get("numerical_rank") or {}) else "-")
            lines.append(f"| `{name}` | {t['module_kind']} | {_f(t['density_exact'])} | "
                         f"{_f((t.get('energy_top') or {}).get('1%'))} | {rank} | {_f(t.get('stable_rank'))} | "
                         f"{_f((t.get('topk_energy') or {}).get(TOPK_KEY))} | "
                         f"{_f((t.get('enrichment_small') or {}).get(SMALL_Q))} |")
        lines += ["", f"(these tensors hold {_f(sum(t['energy'] for _, t in top) / tot_e)} of the update energy)"]
        return "\n".join(lines) + "\n"


NO_UPDATE = ("no coordinate changed: BASE and TUNED hold the same bits in every analysed tensor (no findings: "
             "they need a nonzero update)")


def no_null_line(report: UpdateReport) -> str | None:
    """Why a report with changed coordinates has no findings (no changed tensor got null models), or None."""
    if report.summary["changed"] == 0 or report.summary["null_tensors"] > 0:
        return None
    how = ("--null-models none" if report.meta.get("null_models") == "none" else
           "the sample leaves out tensors above 2^26 elements, the only ones that changed: use --null-models all")
    return f"no null models on a changed tensor ({how}): no findings, each is judged against them"


def nonfinite_line(summary: dict) -> str:
    """What the summary's NaN/Inf counts say, in one line (report.md and the command line)."""
    names = summary["nonfinite_tensors"]
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (f"{summary['nonfinite_delta']:,} changed coordinates with a NaN/Inf Delta, {summary['nonfinite_base']:,} "
            f"NaN/Inf base values, in {len(names)} tensors ({shown})")


def _f(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return f"{x:,}"
    if isinstance(x, float):
        if x == 0:
            return "0"
        return f"{x:.4g}" if abs(x) >= 1e-3 else f"{x:.3e}"
    return str(x)


def _table(groups: dict[str, dict], label: str) -> str:
    cols = ["tensors", "numel", "density_exact", "share_params", "share_updated", "share_energy",
            "median_rank_fraction", f"median_top{TOPK_KEY}_energy", f"median_enrichment_{SMALL_Q}"]
    rows = [f"| {label} | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]

    def order(k: str):
        return (0, int(k)) if k.lstrip("-").isdigit() else (1, k)

    for k in sorted(groups, key=order):
        rows.append(f"| {k} | " + " | ".join(_f(groups[k].get(c)) for c in cols) + " |")
    return "\n".join(rows)


def _json_ready(o):
    """`o` with numpy values as Python ones and non-finite floats as None, for strict JSON."""
    if isinstance(o, dict):
        return {k: _json_ready(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_ready(v) for v in o]
    if isinstance(o, (np.ndarray, np.generic)):
        return _json_ready(o.tolist())
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def build_report(tensors: dict[str, dict], meta: dict, mismatches: dict, skipped: dict,
                 spectra: dict[str, dict[str, np.ndarray]]) -> UpdateReport:
    """Aggregate per-tensor metrics (each with module_kind, layer, numel, changed, energy) into a report."""
    by_kind = _group(tensors, lambda t: t["module_kind"])
    by_layer = _group(tensors, lambda t: "none" if t["layer"] is None else t["layer"])
    numel = sum(t["numel"] for t in tensors.values())
    changed = sum(t["changed"] for t in tensors.values())
    energy = sum(t["energy"] for t in tensors.values())
    ffn = [t for t in tensors.values() if t["module_kind"] in FFN_KINDS]
    atols = next((list(t["density_atol"]) for t in tensors.values()), [])
    summary = {
        "tensors": len(tensors), "numel": numel, "changed": changed, "energy": energy,
        "density_exact": _ratio(changed, numel),
        "density_atol": {a: _ratio(sum(t["density_atol"][a] * t["numel"] for t in tensors.values()), numel)
                         for a in atols},
        "ffn_share_params": _ratio(sum(t["numel"] for t in ffn), numel) or 0.0,
        "ffn_share_updated": _ratio(sum(t["changed"] for t in ffn), changed),
        "ffn_share_energy": _ratio(sum(t["energy"] for t in ffn), energy),
        "null_tensors": sum(1 for t in tensors.values() if t.get("null")),
        # NaN/Inf: counted per tensor, taken as 0 in energies, Grams and spectra (stats.py)
        "nonfinite_delta": sum(t.get("nonfinite_delta", 0) for t in tensors.values()),
        "nonfinite_base": sum(t.get("nonfinite_base", 0) for t in tensors.values()),
        "nonfinite_tensors": sorted(n for n, t in tensors.items()
                                    if t.get("nonfinite_delta") or t.get("nonfinite_base")),
    }
    return UpdateReport(tensors=tensors, summary=summary, by_layer=by_layer, by_kind=by_kind,
                        findings=_findings(tensors, summary), meta=meta, mismatches=mismatches, skipped=skipped,
                        spectra=spectra)
