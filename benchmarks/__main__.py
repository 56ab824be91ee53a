"""``python -m benchmarks`` (``./run bench``): cold starts of full pulls against lazy pulls
through stargz-store and through the Go reference store, behind an emulated WAN link, plus
filesystem figures. See README.md."""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import optimize_modes, report
from benchmarks.coldstart import Target, cold_run, fs_figures
from benchmarks.env import (
    EnvError,
    ProxyThread,
    Registry,
    manifest_layers,
    measure_link,
    skopeo_push,
)
from benchmarks.images import (
    DEFAULT_CACHE,
    RECIPES,
    BuiltImage,
    image_dir,
    read_oci_image,
)
from testbed.gopeer import GoPeerError, GoPeerUnavailable, ensure_built, go_convert_image

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
# Sources whose changes invalidate converted images in the cache.
_CONVERTER_SOURCES = (
    "stargz_store/convert_cmd.py",
    "layerstore/image/convert.py",
    "layerstore/estargz/writer.py",
    "layerstore/estargz/toc.py",
    "layerstore/estargz/tocbuild.py",
    "layerstore/estargz/tarfmt.py",
    "layerstore/estargz/constants.py",
    "layerstore/estargz/footer.py",
    "layerstore/image/ocilayout.py",
    "layerstore/registry/manifest.py",
    "layerstore/common/atomicfile.py",
    "layerstore/digest.py",
)
DEFAULT_IMAGES = "python,large,pandas"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def converter_key() -> str:
    h = hashlib.sha256()
    for rel in _CONVERTER_SOURCES:
        p = REPO / rel
        if p.exists():
            h.update(rel.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:12]


def build_images(names: list[str], cache: Path) -> dict[str, BuiltImage]:
    """Build what the cache lacks, niced, in a child process; then load the metadata."""
    missing = [n for n in names if not (image_dir(cache, n) / "image.json").exists()]
    if missing:
        log(f"building images {', '.join(missing)} (cached under {cache}; first time only)")
        cmd = ["nice", "-n", "19", sys.executable, "-m", "benchmarks.images", "build", *missing]
        subprocess.run([*cmd, "--cache", str(cache)], check=True, cwd=REPO)
    return {
        n: BuiltImage.from_json(json.loads((image_dir(cache, n) / "image.json").read_text()))
        for n in names
    }


def convert_image(img: BuiltImage, cache: Path, optimized: bool, key: str) -> str:
    """The eStargz OCI layout of *img* (cached per converter version *key*, computed once per
    benchmark run); conversions of other converter versions are removed. Raises EnvError."""
    variant = "esgz-opt" if optimized else "esgz"
    top = image_dir(cache, img.name)
    dst = top / f"conv-{key}" / variant
    for old in top.glob("conv-*"):
        if old.name != f"conv-{key}":
            shutil.rmtree(old, ignore_errors=True)
    if (dst / ".done").exists():
        return str(dst)
    if dst.exists():
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["nice", "-n", "19", sys.executable, "-m", "stargz_store", "convert"]
    if optimized:
        cmd += ["--prioritized-files", str(image_dir(cache, img.name) / "prioritized-files.txt")]
    cmd += [f"oci:{img.layout}:{img.tag}", f"oci:{dst}:{img.tag}"]
    log(f"converting {img.name} to {variant}")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        shutil.rmtree(dst, ignore_errors=True)
        raise EnvError(f"stargz-store convert failed ({proc.returncode}): {proc.stderr[-1000:]}")
    (dst / ".done").write_text(f"{time.monotonic() - t0:.1f}\n")
    return str(dst)


def go_writer_key() -> str:
    """The Go peers' build stamp (sources, toolchain, library version): the cache key of the
    images the Go writer re-wrote. Raises EnvError when the Go peers cannot be built."""
    try:
        bin_dir = ensure_built()
    except (GoPeerUnavailable, GoPeerError) as exc:
        raise EnvError(str(exc)) from exc
    return (bin_dir / ".stamp").read_text().strip()[:12]


