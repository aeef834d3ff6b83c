"""Patch tickets (``tickets.patches``): train on the informative share of each image's patch tokens."""
