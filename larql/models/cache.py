"""The KV cache: each layer's keys and values by position, beside the model that fills it.

Its own module (as mlx-lm keeps `cache.py`) because more than the forward pass works on it:
generation continues from it, and speculative decoding rolls it back.

Rollback: `cache.checkpoint()` starts a journal in every layer; each write then first saves the
slots it is about to overwrite (their keys, values and positions). `cache.rollback(n)` undoes,
newest first, every journaled write of a position >= n and sets the length to n, so the cache
is bit for bit what it was after position n - 1, including ring slots of sliding layers that a
rejected position overwrote (position p evicts p - window, which later queries still need).
`cache.commit()` drops the journal. Saving costs 2 x kv_heads x head_dim floats per written
position and layer: nothing next to the pass that writes them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..config import ModelConfig


class LayerCache:
    """Keys and values of one layer, stored [kv_heads, slot, head_dim] so each head is contiguous.

    Sliding layers keep a ring of `window` slots (position p lives in slot p % window); full
    layers grow. Each slot remembers its position, so attention masks by position and a second
    write of the same position (batch dispatch's apply pass) simply overwrites it.
    """

    def __init__(self, kv_heads: int, head_dim: int, window: int | None, capacity: int = 64) -> None:
        self.window = window
        cap = window if window else capacity
        self.k = np.zeros((kv_heads, cap, head_dim), dtype=np.float32)
        self.v = np.zeros_like(self.k)
        self.pos = np.full(cap, -1, dtype=np.int64)
        self.used = 0  # slots [0, used) have been written at least once
        self.journal: list[_Undo] | None = None   # saved slots while a checkpoint is open
        # A journaled chunk longer than the ring stored only its last `window` positions: a
        # rollback below this position would need ones that were never kept.
        self.journal_lossy_below = -1

    def _grow(self, need: int) -> None:
        cap = self.k.shape[1]
        new_cap = max(need, 2 * cap)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = np.zeros((old.shape[0], new_cap, old.shape[2]), dtype=np.float32)
            new[:, :cap] = old
            setattr(self, name, new)
        pos = np.full(new_cap, -1, dtype=np.int64)
        pos[:cap] = self.pos
        self.pos = pos

    def write(self, positions: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """positions [T]; k, v [T, kv_heads, head_dim]. A ring keeps only the last `window`."""
        if len(positions) == 1 and (self.window or positions[0] < self.k.shape[1]):
            p = int(positions[0])
            slot = p % self.window if self.window else p
            if self.journal is not None:
                self._save(np.array([slot]), np.array([p]))
            self.k[:, slot] = k[0]
            self.v[:, slot] = v[0]
            self.pos[slot] = p
            self.used = max(self.used, slot + 1)
            return
        if self.window:
            if self.journal is not None and len(positions) > self.window:
                self.journal_lossy_below = max(self.journal_lossy_below, int(positions[-self.window]))
            keep = slice(max(0, len(positions) - self.window), None)
            positions, k, v = positions[keep], k[keep], v[keep]
            slots = positions % self.window
        else:
            slots = positions
            if int(slots.max()) >= self.k.shape[1]:
                self._grow(int(slots.max()) + 1)
        if self.journal is not None:
            self._save(np.asarray(slots), np.asarray(positions))
        self.k[:, slots] = k.transpose(1, 0, 2)
        self.v[:, slots] = v.transpose(1, 0, 2)
        self.pos[slots] = positions
        self.used = max(self.used, int(slots.max()) + 1)

    def _save(self, slots: np.ndarray, positions: np.ndarray) -> None:
        self.journal.append(_Undo(slots.astype(np.int64), positions.astype(np.int64),
                                  self.k[:, slots].copy(), self.v[:, slots].copy(),
                                  self.pos[slots].copy(), self.used))

    def rollback(self, length: int) -> None:
        """Undo the journaled writes of positions >= length (newest first); keep the journal."""
        if self.journal is None:
            raise RuntimeError("rollback without a checkpoint")
        if length < self.journal_lossy_below:
            raise ValueError(f"cannot roll back to length {length}: a chunk longer than the sliding "
                             f"window ({self.window}) was written since the checkpoint, and the "
                             f"positions it evicted are gone (write rows one by one to roll back)")
        keep: list[_Undo] = []
        used = self.journal[0].used if self.journal else self.used
        for u in self.journal:   # `used` as it was after the last kept write
            kept = u.positions < length
            if kept.any():
                used = max(used, int(u.slots[kept].max()) + 1)
        for u in reversed(self.journal):
            undo = u.positions >= length
            if not undo.any():
                keep.append(u)
                continue
            s = u.slots[undo]
            self.k[:, s] = u.k[:, undo]
            self.v[:, s] = u.v[:, undo]
            self.pos[s] = u.pos[undo]
            if not undo.all():
                keep.append(_Undo(u.slots[~undo], u.positions[~undo], u.k[:, ~undo], u.v[:, ~undo],
                                  u.pos[~undo], u.used))
        self.journal = keep[::-1]
        self.used = used

    def copy(self) -> LayerCache:
        new = LayerCache.__new__(LayerCache)
        new.window, new.used = self.window, self.used
        new.k, new.v, new.pos = self.k.copy(), self.v.copy(), self.pos.copy()
        new.journal, new.journal_lossy_below = None, -1
        return new

    def view(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(k, v [kv_heads, n, head_dim], positions [n]) of every written slot."""
        n = self.used
        return self.k[:, :n], self.v[:, :n], self.pos[:n]


class _Undo(NamedTuple):
    """What one write overwrote: slots, the positions written there, and the old contents."""

    slots: np.ndarray       # [n]
    positions: np.ndarray   # [n] the positions this write stored
    k: np.ndarray           # [kv_heads, n, head_dim] keys before the write
    v: np.ndarray
    pos: np.ndarray         # [n] positions the slots held before the write
    used: int               # LayerCache.used before the write


class KVCache:
    """One LayerCache per layer plus the next position to fill."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.layers = [
            LayerCache(cfg.layer_kv_heads(i), cfg.layer_head_dim(i),
                       None if cfg.is_full(i) else cfg.sliding_window)
            for i in range(cfg.num_layers)
        ]
        self.length = 0
        self.checkpoint_length: int | None = None

    def __len__(self) -> int:
        return self.length

    def checkpoint(self) -> None:
        """Start journaling writes so that `rollback` can undo them (drops an older journal)."""
        for lc in self.layers:
            lc.journal, lc.journal_lossy_below = [], -1
        self.checkpoint_length = self.length

    def rollback(self, length: int) -> None:
        """Forget positions >= length written since `checkpoint()`: the cache is then exactly
        what it was after position length - 1 (ring slots of sliding layers restored)."""
        start = self.checkpoint_length
        if start is None or self.layers[0].journal is None:
            raise RuntimeError("KVCache.rollback needs an open checkpoint()")
        if not start <= length <= self.length:
            raise ValueError(f"cannot roll back to length {length}: the checkpoint was at {start} "
                             f"and the cache holds {self.length} positions")
        for lc in self.layers:
            lc.rollback(length)
        self.length = length

    def commit(self) -> None:
        """Close the checkpoint: later writes are no longer journaled."""
        for lc in self.layers:
            lc.journal = None
        self.checkpoint_length = None
