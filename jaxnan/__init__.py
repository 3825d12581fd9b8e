"""jaxnan: find, explain and survive NaN/Inf in JAX training."""

from jaxnan._src.base import ArrayTree as ArrayTree
from jaxnan._src.checks import Report as Report
from jaxnan._src.checks import check as check
from jaxnan._src.decorators import NonfiniteRecord as NonfiniteRecord
from jaxnan._src.decorators import checked as checked
from jaxnan._src.decorators import checked_grad as checked_grad
from jaxnan._src.decorators import checked_value_and_grad as checked_value_and_grad
from jaxnan._src.guard.host import GuardedStep as GuardedStep
from jaxnan._src.guard.host import guard as guard
from jaxnan._src.guard.records import Incident as Incident
from jaxnan._src.guard.records import Policy as Policy
from jaxnan._src.lint import Finding as Finding
from jaxnan._src.lint import lint as lint
from jaxnan._src.lint_rules import LINT_RULES as LINT_RULES
from jaxnan._src.lint_rules import LintRule as LintRule
from jaxnan._src.locate import Diagnosis as Diagnosis
from jaxnan._src.locate import locate as locate
from jaxnan._src.loss_scale import DynamicLossScaleState as DynamicLossScaleState
from jaxnan._src.loss_scale import dynamic_loss_scale as dynamic_loss_scale
from jaxnan._src.loss_scale import scale_loss as scale_loss
from jaxnan._src.loss_scale import unscale_grads as unscale_grads
from jaxnan._src.monitor import MonitorState as MonitorState
from jaxnan._src.monitor import monitor as monitor
from jaxnan._src.monitor import monitor_metrics as monitor_metrics
from jaxnan._src.report import NonFiniteError as NonFiniteError
from jaxnan._src.rules import register_rule as register_rule
from jaxnan._src.spikes import AdaGCState as AdaGCState
from jaxnan._src.spikes import SkipReason as SkipReason
from jaxnan._src.spikes import SkipSpikesState as SkipSpikesState
from jaxnan._src.spikes import ZScoreClipState as ZScoreClipState
from jaxnan._src.spikes import adagc as adagc
from jaxnan._src.spikes import skip_spikes as skip_spikes
from jaxnan._src.spikes import zscore_clip as zscore_clip
from jaxnan._src.transforms import ClipByGlobalNormState as ClipByGlobalNormState
from jaxnan._src.transforms import SkipNonfiniteState as SkipNonfiniteState
from jaxnan._src.transforms import ZeroNonfiniteState as ZeroNonfiniteState
from jaxnan._src.transforms import clip_by_global_norm as clip_by_global_norm
from jaxnan._src.transforms import skip_nonfinite as skip_nonfinite
from jaxnan._src.transforms import zero_nonfinite as zero_nonfinite
from jaxnan._src.tree import NonfiniteCounts as NonfiniteCounts
from jaxnan._src.tree import all_finite as all_finite
from jaxnan._src.tree import nonfinite_counts as nonfinite_counts

__version__ = "0.1.0"

__all__ = (
    "AdaGCState",
    "ArrayTree",
    "ClipByGlobalNormState",
    "Diagnosis",
    "DynamicLossScaleState",
    "Finding",
    "GuardedStep",
    "Incident",
    "LINT_RULES",
    "LintRule",
    "MonitorState",
    "NonFiniteError",
    "NonfiniteCounts",
    "NonfiniteRecord",
    "Policy",
    "Report",
    "SkipNonfiniteState",
    "SkipReason",
    "SkipSpikesState",
    "ZScoreClipState",
    "ZeroNonfiniteState",
    "adagc",
    "all_finite",
    "check",
    "checked",
    "checked_grad",
    "checked_value_and_grad",
    "clip_by_global_norm",
    "dynamic_loss_scale",
    "guard",
    "lint",
    "locate",
    "monitor",
    "monitor_metrics",
    "nonfinite_counts",
    "register_rule",
    "scale_loss",
    "skip_nonfinite",
    "skip_spikes",
    "unscale_grads",
    "zero_nonfinite",
    "zscore_clip",
)
