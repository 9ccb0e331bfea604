"""The expert interface: where a layer's routed experts get computed.

The model calls `forward(layer, h, ids, weights)` with the raw residual `h` (T x hidden); the
backend applies `pre_feedforward_layernorm_2`, runs each token's K experts and returns the
*raw* weighted sum (T x hidden). The caller applies `post_feedforward_layernorm_2` after
adding the partial sums of every shard, which is why a shard never normalises its output.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from . import kernels, ranges
from .errors import LarqlError


class Pending:
    """A layer's expert call under way: `result()` waits for it and returns the raw weighted
    sum (the same array on every call; an error is raised on every call). Call it exactly
    once it is needed: a remote backend keeps its connections reserved until then."""

    __slots__ = ("_collect", "_value", "_error")

    def __init__(self, collect) -> None:
        self._collect = collect
        self._value: np.ndarray | None = None
        self._error: BaseException | None = None

    def result(self) -> np.ndarray:
        if self._collect is not None:
            collect, self._collect = self._collect, None
            try:
                self._value = collect()
            except BaseException as e:
                self._error = e
        if self._error is not None:
            raise self._error
        return self._value


class Experts(Protocol):
    def forward(self, layer: int, h: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """h: f32 [T, H] residual; ids: int32 [T, K]; weights: f32 [T, K] -> f32 [T, H]."""
        ...

    def forward_multi(
        self, work: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]
    ) -> list[np.ndarray]:
        """Several layers' work at once (batch dispatch): one result per (layer, h, ids, weights)."""
        ...

    def close(self) -> None: ...

    # Optional: `start(layer, h, ids, weights) -> Pending` begins `forward` and returns at once
    # (remote backends send the requests), so the model computes its dense MLP while the
    # experts run. Backends without it are called with `forward` after the dense MLP.


class LocalExperts:
    """Experts computed in this process from the vindex's mmapped LYRW files.

    `experts`/`layers` restrict what is served (a shard); work naming anything else raises
    ExpertOwnershipError instead of silently returning a partial sum.
    """

    def __init__(self, vindex, experts: list[int] | None = None, layers: list[int] | None = None) -> None:
        self.vindex = vindex
        cfg = vindex.config
        self.eps = cfg.rms_norm_eps
        self.num_experts = cfg.num_experts
        self.layers = sorted(layers if layers is not None else vindex.layers_present)
        self.experts = sorted(experts if experts is not None else vindex.experts_present)
        self._owned = np.zeros(cfg.num_experts, dtype=bool)
        self._owned[self.experts] = True
        self._owned_set = frozenset(self.experts)
        self._layer_set = set(self.layers)
        self._tables: dict[int, kernels.ExpertTable] = {}
        self._norms: dict[int, np.ndarray] = {}

    def layer(self, layer: int) -> tuple[kernels.ExpertTable, np.ndarray]:
        """The layer's expert table and pre_feedforward_layernorm_2 weight, loaded once."""
        table = self._tables.get(layer)
        if table is None:
            self._check_layer(layer)
            ef = self.vindex.expert_file(layer)
            ef.advise_random()
            ef.advise_huge(self.experts)
            table = ef.table(self.experts)
            self._tables[layer] = table
            self._norms[layer] = self.vindex.norm(f"layers.{layer}.pre_feedforward_layernorm_2.weight")
        return table, self._norms[layer]

    def _check_layer(self, layer: int) -> None:
        if layer not in self._layer_set:
            raise ExpertOwnershipError(f"layer {layer} is not served here (this shard owns layers "
                                       f"{ranges.text(self.layers)}, experts {ranges.text(self.experts)})")

    def check(self, layer: int, ids: np.ndarray) -> None:
        """Raise ExpertOwnershipError unless `layer` and every expert id >= 0 in `ids` are held here.

        The one ownership check: the server runs it on every work item before computing any
        and maps the error to the protocol's `not_owned`."""
        self._check_layer(layer)
        if ids.size <= 16:  # a decode step: plain ints (~1 us) instead of numpy masks (~6 us)
            flat = ids.ravel().tolist()
            if all(e < 0 or e in self._owned_set for e in flat):
                return
        used = ids[ids >= 0]
        if used.size and (used.max() >= self.num_experts or not self._owned[used].all()):
            bad = sorted({int(e) for e in used if e >= self.num_experts or not self._owned[e]})
            raise ExpertOwnershipError(f"experts {ranges.text(bad)} of layer {layer} are not served here "
                                       f"(this shard owns experts {ranges.text(self.experts)}, "
                                       f"layers {ranges.text(self.layers)})")

    def forward(self, layer: int, h: np.ndarray, ids: np.ndarray, weights: np.ndarray,
                acc: str = "f32") -> np.ndarray:
        """The raw weighted sum, accumulated in double and rounded to f32 once; acc="f64"
        returns the double sums instead (a shard's partial sum for a client to add exactly)."""
        _, norm = self.layer(layer)
        return self.forward_normed(layer, kernels.rms_norm(np.atleast_2d(h), norm, self.eps), ids, weights,
                                   acc)

    def forward_normed(
        self, layer: int, xe: np.ndarray, ids: np.ndarray, weights: np.ndarray, acc: str = "f32"
    ) -> np.ndarray:
        """As `forward` with `pre_feedforward_layernorm_2` already applied (e.g. by a client
        that sent Q8_K activations)."""
        ids = np.asarray(ids)
        self.check(layer, ids)  # before any cast to int32 could wrap a huge id into range
        table, _ = self.layer(layer)
        xe = np.atleast_2d(xe)
        if acc == "f32":
            return kernels.moe_ffn(table, xe, ids, weights)
        if acc != "f64":
            raise ValueError(f"acc must be 'f32' or 'f64', not {acc!r}")
        y64 = np.empty((xe.shape[0], table.hidden), dtype=np.float64)
        kernels.moe_ffn(table, xe, ids, weights, out64=y64)
        return y64

    def forward_q8k(self, layer: int, xq: np.ndarray, ids: np.ndarray, weights: np.ndarray,
                    acc: str = "f32") -> np.ndarray:
        """As `forward_normed` with the normed input already in Q8_K (uint8 [T, row bytes], a
        client's `q8k` encoding). K-quant experts use the blocks as they are, so a client that
        quantised with kernels.quantize_q8k gets `forward`'s result bit for bit; float experts
        take the dequantised values."""
        ids = np.asarray(ids)
        self.check(layer, ids)
        table, _ = self.layer(layer)
        xq = np.ascontiguousarray(xq)
        T = xq.shape[0]
        if acc not in ("f32", "f64"):
            raise ValueError(f"acc must be 'f32' or 'f64', not {acc!r}")
        if not table.q8k_input:
            cols = xq.shape[1] // kernels.row_bytes(kernels.Q8_K, 256) * 256
            xe = kernels.dequantize(xq.reshape(-1), kernels.Q8_K, T, cols)
            return self.forward_normed(layer, xe[:, : table.hidden], ids, weights, acc)
        if acc == "f32":
            return kernels.moe_ffn_q8k(table, xq, T, np.atleast_2d(ids), np.atleast_2d(weights))
        y64 = np.empty((T, table.hidden), dtype=np.float64)
        kernels.moe_ffn_q8k(table, xq, T, np.atleast_2d(ids), np.atleast_2d(weights), out64=y64)
        return y64

    def forward_multi(self, work):
        return [self.forward(*w) for w in work]

    def close(self) -> None:
        self._tables.clear()


class ExpertOwnershipError(LarqlError, ValueError):
    """Work named an expert or layer this backend does not hold."""
