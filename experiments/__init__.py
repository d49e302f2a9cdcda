"""Reproductions and studies that run on top of preftune (not part of the installed package)."""
