"""The KV cache: full-length buffers for full-attention layers, ring buffers for sliding ones.

Every layer's cache holds keys and values by *slot* plus the absolute position stored in each
slot (``-1`` = empty). A token at position ``p`` goes to slot ``p % size``. Full-attention layers
get ``size = max_len`` (so nothing wraps); sliding-window layers get ``size = sliding_window``, a
ring buffer that overwrites the oldest entry, because a query never looks further back than the
window. For gpt-oss-20b at 131072 tokens that is 12 layers x 128 slots instead of 12 x 131072.

Attention masks by stored positions, so slot order never matters (see ``attention.py``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from oss_jax.config import Config


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCache:
    """One layer: ``k``, ``v`` ``[B, S, K, H]`` and the position in each slot ``pos`` ``[B, S]``."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    ring: bool = dataclasses.field(default=False, metadata={"static": True})  # sliding-window ring

    @property
    def size(self) -> int:
        return self.k.shape[1]

    def write(self, k_BTKH: jax.Array, v_BTKH: jax.Array, pos_BT: jax.Array) -> LayerCache:
        """Store new entries at slot ``pos % size``; negative positions (padding) are not stored.

        When more than ``size`` new tokens arrive at once (a prefill chunk longer than the ring),
        only the last ``size`` of each row are kept, so no slot is written twice.
        """
        size = self.size
        newest = jnp.max(pos_BT, axis=1, keepdims=True)
        keep = (pos_BT >= 0) & (pos_BT > newest - size)
        slot = jnp.where(keep, pos_BT % size, size)  # size is out of bounds: dropped
        rows = jnp.arange(pos_BT.shape[0])[:, None]
        return LayerCache(
            k=self.k.at[rows, slot].set(k_BTKH.astype(self.k.dtype), mode="drop"),
            v=self.v.at[rows, slot].set(v_BTKH.astype(self.v.dtype), mode="drop"),
            pos=self.pos.at[rows, slot].set(pos_BT, mode="drop"),
            ring=self.ring,
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """All layers' caches, plus ``length`` ``[B]``: the next position of each row."""

    layers: list[LayerCache]
    length: jax.Array

    @classmethod
    def create(cls, cfg: Config, batch: int, max_len: int, dtype=jnp.bfloat16) -> KVCache:
        """Empty cache for ``batch`` rows of up to ``max_len`` positions."""
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"a cache of {max_len} positions exceeds the model's context of "
                             f"{cfg.max_position_embeddings}")
        K, H = cfg.num_key_value_heads, cfg.head_dim
        layers = []
        for i in range(cfg.num_hidden_layers):
            window = cfg.window(i)
            size = max_len if window is None else min(window, max_len)
            layers.append(LayerCache(k=jnp.zeros((batch, size, K, H), dtype),
                                     v=jnp.zeros((batch, size, K, H), dtype),
                                     pos=jnp.full((batch, size), -1, jnp.int32), ring=window is not None))
        return cls(layers=layers, length=jnp.zeros((batch,), jnp.int32))

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))

    def __repr__(self) -> str:
        lines = [f"KVCache(batch={self.length.shape[0]}, layers={len(self.layers)}, "
                 f"{self.nbytes / 2**20:.2f} MiB, next position per row={list(map(int, self.length))})"]
        for i, c in enumerate(self.layers):
            filled = int(jnp.sum(c.pos[0] >= 0))
            kind = "ring" if c.ring else "full"
            lines.append(f"  layer {i:2d}: k,v {tuple(c.k.shape)} {c.k.dtype}, {kind:4s} "
                         f"slots {filled}/{c.size} filled (row 0)")
        return "\n".join(lines)
