"""Dynamic data pruning (``tickets.dynamic``, InfoBatch-style)."""
