"""pruning: sparsity for vision transformers on plain PyTorch/timm (no lotus import).

- unstructured magnitude (layer-wise / global) and Wanda masks, N:M (2:4) masks: weight parametrizations
- 2:4 ``torch.sparse`` semi-structured kernels on CUDA (legality pass + per-shape speed probe), sparse training
- structured thinning of timm ViT blocks (heads, MLP neurons) that shrinks the model for every device
- Zhu & Gupta gradual schedule, Instant Soup Pruning, essential-sparsity sweep, FLOPs/latency reports

    from pruning import prune_, MagnitudeConfig, WandaConfig, SemiStructuredConfig, StructuredConfig
    report = prune_(model, SemiStructuredConfig(score="wanda"), calib_loader=loader)
"""
from .api import PruneConfig, prune_
from .config import MagnitudeConfig, SemiStructuredConfig, WandaConfig
from .masks import (
    WeightMask, effective_weight, enforce_masks_, get_mask, is_masked, is_nm_sparse, load_masks, make_filter,
    make_permanent, masked_modules, masks_state, select_modules, set_mask, sparsity_report, squash,
)
from .report import (
    compare_latency, count_flops, count_nonzeros, count_params, format_report, measure_latency, model_stats,
)
from .schedule import GradualPruner, GradualSchedule, OneShotSchedule, cubic_sparsity
from .semi_structured import (
    CPU_NOTE, SemiSparseLinear, disable_sparse_training_, enable_sparse_training_, to_semi_structured_,
)
from .soup import instant_soup_prune_, merge_masks
from .structured import StructuredConfig, apply_widths, get_widths, prune_structured
from .sweep import essential_sparsity_sweep, find_knee, plot_sweep, save_sweep

__all__ = [
    # one entry point + configs
    "prune_", "PruneConfig", "MagnitudeConfig", "WandaConfig", "SemiStructuredConfig", "StructuredConfig",
    # masks
    "WeightMask", "make_filter", "select_modules", "set_mask", "get_mask", "is_masked", "masked_modules",
    "masks_state", "load_masks", "enforce_masks_", "make_permanent", "squash", "is_nm_sparse", "effective_weight",
    "sparsity_report",
    # 2:4 kernels
    "to_semi_structured_", "enable_sparse_training_", "disable_sparse_training_", "SemiSparseLinear", "CPU_NOTE",
    # structured thinning
    "prune_structured", "get_widths", "apply_widths",
    # schedules, ISSP, sweep
    "GradualSchedule", "OneShotSchedule", "cubic_sparsity", "GradualPruner",
    "instant_soup_prune_", "merge_masks",
    "essential_sparsity_sweep", "find_knee", "plot_sweep", "save_sweep",
    # cost report
    "count_params", "count_nonzeros", "count_flops", "measure_latency", "compare_latency", "model_stats",
    "format_report",
]
