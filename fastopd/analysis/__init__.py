"""Update analysis: how a fine-tuning or distillation run changed the weights.

`analyze_update(base, tuned)` streams over the tensors two checkpoints share and returns an `UpdateReport`
(sparsity, energy concentration, full spectra, geometry against the base, aggregation by layer and module
kind, null models); `fastopd analyze` is its command line. See docs/analysis.md.
"""

from fastopd.analysis.analyze import AnalysisInputError, MismatchError, analyze_update, select_null_tensors
from fastopd.analysis.io import Checkpoint, CheckpointError, open_checkpoint
from fastopd.analysis.masks import MASK_FORMAT, MaskWriter, match_param_names
from fastopd.analysis.naming import FFN_KINDS, KINDS, layer_index, module_kind
from fastopd.analysis.report import UpdateReport, build_report
from fastopd.analysis.stats import AnalysisConfig, analyze_tensor, spectrum_metrics

__all__ = ["FFN_KINDS", "KINDS", "MASK_FORMAT", "AnalysisConfig", "AnalysisInputError", "Checkpoint",
           "CheckpointError", "MaskWriter", "MismatchError", "UpdateReport", "analyze_tensor", "analyze_update",
           "build_report", "layer_index", "match_param_names", "module_kind", "open_checkpoint",
           "select_null_tensors", "spectrum_metrics"]
