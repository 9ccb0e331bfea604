"""The KV cache: each layer's keys and values by position, beside the model that fills it.

Its own module (as mlx-lm keeps `cache.py`) because more than the forward pass works on it:
generation continues from it, and speculative decoding will copy and roll it back.
"""

from __future__ import annotations

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
            self.k[:, slot] = k[0]
            self.v[:, slot] = v[0]
            self.pos[slot] = p
            self.used = max(self.used, slot + 1)
            return
        if self.window:
            keep = slice(max(0, len(positions) - self.window), None)
            positions, k, v = positions[keep], k[keep], v[keep]
            slots = positions % self.window
        else:
            slots = positions
            if int(slots.max()) >= self.k.shape[1]:
                self._grow(int(slots.max()) + 1)
        self.k[:, slots] = k.transpose(1, 0, 2)
        self.v[:, slots] = v.transpose(1, 0, 2)
        self.pos[slots] = positions
        self.used = max(self.used, int(slots.max()) + 1)

    def copy(self) -> LayerCache:
        new = LayerCache.__new__(LayerCache)
        new.window, new.used = self.window, self.used
        new.k, new.v, new.pos = self.k.copy(), self.v.copy(), self.pos.copy()
        return new

    def view(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(k, v [kv_heads, n, head_dim], positions [n]) of every written slot."""
        n = self.used
        return self.k[:, :n], self.v[:, :n], self.pos[:n]


class KVCache:
    """One LayerCache per layer plus the next position to fill."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.layers = [
            LayerCache(cfg.layer_kv_heads(i), cfg.layer_head_dim(i),
                       None if cfg.is_full(i) else cfg.sliding_window)
            for i in range(cfg.num_layers)
        ]
        self.length = 0

    def __len__(self) -> int:
        return self.length
