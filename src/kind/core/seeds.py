"""Seeds: the one rule that turns a user's seed into the seed of each sample's noise.

Sample `index` of class `name` (its index among that class's samples) in a run with `seed` draws
its noise from a torch generator seeded with a hash of (seed, name, index). A sample's noise so
depends on its class and its place among that class's samples only: not on the batch it was drawn
in, the ranks of a torchrun job, the server's batch mates, or which other classes the run draws.
That is what lets a model assembled for some classes, a grafted one and the server draw a class
exactly as the full model does. A class goes by its name, which parts, assembled and grafted
models keep where they renumber class ids. Plain Python only (no torch import), so the command
line checks a seed without loading torch.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Hashable, Sequence

# seeds a user gives stay below 2^53, so a JSON client (the server's page) holds them exactly
SEED_MAX = 2**44
NULL_CLASS = "<null>"  # the name of the null class, whose samples are unconditional


def sample_seed(seed: int, name: str, index: int) -> int:
    """The generator seed of sample `index` of class `name` in a run with `seed` (0 <= seed <=
    SEED_MAX): 63 bits of BLAKE2b, the same on every platform and Python (`hash` is salted)."""
    digest = hashlib.blake2b(f"{seed}\0{name}\0{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch takes seeds below 2^64


def class_indices(labels: Sequence[Hashable]) -> list[int]:
    """Each sample's index among the samples of its class, in list order: [3, 5, 3] -> [0, 0, 1]."""
    seen: Counter = Counter()
    out = []
    for c in labels:
        out.append(seen[c])
        seen[c] += 1
    return out
