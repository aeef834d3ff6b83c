"""Progressive resolution: the token-budget curriculum (``resolution:`` section)."""
