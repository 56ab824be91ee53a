"""The RPM spec lints cleanly and builds a source RPM; the systemd unit keeps its promises."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

SPEC = REPO / "packaging" / "rpm" / "stargz-store.spec"
UNIT = REPO / "packaging" / "rpm" / "stargz-store.service"
RPMLINTRC = REPO / "packaging" / "rpm" / "stargz-store.rpmlintrc"


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (./run setup installs it)")


def test_spec_passes_rpmlint() -> None:
    _need("rpmlint")
    out = subprocess.run(
        ["rpmlint", "-r", str(RPMLINTRC), str(SPEC)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 errors, 0 warnings" in out.stdout, out.stdout


def test_source_rpm_builds(tmp_path: Path) -> None:
    _need("rpmbuild")
    version = next(
        line.split()[1] for line in SPEC.read_text().splitlines() if line.startswith("Version:")
    )
    sources = tmp_path / "SOURCES"
    sources.mkdir()
    # The working tree as it is (tracked and untracked files), so the test checks this change.
    tarball = sources / f"stargz-store-{version}.tar.gz"
    subprocess.run(
        [
            "tar",
            "-czf",
            str(tarball),
            "--exclude=.git",
            "--exclude=.venv",
            f"--transform=s,^\\.,stargz-store-{version},",
            ".",
        ],
        cwd=REPO,
        check=True,
    )
    subprocess.run(
        ["rpmbuild", "-bs", "--nodeps", "--define", f"_topdir {tmp_path}", str(SPEC)],
        check=True,
        capture_output=True,
    )
    srpms = list((tmp_path / "SRPMS").glob("stargz-store-*.src.rpm"))
    assert len(srpms) == 1
    listing = subprocess.run(
        ["rpm", "-qlp", str(srpms[0])], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "stargz-store.spec" in listing
    assert tarball.name in listing


def test_spec_does_not_restart_on_upgrade() -> None:
    text = SPEC.read_text()
    assert "%systemd_postun stargz-store.service" in text
    assert "%systemd_postun_with_restart" not in text
    assert "%config(noreplace) %{_sysconfdir}/stargz-store/config.toml" in text
    assert "Requires:       fuse3" in text


def test_unit_is_notify_and_has_no_private_mount_namespace() -> None:
    lines = [ln.strip() for ln in UNIT.read_text().splitlines()]
    settings = [ln.split("=", 1) for ln in lines if "=" in ln and not ln.startswith("#")]
    keys = [k for k, _ in settings]
    values = {k: [v for kk, v in settings if kk == k] for k in keys}
    assert values["Type"] == ["notify"]
    assert "crio.service" in values["Before"][0]
    assert any("umount -l" in v for v in values["ExecStartPre"])
    assert any("umount -l" in v for v in values["ExecStopPost"])
    forbidden = ("PrivateTmp", "PrivateMounts", "ReadOnlyPaths", "PrivateDevices", "Protect")
    for key in keys:
        assert not key.startswith(forbidden), f"{key} would hide the FUSE mount from podman"


def test_state_directory_is_private() -> None:
    """The daemon refuses a group- or world-writable --root and tightens a readable one; the
    package installs it 0700 root:root so that it never has to."""
    text = SPEC.read_text()
    assert "install -d -m 0700 %{buildroot}%{_sharedstatedir}/stargz-store\n" in text
    assert "%dir %attr(0700, root, root) %{_sharedstatedir}/stargz-store\n" in text
