"""Results: medians and within-run ratios, the JSON file and the one PNG chart."""

from __future__ import annotations

import importlib
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SCHEMA = 1
# A mode is "<store>-<variant>": the store serving the layers (full = none: podman pulls them;
# lazy = ours; go = the Go reference store, go-stargz-store) and the image variant in the
# registry (gzip; esgz / esgz-opt written by our converter, without / with the workload's
# prioritized files; esgz-go / esgz-go-opt written by the Go library's writer; esgz-optimize
# written by `stargz-store optimize` from the store's own record of the workload; esgz-attached:
# the esgz image unchanged, in a repository of its own, with a profile attached by
# `stargz-store optimize --attach`, which only our store follows: no Go mode of it).
MODES = (
    "full-gzip",
    "lazy-esgz",
    "lazy-esgz-opt",
    "go-esgz",
    "go-esgz-opt",
    "lazy-esgz-go",
    "go-esgz-go",
    "lazy-esgz-optimize",
    "go-esgz-optimize",
    "lazy-esgz-attached",
    "lazy-esgz-go-opt",
    "go-esgz-go-opt",
)
DEFAULT_MODES = MODES[:10]
STORES = {"full": None, "lazy": "ours", "go": "go"}
VARIANTS = ("gzip", "esgz", "esgz-opt", "esgz-go", "esgz-go-opt", "esgz-optimize", "esgz-attached")
_VARIANT_LABELS = {
    "gzip": "gzip",
    "esgz": "eStargz",
    "esgz-opt": "eStargz, optimized",
    "esgz-go": "Go-written eStargz",
    "esgz-go-opt": "Go-written eStargz, optimized",
    "esgz-optimize": "eStargz by optimize",
    "esgz-attached": "eStargz + attached profile",
}
_STORE_LABELS = {"full": "full pull", "lazy": "lazy, ours", "go": "Go store"}
MODE_LABELS = {
    m: f"{_STORE_LABELS[m.split('-', 1)[0]]} ({_VARIANT_LABELS[m.split('-', 1)[1]]})" for m in MODES
}
_TIMES = ("pull_s", "run_s", "total_s")
_MEDIANS = (*_TIMES, "bytes_down", "daemon_peak_rss_bytes")
# Filesystem figures compared ours/Go: for times and RSS lower is better, for rates higher.
_FS_RATIO_KEYS = {
    "resolve_s": "resolve",
    "walk_s": "walk",
    "cold_MBps": "cold MB/s",
    "cached_MBps": "cached MB/s",
    "hot_MBps": "hot MB/s",
    "daemon_peak_rss_bytes": "peak RSS",
    "daemon_idle_rss_bytes": "idle RSS",
    "bytes_fetched": "fetched",
}


