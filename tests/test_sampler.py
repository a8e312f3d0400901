"""Tests for the P×K batch sampler: batch composition, epochs, determinism and DDP sharding."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from reidreg.data.sampler import PKBatchSampler


def make_pids(counts: list[int]) -> np.ndarray:
    """Identity labels 10, 11, ... with ``counts[i]`` images each, interleaved as in a folder listing."""
    pids = np.repeat(np.arange(10, 10 + len(counts)), counts)
    return np.random.default_rng(123).permutation(pids)


@pytest.fixture
def pids() -> np.ndarray:
    # 40 identities with 1..20 images: small (<K) and large identities, uneven chunk counts.
    return make_pids([1 + (7 * i) % 20 for i in range(40)])


def check_pk(batch: list[int], pids: np.ndarray, P: int, K: int) -> list[int]:
    """Assert one batch is P distinct identities × K consecutive indices; return its identities."""
    assert len(batch) == P * K
    assert all(isinstance(i, int) for i in batch)
    labels = pids[batch].reshape(P, K)
    assert (labels == labels[:, :1]).all(), "each identity's K indices must be consecutive"
    ids = labels[:, 0].tolist()
    assert len(set(ids)) == P
    return ids


def all_batches(sampler: PKBatchSampler, epoch: int = 0) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("num_batches", [None, 7])
@pytest.mark.parametrize("mode", ["stream", "fresh"])
def test_batches_are_p_identities_times_k(pids: np.ndarray, num_batches: int | None, mode: str) -> None:
    sampler = PKBatchSampler(
        pids, num_identities=6, num_instances=4, num_batches=num_batches, num_batches_mode=mode
    )
    batches = all_batches(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        check_pk(batch, pids, P=6, K=4)


def test_default_epoch_uses_each_identity_in_chunks_of_k(pids: np.ndarray) -> None:
    P, K = 5, 4
    sampler = PKBatchSampler(pids, num_identities=P, num_instances=K)
    used = Counter(pid for batch in all_batches(sampler) for pid in check_pk(batch, pids, P, K))
    chunks = {pid: max(1, n // K) for pid, n in Counter(pids.tolist()).items()}
    # Every identity is used about once per epoch: at most its chunk count, and at most P-1 chunks left out.
    assert all(used[pid] <= c for pid, c in chunks.items())
    assert 0 <= sum(chunks.values()) - sum(used.values()) < P
    assert len(sampler) == sum(chunks.values()) // P
    # Identities with at least K images are cut into disjoint chunks: no image repeats within an epoch.
    sizes = Counter(pids.tolist())
    flat = [i for batch in all_batches(sampler, epoch=3) for i in batch if sizes[pids[i]] >= K]
    assert len(flat) == len(set(flat))


def test_small_identities_are_oversampled_keeping_every_image(pids: np.ndarray) -> None:
    K = 4
    sizes = Counter(pids.tolist())
    sampler = PKBatchSampler(pids, num_identities=5, num_instances=K)
    seen_small = set()
    for batch in all_batches(sampler):
        for chunk in np.asarray(batch).reshape(-1, K):
            pid = int(pids[chunk[0]])
            if sizes[pid] < K:
                seen_small.add(pid)
                # All of the identity's images appear, the rest are repeats (drawn with replacement).
                assert set(chunk.tolist()) == set(np.flatnonzero(pids == pid).tolist())
    assert seen_small, "the fixture has small identities; some must be used"


@pytest.mark.parametrize("num_batches", [None, 9])
def test_skip_small_identities(pids: np.ndarray, num_batches: int | None) -> None:
    K = 4
    sizes = Counter(pids.tolist())
    sampler = PKBatchSampler(
        pids, num_identities=5, num_instances=K, num_batches=num_batches, skip_small_identities=True
    )
    for batch in all_batches(sampler):
        assert all(sizes[pid] >= K for pid in check_pk(batch, pids, 5, K))
        assert len(set(batch)) == len(batch)  # no identity needs oversampling


def test_skip_small_identities_leaving_too_few_raises() -> None:
    pids = make_pids([8, 8, 2, 2, 3])
    PKBatchSampler(pids, num_identities=3, num_instances=4)  # oversampling keeps 5 usable identities
    with pytest.raises(ValueError, match="num_identities.*2 usable identities.*skip_small_identities"):
        PKBatchSampler(pids, num_identities=3, num_instances=4, skip_small_identities=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_identities=0), "num_identities"),
        (dict(num_instances=0), "num_instances"),
        (dict(num_identities=41), "num_identities"),
        (dict(num_identities=21, num_replicas=2, rank=0), "num_replicas"),
        (dict(num_batches=0), "num_batches"),
        (dict(num_batches_mode="bogus"), "num_batches_mode"),
        (dict(seed=-1), "seed"),
        (dict(num_replicas=2, rank=2), "rank"),
    ],
)
def test_invalid_options_raise(pids: np.ndarray, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PKBatchSampler(pids, **kwargs)


@pytest.mark.parametrize(("num_batches", "mode"), [(None, "stream"), (6, "stream"), (6, "fresh")])
def test_deterministic_per_seed_and_epoch(pids: np.ndarray, num_batches: int | None, mode: str) -> None:
    def make(seed: int) -> PKBatchSampler:
        return PKBatchSampler(
            pids, num_identities=4, num_instances=4, num_batches=num_batches, num_batches_mode=mode, seed=seed
        )

    a, b = make(0), make(0)
    assert all_batches(a, 2) == all_batches(b, 2)
    assert all_batches(a, 2) == all_batches(a, 2)  # re-iterating an epoch repeats it
    assert all_batches(a, 2) != all_batches(a, 3)
    assert all_batches(a, 2) != all_batches(make(1), 2)
    assert len(all_batches(a, 3)) == len(a)  # the length does not change across epochs


def test_does_not_touch_global_rng(pids: np.ndarray) -> None:
    torch_state = torch.get_rng_state()
    numpy_state = np.random.get_state()[1].copy()  # noqa: NPY002 (checking the legacy global RNG is untouched)
    python_state = random.getstate()
    all_batches(
        PKBatchSampler(pids, num_identities=4, num_instances=4, num_batches=3, num_batches_mode="fresh")
    )
    all_batches(PKBatchSampler(pids, num_identities=4, num_instances=4))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)  # noqa: NPY002
    assert random.getstate() == python_state


def test_num_batches_stream_continues_across_epochs(pids: np.ndarray) -> None:
    # With num_batches, "stream" reads consecutive epochs off one sequence of identity-balanced passes.
    P, K = 4, 4
    full = PKBatchSampler(pids, num_identities=P, num_instances=K)
    per_pass = len(full)
    stream = PKBatchSampler(pids, num_identities=P, num_instances=K, num_batches=per_pass // 2 + 1)
    joined = [b for epoch in range(4) for b in all_batches(stream, epoch)]
    assert len(stream) == per_pass // 2 + 1
    passes = [all_batches(full, epoch) for epoch in range(3)]  # pass p is seeded like epoch p
    assert joined[: 2 * per_pass] == passes[0] + passes[1]
    assert joined[2 * per_pass :] == passes[2][: len(joined) - 2 * per_pass]


def test_ddp_ranks_split_identities(pids: np.ndarray) -> None:
    P, K = 4, 4
    for num_batches, mode in [(None, "stream"), (11, "stream"), (11, "fresh")]:
        ranks = [
            PKBatchSampler(
                pids,
                num_identities=P,
                num_instances=K,
                num_batches=num_batches,
                num_batches_mode=mode,
                num_replicas=2,
                rank=r,
            )
            for r in (0, 1)
        ]
        single = PKBatchSampler(
            pids, num_identities=2 * P, num_instances=K, num_batches=num_batches, num_batches_mode=mode
        )
        b0, b1 = all_batches(ranks[0], 5), all_batches(ranks[1], 5)
        assert len(ranks[0]) == len(ranks[1]) == len(b0) == len(b1) == len(single)
        for x, y in zip(b0, b1, strict=True):
            ids0, ids1 = check_pk(x, pids, P, K), check_pk(y, pids, P, K)
            assert not set(ids0) & set(ids1)
            assert len(set(ids0) | set(ids1)) == 2 * P  # as many identities as one 2P single-rank batch


def test_distributed_defaults_without_process_group(pids: np.ndarray) -> None:
    sampler = PKBatchSampler(pids, num_identities=4, num_instances=4)
    assert (sampler.num_replicas, sampler.rank) == (1, 0)


def test_dataloader_and_lightning_epoch_hook(pids: np.ndarray) -> None:
    sampler = PKBatchSampler(pids, num_identities=4, num_instances=4, num_batches=3)
    loader = DataLoader(torch.as_tensor(pids), batch_sampler=sampler)
    assert len(loader) == 3
    for batch in loader:
        assert batch.shape == (16,)
    # Lightning sets the epoch through dataloader.batch_sampler.sampler; it must reach the batch sampler.
    # (Imported here: Lightning takes seconds to import and only this test needs it.)
    from lightning_fabric.utilities.data import _set_sampler_epoch

    _set_sampler_epoch(loader, 7)
    assert sampler.epoch == 7
