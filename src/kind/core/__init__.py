"""The model itself: the class-gated SVD layer, the DiT, diffusion, sampling, decomposition and
merging in memory. May import: kind.io. Touches no files but image grids and sample sets."""
