"""Training: the run config, the loop, its state and checkpoints, the EMA, torchrun. May import
every layer below (io, core, data, store, eval)."""
