"""``stargz-store optimize``: record what a workload reads at start, then either rewrite the
image with those files first (``optimize SRC DST``) or attach the record to the image as an
OCI artifact that the store follows (``optimize --attach SRC``).

Modules:

* :mod:`.command` - the command line, the steps and what the user is told;
* :mod:`.registry` - a read-only registry on 127.0.0.1 serving an OCI layout (the private copy
  of the image, converted to eStargz, that the private store and podman pull from);
* :mod:`.runner` - one recording run: a private store daemon with recording on, a private
  podman (its own graphroot, runroot and configuration) that pulls and runs the image once.

Nothing here touches the machine's podman storage, store or registries: every process runs
against files in one temporary directory, removed at the end.
"""
