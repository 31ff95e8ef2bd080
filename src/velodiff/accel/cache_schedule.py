"""A budgeted cache schedule: given how much a cached feature drifts from step to step and a number of
full evaluations, choose which steps are full by dynamic programming (CacheQuant, Liu et al. 2025,
Sec. 4.1's "dynamic-programming schedule", on the feature-change curves of DeepCache's Fig. 2),
instead of a fixed interval.

Model. ``changes[i]`` (i >= 1) is the relative change of the cached feature from step i - 1 to step i
(the ``feature_change`` instrument measures it). A step i that reuses the feature computed at full
step j < i is off by about the accumulated change ``d(j, i) = changes[j+1] + ... + changes[i]``; the
schedule minimizes the sum of ``d(j, i)`` over every reused step, with step 0 always full. A segment
that starts with full step j and ends before the next full step k costs
``seg(j, k) = sum_{i=j+1}^{k-1} d(j, i)``, and ``best[n][k] = min_j best[n-1][j] + seg(j, k)``:
O(full x steps^2) time, exact (a test checks it against every subset on small cases).
"""

from __future__ import annotations

from collections.abc import Sequence


def segment_costs(changes: Sequence[float]) -> list[list[float]]:
    """``seg[j][k]``: the drift summed over the steps j+1 .. k-1 that reuse step j's feature."""
    n = len(changes)
    seg = [[0.0] * (n + 1) for _ in range(n)]
    for j in range(n):
        drift, total = 0.0, 0.0
        for k in range(j + 1, n + 1):
            seg[j][k] = total
            if k < n:
                drift += float(changes[k])
                total += drift
    return seg


def budgeted_schedule(changes: Sequence[float], full: int) -> list[bool]:
    """Which of the ``len(changes)`` steps run in full (True) when ``full`` of them may, minimizing the
    summed drift of the reused ones (see the module docstring); ``changes[0]`` is ignored."""
    n = len(changes)
    if n == 0:
        return []
    full = max(1, min(int(full), n))
    if any(not c >= 0 for c in changes[1:]):
        raise ValueError("feature changes must be non-negative numbers")
    seg = segment_costs(changes)
    inf = float("inf")
    # best[m][k]: least drift of steps 0 .. k-1 with m full steps among them, the last at k-1's segment
    # start; here indexed by the position j of the m-th full step
    best = [[inf] * n for _ in range(full + 1)]
    back = [[-1] * n for _ in range(full + 1)]
    best[1][0] = 0.0
    for m in range(2, full + 1):
        for k in range(m - 1, n):
            for j in range(m - 2, k):
                if best[m - 1][j] == inf:
                    continue
                cost = best[m - 1][j] + seg[j][k]
                if cost < best[m][k]:
                    best[m][k], back[m][k] = cost, j
    last = min(range(n), key=lambda j: best[full][j] + seg[j][n] if best[full][j] < inf else inf)
    chosen, m, j = [], full, last
    while j >= 0 and m >= 1:
        chosen.append(j)
        j, m = back[m][j], m - 1
    out = [False] * n
    for j in chosen:
        out[j] = True
    return out


def schedule_drift(changes: Sequence[float], schedule: Sequence[bool]) -> float:
    """The summed drift of a schedule's reused steps (what :func:`budgeted_schedule` minimizes)."""
    total, drift = 0.0, 0.0
    for i, is_full in enumerate(schedule):
        if is_full:
            drift = 0.0
        else:
            drift += float(changes[i])
            total += drift
    return total
