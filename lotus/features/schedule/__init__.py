"""The LOTUS schedule (``schedule:``): phases, per-epoch plans, on-the-fly sample tickets, and the decisions of
``schedule.mode: auto`` (``auto.py``) with their controller (``auto_callback.py``)."""
