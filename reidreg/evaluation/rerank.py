"""k-reciprocal re-ranking.

Z. Zhong, L. Zheng, D. Cao, S. Li, "Re-ranking Person Re-identification with k-reciprocal Encoding",
CVPR 2017, https://arxiv.org/abs/1701.08398.

The probe and gallery together (N = Q + G items) form the set in which neighbourhoods are taken:

1. Original distance d: the given distances are squared and each row of the N x N matrix is divided by
   its maximum (as in the authors' code, whose numbers ReID papers report; it makes the Gaussian kernel
   below scale-free). Rows are then ordered by (distance, index): ties go to the lower index.
2. k-reciprocal set R(i, k): the j among the k + 1 nearest of i (i itself included) that have i among
   their own k + 1 nearest.
3. Expansion: R*(i) = R(i, k1) united with R(c, round(k1 / 2)) for every c in R(i, k1) whose set shares
   more than 2/3 of its items with R(i, k1).
4. V_i[j] = exp(-d(i, j)) for j in R*(i), 0 elsewhere, normalised to sum 1 (Gaussian-kernel encoding).
5. Local query expansion: V_i <- mean of V_j over the k2 nearest j of i (i included).
6. Jaccard distance: d_J(i, j) = 1 - sum_k min(V_i[k], V_j[k]) / sum_k max(V_i[k], V_j[k]); the rows of V
   sum to 1, so the denominator is 2 - (numerator).
7. Final distance (1 - lambda) * d_J + lambda * d, returned for the query rows and gallery columns.

Sets are sparse (tens of items per row), so steps 2-6 use scipy.sparse; the cost is the N x N matrix
itself (N^2 float32) and one partial sort per row to find the nearest neighbours.
"""

import numpy as np
import scipy.sparse as sp
import torch

# Rows of the N x N matrix processed at once when finding nearest neighbours (bounds the index arrays).
NEIGHBOUR_BLOCK_ROWS = 1024
# Query rows whose Jaccard distances are computed at once.
JACCARD_BLOCK_ROWS = 64


def _as_float_matrix(values: np.ndarray | torch.Tensor, *, name: str, shape: tuple[int, int]) -> np.ndarray:
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if array.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {array.shape}")
    # min/max propagate NaN, so two reductions check everything without N^2 temporaries.
    if array.size and not (array.min() >= 0 and np.isfinite(array.max())):
        raise ValueError(f"{name} must hold finite, non-negative distances")
    return array


