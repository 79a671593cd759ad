"""Experiments on top of the library: the demo (presets, jobs, scheduler, report) and the
ablations. May import every layer below; nothing below imports it."""
