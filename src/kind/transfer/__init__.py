"""Transfer to new classes: the one registry of methods (KIND and the baselines) and transfer
runs. May import every layer below (io, core, data, store, eval, training)."""
