"""P×K batch sampler for ReID training (docs/protocol.md, "Sampling: P×K batches").

Every batch holds P distinct identities with K images each, laid out identity by identity (K consecutive
indices per identity), which is what the batch-hard triplet loss needs: each anchor has K−1 positives and
(P−1)·K negatives in its batch.

How an epoch is built (one "pass" over the identities, the "RandomIdentitySampler" idea):

* each usable identity's images are shuffled and cut into ⌊n/K⌋ chunks of K (the remainder is left out
  for this pass); an identity with fewer than K images gives one chunk: all its images plus extra ones
  drawn with replacement (or is skipped with ``skip_small_identities=True``, as the AdaptiveReID code does);
* the chunks are packed into batches of P·R distinct identities (R = number of DDP replicas). The number of
  batches per pass depends only on the chunk counts, never on the random draw, so ``len()`` is exact and the
  same every epoch; at most P·R − 1 chunks are left out per pass.

With ``num_batches`` set, an epoch has exactly that many batches instead (the official code's "200 steps per
epoch"). ``num_batches_mode="stream"`` (default, as the official code) reads them off an endless stream of
such passes, so over training every identity is seen equally often; ``"fresh"`` draws P·R identities
uniformly anew for every batch.

Randomness comes from a local ``numpy.random.Generator`` seeded by (seed, pass) or (seed, epoch): the same
seed and epoch give the same batches on every run and every rank, and no global RNG is touched.

Epochs: call ``set_epoch`` before each epoch. Lightning (2.x) calls ``set_epoch`` only on
``dataloader.sampler`` and ``dataloader.batch_sampler.sampler``, not on the batch sampler itself, so this
class exposes a ``sampler`` attribute that forwards the call.

DDP: all ranks build the same global batches of P·R identities; rank r takes the r-th group of P, so the
ranks see disjoint identities at every step and yield the same number of batches. Under Lightning, pass
``use_distributed_sampler=False`` to the Trainer: this sampler already shards, and Lightning cannot
re-instantiate a custom batch sampler with its own distributed sampler.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler


class _EpochForwarder:
    """Stands in as ``PKBatchSampler.sampler`` so that Lightning's per-epoch ``set_epoch`` reaches it."""

    def __init__(self, owner: PKBatchSampler) -> None:
        self._owner = owner

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)


