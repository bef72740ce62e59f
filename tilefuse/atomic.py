"""Deprecated alias: write-then-rename now lives in :mod:`tilefuse.outputs` (the guarded writer)."""

from tilefuse.outputs import replace_path, temporary_sibling

__all__ = ["replace_path", "temporary_sibling"]
