"""Pictures of a quantized mode checkpoint: expert bit widths, expert selection frequencies, bytes per module type.

Everything here reads files only: `config.json`'s `quantization_config` (the `bit_map` and `summary` written at
quantization time) and the JSON headers of the safetensors files (tensor sizes without loading a tensor). The
plots draw on `matplotlib.figure.Figure` objects directly (Agg canvas, no pyplot state) and return the figure, so a
caller or a test can inspect what was drawn.

    from mode_hf.hf.report import write_report
    paths = write_report("path/to/checkpoint")  # report/bits_heatmap.png, report/frequency.png, report/bytes.png
"""

from __future__ import annotations

import itertools
import json
import math
import re
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CheckpointError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 120
MAX_TICKS = 16  # tick labels per heatmap axis at most
ANNOTATE_MAX_CELLS = 256  # write the width into each cell of bit maps up to this size (16 x 16)
MB = 1e6
FREQUENCY_RANGE = 1000.0  # the log colour scale spans 3 decades below the largest frequency
# One fixed colour per width, so that pictures of different checkpoints compare at a glance.
BIT_COLORS = {2: "#d73027", 3: "#fc8d59", 4: "#91bfdb", 8: "#4575b4"}
OTHER_BIT_COLORS = ("#762a83", "#1b7837", "#8c510a", "#01665e")  # widths outside 2/3/4/8, in ascending order
MISSING_COLOR = "#d9d9d9"  # cells of a set with fewer experts than the widest set; never-selected experts
LAYER_PATTERN = re.compile(r"layers\.(\d+)\.")

# Module types of `bytes_by_module_type`, in the order they are reported. The first rule whose substrings occur in a
# tensor name wins; routed experts (names under a `bit_map` set) are matched before any rule, and "routers" never
# takes a name under "experts." (an unquantized expert set's own gate).
ROUTED_EXPERTS = "routed experts"
TYPE_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("vision tower", ("visual", "vision_tower", "vision_model")),
    ("embeddings", ("embed_tokens", "wte")),
    ("lm head", ("lm_head",)),
    ("attention", ("self_attn", "attn")),
    ("routers", ("gate.weight", "router")),
    ("shared experts / dense MLP", (".mlp.",)),
)
OTHER = "norms and other"
MODULE_TYPES = (ROUTED_EXPERTS, *(name for name, _ in TYPE_RULES), OTHER)