def go_convert(img: BuiltImage, cache: Path, optimized: bool, key: str) -> str:
    """The image re-written layer by layer by the Go library's writer (``estargz-peer build``,
    ``estargz.Build`` defaults), with the workload's prioritized files when *optimized*;
    cached per Go build *key*. Raises EnvError."""
    variant = "esgz-go-opt" if optimized else "esgz-go"
    top = image_dir(cache, img.name)
    dst = top / f"goconv-{key}" / variant
    for old in top.glob("goconv-*"):
        if old.name != f"goconv-{key}":
            shutil.rmtree(old, ignore_errors=True)
    if (dst / ".done").exists():
        return str(dst)
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    prioritized: list[str] = []
    if optimized:
        prio = image_dir(cache, img.name) / "prioritized-files.txt"
        prioritized = [p for p in prio.read_text().splitlines() if p.strip()]
    log(f"converting {img.name} to {variant} (Go writer)")
    t0 = time.monotonic()
    try:
        go_convert_image(
            Path(img.layout),
            img.tag,
            dst,
            img.tag,
            prioritized=prioritized,
            nice=19,
            log=lambda m: log(f"  {m}"),
        )
    except (GoPeerError, GoPeerUnavailable, OSError) as exc:
        shutil.rmtree(dst, ignore_errors=True)
        raise EnvError(f"Go writer failed: {exc}") from exc
    (dst / ".done").write_text(f"{time.monotonic() - t0:.1f}\n")
    return str(dst)


def variant_layout(
    img: BuiltImage, variant: str, cache: Path, conv_key: str, go_key: str | None
) -> str:
    """The OCI layout of one image variant (report.VARIANTS), built and cached on first use."""
    if variant == "gzip":
        return img.layout
    if variant in ("esgz", "esgz-opt"):
        return convert_image(img, cache, variant == "esgz-opt", conv_key)
    if variant == "esgz-optimize":
        return optimize_modes.optimized_layout(img, cache, optimize_modes.key(conv_key), log)
    if variant == "esgz-attached":
        raise EnvError("esgz-attached is the esgz image with a profile attached, not a layout")
    if go_key is None:
        raise EnvError("the Go writer is not available")
    return go_convert(img, cache, variant == "esgz-go-opt", go_key)


