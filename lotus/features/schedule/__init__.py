"""The LOTUS schedule (``lotus:``): phases, per-epoch plans, on-the-fly sample tickets, and the decisions of
``lotus.schedule: auto`` (``auto.py``) with their controller (``auto_callback.py``)."""