def load_report_data(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The `quantization_config` of a mode checkpoint's `config.json`.

    Args:
        checkpoint_dir: a directory written by `save_pretrained` of a mode-quantized model.

    Returns:
        The `quantization_config` dict; it holds `bit_map` ({expert-set name: [width per expert]}) and usually
        `summary`.

    Raises:
        CheckpointError: `config.json` is missing, or has no `quantization_config` with a `bit_map`.
    """
    config_path = Path(checkpoint_dir) / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} does not exist: not a saved checkpoint directory.")
    options = json.loads(config_path.read_text(encoding="utf-8")).get("quantization_config") or {}
    if not options.get("bit_map"):
        raise CheckpointError(
            f"{config_path} has no quantization_config.bit_map: not a mode checkpoint (quantize with mode_hf first)."
        )
    return options


def expert_set_rows(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """Expert-set names in decoder-layer order, and a compact label for each.

    Sets are sorted by the layer index parsed from `layers.<i>.` (numerically: layer 2 before layer 10), then by
    name; names without a layer index come last. A layer with one set is labelled "L<i>", a layer with several
    "L<i> <last name component>" (e.g. "L0 text_experts"); full names are used when labels would still collide.

    Returns:
        (names in row order, labels in row order).
    """
    def layer(name: str) -> int | None:
        match = LAYER_PATTERN.search(name)
        return int(match.group(1)) if match else None

    def label(name: str) -> str:
        if layer(name) is None:
            return name
        shared = sum(layer(other) == layer(name) for other in names) > 1
        return f"L{layer(name)} {name.rsplit('.', 1)[-1]}" if shared else f"L{layer(name)}"

    ordered = sorted(names, key=lambda n: (layer(n) is None, layer(n) or 0, n))
    labels = [label(name) for name in ordered]
    return ordered, labels if len(set(labels)) == len(labels) else list(ordered)


def _safetensors_files(checkpoint_dir: Path) -> list[Path]:
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        return [checkpoint_dir / shard for shard in sorted(shards)]
    return sorted(checkpoint_dir.glob("model*.safetensors"))


def _tensor_sizes(path: Path) -> dict[str, int]:
    """{tensor name: bytes} from a safetensors header: 8-byte little-endian length, then JSON; no tensor is read."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return {name: entry["data_offsets"][1] - entry["data_offsets"][0] for name, entry in header.items()}


def module_type(name: str, expert_sets: Sequence[str]) -> str:
    """The module type (one of MODULE_TYPES) of the tensor called `name`, given the checkpoint's expert-set names."""
    if name.startswith(tuple(f"{s}." for s in expert_sets)):
        return ROUTED_EXPERTS
    for type_name, substrings in TYPE_RULES:
        if any(s in name for s in substrings) and not (type_name == "routers" and "experts." in name):
            return type_name
    return OTHER


def bytes_by_module_type(checkpoint_dir: str | Path, bit_map: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Bytes stored per module type, summed over every tensor of the checkpoint's safetensors files.

    Only the files' JSON headers are read (size = end - start of each tensor's `data_offsets`). Shards are found
    through `model.safetensors.index.json` when present, else as `model*.safetensors`.

    Returns:
        {module type: bytes} with every entry of MODULE_TYPES, in that order (0 for types the model lacks).

    Raises:
        CheckpointError: the directory holds no safetensors files.
    """
    files = _safetensors_files(Path(checkpoint_dir))
    if not files:
        raise CheckpointError(f"no model*.safetensors files in {checkpoint_dir}.")
    expert_sets, totals = list(bit_map), dict.fromkeys(MODULE_TYPES, 0)
    for path in files:
        for name, size in _tensor_sizes(path).items():
            totals[module_type(name, expert_sets)] += size
    return totals


def _row_matrix(rows: Sequence[Sequence[float]]) -> np.ndarray:
    """Rows of unequal length as a float matrix [R, max length], NaN-padded."""
    matrix = np.full((len(rows), max((len(r) for r in rows), default=0)), np.nan)
    for i, row in enumerate(rows):
        matrix[i, : len(row)] = row
    return matrix


def _thinned_ticks(count: int) -> np.ndarray:
    """At most MAX_TICKS evenly stepped positions in range(count)."""
    return np.arange(0, count, max(1, math.ceil(count / MAX_TICKS)))


def _figure(rows: int, cols: int, panels: int = 1, extra_width: float = 2.5) -> Figure:
    """A constrained-layout figure sized to the heatmap: big cells for small maps, at most ~1900 x 1300 px."""
    from matplotlib.figure import Figure

    panel_width = min(max(cols * 0.55, 3.5), 13.0 / panels)
    height = min(max(rows * 0.3, 2.0), 9.0) + 1.5
    return Figure(figsize=(panels * panel_width + extra_width, height), dpi=DPI, layout="constrained")


def _draw_heatmap(ax: Any, matrix: np.ndarray, labels: Sequence[str], cmap: Any, norm: Any) -> Any:
    """imshow of `matrix` [R, E] (NaN drawn grey) with row labels and thinned ticks; returns the AxesImage."""
    cmap = cmap.with_extremes(bad=MISSING_COLOR)
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    rows, cols = matrix.shape
    ax.set_yticks(_thinned_ticks(rows), [labels[i] for i in _thinned_ticks(rows)])
    ax.set_xticks(_thinned_ticks(cols))
    ax.set_xlabel("expert")
    return image


def _bit_colors(widths: Sequence[int]) -> dict[int, str]:
    others = iter(OTHER_BIT_COLORS * len(widths))
    return {w: BIT_COLORS.get(w) or next(others) for w in sorted(widths)}


def _annotate_cells(ax: Any, matrix: np.ndarray, colors: Mapping[int, str]) -> None:
    """Write each cell's width, in black or white, whichever reads better on the cell's colour."""
    from matplotlib.colors import to_rgb

    for (row, col), value in np.ndenumerate(matrix):
        if not np.isnan(value):
            text_color = "black" if np.dot(to_rgb(colors[int(value)]), (0.299, 0.587, 0.114)) > 0.5 else "white"
            ax.text(col, row, int(value), ha="center", va="center", fontsize=9, color=text_color)


def plot_bits_heatmap(
    bit_map: Mapping[str, Sequence[int]], path: str | Path, average_bits: float | None = None
) -> Figure:
    """Heatmap of expert bit widths: one row per expert set (decoder-layer order), one column per expert.

    Each width present gets one colour (fixed per width: 2 red ... 8 blue) and a legend entry; maps of at most
    ANNOTATE_MAX_CELLS cells also carry the width as text in each cell. Sets with fewer experts than the widest set
    leave grey cells.

    Args:
        bit_map: {expert-set name: [width per expert]}.
        path: the PNG to write.
        average_bits: shown in the title when given.

    Returns:
        The figure; `fig.axes[0].images[0].get_array()` is the drawn [sets, experts] width matrix (masked padding).
    """
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    names, labels = expert_set_rows(list(bit_map))
    matrix = _row_matrix([bit_map[n] for n in names])  # [R, E]
    colors = _bit_colors(sorted({int(b) for widths in bit_map.values() for b in widths}))
    widths = list(colors)
    bounds = [widths[0] - 0.5, *((a + b) / 2 for a, b in itertools.pairwise(widths)), widths[-1] + 0.5]
    fig = _figure(*matrix.shape)
    ax = fig.add_subplot()
    cmap, norm = ListedColormap(list(colors.values())), BoundaryNorm(bounds, len(widths))
    _draw_heatmap(ax, matrix, labels, cmap=cmap, norm=norm)
    if matrix.size <= ANNOTATE_MAX_CELLS:
        _annotate_cells(ax, matrix, colors)
    handles = [Patch(facecolor=c, edgecolor="black", label=str(w)) for w, c in colors.items()]
    ax.legend(handles=handles, title="bits", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title("Expert bit widths" + (f" (average {average_bits:.2f} bits)" if average_bits is not None else ""))
    fig.savefig(path)
    return fig


def plot_frequency(
    frequency: Mapping[str, Mapping[str, Sequence[float]]] | None, keep_ratio: float | None, path: str | Path
) -> Figure | None:
    """Text and vision expert-selection frequencies side by side, rows as in `plot_bits_heatmap`.

    Both panels share one logarithmic colour scale (3 decades below the largest frequency), so the modalities
    compare directly; experts never selected (frequency 0) are grey. The vision panel's title carries the
    redundancy filter's keep ratio.

    Args:
        frequency: {expert-set name: {"text": [share of text tokens routed to each expert], "vision": [...]}}, as in
            the checkpoint summary; None or empty for method "uniform".
        keep_ratio: fraction of vision tokens the redundancy filter kept, or None.
        path: the PNG to write.

    Returns:
        The figure (axes 0: text, 1: vision, 2: colorbar), or None (nothing written) when `frequency` is empty.
    """
    if not frequency:
        return None
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    names, labels = expert_set_rows(list(frequency))
    panels = {g: _row_matrix([frequency[n].get(g) or [] for n in names]) for g in ("text", "vision")}  # [R, E] each
    positive = np.concatenate([m[m > 0] for m in panels.values()])
    top = float(positive.max()) if positive.size else 1.0
    bottom = min(max(float(positive.min()) if positive.size else 0.0, top / FREQUENCY_RANGE), top / 10)
    norm = LogNorm(vmin=bottom, vmax=top)  # smaller frequencies take the lowest colour
    fig = _figure(len(names), max(m.shape[1] for m in panels.values()), panels=2)
    axes = fig.subplots(1, 2, sharey=True)
    kept = "n/a" if keep_ratio is None else f"{100 * keep_ratio:.1f}%"
    titles = {"text": "Text tokens", "vision": f"Vision tokens (vision tokens kept: {kept})"}
    for ax, (group, matrix) in zip(axes, panels.items()):
        matrix = np.where(matrix > 0, matrix, np.nan)  # log scale: zeros drawn grey
        image = _draw_heatmap(ax, matrix, labels, cmap=colormaps["viridis"], norm=norm)
        ax.set_title(titles[group])
    fig.colorbar(image, ax=axes, label="selection frequency\n(grey: never selected)", shrink=0.9, extend="min")
    fig.suptitle("Expert selection frequency by modality")
    fig.savefig(path)
    return fig


def _bar_panel(ax: Any, sizes: Mapping[str, int], color: str) -> None:
    """Horizontal bars of `sizes` (bytes), first entry on top, each labelled with its MB."""
    labels, values = list(sizes), np.array(list(sizes.values()), dtype=float) / MB
    bars = ax.barh(labels, values, color=color)
    ax.bar_label(bars, labels=[f"{v:,.0f} MB" if v >= 100 else f"{v:.3g} MB" for v in values], padding=3)
    ax.invert_yaxis()
    ax.set_xlim(0, max(values.max(initial=0.0), 1e-9) * 1.25)  # room for the labels
    ax.set_xlabel("MB")


def plot_bytes(by_type: Mapping[str, int], path: str | Path, expert_bytes: Mapping[str, int] | None = None) -> Figure:
    """Bar chart of checkpoint bytes per module type (types with 0 bytes left out).

    Args:
        by_type: {module type: bytes}, as from `bytes_by_module_type`.
        path: the PNG to write.
        expert_bytes: the summary's {"bf16": int, "packed": int}; when given, a second panel compares the routed
            experts at 16 bits with their packed size.

    Returns:
        The figure; axes 0 holds the per-type bars, axes 1 (when `expert_bytes` is given) the comparison.
    """
    from matplotlib.figure import Figure

    present = {name: size for name, size in by_type.items() if size > 0}
    heights = [max(len(present), 1), 2] if expert_bytes else [max(len(present), 1)]
    fig = Figure(figsize=(9.0, 1.2 + 0.45 * sum(heights)), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(heights), 1, gridspec_kw={"height_ratios": heights}, squeeze=False)[:, 0]
    _bar_panel(axes[0], present, "#4575b4")
    axes[0].set_title(f"Checkpoint bytes by module type (total {sum(present.values()) / MB:,.4g} MB)")
    if expert_bytes:
        pair = {"routed experts, 16-bit": expert_bytes["bf16"], "routed experts, packed": expert_bytes["packed"]}
        _bar_panel(axes[1], pair, "#fc8d59")
        share = expert_bytes["packed"] / max(expert_bytes["bf16"], 1)
        axes[1].set_title(f"Routed experts: packed is {share:.1%} of 16-bit")
    fig.savefig(path)
    return fig


def write_report(checkpoint_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the report pictures of a mode checkpoint.

    Writes `bits_heatmap.png`, `frequency.png` (only when the summary has frequencies, i.e. not method "uniform")
    and `bytes.png`.

    Args:
        checkpoint_dir: the saved checkpoint.
        out_dir: where to write; default `<checkpoint_dir>/report` (created if missing).

    Returns:
        The written paths, in the order above.

    Raises:
        CheckpointError: not a mode checkpoint, or no safetensors files.
    """
    options = load_report_data(checkpoint_dir)
    summary = options.get("summary") or {}
    out = Path(out_dir) if out_dir is not None else Path(checkpoint_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "bits_heatmap.png"]
    plot_bits_heatmap(options["bit_map"], written[0], summary.get("average_bits"))
    if plot_frequency(summary.get("frequency"), summary.get("keep_ratio"), out / "frequency.png") is not None:
        written.append(out / "frequency.png")
    by_type = bytes_by_module_type(checkpoint_dir, options["bit_map"])
    written.append(out / "bytes.png")
    plot_bytes(by_type, written[-1], summary.get("expert_bytes"))
    return written
