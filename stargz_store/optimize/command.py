"""``stargz-store optimize [options] SRC DST`` and ``stargz-store optimize --attach SRC``.

Both record what the image's workload reads when it starts, by running it once:

1. SRC (``oci:DIR[:TAG]`` or ``docker://REF``, as ``convert`` takes them) is copied into a
   private OCI layout in a temporary directory, converted to eStargz where it is not already
   (layers that are eStargz are copied byte for byte, so their TOC digests stay SRC's);
2. a read-only registry on 127.0.0.1 serves that copy (:mod:`.registry`), a private store
   daemon with recording on mounts under the temporary directory, and a private podman pulls
   the image through the store and runs it once (:mod:`.runner`: ``--cmd``, ``--entrypoint``,
   ``--env``, ``--mount``); the container runs until it exits, until ``--period`` seconds after
   its first read (the store has written the profile then), or until ``--timeout``;
3. the profile lists, per layer, the files read in first-access order: the executable and the
   ELF loader the kernel reads for ``execve``, the libraries it maps, the files opened.

Then ``optimize SRC DST`` writes DST (``oci:`` or ``docker://``) from the private copy with
each recorded layer rewritten: its recorded files first, in access order, then the
``.prefetch.landmark`` (the store fetches everything before it in one request on first use);
other layers are copied. DST has new digests, like any conversion.

``optimize --attach SRC`` (a ``docker://`` image whose layers are eStargz) leaves the image as
it is (same digest, signatures and digest pins still valid) and pushes the profile to SRC's
repository as an OCI artifact whose ``subject`` is SRC's manifest (for this platform). A store
with ``[fetch] prefetch_profile`` (the default) looks for it on the image's first use and
fetches the listed files in access order while the container starts. The ``--src-*`` registry
options apply to both reading SRC and pushing the profile.

Needs root (a FUSE mount and rootful podman), podman and an OCI runtime. Progress goes to
stderr; stdout stays empty.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from layerstore.errors import LayerStoreError
from stargz_store.cmdline import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    ArgParser,
    HelpShown,
    UsageError,
    version,
)
from stargz_store.convert_cmd import (
    Progress,
    SourceSide,
    add_conversion_args,
    add_output_args,
    add_registry_args,
    describe_error,
    normalize_tls_flags,
    on_side,
    open_destination,
    open_source,
    registries_for,
)
from stargz_store.log import scoped_logging

PROG = "stargz-store optimize"
REPOSITORY = "stargz-optimize/image"
TAG = "run"
SHOWN_FILES = 8


def _json_list(text: str) -> list[str]:
    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'expected a JSON list of strings, e.g. \'["sh", "-c", "true"]\', got {text!r}'
        ) from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {text!r}")
    return value


def _env(text: str) -> str:
    name, sep, _ = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return text


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return v


def _parser() -> argparse.ArgumentParser:
    p = ArgParser(
        prog=PROG,
        description="Run an image once against a private store that records the files its "
        "workload reads at start (the kernel's reads for exec and mmap included), then write "
        "DST with those files first in each layer (prefetched in one request), or, with "
        "--attach, push the record next to SRC as an OCI artifact that the store follows "
        "(SRC's digest does not change).",
        epilog="SRC and DST: oci:DIR[:TAG] or docker://REF, as for convert. Needs root and "
        "podman. Exit status: 0 done, 1 failed, 2 bad usage. Examples: stargz-store optimize "
        "docker://registry.example/app:1 docker://registry.example/app:1-opt; stargz-store "
        'optimize --attach --cmd \'["python3", "-c", "import app"]\' '
        "docker://registry.example/app:1-esgz",
    )
    p.add_argument("src", metavar="SRC", help="the image to run and optimize")
    p.add_argument(
        "dst",
        metavar="DST",
        nargs="?",
        help="where to write the optimized image (not with --attach)",
    )
    p.add_argument(
        "--attach",
        action="store_true",
        help="do not write a new image: push the recorded profile to SRC's repository as an "
        "artifact referring to SRC (SRC must be docker:// and eStargz)",
    )
    r = p.add_argument_group("the recording run")
    r.add_argument(
        "--cmd",
        type=_json_list,
        metavar="JSON",
        help="the command, replacing the image's Cmd: a JSON list, e.g. "
        '\'["python3", "-c", "print(1)"]\' (default: the image\'s)',
    )
    r.add_argument(
        "--entrypoint",
        type=_json_list,
        metavar="JSON",
        help="the entrypoint, replacing the image's: a JSON list (default: the image's)",
    )
    r.add_argument(
        "--env",
        type=_env,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set an environment variable in the container (repeatable)",
    )
    r.add_argument(
        "--mount",
        action="append",
        default=[],
        metavar="SPEC",
        help="podman's --mount, e.g. type=bind,src=/data,dst=/data,ro (repeatable)",
    )
    r.add_argument(
        "--period",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="record reads until this long after the container's first read (default 10); "
        "a container still running then is stopped",
    )
    r.add_argument(
        "--timeout",
        type=_seconds,
        default=300.0,
        metavar="SECONDS",
        help="stop the container after this long in any case (default 300)",
    )
    r.add_argument(
        "--runtime",
        metavar="NAME",
        help="podman's OCI runtime for the run (e.g. runc; default: podman's choice)",
    )
    r.add_argument(
        "--profile-out",
        metavar="FILE",
        help="also write the recorded profile (JSON) to FILE",
    )
    r.add_argument(
        "--keep-workdir",
        action="store_true",
        help="keep the temporary directory (private copy, store log, podman files) for inspection",
    )
    add_conversion_args(p)
    add_registry_args(p)
    add_output_args(p)
    return p


class _Out:
    """What the user is told, on stderr (stdout stays empty)."""

    def __init__(self, err: TextIO, quiet: bool) -> None:
        self.err = err
        self.quiet = quiet
        self.step = 0
        self.steps = 4

    def __call__(self, text: str = "") -> None:
        if not self.quiet:
            print(text, file=self.err, flush=True)

    def heading(self, text: str) -> None:
        self.step += 1
        self(f"[{self.step}/{self.steps}] {text}")


class _PriorityProgress(Progress):
    """``convert``'s progress lines, plus how many files went first."""

    def layer_done(self, report: Any) -> None:
        super().layer_done(report)
        if report.action == "converted" and report.prioritized:
            missed = len(report.missed_prioritized)
            note = f" ({missed} not in the layer)" if missed else ""
            print(
                f"    {report.prioritized - missed} recorded files first, then the prefetch "
                f"landmark{note}",
                file=self.out,
                flush=True,
            )


