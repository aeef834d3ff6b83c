"""Random data subsets in training: a fixed random subset or RS2 (``tickets.random``)."""
