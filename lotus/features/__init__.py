"""Training features, one folder each, every one with the same files:

* ``config.py``: its config section (a dataclass validated by :mod:`lotus.schema`);
* ``callback.py``: its :class:`lotus.callbacks.Callback` (the hooks it uses in the training loop);
* anything else it needs (e.g. ``patches/rankings_file.py``, ``tickets/proxy.py``, ``outliers/quant.py``).

The list of features, what each may change on the trainer and the order hooks run in is
:data:`lotus.features.registry.FEATURES`. This package imports nothing itself, so a config module can be
imported without pulling in any callback.
"""
