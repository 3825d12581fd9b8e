"""jaxnan: find, explain and survive NaN/Inf in JAX training."""

from jaxnan._src.checks import NonfiniteRecord as NonfiniteRecord
from jaxnan._src.checks import checked as checked
from jaxnan._src.checks import checked_grad as checked_grad
from jaxnan._src.checks import checked_value_and_grad as checked_value_and_grad
from jaxnan._src.checks import nonfinite_errors as nonfinite_errors
from jaxnan._src.checks.check import Report as Report
from jaxnan._src.checks.check import check as check
from jaxnan._src.core.errors import NonFiniteError as NonFiniteError
from jaxnan._src.core.errors import Phase as Phase
from jaxnan._src.core.scaling import ArrayTree as ArrayTree
from jaxnan._src.core.tree import NonfiniteCounts as NonfiniteCounts
from jaxnan._src.core.tree import all_finite as all_finite
from jaxnan._src.core.tree import nonfinite_counts as nonfinite_counts
from jaxnan._src.guard.api import guard as guard
from jaxnan._src.guard.bad_batches import BadBatch as BadBatch
from jaxnan._src.guard.bad_batches import BadBatches as BadBatches
from jaxnan._src.guard.bad_batches import SkippedAs as SkippedAs
from jaxnan._src.guard.evidence import Evidence as Evidence
from jaxnan._src.guard.history_rules import (
    register_history_rule as register_history_rule,
)
from jaxnan._src.guard.incidents import Incident as Incident
from jaxnan._src.guard.incidents import Policy as Policy
from jaxnan._src.guard.step import GuardedStep as GuardedStep
from jaxnan._src.inspect.activations import ActivationStats as ActivationStats
from jaxnan._src.inspect.activations import LayerStats as LayerStats
from jaxnan._src.inspect.activations import activation_stats as activation_stats
from jaxnan._src.inspect.impute import ImputeReport as ImputeReport
from jaxnan._src.inspect.impute import impute as impute
from jaxnan._src.inspect.impute import impute_stats as impute_stats
from jaxnan._src.inspect.leaf_stats import GradStats as GradStats
from jaxnan._src.inspect.leaf_stats import ParamStats as ParamStats
from jaxnan._src.inspect.leaf_stats import grad_stats as grad_stats
from jaxnan._src.inspect.leaf_stats import param_stats as param_stats
from jaxnan._src.inspect.outliers import ClipReport as ClipReport
from jaxnan._src.inspect.outliers import clip_outliers as clip_outliers
from jaxnan._src.inspect.plot import plot_stats as plot_stats
from jaxnan._src.inspect.rows import DropReport as DropReport
from jaxnan._src.inspect.rows import drop_nonfinite_rows as drop_nonfinite_rows
from jaxnan._src.inspect.vocab import Strategy as Strategy
from jaxnan._src.lint import LINT_RULES as LINT_RULES
from jaxnan._src.lint import Finding as Finding
from jaxnan._src.lint import LintRule as LintRule
from jaxnan._src.lint import lint as lint
from jaxnan._src.locate.api import Diagnosis as Diagnosis
from jaxnan._src.locate.api import locate as locate
from jaxnan._src.locate.primitive_rules import register_rule as register_rule
from jaxnan._src.transforms.adagc import AdaGCState as AdaGCState
from jaxnan._src.transforms.adagc import adagc as adagc
from jaxnan._src.transforms.clip import ClipByGlobalNormState as ClipByGlobalNormState
from jaxnan._src.transforms.clip import clip_by_global_norm as clip_by_global_norm
from jaxnan._src.transforms.inject import Fault as Fault
from jaxnan._src.transforms.inject import fault_step as fault_step
from jaxnan._src.transforms.inject import inject_grads as inject_grads
from jaxnan._src.transforms.inject import inject_loss as inject_loss
from jaxnan._src.transforms.inject import inject_rows as inject_rows
from jaxnan._src.transforms.loss_scale import (
    DynamicLossScaleState as DynamicLossScaleState,
)
from jaxnan._src.transforms.loss_scale import dynamic_loss_scale as dynamic_loss_scale
from jaxnan._src.transforms.loss_scale import scale_loss as scale_loss
from jaxnan._src.transforms.loss_scale import unscale_grads as unscale_grads
from jaxnan._src.transforms.monitor import MonitorState as MonitorState
from jaxnan._src.transforms.monitor import monitor as monitor
from jaxnan._src.transforms.monitor import monitor_metrics as monitor_metrics
from jaxnan._src.transforms.nonfinite import SkipNonfiniteState as SkipNonfiniteState
from jaxnan._src.transforms.nonfinite import ZeroNonfiniteState as ZeroNonfiniteState
from jaxnan._src.transforms.nonfinite import skip_nonfinite as skip_nonfinite
from jaxnan._src.transforms.nonfinite import zero_nonfinite as zero_nonfinite
from jaxnan._src.transforms.spikes import SkipReason as SkipReason
from jaxnan._src.transforms.spikes import SkipSpikesState as SkipSpikesState
from jaxnan._src.transforms.spikes import ZScoreClipState as ZScoreClipState
from jaxnan._src.transforms.spikes import skip_spikes as skip_spikes
from jaxnan._src.transforms.spikes import zscore_clip as zscore_clip

__version__ = "0.1.0"

__all__ = (
    "ActivationStats",
    "AdaGCState",
    "ArrayTree",
    "BadBatch",
    "BadBatches",
    "ClipByGlobalNormState",
    "ClipReport",
    "Diagnosis",
    "DropReport",
    "DynamicLossScaleState",
    "Evidence",
    "Fault",
    "Finding",
    "GradStats",
    "GuardedStep",
    "ImputeReport",
    "Incident",
    "LINT_RULES",
    "LayerStats",
    "LintRule",
    "MonitorState",
    "NonFiniteError",
    "NonfiniteCounts",
    "NonfiniteRecord",
    "ParamStats",
    "Phase",
    "Policy",
    "Report",
    "SkipNonfiniteState",
    "SkipReason",
    "SkipSpikesState",
    "SkippedAs",
    "Strategy",
    "ZScoreClipState",
    "ZeroNonfiniteState",
    "activation_stats",
    "adagc",
    "all_finite",
    "check",
    "checked",
    "checked_grad",
    "checked_value_and_grad",
    "clip_by_global_norm",
    "clip_outliers",
    "drop_nonfinite_rows",
    "dynamic_loss_scale",
    "fault_step",
    "grad_stats",
    "guard",
    "impute",
    "impute_stats",
    "inject_grads",
    "inject_loss",
    "inject_rows",
    "lint",
    "locate",
    "monitor",
    "monitor_metrics",
    "nonfinite_counts",
    "nonfinite_errors",
    "param_stats",
    "plot_stats",
    "register_history_rule",
    "register_rule",
    "scale_loss",
    "skip_nonfinite",
    "skip_spikes",
    "unscale_grads",
    "zero_nonfinite",
    "zscore_clip",
)