class PKBatchSampler(Sampler[list[int]]):
    """Yield lists of P·K dataset indices: P distinct identities × K images, grouped identity by identity.

    Args:
        pids: identity label of every dataset item (index i ↔ ``pids[i]``); any integers.
        num_identities: P, identities per batch (per rank).
        num_instances: K, images per identity.
        num_batches: batches per epoch; ``None`` = one pass over the identities (see the module docstring).
        num_batches_mode: with ``num_batches``, ``"stream"`` (balanced passes, official code) or ``"fresh"``
            (identities drawn anew for every batch).
        skip_small_identities: leave out identities with fewer than K images instead of oversampling them.
        seed: non-negative base seed; batches depend only on (seed, epoch).
        num_replicas: DDP world size; default: torch.distributed's when initialised, else 1.
        rank: this process's rank; default: torch.distributed's when initialised, else 0.
    """

    def __init__(
        self,
        pids: Sequence[int],
        *,
        num_identities: int = 16,
        num_instances: int = 4,
        num_batches: int | None = None,
        num_batches_mode: Literal["stream", "fresh"] = "stream",
        skip_small_identities: bool = False,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__()
        if num_identities < 1:
            raise ValueError(f"num_identities (P) must be >= 1, got {num_identities}")
        if num_instances < 1:
            raise ValueError(f"num_instances (K) must be >= 1, got {num_instances}")
        if num_batches is not None and num_batches < 1:
            raise ValueError(f"num_batches must be >= 1 or None, got {num_batches}")
        if num_batches_mode not in ("stream", "fresh"):
            raise ValueError(f"num_batches_mode must be 'stream' or 'fresh', got {num_batches_mode!r}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")

        pid_array = np.asarray(pids)
        if pid_array.ndim != 1 or len(pid_array) == 0:
            raise ValueError("pids must be a non-empty 1-D sequence of identity labels")
        # Stable sort keeps each identity's indices in dataset order, so results do not depend on hashing.
        order = np.argsort(pid_array, kind="stable")
        _, starts, counts = np.unique(pid_array[order], return_index=True, return_counts=True)
        groups = np.split(order, starts[1:])
        if skip_small_identities:
            groups = [g for g, n in zip(groups, counts, strict=True) if n >= num_instances]

        self.num_identities = num_identities
        self.num_instances = num_instances
        self.num_batches = num_batches
        self.num_batches_mode = num_batches_mode
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.sampler = _EpochForwarder(self)
        self._groups: list[np.ndarray] = groups

        ids_per_step = num_identities * num_replicas
        if ids_per_step > len(groups):
            hint = " (after skip_small_identities; or set it False)" if skip_small_identities else ""
            raise ValueError(
                f"num_identities (P={num_identities}) × num_replicas ({num_replicas}) = {ids_per_step} "
                f"exceeds the {len(groups)} usable identities{hint}; lower num_identities"
            )
        self._batches_per_pass, self._chunk_caps = self._plan_pass()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches ``__iter__`` yields (Lightning calls it before every epoch)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        return self._batches_per_pass if self.num_batches is None else self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        P = self.num_identities
        lo, hi = self.rank * P, (self.rank + 1) * P
        for global_batch in self._global_batches():
            # Each global batch is a list of P·R chunks (K indices each) of distinct identities.
            yield np.concatenate(global_batch[lo:hi]).tolist()

    def _plan_pass(self) -> tuple[int, np.ndarray]:
        """Batches per pass B and the per-identity chunk caps, from the chunk counts alone.

        An identity can appear at most once per batch, so it contributes at most B chunks; B = ⌊Σ min(c_i, B)
        / (P·R)⌋ is found by iterating from ⌊Σ c_i / (P·R)⌋ downwards (it only shrinks, and stays ≥ 1 because
        there are at least P·R identities).
        """
        ids_per_step = self.num_identities * self.num_replicas
        chunks = np.array([max(1, len(g) // self.num_instances) for g in self._groups])
        batches = int(chunks.sum()) // ids_per_step
        while (smaller := int(np.minimum(chunks, batches).sum()) // ids_per_step) < batches:
            batches = smaller
        return batches, np.minimum(chunks, batches)

    def _pass_batches(self, rng: np.random.Generator) -> list[list[np.ndarray]]:
        """One pass: every identity's chunks, packed into B global batches of P·R distinct identities."""
        B = self._batches_per_pass
        ids_per_step = self.num_identities * self.num_replicas
        chunks: list[np.ndarray] = []
        for i in rng.permutation(len(self._groups)):
            chunks.extend(self._identity_chunks(self._groups[i], rng)[: self._chunk_caps[i]])
        # Chunks are grouped by identity and no identity has more than B of them, so giving chunk j to
        # batch j mod B puts each identity's chunks into different batches. The identity order is random,
        # so which identities share a batch is too; the < P·R chunks beyond B·P·R are left out this pass.
        batches = [chunks[b : B * ids_per_step : B] for b in range(B)]
        for batch in batches:
            rng.shuffle(batch)  # random split of the identities over ranks
        rng.shuffle(batches)  # an identity's chunks would otherwise sit in consecutive batches
        return batches

    def _identity_chunks(self, indices: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        """Shuffle one identity's indices into chunks of K; a small identity gives one oversampled chunk."""
        K = self.num_instances
        if len(indices) < K:
            # Keep every image once and fill up with replacement, rather than drawing all K with replacement.
            chunk = np.concatenate([indices, rng.choice(indices, size=K - len(indices), replace=True)])
            return [rng.permutation(chunk)]
        shuffled = rng.permutation(indices)
        return np.split(shuffled[: len(indices) // K * K], len(indices) // K)

    def _global_batches(self) -> Iterator[list[np.ndarray]]:
        if self.num_batches is None:
            yield from self._pass_batches(np.random.default_rng([self.seed, self.epoch]))
        elif self.num_batches_mode == "stream":
            # Epoch e = positions [e·N, (e+1)·N) of an endless sequence of passes, pass p seeded (seed, p).
            B, N = self._batches_per_pass, self.num_batches
            start = self.epoch * N
            for p in range(start // B, (start + N - 1) // B + 1):
                batches = self._pass_batches(np.random.default_rng([self.seed, p]))
                yield from batches[max(start - p * B, 0) : min(start + N - p * B, B)]
        else:
            rng = np.random.default_rng([self.seed, self.epoch])
            ids_per_step = self.num_identities * self.num_replicas
            for _ in range(self.num_batches):
                ids = rng.choice(len(self._groups), size=ids_per_step, replace=False)
                yield [self._fresh_chunk(self._groups[i], rng) for i in ids]

    def _fresh_chunk(self, indices: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """K images of one identity: without replacement when it has enough, else all of them plus extras."""
        K = self.num_instances
        if len(indices) >= K:
            return rng.choice(indices, size=K, replace=False)
        return self._identity_chunks(indices, rng)[0]
