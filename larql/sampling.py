"""Choosing the next token from logits: greedy by default, or temperature / top-k / top-p.

`Sampler` is reproducible: the same seed and logits give the same tokens (a numpy Generator
owned by the sampler, never the global random state).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Sampler:
    """temperature 0 = greedy (argmax). top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, not {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, not {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        self.rng = np.random.default_rng(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def __call__(self, logits: np.ndarray) -> int:
        if self.greedy:
            return int(np.argmax(logits))
        probs = self.distribution(logits)
        return int(self.rng.choice(probs.size, p=probs))

    def distribution(self, logits: np.ndarray) -> np.ndarray:
        """The (filtered, renormalised) f64 distribution sampling draws from."""
        z = np.asarray(logits, dtype=np.float64) / self.temperature
        if self.top_k and self.top_k < z.size:
            kth = np.partition(z, z.size - self.top_k)[z.size - self.top_k]
            z = np.where(z >= kth, z, -np.inf)
        p = np.exp(z - np.max(z))
        p /= p.sum()
        if self.top_p < 1.0:
            # Keep the smallest set of most likely tokens whose mass reaches top_p.
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            n = int(np.searchsorted(cum, self.top_p)) + 1
            keep = np.zeros(p.size, dtype=bool)
            keep[order[:n]] = True
            p = np.where(keep, p, 0.0)
            p /= p.sum()
        return p


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    m = np.max(z)
    return z - m - np.log(np.sum(np.exp(z - m)))


def top_logprobs(logprobs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely (id, log-probability) pairs, most likely first."""
    k = min(k, logprobs.size)
    idx = np.argpartition(-logprobs, k - 1)[:k]
    idx = idx[np.argsort(-logprobs[idx], kind="stable")]
    return [(int(i), float(logprobs[i])) for i in idx]
