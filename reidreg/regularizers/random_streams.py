"""Per-step random streams for stochastic regularizers (SGP, adversarial training).

A regularizer that draws random numbers during training seeds a fresh ``torch.Generator`` from
``(seed, global step)`` instead of drawing from torch's global RNG. The draws of step t then depend on
nothing else: a run resumed from a checkpoint at step t draws exactly what the uninterrupted run drew,
other code that consumes global randomness (data augmentation, dropout) does not shift them, and every
DDP rank draws the same numbers — required when the draws decide what is added to all-reduced gradients,
or the replicas would drift apart.
"""

from __future__ import annotations

import numpy as np
import torch


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` whose stream is a function of ``(seed, step)`` only."""
    # SeedSequence hashes the pair, so nearby (seed, step) pairs give unrelated streams.
    state = np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))
