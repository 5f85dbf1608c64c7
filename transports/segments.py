"""Segments: the rows of a transfer, ``(local_region, local_offset, remote_region, remote_offset, nbytes)``.

A ``SegmentPairs`` is an int64 ``[n, 5]`` table; transports never see tokens or layers.
``validate`` checks every row against the registered regions of both sides before a post.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from .errors import SegmentError

# Columns of a SegmentPairs table.
LOCAL_REGION, LOCAL_OFFSET, REMOTE_REGION, REMOTE_OFFSET, NBYTES = range(5)

class SegmentPairs:
    """A batch of (local segment -> remote segment) pairs, stored as an int64 [n, 5] table."""

    __slots__ = ("table",)

    def __init__(self, table: np.ndarray) -> None:
        table = np.ascontiguousarray(table, dtype=np.int64)
        if table.ndim != 2 or table.shape[1] != 5:
            raise SegmentError(f"segment table must have shape [n, 5], got {table.shape}")
        if len(table) and (table[:, NBYTES] <= 0).any():
            raise SegmentError("every segment must have nbytes > 0")
        if len(table) and ((table[:, LOCAL_OFFSET] < 0) | (table[:, REMOTE_OFFSET] < 0)).any():
            raise SegmentError("segment offsets must be >= 0")
        self.table = table

    @classmethod
    def from_tuples(cls, rows: Iterable[Sequence[int]]) -> SegmentPairs:
        rows = list(rows)
        return cls(np.asarray(rows, dtype=np.int64).reshape(len(rows), 5))

    @classmethod
    def strided(
        cls,
        local_region: int,
        remote_region: int,
        nbytes: int,
        count: int,
        local_offset: int = 0,
        remote_offset: int = 0,
        local_stride: int | None = None,
        remote_stride: int | None = None,
    ) -> SegmentPairs:
        """``count`` segments of ``nbytes`` at regular strides (default: packed)."""
        idx = np.arange(count, dtype=np.int64)
        t = np.empty((count, 5), dtype=np.int64)
        t[:, LOCAL_REGION] = local_region
        t[:, LOCAL_OFFSET] = local_offset + idx * (local_stride or nbytes)
        t[:, REMOTE_REGION] = remote_region
        t[:, REMOTE_OFFSET] = remote_offset + idx * (remote_stride or nbytes)
        t[:, NBYTES] = nbytes
        return cls(t)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def nbytes(self) -> int:
        return int(self.table[:, NBYTES].sum())

    def merged(self) -> SegmentPairs:
        """Adjacent rows whose local and remote runs both continue are merged into one."""
        t = self.table
        if len(t) < 2:
            return self
        cont = (
            (t[1:, LOCAL_REGION] == t[:-1, LOCAL_REGION])
            & (t[1:, REMOTE_REGION] == t[:-1, REMOTE_REGION])
            & (t[1:, LOCAL_OFFSET] == t[:-1, LOCAL_OFFSET] + t[:-1, NBYTES])
            & (t[1:, REMOTE_OFFSET] == t[:-1, REMOTE_OFFSET] + t[:-1, NBYTES])
        )
        if not cont.any():
            return self
        starts = np.flatnonzero(np.concatenate(([True], ~cont)))
        out = t[starts].copy()
        out[:, NBYTES] = np.add.reduceat(t[:, NBYTES], starts)
        return SegmentPairs(out)

    def validate(self, local: dict[int, int], remote: dict[int, int]) -> None:
        """Raise ``SegmentError`` unless every row fits its regions (``{region_id: nbytes}``)."""
        t = self.table
        for col_r, col_o, regions, side in (
            (LOCAL_REGION, LOCAL_OFFSET, local, "local"),
            (REMOTE_REGION, REMOTE_OFFSET, remote, "remote"),
        ):
            col = t[:, col_r]
            all_ends = t[:, col_o] + t[:, NBYTES]
            is_one = len(col) > 0 and bool((col == col[0]).all())  # one region: no hash, no row masks
            for rid in [int(col[0])] if is_one else np.unique(col).tolist():
                size = regions.get(rid)
                if size is None:
                    first = 0 if is_one else int(np.flatnonzero(col == rid)[0])
                    raise SegmentError(
                        f"segment {first}: {side} region {rid} is not registered "
                        f"(known {side} regions: {sorted(regions)}); register it, or refresh the peer descriptor"
                    )
                ends = all_ends if is_one else all_ends[col == rid]
                if int(ends.max()) > size:
                    rows = np.arange(len(col)) if is_one else np.flatnonzero(col == rid)
                    bad = int(rows[int(np.argmax(ends > size))])
                    raise SegmentError(
                        f"segment {bad}: {side} range [{t[bad, col_o]}, {t[bad, col_o] + t[bad, NBYTES]}) "
                        f"is outside {side} region {rid} of {size} bytes"
                    )
