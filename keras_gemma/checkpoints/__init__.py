"""Checkpoint formats: loading presets, importing and exporting weights."""
