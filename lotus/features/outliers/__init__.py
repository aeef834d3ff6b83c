"""Outlier-feature tools (He et al., NeurIPS 2024): monitoring, SOAP/Shampoo, int8 checks.

- ``config``: the ``outliers:`` section (:class:`OutliersConfig`, :class:`QuantConfig`);
- ``callback``: :class:`OutlierMonitor`, the training callback for the section;
- ``metrics``: kurtosis (Eq. 1) and max-median ratio of activations;
- ``hooks``: forward hooks on every block input and the last block output of a timm ViT;
- ``optimizers``: ``build("soap" | "shampoo", param_groups, optim_cfg)``;
- ``quant``: simulated W8A8 int8 post-training quantisation and its accuracy drop;
- ``layer_report``: per-layer tables and PNG plots; ``loading``: model + data for the CLI commands.

The OP block itself lives in :mod:`lotus.models.op_block` (``model.block: op``). Import from the modules;
this package file imports nothing, so ``lotus.config`` can read the config section alone.
"""