def mode_parts(mode: str) -> tuple[str | None, str]:
    """(store: None | "ours" | "go", variant) of a mode name; ValueError for an unknown one."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode}; known: {', '.join(MODES)}")
    store, variant = mode.split("-", 1)
    return STORES[store], variant


def go_counterpart(mode: str) -> str | None:
    """The Go store's mode on the same image variant as our lazy *mode* (None otherwise, and
    for a variant the Go store has no mode of, like esgz-attached)."""
    store, variant = mode.split("-", 1)
    go_mode = f"go-{variant}"
    return go_mode if store == "lazy" and go_mode in MODES else None


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
    """Per image: every lazy mode against the full pull of the same run, and our store
    against the Go store on the same image variant (``lazy-X/<key>_vs_go-X``), medians."""
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
        for mode in MODES:
            go_mode = go_counterpart(mode)
            ours, go = modes.get(mode), modes.get(go_mode or "")
            if not ours or not go:
                continue
            for key in _TIMES:
                out[f"{mode}/{key}_vs_{go_mode}"] = _ratio(ours.get(key), go.get(key))
            out[f"{mode}/bytes_vs_{go_mode}"] = _ratio(ours.get("bytes_down"), go.get("bytes_down"))
            out[f"{mode}/rss_vs_{go_mode}"] = _ratio(
                ours.get("daemon_peak_rss_bytes"), go.get("daemon_peak_rss_bytes")
            )
        ratios[image] = out
    return ratios


def fs_ratios(ours: dict[str, Any] | None, go: dict[str, Any] | None) -> dict[str, float | None]:
    """Filesystem figures, ours / Go (same layer, same link)."""
    if not ours or not go or ours.get("error") or go.get("error"):
        return {}
    return {f"{k}_ours_vs_go": _ratio(ours.get(k), go.get(k)) for k in _FS_RATIO_KEYS}


def compute_floors(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Per image, the floor of a lazy cold start: the bytes the workload opens at the link's
    effective rate, plus the full pull's create+run (the container's own start, its files on
    local disk); and every mode's median total against it. No floor without the full pull's
    run, the link check or the recorded opened bytes."""
    link = results.get("link") or {}
    mbit = link.get("effective_mbit")
    floors: dict[str, dict[str, float | None]] = {}
    for image, info in (results.get("images") or {}).items():
        opened = (info or {}).get("opened_bytes")
        entries = {
            e["mode"]: e.get("median") or {}
            for e in results.get("coldstart", [])
            if e["image"] == image
        }
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
    """Fill in medians, ratios and floors (idempotent)."""
    for entry in results.get("coldstart", []):
        entry["median"] = summarize_mode(entry.get("runs", []))
    results["ratios"] = compute_ratios(results.get("coldstart", []))
    results["floors"] = compute_floors(results)
    if results.get("fs_go"):
        results["ratios"]["fs"] = fs_ratios(results.get("fs"), results.get("fs_go"))
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
    per_image = max(3, max((sum(e["image"] == i for e in entries) for i in images), default=3))
    fig, axes = plt.subplots(
        1,
        len(images),
        figsize=(max(6.0, (0.75 * per_image + 1.6) * len(images) + 1), 5.5),
        squeeze=False,
    )
    for ax, image in zip(axes[0], images):
        mine = [e for e in entries if e["image"] == image]
        xs = list(range(len(mine)))
        pulls = [float(e["median"]["pull_s"] or 0.0) for e in mine]
        runs = [float(e["median"]["run_s"] or 0.0) for e in mine]
        bottom = ax.bar(xs, pulls, label="pull", color="#4878a8", edgecolor="white")
        top = ax.bar(
            xs, runs, bottom=pulls, label="create + run", color="#e0904a", edgecolor="white"
        )
        # the Go store's bars hatched, so that the contenders stand apart at a glance
        for e, b1, b2 in zip(mine, bottom, top):
            if e["mode"].startswith("go-"):
                b1.set_hatch("//")
                b2.set_hatch("//")
        ratios = results.get("ratios", {}).get(image, {})
        for x, e, p, r in zip(xs, mine, pulls, runs):
            text = f"{float(e['median']['total_s']):.1f} s"
            ratio = ratios.get(f"{e['mode']}/total_s_vs_full")
            if ratio is not None:
                text += f"\n{ratio:.2f}x full"
            go_mode = go_counterpart(e["mode"])
            vs_go = ratios.get(f"{e['mode']}/total_s_vs_{go_mode}") if go_mode else None
            if vs_go is not None:
                text += f"\n{vs_go:.2f}x Go"
            ax.text(x, p + r, text, ha="center", va="bottom", fontsize=7)
        ax.set_title(image)
        ax.set_xticks(xs)
        ax.set_xticklabels(
            [MODE_LABELS.get(e["mode"], e["mode"]).replace(" (", "\n(") for e in mine],
            fontsize=7,
            rotation=90 if len(mine) > 3 else 0,
        )
        if mine:
            ax.set_ylim(0, max(p + r for p, r in zip(pulls, runs)) * 1.35)
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
    lines.append(
        "image   mode                 pull s   run s   total s   MB down   RSS MB   vs full   vs Go"
    )
    for e in results.get("coldstart", []):
        m = e.get("median") or {}
        ratios = results.get("ratios", {}).get(e["image"], {})
        ratio = ratios.get(f"{e['mode']}/total_s_vs_full")
        go_mode = go_counterpart(e["mode"])
        vs_go = ratios.get(f"{e['mode']}/total_s_vs_{go_mode}") if go_mode else None
        err = f"  ERROR: {e['error']}" if e.get("error") else ""
        lines.append(
            f"{e['image']:<7} {e['mode']:<18} {_fmt(m.get('pull_s')):>8} {_fmt(m.get('run_s')):>7}"
            f" {_fmt(m.get('total_s')):>9} {_fmt(m.get('bytes_down'), '', 1e6, 1):>9}"
            f" {_fmt(m.get('daemon_peak_rss_bytes'), '', 1e6, 0):>8}"
            f" {_fmt(ratio, 'x'):>9} {_fmt(vs_go, 'x'):>7}{err}"
        )
    lines.append("(vs Go: our store's median total over the Go store's, same image variant)")
    attached = {
        image: r.get("lazy-esgz-attached/total_s_vs_lazy-esgz-optimize")
        for image, r in (results.get("ratios") or {}).items()
        if image != "fs"
    }
    for image, ratio in attached.items():
        if ratio is not None:
            lines.append(
                f"attached profile vs optimized image ({image}): {ratio:.2f}x "
                "(lazy-esgz-attached total over lazy-esgz-optimize)"
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
        lines.append(
            f"floor {image}: {_fmt(f.get('floor_s'))} s (opened bytes at the effective rate + "
            f"the full pull's create+run); total vs floor: {vs or '-'}"
        )
    for key, who in (("fs", "ours"), ("fs_go", "Go store")):
        fs = results.get(key)
        if not fs:
            continue
        lines.append("")
        if fs.get("error"):
            lines.append(f"filesystem figures ({who}): ERROR: {fs['error']}")
        else:
            lines.append(
                f"filesystem, {who} ({fs.get('image')}, layer {fs.get('layer_mb', 0):.0f} MB "
                f"compressed, {fs.get('entries')} entries): resolve "
                f"{_fmt(fs.get('resolve_s'), ' s', 1, 3)}, "
                f"walk {_fmt(fs.get('walk_s'), ' s')}, "
                f"cold {_fmt(fs.get('cold_MBps'), ' MB/s', 1, 1)}, "
                f"cached {_fmt(fs.get('cached_MBps'), ' MB/s', 1, 1)}, hot "
                f"{_fmt(fs.get('hot_MBps'), ' MB/s', 1, 1)}, peak RSS "
                f"{_fmt(fs.get('daemon_peak_rss_bytes'), ' MB', 1e6, 0)}, idle RSS "
                f"{_fmt(fs.get('daemon_idle_rss_bytes'), ' MB', 1e6, 0)}, fetched "
                f"{_fmt(fs.get('bytes_fetched'), ' MB', 1e6, 1)} "
                f"({_fmt(fs.get('fetched_vs_layer'), '', 0.01, 1)}% of the layer)"
            )
    fsr = results.get("ratios", {}).get("fs")
    if fsr:
        lines.append(
            "filesystem, ours/Go: "
            + ", ".join(
                f"{_FS_RATIO_KEYS.get(k.replace('_ours_vs_go', ''), k)} {_fmt(v, 'x')}"
                for k, v in fsr.items()
            )
        )
    return "\n".join(lines)