def host_info(key: str) -> dict[str, Any]:
    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return ""

    return {
        "kernel": platform.release(),
        "nproc": os.cpu_count(),
        "podman": out(["podman", "--version"]),
        "python": platform.python_version(),
        "git_commit": out(["git", "-C", str(REPO), "rev-parse", "HEAD"]),
        "converter_key": key,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--quick", action="store_true", help="python image only, 1 run (smoke)")
    p.add_argument("--runs", type=int, default=3, help="cold runs per image and mode (median)")
    p.add_argument("--rtt-ms", type=float, default=20.0, help="emulated round-trip time")
    p.add_argument("--mbit", type=float, default=150.0, help="emulated bandwidth, 0 = unlimited")
    p.add_argument("--images", default=DEFAULT_IMAGES, help=f"comma-separated: {','.join(RECIPES)}")
    p.add_argument(
        "--modes",
        default=",".join(report.DEFAULT_MODES),
        help=f"comma-separated modes, of: {','.join(report.MODES)}",
    )
    p.add_argument("--no-fs", action="store_true", help="skip the filesystem figures")
    p.add_argument(
        "--fs-stores",
        default="ours,go",
        help="stores measured for the filesystem figures: ours, go, or ours,go",
    )
    p.add_argument("--fs-read-mb", type=float, default=128.0, help="bytes read for fs figures")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="images, registry, scratch")
    p.add_argument("--out", type=Path, default=RESULTS, help="where the JSON and PNG go")
    args = p.parse_args(argv)
    if args.quick:
        args.images = "python"
        args.runs = 1
        args.fs_read_mb = min(args.fs_read_mb, 16.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    images = [n.strip() for n in args.images.split(",") if n.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for n in images:
        if n not in RECIPES:
            print(f"unknown image {n}; known: {', '.join(RECIPES)}", file=sys.stderr)
            return 2
    for m in modes:
        if m not in report.MODES:
            print(f"unknown mode {m}; known: {', '.join(report.MODES)}", file=sys.stderr)
            return 2
    fs_stores = [x.strip() for x in args.fs_stores.split(",") if x.strip()]
    if any(x not in ("ours", "go") for x in fs_stores):
        print("--fs-stores takes ours, go or ours,go", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("benchmarks need root (FUSE, overlay mounts, drop_caches)", file=sys.stderr)
        return 2
    cache: Path = args.cache.resolve()
    conv_key = converter_key()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results: dict[str, Any] = {
        "schema": report.SCHEMA,
        "started": started,
        "command": " ".join(
            ["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])]
        ),
        "params": {
            "rtt_ms": args.rtt_ms,
            "mbit": args.mbit,
            "runs": args.runs,
            "quick": args.quick,
            "images": images,
            "modes": modes,
            "store": "config defaults; background_fetch off for the fs figures only",
            "go_store": "go-stargz-store (Debian's stargz-snapshotter 0.12), upstream defaults;"
            " no_background_fetch for the fs figures only",
            "fs_stores": fs_stores,
        },
        "host": host_info(conv_key),
        "images": {},
        "coldstart": [],
        "fs": None,
    }

    built = build_images(images, cache)
    layouts: dict[tuple[str, str], str] = {}
    conv_errors: dict[tuple[str, str], str] = {}
    variants = {"gzip"} | {report.mode_parts(m)[1] for m in modes}  # gzip: the link check
    if not args.no_fs or "esgz-attached" in variants:  # the attached mode runs the esgz image
        variants.add("esgz")
    go_key: str | None = None
    go_needed = any(v.startswith("esgz-go") for v in variants) or any(
        report.mode_parts(m)[0] == "go" for m in modes
    )
    if go_needed or (not args.no_fs and "go" in fs_stores):
        try:
            go_key = go_writer_key()
            results["host"]["go_peer_key"] = go_key
        except EnvError as exc:
            log(f"Go peers unavailable: {exc}")
            results["host"]["go_peer_error"] = str(exc)
    for n in images:
        img = built[n]
        for variant in report.VARIANTS:
            if variant not in variants or variant == "esgz-attached":  # (pushed below)
                continue
            try:
                layouts[(n, variant)] = variant_layout(img, variant, cache, conv_key, go_key)
            except EnvError as exc:
                conv_errors[(n, variant)] = str(exc)
                log(f"{n}/{variant}: {exc}")
        results["images"][n] = {
            "uncompressed_bytes": img.uncompressed_bytes,
            "gzip_bytes": img.compressed_bytes,
            "rootfs_bytes": img.rootfs_bytes,
            "layers": len(img.layers),
            "cmd": img.cmd,
            "opened_files": len(img.opened_files),
            "opened_bytes": img.opened_bytes,
            "opened_share": img.opened_bytes / img.rootfs_bytes if img.rootfs_bytes else None,
            "variants": {},
        }

    scratch = cache / "scratch"
    registry = Registry(cache / "registry-store", scratch / "registry")
    proxy: ProxyThread | None = None
    try:
        registry.start()
        refs: dict[tuple[str, str], str] = {}
        for (n, variant), layout in layouts.items():
            digest, _manifest, _config = read_oci_image(Path(layout), built[n].tag)
            repo, tag = f"bench/{n}", f"{variant}-{digest.split(':')[1][:12]}"
            if not registry.has_manifest(repo, tag):
                log(f"pushing {n}:{variant} to the local registry")
                skopeo_push(layout, built[n].tag, f"{registry.address}/{repo}:{tag}")
            refs[(n, variant)] = f"{repo}:{tag}"
            sizes = [int(str(la["size"])) for la in manifest_layers(layout, built[n].tag)]
            results["images"][n]["variants"][variant] = {
                "ref": f"{repo}:{tag}",
                "manifest_digest": digest,
                "compressed_bytes": sum(sizes),
            }
        if "esgz-attached" in variants:
            for n in images:
                if (n, "esgz") not in layouts:
                    conv_errors[(n, "esgz-attached")] = conv_errors.get((n, "esgz"), "no esgz")
                    continue
                try:
                    refs[(n, "esgz-attached")] = optimize_modes.attached_ref(
                        built[n], layouts[(n, "esgz")], registry, log
                    )
                    results["images"][n]["variants"]["esgz-attached"] = {
                        "ref": refs[(n, "esgz-attached")]
                    }
                except EnvError as exc:
                    conv_errors[(n, "esgz-attached")] = str(exc)
                    log(f"{n}/esgz-attached: {exc}")
        for n in images:
            summary = optimize_modes.profile_summary(cache, built[n], optimize_modes.key(conv_key))
            if summary is not None:
                results["images"][n]["optimize_profile"] = summary
        mbit = args.mbit if args.mbit > 0 else float("inf")
        proxy = ProxyThread(registry.port, args.rtt_ms / 1000, mbit * 1e6)
        proxy.start()
        log(
            f"registry {registry.address}, WAN proxy {proxy.address} "
            f"(RTT {args.rtt_ms:g} ms, {args.mbit:g} Mbit/s)"
        )
        first = built[images[0]]
        biggest_gzip = max(first.layers, key=lambda la: la.size)
        link = measure_link(
            proxy.address,
            f"bench/{first.name}",
            biggest_gzip.digest,
            min(biggest_gzip.size, 32 << 20),
        )
        results["link"] = link
        log(
            f"link check: {link['bytes'] / 1e6:.1f} MB in {link['seconds']:.2f} s, first byte "
            f"after {link['first_byte_s'] * 1000:.0f} ms, {link['effective_mbit']:.0f} Mbit/s "
            "effective"
        )

        entries: dict[tuple[str, str], dict[str, Any]] = {}
        for n in images:
            for m in modes:
                entry: dict[str, Any] = {"image": n, "mode": m, "runs": [], "error": None}
                store, variant = report.mode_parts(m)
                if (n, variant) not in refs:
                    entry["error"] = conv_errors.get((n, variant), "no image")
                elif store == "go" and go_key is None:
                    entry["error"] = results["host"].get("go_peer_error", "no Go store")
                entries[(n, m)] = entry
                results["coldstart"].append(entry)
        for r in range(args.runs):
            for n in images:
                for m in modes:
                    entry = entries[(n, m)]
                    if entry["error"]:
                        continue
                    store, variant = report.mode_parts(m)
                    target = Target(
                        image=n,
                        mode=m,
                        ref=f"{proxy.address}/{refs[(n, variant)]}",
                        expect=built[n].expect,
                        store=store,
                    )
                    res = cold_run(target, proxy, scratch / "run", log=log)
                    res["run"] = r
                    entry["runs"].append(res)
                    if res.get("error") is None:
                        log(
                            f"run {r + 1}/{args.runs} {n:<6} {m:<18} pull {res['pull_s']:6.2f} s"
                            f"  run {res['run_s']:6.2f} s  total {res['total_s']:6.2f} s  "
                            f"{res['bytes_down'] / 1e6:7.1f} MB down"
                            + (f"  [{res['warning']}]" if res.get("warning") else "")
                        )
            report.write_json(report.finalize(results), args.out / f"{stamp}.json")
        for entry in entries.values():
            if entry["runs"] and all(r.get("error") for r in entry["runs"]):
                entry["error"] = entry["runs"][-1]["error"]

        if not args.no_fs:
            fs_image = images[-1]
            if (fs_image, "esgz") in refs:
                layout = layouts[(fs_image, "esgz")]
                layers = manifest_layers(layout, built[fs_image].tag)
                biggest = max(layers, key=lambda la: int(str(la["size"])))
                for store in fs_stores:
                    key = "fs" if store == "ours" else "fs_go"
                    if store == "go" and go_key is None:
                        results[key] = {"error": results["host"].get("go_peer_error")}
                        continue
                    log(f"filesystem figures on {fs_image}'s largest eStargz layer ({store})")
                    results[key] = fs_figures(
                        fs_image,
                        f"{proxy.address}/{refs[(fs_image, 'esgz')]}",
                        str(biggest["digest"]),
                        int(str(biggest["size"])),
                        proxy,
                        scratch / "fs",
                        int(args.fs_read_mb * 1e6),
                        log=log,
                        store=store,
                    )
            else:
                results["fs"] = {"error": conv_errors.get((fs_image, "esgz"), "no eStargz image")}
    finally:
        if proxy is not None:
            proxy.stop()
        registry.stop()
        results["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        )
        js, png = report.write_results(results, args.out, stamp)
        print()
        print(report.summary_text(results))
        print(f"\nresults: {js}\nchart:   {png or results.get('chart_error')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
