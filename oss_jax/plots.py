"""Plots of routing and attention records: each function returns a matplotlib ``Figure``.

Figures are built with ``matplotlib.figure.Figure`` (not ``pyplot``), so they never pile up in
pyplot's global state; a notebook shows a returned figure, a script saves it with
``fig.savefig("x.png")``. Pass ``ax=`` to draw into an existing axes instead (all but
:func:`expert_text`, which sizes its figure from the font).

Palettes are colour-blind safe: ``viridis`` / ``cividis`` for continuous values and Paul Tol's
"muted" qualitative palette for expert ids. It has 9 colours, fewer than gpt-oss's 32 experts,
so colours repeat and every coloured token also carries its expert id as text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

# Paul Tol, "muted" (https://personal.sron.nl/~pault/#sec:qualitative): distinct under the common
# colour-vision deficiencies.
EXPERT_COLORS = ("#CC6677", "#332288", "#DDCC77", "#117733", "#88CCEE", "#882255", "#44AA99", "#999933",
                 "#AA4499")


def expert_color(expert: int) -> str:
    """The colour of an expert id (cycling through :data:`EXPERT_COLORS`)."""
    return EXPERT_COLORS[int(expert) % len(EXPERT_COLORS)]


def _text_color(background) -> str:
    """Black or white, whichever reads better on ``background`` (relative luminance)."""
    r, g, b = to_rgb(background)
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"


def _axes(ax: Axes | None, size: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def _layer_labels(n: int, sliding: np.ndarray | None, first_is_embedding: bool = False) -> list[str]:
    labels = []
    for i in range(n):
        layer = i - 1 if first_is_embedding else i
        if first_is_embedding and i == 0:
            labels.append("embed")
        elif sliding is not None and 0 <= layer < len(sliding):
            labels.append(f"{layer} {'slide' if sliding[layer] else 'full'}")
        else:
            labels.append(str(layer))
    return labels


def load_heatmap(load_LE: np.ndarray, *, sliding: np.ndarray | None = None, title: str | None = None,
                 ax: Axes | None = None) -> Figure:
    """Layer x expert heatmap of each expert's share of its layer's routings.

    Args:
      load_LE: ``[L, E]`` counts or fractions (rows are normalised here).
      sliding: optional bool ``[L]`` to tag layers as sliding/full.
    """
    load = np.asarray(load_LE, np.float64)
    frac = load / np.maximum(load.sum(-1, keepdims=True), 1e-300)
    L, E = frac.shape
    fig, ax = _axes(ax, (max(5.0, 0.28 * E + 2.5), max(3.0, 0.28 * L + 1.5)))
    im = ax.imshow(frac, aspect="auto", cmap="viridis", interpolation="nearest", origin="lower")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(L), _layer_labels(L, sliding), fontsize=8 if L > 12 else 10)
    ax.set_xticks(range(0, E, max(1, E // 16)))
    ax.set_title(title or f"Expert load (share of routings; uniform = 1/{E} = {1 / E:.3f})")
    fig.colorbar(im, ax=ax, label="share of the layer's routings")
    return fig


def coactivation_heatmap(rate_EE: np.ndarray, *, layer: int | None = None, annotate: bool | None = None,
                         ax: Axes | None = None) -> Figure:
    """Heatmap of co-activation ``N(i, j) / N(i)`` (``metrics.coactivation``) for one layer.

    The diagonal (always 1) is left blank so the colour scale shows the off-diagonal structure.
    Values are written in the cells when E <= 16 (or ``annotate=True``).
    """
    rate = np.array(rate_EE, np.float64)
    E = rate.shape[0]
    np.fill_diagonal(rate, np.nan)
    fig, ax = _axes(ax, (max(4.5, 0.3 * E + 2), max(4.0, 0.3 * E + 1.2)))
    im = ax.imshow(rate, cmap="cividis", interpolation="nearest", vmin=0)
    ax.set_xlabel("expert j (also chosen)")
    ax.set_ylabel("expert i (chosen)")
    ticks = range(0, E, max(1, E // 16))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    where = "" if layer is None else f", layer {layer}"
    ax.set_title(f"Co-activation N(i,j) / N(i){where}")
    fig.colorbar(im, ax=ax, label="fraction of i's tokens also routed to j")
    if annotate or (annotate is None and E <= 16):
        cmap, hi = im.get_cmap(), np.nanmax(rate) if np.isfinite(rate).any() else 1.0
        for i in range(E):
            for j in range(E):
                if np.isfinite(rate[i, j]):
                    ax.text(j, i, f"{rate[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color=_text_color(cmap(rate[i, j] / hi if hi > 0 else 0)))
    return fig


OTHER_COLOR = "#DDDDDD"  # experts beyond the palette: pale grey, identified by their id


def expert_colors(expert_ids: np.ndarray) -> dict[int, str]:
    """Colours for the experts in ``expert_ids``: the most frequent get the 9 distinct palette
    colours, the rest :data:`OTHER_COLOR` (pass the result to :func:`expert_text` to keep one
    mapping across several plots)."""
    ids, counts = np.unique(np.asarray(expert_ids).reshape(-1), return_counts=True)
    ranked = ids[np.argsort(-counts, kind="stable")]
    return {int(e): EXPERT_COLORS[i] if i < len(EXPERT_COLORS) else OTHER_COLOR for i, e in enumerate(ranked)}


def expert_text(tokens: Sequence[int], first_choice_T: np.ndarray, decode: Callable[[Sequence[int]], str], *,
                layer: int, num_experts: int, width: int = 80, colors: dict[int, str] | None = None,
                fontsize: float = 10) -> Figure:
    """The text, each token in a box coloured by its first-choice expert at ``layer``, its id underneath.

    Args:
      tokens: ``[T]`` token ids.
      first_choice_T: ``[T]`` expert ids (e.g. ``trace.first_choice[layer]``).
      decode: token ids -> text (e.g. ``oss_jax.harmony.decode``), called one token at a time.
      layer: for the title.
      num_experts: E (for the title).
      width: characters per line before wrapping.
      colors: expert id -> colour; default :func:`expert_colors` (the 9 most frequent experts get
        distinct colour-blind-safe colours, the others pale grey; the id is always printed).
    """
    experts = np.asarray(first_choice_T).reshape(-1)
    colors = expert_colors(experts) if colors is None else colors
    texts = [decode([int(t)]).replace("\n", "\u21b5").replace("\t", "\u2192") or "\u2205" for t in tokens]
    # Lay out in monospace character cells: a token takes len + 1 cells; lines wrap at ``width``.
    placed, x, line = [], 0, 0
    for text in texts:
        w = max(len(text), 2)
        if x > 0 and x + w > width:
            x, line = 0, line + 1
        placed.append((x, line, w))
        x += w + 1
    lines = line + 1
    # Size the figure from the font so that one character cell is one glyph wide.
    cell_in, line_in, margin = 0.6 * fontsize / 72, 2.6 * fontsize / 72, 0.25
    title_in, legend_in = 0.45, 0.75
    axes_w, axes_h = (width + 1) * cell_in, lines * line_in
    fig_w, fig_h = axes_w + 2 * margin, axes_h + title_in + legend_in
    fig = Figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes((margin / fig_w, legend_in / fig_h, axes_w / fig_w, axes_h / fig_h))
    for (x0, y0, w), text, e in zip(placed, texts, experts, strict=True):
        color = colors.get(int(e), OTHER_COLOR)
        ink = _text_color(color)
        ax.add_patch(Rectangle((x0 - 0.3, -y0 - 0.45), w + 0.6, 0.9, facecolor=color, edgecolor="white", lw=0.5))
        ax.text(x0 + w / 2, -y0 + 0.12, text, ha="center", va="center", family="monospace", fontsize=fontsize,
                color=ink)
        ax.text(x0 + w / 2, -y0 - 0.3, str(int(e)), ha="center", va="center", fontsize=0.65 * fontsize, color=ink)
    ax.set_xlim(-0.5, width + 0.5)
    ax.set_ylim(-lines + 0.5, 0.5)
    ax.axis("off")
    used = sorted({int(e) for e in experts}, key=lambda e: (colors.get(e, OTHER_COLOR) == OTHER_COLOR, e))
    handles = [Patch(facecolor=colors[e], label=str(e)) for e in used if colors.get(e, OTHER_COLOR) != OTHER_COLOR]
    if any(colors.get(e, OTHER_COLOR) == OTHER_COLOR for e in used):
        handles.append(Patch(facecolor=OTHER_COLOR, label="other (id shown)"))
    fig.legend(handles=handles, title="first-choice expert", ncols=min(10, len(handles)), loc="lower center",
               fontsize=8, title_fontsize=8, frameon=False)
    fig.suptitle(f"First-choice expert per token, layer {layer} ({len(used)} of {num_experts} experts used)",
                 y=1 - 0.08 / fig_h, va="top", fontsize=11)
    return fig


def sink_heatmap(mass_LN: np.ndarray, *, sliding: np.ndarray | None = None, ax: Axes | None = None) -> Figure:
    """Layer x head heatmap of mean attention-sink mass (``metrics.sink_mass_by_head``)."""
    mass = np.asarray(mass_LN, np.float64)
    L, N = mass.shape
    fig, ax = _axes(ax, (max(5.0, 0.16 * N + 2.5), max(3.0, 0.28 * L + 1.5)))
    im = ax.imshow(mass, aspect="auto", cmap="viridis", interpolation="nearest", origin="lower", vmin=0,
                   vmax=max(float(np.nanmax(mass)), 1e-9))
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_yticks(range(L), _layer_labels(L, sliding), fontsize=8 if L > 12 else 10)
    ax.set_xticks(range(0, N, max(1, N // 16)))
    ax.set_title("Attention-sink mass (mean over queries)")
    fig.colorbar(im, ax=ax, label="probability taken by the sink")
    return fig


def logit_lens_grid(top_ids: np.ndarray, top_probs: np.ndarray, decode: Callable[[Sequence[int]], str], *,
                    tokens: Sequence[int] | None = None, sliding: np.ndarray | None = None,
                    max_chars: int = 7, ax: Axes | None = None) -> Figure:
    """Logit-lens grid: for each layer (rows) and position (columns), the top next token and its probability.

    Args:
      top_ids, top_probs: ``[L + 1, T]`` (or ``[L + 1, T, top]``, the first is shown), e.g. from
        ``metrics.logit_lens`` on one sequence; row 0 is the embeddings.
      decode: token ids -> text.
      tokens: ``[T]`` input tokens, shown under the columns.
      max_chars: token text is cut to this many characters.
    """
    ids, probs = np.asarray(top_ids), np.asarray(top_probs, np.float64)
    if ids.ndim == 3:
        ids, probs = ids[..., 0], probs[..., 0]
    n, T = ids.shape
    fig, ax = _axes(ax, (max(6.0, 0.75 * T + 2), max(3.0, 0.42 * n + 1.8)))
    im = ax.imshow(probs, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest", origin="lower")
    cmap = im.get_cmap()

    def short(t):
        s = decode([int(t)]).replace("\n", "\u21b5")
        return s if len(s) <= max_chars else s[:max_chars - 1] + "\u2026"

    for li in range(n):
        for t in range(T):
            ax.text(t, li, short(ids[li, t]), ha="center", va="center", fontsize=7, family="monospace",
                    color=_text_color(cmap(probs[li, t])))
    ax.set_yticks(range(n), _layer_labels(n, sliding, first_is_embedding=True), fontsize=8)
    ax.set_ylabel("residual after layer")
    if tokens is not None:
        ax.set_xticks(range(T), [short(t) for t in tokens], rotation=60, ha="right", fontsize=7, family="monospace")
        ax.set_xlabel("input token (prediction is for the next one)")
    else:
        ax.set_xlabel("position")
    ax.set_title("Logit lens: top next token per layer")
    fig.colorbar(im, ax=ax, label="probability of the top token")
    return fig


def entropy_plot(entropy_T: np.ndarray, *, tokens: Sequence[int] | None = None,
                 decode: Callable[[Sequence[int]], str] | None = None,
                 others: dict[str, np.ndarray] | None = None,
                 regions: Sequence[tuple[int, int, str]] = (), ax: Axes | None = None) -> Figure:
    """Next-token entropy along a trace (nats), optionally with other per-token curves.

    Args:
      entropy_T: ``[T]`` (e.g. ``trace.next_token_entropy``).
      tokens, decode: label the x axis with the tokens (when T <= 60).
      others: more ``[T]`` curves by name (e.g. mean routing entropy over layers).
      regions: ``(start, stop, label)`` spans to shade, e.g. the analysis and final channels.
    """
    y = np.asarray(entropy_T, np.float64)
    T = len(y)
    fig, ax = _axes(ax, (min(18.0, max(7.5, 0.18 * T + 4)), 3.5))
    shades = ("#DDDDDD", "#BBCCEE", "#CCEEFF", "#EEEEBB")  # Tol's pale colours
    for i, (start, stop, label) in enumerate(regions):
        ax.axvspan(start - 0.5, stop - 0.5, color=shades[i % len(shades)], alpha=0.7, lw=0, label=label)
    ax.plot(np.arange(T), y, color="#332288", marker="o", ms=3, lw=1.2, label="next-token entropy")
    styles = ("--", ":", "-.")
    for i, (name, curve) in enumerate((others or {}).items()):
        ax.plot(np.arange(T), np.asarray(curve), color=EXPERT_COLORS[(i + 3) % len(EXPERT_COLORS)],
                ls=styles[i % len(styles)], lw=1.2, label=name)
    ax.set_xlabel("position")
    ax.set_ylabel("entropy (nats)")
    ax.set_xlim(-0.5, T - 0.5)
    ax.set_ylim(bottom=0)
    if tokens is not None and decode is not None and T <= 60:
        ax.set_xticks(range(T), [decode([int(t)]).replace("\n", "\u21b5")[:8] for t in tokens], rotation=60,
                      ha="right", fontsize=7, family="monospace")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title("Entropy along the trace")
    return fig
