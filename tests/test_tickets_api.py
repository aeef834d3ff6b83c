"""data_tickets public surface: the top-level exports and the module map in the package docstring."""

from __future__ import annotations

import importlib
import re

import data_tickets


def test_top_level_exports_resolve_and_stay_small():
    assert len(data_tickets.__all__) <= 16 and len(set(data_tickets.__all__)) == len(data_tickets.__all__)
    for name in data_tickets.__all__:
        assert getattr(data_tickets, name) is not None, name
    for name in ("score", "select", "TicketFile", "DynamicPruner", "PatchTicket", "SCORERS", "POLICIES"):
        assert name in data_tickets.__all__, name  # the names lotus imports from the top level


def test_docstring_module_map_matches_the_modules():
    table = re.split(r"^=+ =+$", data_tickets.__doc__, flags=re.M)[2]  # rows between the 2nd and 3rd rule
    module, seen = None, {}
    for line in table.splitlines():
        if line.strip():
            module = line.split()[0] if not line.startswith(" ") else module
            seen.setdefault(module, []).extend(re.findall(r"``(\w+)``", line))
    assert len(seen) >= 10
    for module, names in seen.items():
        mod = importlib.import_module(f"data_tickets.{module}")
        for name in names:
            assert hasattr(mod, name), f"data_tickets.{module}.{name}"
