"""Seeds derived from a user's seed and what they are for: independent streams that never overlap.

``seed + k`` would make runs with neighbouring seeds share streams (seed s at epoch 1 would be
seed s + 1 at epoch 0, correlating the members of an ensemble); numpy's ``SeedSequence`` hashes
the parts instead.
"""

from __future__ import annotations

import numpy as np

__all__ = ["derive_seed"]


def derive_seed(*parts: int) -> int:
    """A seed in [0, 2^63) fixed by ``parts`` (integers; negative ones are taken modulo 2^64)."""
    entropy = [int(part) % 2**64 for part in parts]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)
