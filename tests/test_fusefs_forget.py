"""The FUSE adapter forgets failed layer lookups on request (credentials arrived): its own
negative cache and the kernel's negative dentries, over a real mount and a fake provider.

Its own mount (pyfuse3 has one session per process): a 60 s negative timeout, so nothing here
depends on an entry expiring.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerstore import errors as lse
from layerstore.registry.reference import in_repository, parse_reference
from stargz_store.config import FuseSettings
from stargz_store.fusefs import StoreOperations, mount_options
from tests import fuse_util as fu

ok, why = fu.fuse_available()
pytestmark = [pytest.mark.fuse, pytest.mark.skipif(not ok, reason=why), pytest.mark.timeout(60)]

OTHER_REF = "registry.example:5000/library/other:1.0"


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[tuple[Path, fu.FakeManager, StoreOperations]]:
    mgr = fu.FakeManager()
    settings = FuseSettings(negative_timeout=60.0, store_dir_timeout=0.0)
    ops = StoreOperations(mgr, settings, validate_ref=parse_reference)
    with fu.mounted_ops(ops, tmp_path / "mnt", mount_options(settings)) as mp:
        yield mp, mgr, ops


def _in_thread(fn: object) -> object:
    """Call *fn* from a thread of its own (as the auth-helper connection thread does)."""
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(fn()))  # type: ignore[operator]
    t.start()
    t.join(30)
    assert out, "forget_failures_from_thread did not return"
    return out[0]


def test_forgetting_failures_clears_adapter_and_kernel_negative_entries(
    mounted: tuple[Path, fu.FakeManager, StoreOperations],
) -> None:
    mp, mgr, ops = mounted
    layer = fu.FakeLayer(fu.sample_tree())
    key = layer.compressed_digest
    for ref in (fu.REF, OTHER_REF):
        mgr.errors[(ref, key)] = lse.AuthenticationError("anonymous access refused (HTTP 401)")
    paths = {ref: mp / fu.b64(ref) / key for ref in (fu.REF, OTHER_REF)}
    for path in paths.values():
        with pytest.raises(FileNotFoundError):
            os.stat(path)
    assert mgr.count("get") == 2
    # Credentials arrive: the provider would now succeed, but the failure is remembered by the
    # kernel (a negative dentry: no request reaches us) for the negative timeout.
    for ref in (fu.REF, OTHER_REF):
        del mgr.errors[(ref, key)]
        mgr.add(ref, layer)
    for path in paths.values():
        with pytest.raises(FileNotFoundError):
            os.stat(path)
    assert ops.stats.lookups == 2 and mgr.count("get") == 2  # (key lookups: none came)

    def forget_ref() -> object:
        return ops.forget_failures_from_thread(
            lambda ref: in_repository(ref, "registry.example:5000", "library/sample")
        )

    assert _in_thread(forget_ref) == 1  # one negative dentry invalidated
    assert os.path.isdir(paths[fu.REF])
    assert (paths[fu.REF] / "diff" / "etc" / "hostname").exists()
    assert mgr.count("get") == 3
    # The other repository's failure stays remembered.
    with pytest.raises(FileNotFoundError):
        os.stat(paths[OTHER_REF])
    assert mgr.count("get") == 3 and ops.stats.negative_hits == 0  # the kernel answered
    assert _in_thread(forget_ref) == 0  # nothing left to forget for that repository


def test_forgetting_failures_the_kernel_no_longer_holds(
    mounted: tuple[Path, fu.FakeManager, StoreOperations],
) -> None:
    """The adapter's own negative cache is cleared too; a name the kernel dropped meanwhile
    (here: invalidated by the test) is no error."""
    import pyfuse3

    mp, mgr, ops = mounted
    layer = fu.FakeLayer(fu.sample_tree())
    key = layer.compressed_digest
    mgr.errors[(fu.REF, key)] = lse.AuthenticationError("anonymous access refused (HTTP 401)")
    refdir = mp / fu.b64(fu.REF)
    with pytest.raises(FileNotFoundError):
        os.stat(refdir / key)
    parent = os.stat(refdir).st_ino
    _in_thread(lambda: pyfuse3.invalidate_entry(parent, os.fsencode(key)))
    with pytest.raises(FileNotFoundError):  # the adapter answers from its negative cache
        os.stat(refdir / key)
    assert mgr.count("get") == 1 and ops.stats.negative_hits == 1
    del mgr.errors[(fu.REF, key)]
    mgr.add(fu.REF, layer)
    _in_thread(lambda: pyfuse3.invalidate_entry(parent, os.fsencode(key)))
    assert _in_thread(lambda: ops.forget_failures_from_thread(lambda ref: ref == fu.REF)) == 1
    assert os.path.isdir(refdir / key) and mgr.count("get") == 2


def test_forget_failures_without_a_running_loop_is_a_no_op() -> None:
    ops = StoreOperations(fu.FakeManager(), FuseSettings())
    assert ops.forget_failures_from_thread(lambda ref: True) == 0
    assert ops.forget_failures(lambda ref: True) == []