def _mb(n: float) -> str:
    if n < 1e3:
        return f"{n:.0f} B"
    if n < 1e6:
        return f"{n / 1e3:.1f} KB"
    return f"{n / 1e6:.1f} MB"


def main(argv: Sequence[str], stderr: TextIO | None = None) -> int:
    err = stderr if stderr is not None else sys.stderr
    try:
        args = _parser().parse_args(normalize_tls_flags(argv))
        _check_usage(args)
    except UsageError as e:
        print(f"{PROG}: {e}", file=err)
        print(f"usage: {PROG} [options] SRC DST | --attach SRC (see {PROG} --help)", file=err)
        return EXIT_USAGE
    except HelpShown:
        return EXIT_OK
    level = args.log_level or ("error" if args.quiet else "warning")
    with scoped_logging(level, "auto", err):
        try:
            return _optimize(args, err)
        except UsageError as e:
            print(f"{PROG}: {e}", file=err)
            return EXIT_USAGE
        except LayerStoreError as e:
            print(f"\n{PROG}: {describe_error(e)}", file=err)
            return EXIT_FAILURE
        except _Failed as e:
            print(f"{PROG}: {e}", file=err)
            return EXIT_FAILURE
        except OSError as e:
            print(f"{PROG}: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=err)
            return EXIT_FAILURE
        except KeyboardInterrupt:
            print(f"\n{PROG}: interrupted", file=err)
            return 130


class _Failed(Exception):
    """A failure with a one-line message for the user."""


def _check_usage(args: argparse.Namespace) -> None:
    if args.attach and args.dst:
        raise UsageError("--attach writes no image: give SRC only")
    if not args.attach and not args.dst:
        raise UsageError("DST is missing (or use --attach to attach the profile to SRC)")
    if args.attach and not args.src.startswith("docker://"):
        raise UsageError("--attach needs a docker://REF source (the profile is pushed next to it)")


def _optimize(args: argparse.Namespace, err: TextIO) -> int:
    from stargz_store.optimize.runner import RunError

    if os.geteuid() != 0:
        raise _Failed(
            "needs root: the recording run mounts a private store (FUSE) and runs rootful podman"
        )
    if shutil.which("podman") is None:
        raise _Failed("podman is not installed (the recording run uses it)")
    out = _Out(err, args.quiet)
    workdir = Path(tempfile.mkdtemp(prefix="stargz-optimize-", dir=args.tmpdir))
    clients: list[Any] = []
    try:
        return _steps(args, out, workdir, clients)
    except RunError as e:
        raise _Failed(str(e)) from None
    finally:
        for c in clients:
            c.close()
        if args.keep_workdir:
            out(f"kept {workdir}")
        elif (workdir / "run").exists():
            out(f"left {workdir} in place (the recording run could not be cleaned up)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _steps(args: argparse.Namespace, out: _Out, workdir: Path, clients: list[Any]) -> int:
    from layerstore.estargz.writer import WriterOptions
    from layerstore.image.convert import ConvertOptions, OCIDestination, OCISource, convert_image
    from layerstore.image.ocilayout import OCILayout
    from layerstore.registry import manifest as mf

    conf = registries_for(args, *(t for t in (args.src, args.dst) if t))
    src, sclient = open_source(args, args.src, conf)
    if sclient is not None:
        clients.append(sclient)
    platform = args.platform
    attach_to: tuple[Any, dict[str, Any], set[str]] | None = None
    dst = push_check = None
    if args.attach:
        assert sclient is not None
        attach_to = _attach_target(args, sclient, platform)
        platform = platform or str(mf.host_platform())
    else:
        dst, push_check, dclient = open_destination(args, args.dst, conf)
        if dclient is not None:
            clients.append(dclient)
        if push_check is not None:
            with on_side(dst.label):
                push_check()
    writer = WriterOptions(
        chunk_size=args.chunk_size,
        compression_level=args.compression_level,
        min_chunk_size=args.min_chunk_size,
        tmpdir=args.tmpdir,
    )
    tty = bool(getattr(out.err, "isatty", lambda: False)())
    progress = None if args.quiet else _PriorityProgress(out.err, tty)

    layout_dir = workdir / "image"
    out.heading(f"copying {args.src} to a private eStargz image for the recording run")
    convert_image(
        src,
        OCIDestination(OCILayout.create(layout_dir), TAG),
        ConvertOptions(writer=writer, platform=platform, keep_estargz=True),
        progress,
    )
    run_layers = _run_layers(layout_dir, platform)
    result = _record(args, out, workdir, layout_dir, run_layers)
    profile = result.profile
    assert profile is not None

    if args.profile_out:
        Path(args.profile_out).write_bytes(profile.to_json() + b"\n")
        out(f"    profile written to {args.profile_out}")
    if attach_to is not None:
        return _attach(args, out, attach_to, profile, clients[0])
    assert dst is not None
    by_toc = {toc: digest for digest, toc in run_layers if toc}
    priorities = {
        by_toc[lp.toc_digest]: lp.paths for lp in profile.layers if lp.toc_digest in by_toc
    }
    out.heading(f"writing {args.dst} with each layer's recorded files first")
    written = convert_image(
        SourceSide(OCISource(OCILayout.open(layout_dir), TAG)),
        dst,
        ConvertOptions(writer=writer, keep_estargz=True, layer_priorities=priorities),
        progress,
    )
    out(f"wrote {dst.describe()} ({written.media_type}, {written.digest})")
    _digestfile(args, written.digest)
    return EXIT_OK


def _attach_target(
    args: argparse.Namespace, client: Any, platform: str | None
) -> tuple[Any, dict[str, Any], set[str]]:
    """SRC's reference, its manifest's descriptor (for this platform) and its layers' TOC
    digests; checks push access to its repository first."""
    from layerstore.estargz.constants import TOC_DIGEST_ANNOTATION
    from layerstore.registry.reference import parse_reference

    label = f"source {args.src}"
    with on_side(label):
        ref = parse_reference(args.src[len("docker://") :])
        image = client.resolve(ref, platform)
    tocs = {
        d.annotations[TOC_DIGEST_ANNOTATION]
        for d in image.manifest.layers
        if TOC_DIGEST_ANNOTATION in d.annotations
    }
    if not tocs:
        raise _Failed(
            f"{args.src} has no eStargz layers, so no store can follow a profile of it: convert "
            f"it first (stargz-store convert), or write an optimized copy (optimize SRC DST)"
        )
    if not args.no_push_check:
        with on_side(f"destination {args.src}"):
            client.check_push(ref)
    subject = {
        "mediaType": image.media_type,
        "digest": image.manifest_digest,
        "size": len(image.raw_manifest),
    }
    return ref, subject, tocs


def _run_layers(layout_dir: Path, platform: str | None) -> list[tuple[str, str]]:
    """(digest, TOC digest or "") of the layers of the manifest podman runs from the copy."""
    from layerstore.estargz.constants import TOC_DIGEST_ANNOTATION
    from layerstore.image.ocilayout import OCILayout
    from layerstore.registry import manifest as mf

    layout = OCILayout.open(layout_dir)
    desc = layout.resolve(TAG)
    parsed = mf.parse_manifest(layout.read_blob(desc["digest"], mf.MAX_MANIFEST_SIZE))
    if isinstance(parsed, mf.ImageIndex):
        chosen = mf.select_manifest(parsed, platform)
        parsed = mf.parse_manifest(layout.read_blob(chosen.digest, mf.MAX_MANIFEST_SIZE))
    assert isinstance(parsed, mf.ImageManifest)
    return [(d.digest, d.annotations.get(TOC_DIGEST_ANNOTATION, "")) for d in parsed.layers]


def _record(
    args: argparse.Namespace,
    out: _Out,
    workdir: Path,
    layout_dir: Path,
    run_layers: list[tuple[str, str]],
) -> Any:
    from stargz_store.optimize.registry import LayoutRegistry
    from stargz_store.optimize.runner import RecordingRun, RunOptions

    options = RunOptions(
        cmd=args.cmd,
        entrypoint=args.entrypoint,
        env=tuple(args.env),
        mounts=tuple(args.mount),
        period=args.period,
        timeout=args.timeout,
        runtime=args.runtime,
        log_level="debug" if args.log_level == "debug" else "info",
    )
    out.heading(
        f"running it once against a private store that records reads for {args.period:g} s "
        "after the first read"
    )
    with LayoutRegistry(layout_dir, REPOSITORY) as reg:
        ref = reg.reference(TAG)
        run = RecordingRun(workdir / "run", reg.host, options)
        try:
            run.start_store()
            run.pull(ref)
            served = run.store_layers()
            out(f"    {shlex.join(run.run_command(ref))}")
            result = run.run(ref)
        finally:
            warning = run.close(keep=args.keep_workdir)
            if warning:
                out(f"    warning: {warning}")
    how = {
        "exited": f"the container exited with status {result.status}",
        "recording period ended": "the recording period ended; the container was stopped",
        "timeout": f"--timeout {args.timeout:g} s reached; the container was stopped",
    }[result.ended]
    out(
        f"    {how} after {result.seconds:.1f} s (podman took {served} of {len(run_layers)} "
        "layers from the store)"
    )
    for line in result.output_tail:
        out(f"    | {line}")
    profile = result.profile
    if profile is None or not profile.files:
        hint = (
            "podman took no layer from the store (see its log with --keep-workdir)"
            if served == 0
            else "the container read no file of the image"
        )
        raise _Failed(f"nothing was recorded: {hint}")
    out.heading(f"recorded {profile.files} files, {_mb(profile.total_bytes)} read:")
    index = {toc: i for i, (_, toc) in enumerate(run_layers) if toc}
    for lp in sorted(profile.layers, key=lambda x: index.get(x.toc_digest, -1)):
        i = index.get(lp.toc_digest)
        where = f"layer {i + 1}/{len(run_layers)}" if i is not None else "layer"
        out(
            f"    {where} (TOC {lp.toc_digest[:19]}...): {len(lp.entries)} files, "
            f"{_mb(lp.total_bytes)}"
        )
        for e in lp.entries[:SHOWN_FILES]:
            out(f"      {e.first_access_ms:>6} ms {_mb(e.bytes):>9}  /{e.path}")
        if len(lp.entries) > SHOWN_FILES:
            out(f"      ... and {len(lp.entries) - SHOWN_FILES} more")
    unread = len([t for _, t in run_layers if t and profile.layer(t) is None])
    if unread:
        out(f"    ({unread} layer(s) with nothing read)")
    return result


def _attach(
    args: argparse.Namespace,
    out: _Out,
    target: tuple[Any, dict[str, Any], set[str]],
    profile: Any,
    client: Any,
) -> int:
    import dataclasses

    from layerstore.estargz.profile import PROFILE_MEDIA_TYPE, now_rfc3339
    from layerstore.registry.referrers import CREATED_ANNOTATION, Referrers

    ref, subject, tocs = target
    kept = tuple(lp for lp in profile.layers if lp.toc_digest in tocs)
    if not kept:
        raise _Failed(
            f"every recorded layer was converted for the run; {args.src}'s own layers are "
            "not eStargz, so there is nothing to attach (convert it first)"
        )
    doc = dataclasses.replace(
        profile,
        layers=kept,
        image=args.src[len("docker://") :],
        manifest_digest=subject["digest"],
        tool=f"stargz-store {version()}",
    )
    out.heading(f"attaching the profile to {args.src} ({subject['digest']})")
    with on_side(f"destination {args.src}"):
        res = Referrers(client).attach(
            ref, subject, PROFILE_MEDIA_TYPE, doc.to_json(), {CREATED_ANNOTATION: now_rfc3339()}
        )
    where = f"tag {res.tag}" if res.tag else "the registry's referrers API"
    out(
        f"attached profile {res.payload_digest} as artifact {res.digest} to {args.src} "
        f"(found through {where}); the image's digest is unchanged: {subject['digest']}"
    )
    _digestfile(args, res.digest)
    return EXIT_OK


def _digestfile(args: argparse.Namespace, digest: str) -> None:
    if args.digestfile:
        try:
            Path(args.digestfile).write_text(digest, encoding="utf-8")
        except OSError as e:
            raise _Failed(f"--digestfile {args.digestfile}: {e.strerror or e}") from None


__all__ = ["main"]
