"""jaxnan: find, explain and survive NaN/Inf in JAX training."""

from jaxnan._src.base import ArrayTree as ArrayTree
from jaxnan._src.checks import Report as Report
from jaxnan._src.checks import check as check
from jaxnan._src.loss_scale import DynamicLossScaleState as DynamicLossScaleState
from jaxnan._src.loss_scale import dynamic_loss_scale as dynamic_loss_scale
from jaxnan._src.loss_scale import scale_loss as scale_loss
from jaxnan._src.loss_scale import unscale_grads as unscale_grads
from jaxnan._src.monitor import MonitorState as MonitorState
from jaxnan._src.monitor import monitor as monitor
from jaxnan._src.monitor import monitor_metrics as monitor_metrics
from jaxnan._src.report import NonFiniteError as NonFiniteError
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
    "DynamicLossScaleState",
    "MonitorState",
    "NonFiniteError",
    "NonfiniteCounts",
    "Report",
    "SkipNonfiniteState",
    "SkipReason",
    "SkipSpikesState",
    "ZScoreClipState",
    "ZeroNonfiniteState",
    "adagc",
    "all_finite",
    "check",
    "clip_by_global_norm",
    "dynamic_loss_scale",
    "monitor",
    "monitor_metrics",
    "nonfinite_counts",
    "scale_loss",
    "skip_nonfinite",
    "skip_spikes",
    "unscale_grads",
    "zero_nonfinite",
    "zscore_clip",
)
