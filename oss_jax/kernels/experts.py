"""Fast expert dispatch: the mixture of ``Experts.reference`` without computing every expert on
every token, and the same on a device mesh.

gpt-oss sends each token to k of E experts (4 of 32 in 20b), so the reference's einsum over all
E experts does E/k times the useful work and holds every expert's weights at once. The loops
here apply one expert at a time (``ffn(e, x_RD)``, given by ``Experts``) to the rows routed to it:

* ``"gather"``: a loop over the X*k (token, expert) pairs, one row each: few tokens (a decode
  step) read few experts.
* ``"sorted"``: the pairs sorted by expert into tiles of R rows of one expert each, a loop of one
  ``[R, D] @ w[expert]`` per tile: a grouped matmul, about X*k rows of work and each used expert
  read about once (prefill, large batches, training).
* ``"ragged"``: the pairs sorted by expert, then each projection one grouped matmul over every
  expert at once (``jax.lax.ragged_dot``, through ``Experts.grouped``): one kernel instead of a loop
  of small ones, for accelerators. Packed experts are decoded whole (every expert, transient) first,
  except on the CPU, where the native kernel multiplies by the packed bytes (``native.grouped_matmul``).
* ``"scan"``: a loop over all E experts, each applied to every token and weighted by that token's
  gate (zero when not chosen): E/k times the useful work, one expert in memory at a time.
* ``"auto"``: gather when X*k < E, else ragged on a GPU or TPU, and on the CPU ragged with packed
  experts on the native kernel, sorted otherwise (:func:`choose`, the one place this is decided, says why).

Gather and sorted index one expert per loop step with ``dynamic_slice`` rather than gathering
``[X, k, D, 2F]`` copies of the weights: on XLA's CPU backend a plain 2-D matmul on one expert is
the fast kernel, and batched einsums over a gathered expert axis are several times slower. An
expert larger than ``SLICE_BYTES`` is read a slice at a time (:func:`expert_matmul`).

:func:`experts_parallel` runs the module on its mesh (set by ``oss_jax.sharding.shard``): each
device mixes its own experts (or hidden units) and one ``psum`` adds the partial outputs.

Shape letters: the legend in ``oss_jax/model.py``; here also P ((token, expert) pairs, X*k),
R (rows of one tile), C (rows of one weight slice), I and O (input and output width of a matmul).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from oss_jax.kernels import mxfp4
from oss_jax.kernels import native as native_cpu

f32 = jnp.float32
# Rows per tile of the "sorted" dispatch (at most).
SORTED_TILE = 128
# An expert's weight is read in slices of at most this many bytes (of float32 nibble planes when
# packed): see expert_matmul.
SLICE_BYTES = 4 << 20
# Pairs per expert (on average) from which "auto" takes the native grouped kernel on the CPU (choose); measured
# in benchmarks/results/mxfp4_kernel.md (one 20b layer: 1.2-1.4x faster than sorted at 2 per expert, 1.5-1.9x at 64).
GROUPED_MIN_ROWS = 2
MODES = ("auto", "gather", "sorted", "ragged", "scan", "dense")
Ffn = Callable[[jax.Array, jax.Array], jax.Array]  # ffn(e, x [R, D]) -> [R, D] float32
# grouped(x [P, D] sorted by expert, expert of each row e [P], rows per expert sizes [E]) -> [P, D] float32
Grouped = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")  # platforms where "auto" prefers one grouped matmul to a loop


def mix(ffn: Ffn, E: int, x_XD: jax.Array, idx_Xk: jax.Array, gates_Xk: jax.Array, mode: str,
        grouped: Grouped | None = None, native_grouped: bool = False) -> jax.Array:
    """``sum_k gates[x, k] * ffn(idx[x, k], x)`` -> ``[X, D]`` float32, by ``mode`` (gather, sorted,
    ragged, scan or auto; ragged needs ``grouped``, the same experts as one grouped matmul). An index
    outside ``[0, E)`` (another device's expert) contributes nothing. ``native_grouped``: ``grouped`` runs
    on the native CPU kernel (:func:`choose`)."""
    X, k = idx_Xk.shape
    mode = choose(mode, X * k, E, native_grouped)
    if mode == "ragged":
        if grouped is None:
            raise ValueError("expert dispatch 'ragged' needs the experts' grouped matmul (Experts.grouped)")
        return _ragged(grouped, E, x_XD, idx_Xk, gates_Xk)
    if mode == "gather":
        return _tiles(ffn, E, x_XD, idx_Xk, gates_Xk, tile=1)
    if mode == "sorted":
        return _tiles(ffn, E, x_XD, idx_Xk, gates_Xk, tile=_sorted_tile(X * k, E))
    if mode == "scan":
        @jax.checkpoint  # the backward pass recomputes each expert: nothing of it is kept per step
        def step(acc_XD, e):
            coef_X = jnp.sum(jnp.where(idx_Xk == e, gates_Xk, 0.0), axis=-1)
            return acc_XD + coef_X[:, None] * ffn(e, x_XD), None

        out, _ = jax.lax.scan(step, jnp.zeros(x_XD.shape, f32), jnp.arange(E))
        return out
    raise ValueError(f"unknown expert dispatch {mode!r} (use one of {', '.join(map(repr, MODES))})")


def backend() -> str:
    """The platform that ``jit`` compiles the mixture for: ``jax.default_backend()`` ("cpu", "gpu", "tpu").
    (The arrays are tracers inside ``jit``: they have no devices to ask.)"""
    return jax.default_backend()


def choose(mode: str, pairs: int, E: int, native_grouped: bool = False) -> str:
    """The dispatch that runs for ``mode`` on ``pairs`` (token, expert) pairs of ``E`` experts: ``mode``
    itself, or for ``"auto"`` the one place the choice is made, per backend:

    * ``pairs < E`` (a decode step): gather, everywhere: it reads only the experts chosen, one per pair,
      while a grouped matmul reads (and, packed, decodes) every expert.
    * otherwise on a GPU or TPU: ragged. One grouped matmul per projection keeps the chip busy; sorted's
      loop of about ``pairs / R + E`` tiles is as many small sequential matmuls, each launched on its own.
      (Not yet measured on a GPU: ``benchmarks/gpu.py`` times the prefill both ways.)
    * otherwise on the CPU: sorted. XLA's CPU backend has no grouped matmul: it runs ``ragged_dot`` as a
      masked dense matmul over every expert (E times the work: a 256-token prefill with 32 experts is about
      17x slower than sorted), while sorted's 2-D matmuls run at full speed. Except with packed experts
      on the native kernels (``native_grouped``) and at least ``GROUPED_MIN_ROWS`` rows per expert: ragged.
      ``native.grouped_matmul`` decodes each expert once per call, a panel at a time in the cache, where
      sorted decodes a whole float32 copy of the expert per tile and pads every tile: 2,048 pairs of
      gpt-oss-20b (a 512-token prefill) take 0.5-0.65 of the time (``benchmarks/mxfp4_kernel.py``). With
      fewer rows per expert the decode is most of the work, and sorted's tiles run the one-row kernel.
    """
    if mode != "auto":
        return mode
    if pairs < E:
        return "gather"
    if native_grouped and backend() == "cpu" and pairs >= GROUPED_MIN_ROWS * E:
        return "ragged"
    return grouped_dispatch()


def grouped_dispatch() -> str:
    """The dispatch for many tokens (prefill, training) on this backend: ``"ragged"`` on a GPU or TPU,
    ``"sorted"`` on the CPU (why: :func:`choose`)."""
    return "ragged" if backend() in ACCELERATORS else "sorted"


def _ragged(grouped: Grouped, E: int, x_XD: jax.Array, idx_Xk: jax.Array, gates_Xk: jax.Array) -> jax.Array:
    """Ragged: the X*k (token, expert) rows sorted by expert, ``grouped`` on all of them at once, then
    each token's k rows gated and summed.

    Rows of another device's experts (an index outside ``[0, E)``) sort last, outside every group
    (``sizes`` sums to fewer rows): their outputs are dropped. The rows go back to token order by the
    inverse permutation (a gather, then a sum over k), not a scatter-add, whose atomic adds on a GPU
    would sum in a different order each run. ``grouped`` is recomputed in the backward pass (``jax.checkpoint``), so
    packed experts' decoded weights (every expert) live only while one layer's matmuls run.
    """
    X, k = idx_Xk.shape
    P = X * k
    flat_P = idx_Xk.reshape(-1)
    flat_P = jnp.where((flat_P >= 0) & (flat_P < E), flat_P, E).astype(jnp.int32)  # E: not ours, last
    order = jnp.argsort(flat_P, stable=True)
    row_e = flat_P[order]
    sizes_E = jnp.bincount(flat_P, length=E + 1)[:E].astype(jnp.int32)
    y_PD = jax.checkpoint(grouped)(x_XD[order // k], jnp.minimum(row_e, E - 1), sizes_E)
    g_P = gates_Xk.reshape(-1).astype(f32)[order]
    y_PD = jnp.where((row_e < E)[:, None], g_P[:, None] * y_PD, 0.0)  # where, not a product: drops NaN too
    back = jnp.zeros((P,), jnp.int32).at[order].set(jnp.arange(P, dtype=jnp.int32))  # row of each pair
    return jnp.sum(y_PD[back].reshape(X, k, -1), axis=1)


def _tiles(ffn: Ffn, E: int, x_XD: jax.Array, idx_Xk: jax.Array, gates_Xk: jax.Array, tile: int) -> jax.Array:
    """Gather (``tile == 1``: the pairs in token order) or sorted (the pairs grouped by expert).

    The X*k (token, expert) rows are laid out so that each tile of ``tile`` consecutive rows
    belongs to one expert; a loop then runs ``ffn(expert, rows)`` once per tile and adds the
    gated results into the tokens' outputs. Sorted: each expert's rows start a new tile, so at
    most ``ceil(X*k / R) + E`` tiles (a static bound), rows past the expert's end have gate 0,
    and tiles past the last used one (or of another device's experts) are skipped by a
    ``lax.cond``. No token is ever dropped.
    """
    X, k = idx_Xk.shape
    D = x_XD.shape[-1]
    P, R = X * k, tile
    flat_P = idx_Xk.reshape(-1)
    flat_P = jnp.where((flat_P >= 0) & (flat_P < E), flat_P, E).astype(jnp.int32)  # E: not ours, skipped
    if R == 1:  # gather: row p is pair p, itself a tile
        n_tiles, row_e = P, flat_P
        row_tok = jnp.arange(P, dtype=jnp.int32) // k
        row_gate = gates_Xk.reshape(-1).astype(f32)
        tile_e, tile_row = flat_P, jnp.arange(P, dtype=jnp.int32)
    else:
        order = jnp.argsort(flat_P, stable=True)
        row_e = flat_P[order]
        row_tok = (order // k).astype(jnp.int32)
        row_gate = gates_Xk.reshape(-1).astype(f32)[order]
        sizes = jnp.bincount(flat_P, length=E + 1)[:E]
        starts = jnp.cumsum(sizes) - sizes  # each expert's first row
        tiles = -(-sizes // R)
        ends = jnp.cumsum(tiles)  # exclusive end of each expert's tiles
        n_tiles = min(-(-P // R) + min(E, P), P)
        t = jnp.arange(n_tiles)
        tile_e = jnp.searchsorted(ends, t, side="right").astype(jnp.int32)  # E past the last tile
        e = jnp.minimum(tile_e, E - 1)
        tile_row = (starts[e] + (t - (ends[e] - tiles[e])) * R).astype(jnp.int32)
    # R rows of padding at the end: every tile's slice is in bounds; padding has gate 0.
    x_rows = jnp.concatenate([x_XD[row_tok], jnp.zeros((R, D), x_XD.dtype)])
    row_tok = jnp.concatenate([row_tok, jnp.full((R,), X, jnp.int32)])
    row_gate = jnp.concatenate([row_gate, jnp.zeros((R,), f32)])
    row_e = jnp.concatenate([row_e, jnp.full((R,), E, jnp.int32)])
    # Recompute each tile in the backward pass rather than keep its weights per tile. The whole step,
    # cond included: a checkpointed ffn inside the cond would make the cond hand its inputs (every
    # expert's weights) out as per-tile residuals; this way the loop keeps only ``t``.
    @jax.checkpoint
    def body(t, acc_XD):
        e, r = tile_e[t], tile_row[t]

        def run(acc_XD):
            y_RD = ffn(e, jax.lax.dynamic_slice_in_dim(x_rows, r, R))
            mine = jax.lax.dynamic_slice_in_dim(row_e, r, R) == e  # rows past the expert's end: 0
            g_R = jnp.where(mine, jax.lax.dynamic_slice_in_dim(row_gate, r, R), 0.0)
            return acc_XD.at[jax.lax.dynamic_slice_in_dim(row_tok, r, R)].add(g_R[:, None] * y_RD)

        return jax.lax.cond(e < E, run, lambda a: a, acc_XD)

    out = jax.lax.fori_loop(0, n_tiles, body, jnp.zeros((X + 1, D), f32))  # row X: padding's sink
    return out[:X]


def _sorted_tile(pairs: int, experts: int) -> int:
    """Rows per tile of the sorted dispatch: about one tile per expert, a power of two in
    ``[8, SORTED_TILE]`` (small tiles waste less on padding; large ones feed the matmul better)."""
    per_expert = max(1, -(-pairs // experts))
    return int(min(SORTED_TILE, max(8, 1 << (per_expert - 1).bit_length())))


# -- one expert ------------------------------------------------------------------------------------
def row(x: jax.Array, i: jax.Array) -> jax.Array:
    """``x[i]`` for a traced scalar index: one ``dynamic_slice`` (no gather, no copy of ``x``)."""
    return jax.lax.dynamic_index_in_dim(x, i, keepdims=False)


def expert_matmul(x_RI: jax.Array, w, e: jax.Array, dtype, native: bool | str = "auto") -> jax.Array:
    """``x @ w[e]`` for one expert ``e`` (a traced scalar) of a stacked weight -> ``[R, O]``.

    ``w`` is dense ``[E, I, O]``, or MXFP4 ``(blocks [E, O, I/32, 16], scales [E, O, I/32])``
    decoded to ``dtype``. XLA's CPU backend copies a ``dynamic_slice`` out before a matmul reads
    it. A whole large expert matrix (gate_up: 66 MB in float32 at the 20b shape) copied from memory and read back
    costs about 4x the matmul itself, while a slice of ``SLICE_BYTES`` stays in cache. So a large
    expert is taken a slice at a time: rows of ``I``, summed (dense); rows of ``O``, concatenated
    (packed). Small experts are one slice, a single matmul.

    Packed weights on the CPU go to the native kernel instead (``kernels.native``: the packed bytes read
    in place, float32 sums) where ``native`` allows: ``"auto"`` (``Experts.native``'s default) when it is
    built and ``R <= kernels.native.max_rows()`` (decode steps; larger tiles of a prefill are faster with
    XLA's matrix product), ``True`` always, ``False`` never.
    """
    R = x_RI.shape[0]
    if isinstance(w, tuple):
        blocks, scales = w
        if native_cpu.enabled(native) and (native is True or R <= native_cpu.max_rows()):
            return native_cpu.expert_matmul(x_RI, blocks, scales, e).astype(jnp.result_type(x_RI, dtype))
        _, O, nb, half = blocks.shape
        C = _slice_rows(O, nb * half * 4)  # float32 bytes per output row of one nibble plane
        if C == O:
            return mxfp4.matmul(x_RI, row(blocks, e), row(scales, e), dtype)

        def part(_, c):
            b = jax.lax.dynamic_slice(blocks, (e, c * C, 0, 0), (1, C, nb, half))[0]
            s = jax.lax.dynamic_slice(scales, (e, c * C, 0), (1, C, nb))[0]
            return None, mxfp4.matmul(x_RI, b, s, dtype)

        _, y_ARC = jax.lax.scan(part, None, jnp.arange(O // C))
        return jnp.moveaxis(y_ARC, 0, 1).reshape(R, O)
    _, I, O = w.shape
    C = _slice_rows(I, O * w.dtype.itemsize)
    if C == I:
        return x_RI @ row(w, e)

    def add(c, acc_RO):
        w_CO = jax.lax.dynamic_slice(w, (e, c * C, 0), (1, C, O))[0]
        x_RC = jax.lax.dynamic_slice_in_dim(x_RI, c * C, C, axis=1)
        return acc_RO + jnp.matmul(x_RC, w_CO, preferred_element_type=f32)

    y = jax.lax.fori_loop(0, I // C, add, jnp.zeros((R, O), f32))
    return y.astype(jnp.result_type(x_RI, w))


def _slice_rows(rows: int, row_bytes: int) -> int:
    """Rows per slice of ``expert_matmul``: the largest divisor of ``rows`` whose slice fits in
    ``SLICE_BYTES``; all of them when they fit, when that divisor is under a quarter of what fits
    (slices that small cost more in loop steps than they save), or off the CPU backend (where the
    copies this avoids were measured)."""
    fit = SLICE_BYTES // row_bytes
    if rows <= fit or jax.default_backend() != "cpu":
        return rows
    best = max(d for d in range(1, max(fit, 1) + 1) if rows % d == 0)
    return best if 4 * best >= fit else rows


# -- expert parallelism ----------------------------------------------------------------------------
# The axes of each expert parameter that a mesh splits: "E" (experts) over the mesh axis "expert",
# "F" (hidden units) over "tensor". MXFP4 blocks [E, out, in/32, 16] split like the dense weight
# they encode: gate_up along out (2F rows, whole gate/linear pairs), down along in (F/32 blocks).
PARAM_AXES = {
    "gate_up_EDF2": ("E", None, "F"), "down_EFD": ("E", "F", None),
    "gate_up_bias_EF2": ("E", "F"), "down_bias_ED": ("E", None),
    "gate_up_blocks": ("E", "F", None, None), "gate_up_scales": ("E", "F", None),
    "down_blocks": ("E", None, "F", None), "down_scales": ("E", None, "F"),
    # LoRA adapters (oss_jax.lora.ExpertsLora): A1 [E, D, r], B1 [E, r, 2F], A2 [E, F, r], B2 [E, r, D].
    "A1_EDr": ("E", None, None), "B1_ErF2": ("E", None, "F"), "A2_EFr": ("E", "F", None), "B2_ErD": ("E", None, None),
}


def split(num_experts: int, hidden: int, packed: bool, expert: int, tensor: int) -> tuple[bool, bool]:
    """(experts over a mesh axis of size ``expert``, hidden units over one of size ``tensor``):
    each only where it divides (MXFP4 ``down`` splits whole 32-value blocks)."""
    units = hidden // 32 if packed else hidden
    return expert > 1 and num_experts % expert == 0, tensor > 1 and units % tensor == 0


def param_spec(name: str, by_expert: bool, by_hidden: bool) -> PartitionSpec:
    """The ``PartitionSpec`` of the expert parameter ``name`` (a key of ``PARAM_AXES``)."""
    mesh_axis = {"E": "expert" if by_expert else None, "F": "tensor" if by_hidden else None, None: None}
    return PartitionSpec(*(mesh_axis[a] for a in PARAM_AXES[name]))


def experts_parallel(experts: nnx.Module, x_XD: jax.Array, idx_Xk: jax.Array, gates_Xk: jax.Array) -> jax.Array:
    """``experts(x, idx, gates)`` on ``experts.mesh``: each device mixes its own experts, one psum adds.

    Args:
      experts: an ``Experts`` whose parameters are laid out by ``param_spec`` on ``experts.mesh``.
      x_XD: tokens ``[X, D]``; idx_Xk: chosen experts ``[X, k]`` (global ids); gates_Xk: ``[X, k]``.

    Returns ``[X, D]`` in ``x_XD``'s dtype, equal to the single-device result. Tokens are split over
    ``data`` only, so every device of an ``(expert, tensor)`` group holds the same tokens; nothing
    is dropped and there is no capacity (see ``oss_jax.sharding`` for the design and its cost).
    """
    mesh = experts.mesh
    E, F2 = experts.gate_up_bias_EF2.shape
    by_expert, by_hidden = split(E, F2 // 2, experts.packed, mesh.shape["expert"], mesh.shape["tensor"])
    graphdef, state = nnx.split(experts)
    def spec(kp, _) -> PartitionSpec:  # by the parameter's own name (adapters sit one level down, in lora)
        return param_spec([k.key for k in kp if isinstance(k, jax.tree_util.DictKey)][-1], by_expert, by_hidden)

    state_specs = jax.tree_util.tree_map_with_path(spec, state)
    d = mesh.shape["data"]
    tokens = PartitionSpec("data" if d > 1 and x_XD.shape[0] % d == 0 else None, None)

    def local(state, x_XD, idx_Xk, gates_Xk):
        mine = nnx.merge(graphdef, state)  # this device's experts / hidden units
        if by_expert:
            E_local = mine.gate_up_bias_EF2.shape[0]
            idx_Xk = idx_Xk - jax.lax.axis_index("expert") * E_local
            here = (idx_Xk >= 0) & (idx_Xk < E_local)
            # Other devices' experts get gate 0 and index -1, which adds nothing in any dispatch.
            gates_Xk = jnp.where(here, gates_Xk, 0.0)
            idx_Xk = jnp.where(here, idx_Xk, -1)
        if by_hidden:  # partial sums over hidden units: the output bias is added by one device
            first = jax.lax.axis_index("tensor") == 0
            mine.down_bias_ED.set_value(jnp.where(first, mine.down_bias_ED[...], 0))
        out_XD = mine.mix(x_XD, idx_Xk, gates_Xk)  # float32
        axes = ("expert",) * by_expert + ("tensor",) * by_hidden
        return jax.lax.psum(out_XD, axes) if axes else out_XD

    # check_vma=False: the single-device code (a scan whose zero carry starts out replicated)
    # runs unchanged inside; the psum above makes the outputs replicated, as out_specs says.
    out = jax.shard_map(local, mesh=mesh, in_specs=(state_specs, tokens, tokens, tokens),
                        out_specs=tokens, check_vma=False)(state, x_XD, idx_Xk, gates_Xk)
    return out.astype(x_XD.dtype)