def _nearest_neighbours(dist: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k nearest items of every row, ordered by (distance, index) like a stable argsort."""
    k = min(k, dist.shape[1])
    neighbours = np.empty((dist.shape[0], k), np.int64)
    for start in range(0, dist.shape[0], NEIGHBOUR_BLOCK_ROWS):
        block = dist[start : start + NEIGHBOUR_BLOCK_ROWS]
        nearest = np.argpartition(block, k - 1, axis=1)[:, :k]
        nearest_dist = np.take_along_axis(block, nearest, 1)
        nearest = np.take_along_axis(nearest, np.lexsort((nearest, nearest_dist), axis=1), 1)
        # argpartition picks arbitrarily among items tied with the k-th distance; redo those rows stably.
        kth = nearest_dist.max(1, keepdims=True)
        for row in np.flatnonzero((block <= kth).sum(1) > k):
            nearest[row] = np.argsort(block[row], kind="stable")[:k]
        neighbours[start : start + len(block)] = nearest
    return neighbours


def _reciprocal_sets(neighbours: np.ndarray, k: int) -> sp.csr_matrix:
    """Boolean N x N matrix whose row i marks R(i, k) (from the k + 1 nearest, i included)."""
    num_items = neighbours.shape[0]
    forward = neighbours[:, : k + 1]
    rows = np.repeat(np.arange(num_items), forward.shape[1])
    is_near = sp.csr_matrix((np.ones(rows.size, bool), (rows, forward.ravel())), shape=(num_items, num_items))
    return is_near.multiply(is_near.T).tocsr()


def _expanded_sets(neighbours: np.ndarray, k1: int) -> sp.csr_matrix:
    """R*(i): R(i, k1) plus each R(c, round(k1/2)), c in R(i, k1), sharing more than 2/3 with R(i, k1)."""
    reciprocal = _reciprocal_sets(neighbours, k1).astype(np.int32)
    half_reciprocal = _reciprocal_sets(neighbours, int(np.around(k1 / 2))).astype(np.int32)
    # shared[i, c] = |R(c, k1/2) & R(i, k1)|, kept only where c is in R(i, k1).
    shared = reciprocal.multiply(reciprocal @ half_reciprocal.T).tocsr()
    candidate_size = np.asarray(half_reciprocal.sum(1)).ravel()
    rows = np.repeat(np.arange(shared.shape[0]), np.diff(shared.indptr))
    accepted = shared.data > 2.0 / 3.0 * candidate_size[shared.indices]
    accept = sp.csr_matrix(
        (np.ones(accepted.sum(), np.int32), (rows[accepted], shared.indices[accepted])), shared.shape
    )
    return ((reciprocal + accept @ half_reciprocal) > 0).tocsr()


def _encode(dist: np.ndarray, neighbours: np.ndarray, k1: int, k2: int) -> sp.csr_matrix:
    """The (query-expanded) k-reciprocal feature vectors V, one sparse row per item, rows summing to 1."""
    expanded = _expanded_sets(neighbours, k1)
    rows = np.repeat(np.arange(expanded.shape[0]), np.diff(expanded.indptr))
    weight = np.exp(-dist[rows, expanded.indices].astype(np.float64))
    encoding = sp.csr_matrix((weight, expanded.indices, expanded.indptr), expanded.shape)
    # R(i, k1) misses i only with more than k1 exact duplicates of lower index; keep such a row at 0.
    row_sum = np.asarray(encoding.sum(1)).ravel()
    encoding = sp.diags(np.divide(1.0, row_sum, out=np.zeros_like(row_sum), where=row_sum > 0)) @ encoding
    if k2 > 1:
        nearest = neighbours[:, :k2]
        row_start = np.arange(0, nearest.size + 1, nearest.shape[1])
        averaging = sp.csr_matrix(
            (np.full(nearest.size, 1.0 / nearest.shape[1]), nearest.ravel(), row_start), shape=encoding.shape
        )
        encoding = averaging @ encoding
    return encoding.tocsr()


def _jaccard_to_gallery(encoding: sp.csr_matrix, num_query: int) -> np.ndarray:
    """d_J(i, j) for query rows i < num_query and gallery columns j >= num_query."""
    num_items = encoding.shape[0]
    by_column = encoding.tocsc()
    jaccard = np.empty((num_query, num_items - num_query), np.float32)
    for start in range(0, num_query, JACCARD_BLOCK_ROWS):
        block = encoding[start : min(start + JACCARD_BLOCK_ROWS, num_query)].tocoo()
        # For each non-zero V_i[k], every item j with V_j[k] > 0 gains min(V_i[k], V_j[k]).
        column_start, column_end = by_column.indptr[block.col], by_column.indptr[block.col + 1]
        length = column_end - column_start
        # Flat positions of all those columns' entries: column_start + offset within the column.
        offset = np.arange(length.sum()) - np.repeat(np.cumsum(length) - length, length)
        position = np.repeat(column_start, length) + offset
        overlap = np.minimum(np.repeat(block.data, length), by_column.data[position])
        target = np.repeat(block.row, length) * num_items + by_column.indices[position]
        min_sum = np.bincount(target, weights=overlap, minlength=block.shape[0] * num_items)
        min_sum = min_sum.reshape(block.shape[0], num_items)[:, num_query:]
        jaccard[start : start + block.shape[0]] = 1.0 - min_sum / (2.0 - min_sum)
    return jaccard


def re_ranking(
    q_g_dist: np.ndarray | torch.Tensor,
    q_q_dist: np.ndarray | torch.Tensor,
    g_g_dist: np.ndarray | torch.Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> np.ndarray:
    """k-reciprocal re-ranked (num_query, num_gallery) distances (Zhong et al., CVPR 2017; see module doc).

    Inputs are non-negative distances (numpy or torch, any device): query-gallery (Q, G), query-query
    (Q, Q) and gallery-gallery (G, G). ``lambda_value=1`` returns the normalised squared input distance
    (same ranking as ``q_g_dist``); ``lambda_value=0`` the Jaccard distance alone. Needs O((Q + G)^2)
    memory.
    """
    if k1 < 1 or k2 < 1:
        raise ValueError(f"k1 and k2 must be >= 1, got k1={k1}, k2={k2}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value}")
    num_query, num_gallery = np.shape(q_g_dist)
    q_g = _as_float_matrix(q_g_dist, name="q_g_dist", shape=(num_query, num_gallery))
    q_q = _as_float_matrix(q_q_dist, name="q_q_dist", shape=(num_query, num_query))
    g_g = _as_float_matrix(g_g_dist, name="g_g_dist", shape=(num_gallery, num_gallery))

    num_items = num_query + num_gallery
    dist = np.empty((num_items, num_items), np.float32)
    dist[:num_query, :num_query], dist[:num_query, num_query:] = q_q, q_g
    dist[num_query:, :num_query], dist[num_query:, num_query:] = q_g.T, g_g
    np.square(dist, out=dist)
    dist /= np.maximum(dist.max(1, keepdims=True), np.finfo(np.float32).tiny)

    neighbours = _nearest_neighbours(dist, max(k1 + 1, k2))
    jaccard = _jaccard_to_gallery(_encode(dist, neighbours, k1, k2), num_query)
    original = dist[:num_query, num_query:]
    return ((1.0 - lambda_value) * jaccard + lambda_value * original).astype(np.float32)
