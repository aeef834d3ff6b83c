"""Sparsity masks and structured thinning during training (``pruning:``), on the :mod:`pruning` library."""
