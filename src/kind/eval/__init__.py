"""Metrics and evaluation: feature networks, FID, precision/recall, class accuracy, IS, sFID.
May import: kind.io, kind.core, kind.data, kind.store."""
