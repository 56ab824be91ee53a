"""Results: medians and within-run ratios, the JSON file and the one PNG chart."""

from __future__ import annotations

import importlib
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SCHEMA = 1
MODES: tuple[str, ...] = ("full-gzip", "lazy-esgz", "lazy-esgz-opt")
MODE_LABELS = {
    "full-gzip": "full pull (gzip)",
    "lazy-esgz": "lazy (eStargz)",
    "lazy-esgz-opt": "lazy (eStargz, optimized)",
}
# The two modes of `stargz-store optimize` (benchmarks/optimize_modes.py).
MODES += ("lazy-esgz-optimize", "lazy-esgz-attached")
MODE_LABELS.update(
    {
        "lazy-esgz-optimize": "lazy (optimized by `optimize`)",
        "lazy-esgz-attached": "lazy (eStargz + attached profile)",
    }
)
_TIMES = ("pull_s", "run_s", "total_s")
_MEDIANS = (*_TIMES, "bytes_down", "daemon_peak_rss_bytes")


def _rate(params: dict[str, Any]) -> str:
    mbit = params.get("mbit")
    if mbit is None:
        return "? Mbit/s"
    return "unlimited" if float(mbit) <= 0 else f"{float(mbit):g} Mbit/s"


def median_of(runs: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [float(r[key]) for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize_mode(runs: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    ok = [r for r in runs if not r.get("error")]
    return {key: median_of(ok, key) for key in _MEDIANS}


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def compute_ratios(coldstart: Sequence[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per image: every lazy mode against the full pull of the same run (medians)."""
    by_image: dict[str, dict[str, dict[str, float | None]]] = {}
    for entry in coldstart:
        by_image.setdefault(entry["image"], {})[entry["mode"]] = entry.get("median") or {}
    ratios: dict[str, dict[str, float | None]] = {}
    for image, modes in by_image.items():
        full = modes.get("full-gzip", {})
        out: dict[str, float | None] = {}
        for mode in MODES[1:]:
            lazy = modes.get(mode)
            if not lazy:
                continue
            for key in _TIMES:
                out[f"{mode}/{key}_vs_full"] = _ratio(lazy.get(key), full.get(key))
            out[f"{mode}/bytes_vs_full"] = _ratio(lazy.get("bytes_down"), full.get("bytes_down"))
        opt, plain = modes.get("lazy-esgz-opt"), modes.get("lazy-esgz")
        if opt and plain:
            out["lazy-esgz-opt/total_s_vs_lazy-esgz"] = _ratio(
                opt.get("total_s"), plain.get("total_s")
            )
        optimized, attached = modes.get("lazy-esgz-optimize"), modes.get("lazy-esgz-attached")
        if optimized and attached:
            out["lazy-esgz-attached/total_s_vs_lazy-esgz-optimize"] = _ratio(
                attached.get("total_s"), optimized.get("total_s")
            )
        ratios[image] = out
    return ratios


def compute_floors(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Per image, the floor of a lazy cold start: the bytes the workload opens at the link's
    effective rate, plus the full pull's create+run (the container's own start); and every
    mode's median total against it."""
    link = results.get("link") or {}
    mbit = link.get("effective_mbit")
    floors: dict[str, dict[str, float | None]] = {}
    for image, info in (results.get("images") or {}).items():
        opened = info.get("opened_bytes")
        entries = {e["mode"]: e.get("median") or {} for e in results.get("coldstart", [])
                   if e["image"] == image}  # fmt: skip
        run = (entries.get("full-gzip") or {}).get("run_s")
        if not opened or not mbit or run is None:
            continue
        floor = opened * 8 / (float(mbit) * 1e6) + float(run)
        out: dict[str, float | None] = {"floor_s": floor}
        for mode, med in entries.items():
            out[f"{mode}/total_s_vs_floor"] = _ratio(med.get("total_s"), floor)
        floors[image] = out
    return floors


def finalize(results: dict[str, Any]) -> dict[str, Any]:
    """Fill in medians and ratios (idempotent)."""
    for entry in results.get("coldstart", []):
        entry["median"] = summarize_mode(entry.get("runs", []))
    results["ratios"] = compute_ratios(results.get("coldstart", []))
    results["floors"] = compute_floors(results)
    results.setdefault("schema", SCHEMA)
    return results


def write_json(results: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def write_chart(results: dict[str, Any], path: Path) -> Path:
    """Stacked bars (pull, create+run) of the median cold start per image (one panel each, own
    scale) and mode, labelled with the median total and the ratio to the full pull."""
    # Imported by name: matplotlib's sources need Python >= 3.10 to parse, mypy targets 3.9.
    matplotlib: Any = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")

    entries = [e for e in results.get("coldstart", []) if (e.get("median") or {}).get("total_s")]
    images = list(dict.fromkeys(e["image"] for e in entries)) or ["(no results)"]
    fig, axes = plt.subplots(
        1, len(images), figsize=(max(6.0, 3.8 * len(images) + 1), 5.0), squeeze=False
    )
    for ax, image in zip(axes[0], images):
        mine = [e for e in entries if e["image"] == image]
        xs = list(range(len(mine)))
        pulls = [float(e["median"]["pull_s"] or 0.0) for e in mine]
        runs = [float(e["median"]["run_s"] or 0.0) for e in mine]
        ax.bar(xs, pulls, label="pull", color="#4878a8")
        ax.bar(xs, runs, bottom=pulls, label="create + run", color="#e0904a")
        ratios = results.get("ratios", {}).get(image, {})
        for x, e, p, r in zip(xs, mine, pulls, runs):
            text = f"{float(e['median']['total_s']):.1f} s"
            ratio = ratios.get(f"{e['mode']}/total_s_vs_full")
            if ratio is not None:
                text += f"\n{ratio:.2f}x full"
            ax.text(x, p + r, text, ha="center", va="bottom", fontsize=8)
        ax.set_title(image)
        ax.set_xticks(xs)
        ax.set_xticklabels(
            [MODE_LABELS.get(e["mode"], e["mode"]).replace(" (", "\n(") for e in mine],
            fontsize=8,
        )
        if mine:
            ax.set_ylim(0, max(p + r for p, r in zip(pulls, runs)) * 1.25)
        ax.set_ylabel("seconds (median)")
    axes[0][0].legend(loc="upper right")
    params = results.get("params", {})
    link = results.get("link")
    eff = f", {link['effective_mbit']:.0f} effective" if link else ""
    fig.suptitle(
        f"Cold start: pull + create/run, median of {params.get('runs', '?')} runs "
        f"(RTT {params.get('rtt_ms', '?')} ms, {_rate(params)}{eff})"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_results(results: dict[str, Any], out_dir: Path, stamp: str) -> tuple[Path, Path | None]:
    """Write ``<stamp>.json`` and ``<stamp>.png`` (no chart without matplotlib)."""
    finalize(results)
    png: Path | None = out_dir / f"{stamp}.png"
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        png = None
        results["chart_error"] = "matplotlib is not installed: .venv/bin/pip install matplotlib"
    results["chart"] = str(png) if png else None
    js = write_json(results, out_dir / f"{stamp}.json")
    if png is not None:
        write_chart(results, png)
    return js, png


def _fmt(value: Any, unit: str = "", scale: float = 1.0, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{float(value) / scale:.{digits}f}{unit}"


def summary_text(results: dict[str, Any]) -> str:
    """A human-readable table of the medians, the ratios and the filesystem figures."""
    lines = []
    link = results.get("link")
    if link:
        lines.append(
            f"link: first byte {link['first_byte_s'] * 1000:.0f} ms, "
            f"{link['effective_mbit']:.0f} Mbit/s effective "
            f"(nominal {_rate(results.get('params', {}))})"
        )
    lines.append("image   mode                 pull s   run s   total s   MB down   vs full")
    for e in results.get("coldstart", []):
        m = e.get("median") or {}
        ratio = (results.get("ratios", {}).get(e["image"], {})).get(f"{e['mode']}/total_s_vs_full")
        err = f"  ERROR: {e['error']}" if e.get("error") else ""
        lines.append(
            f"{e['image']:<7} {e['mode']:<18} {_fmt(m.get('pull_s')):>8} {_fmt(m.get('run_s')):>7}"
            f" {_fmt(m.get('total_s')):>9} {_fmt(m.get('bytes_down'), '', 1e6, 1):>9}"
            f" {_fmt(ratio, 'x'):>9}{err}"
        )
    floors = results.get("floors") or {}
    if floors:
        lines.append("")
        for image, f in floors.items():
            vs = ", ".join(
                f"{k.split('/')[0]} {v:.2f}x"
                for k, v in f.items()
                if k.endswith("_vs_floor") and v is not None
            )
            lines.append(f"floor {image}: {_fmt(f.get('floor_s'))} s (opened bytes at the "
                         f"effective rate + full pull's run); total vs floor: {vs}")  # fmt: skip
    fs = results.get("fs")
    if fs:
        lines.append("")
        if fs.get("error"):
            lines.append(f"filesystem figures: ERROR: {fs['error']}")
        else:
            lines.append(
                f"filesystem ({fs.get('image')}, layer {fs.get('layer_mb', 0):.0f} MB compressed, "
                f"{fs.get('entries')} entries): resolve {_fmt(fs.get('resolve_s'), ' s', 1, 3)}, "
                f"walk {_fmt(fs.get('walk_s'), ' s')}, "
                f"cold {_fmt(fs.get('cold_MBps'), ' MB/s', 1, 1)}, "
                f"cached {_fmt(fs.get('cached_MBps'), ' MB/s', 1, 1)}, hot "
                f"{_fmt(fs.get('hot_MBps'), ' MB/s', 1, 1)}, peak RSS "
                f"{_fmt(fs.get('daemon_peak_rss_bytes'), ' MB', 1e6, 0)}, fetched "
                f"{_fmt(fs.get('bytes_fetched'), ' MB', 1e6, 1)} "
                f"({_fmt(fs.get('fetched_vs_layer'), '', 0.01, 1)}% of the layer)"
            )
    return "\n".join(lines)
