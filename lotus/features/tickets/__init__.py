"""Offline ticket files (``tickets.file``) and proxy trainings for offline scorers."""
