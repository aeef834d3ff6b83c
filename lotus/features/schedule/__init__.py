"""The LOTUS schedule (``lotus:``): phases, per-epoch plans, on-the-fly sample tickets."""
