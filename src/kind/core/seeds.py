"""Seeds: the one rule that turns a user's seed into the seed of each sample's noise.

Sample `index` of a run with `seed` draws its noise from a torch generator seeded with
`seed * 1_000_003 + index`, so a sample's noise does not depend on the batch it was drawn in
(sampling, its ranks under torchrun, and the server's batches draw the same samples). torch takes
generator seeds below 2^64; up to `SEED_MAX` that leaves room for over 8 * 10^17 sample indices.
Plain integers only (no torch import), so the command line checks a seed without loading torch.
"""

SEED_MAX = 2**44


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample `index` of a run with `seed` (0 <= seed <= SEED_MAX)."""
    return seed * 1_000_003 + index
