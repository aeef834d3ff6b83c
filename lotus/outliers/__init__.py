"""Outlier-feature tools (He et al., NeurIPS 2024): monitoring, OP-block support, SOAP/Shampoo, int8 checks.

- :mod:`~lotus.outliers.metrics`: kurtosis (Eq. 1) and max-median ratio of activations;
- :mod:`~lotus.outliers.hooks`: forward hooks on every block input and the last block output of a timm ViT;
- :mod:`~lotus.outliers.callback`: :class:`OutlierMonitor`, the training callback for the ``outliers:`` section;
- :mod:`~lotus.outliers.optimizers`: ``build("soap" | "shampoo", param_groups, optim_cfg)``;
- :mod:`~lotus.outliers.quant`: simulated W8A8 int8 post-training quantisation and its accuracy drop;
- :mod:`~lotus.outliers.report`: per-layer tables and PNG plots.

The OP block itself lives in :mod:`lotus.models.op_block` (``model.block: op``).
"""
from __future__ import annotations

from lotus.outliers.config import OutliersConfig
from lotus.outliers.hooks import FINAL, ResidualStreamProbe, find_blocks, measure, site_names
from lotus.outliers.metrics import OutlierStats, kurtosis, max_median_ratio, neuron_rms
from lotus.outliers.quant import QuantConfig, W8A8Linear, calibrate_activation_scales, quantcheck, quantize_w8a8_

__all__ = [
    "OutliersConfig", "QuantConfig", "callbacks", "OutlierMonitor",
    "kurtosis", "max_median_ratio", "neuron_rms", "OutlierStats",
    "FINAL", "ResidualStreamProbe", "find_blocks", "site_names", "measure",
    "W8A8Linear", "calibrate_activation_scales", "quantize_w8a8_", "quantcheck",
]


def callbacks(cfg):  # noqa: ANN001 - lotus.config.Config; imported lazily (lotus.train imports lotus.config)
    """Callbacks for the ``outliers:`` section of ``cfg`` (empty when disabled)."""
    from lotus.outliers.callback import callbacks as _callbacks

    return _callbacks(cfg)


def __getattr__(name: str):
    if name == "OutlierMonitor":
        from lotus.outliers.callback import OutlierMonitor

        return OutlierMonitor
    raise AttributeError(f"module 'lotus.outliers' has no attribute {name!r}")
