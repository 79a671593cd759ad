"""Data: data specs (bundled sets, image folders, class lists), latent stores, and the one
`open_dataset` every consumer uses. May import: kind.io, kind.core."""
