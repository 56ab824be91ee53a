"""Registry credentials.

Owns: the containers-auth.json(5) chain and docker configs (:mod:`.authfile`),
docker-credential-* helpers (:mod:`.credhelper`), the one lookup the registry client asks
(:mod:`.store`: ``CredentialStore``), credential values (:mod:`.types`), the token flow as pure
logic (:mod:`.token`), and podman's additional-layer-store-auth-helper channel: the daemon's side
(:mod:`.helper_channel`), the ``stargz-store-helper`` program (:mod:`.helper_client`) and what
both share (:mod:`.helper_protocol`).

May import: the ``layerstore`` foundation (``layerstore.errors``, ``digest``, ``source``,
``common``) and nothing else of ``layerstore``; never ``stargz_store``, ``pyfuse3`` or ``trio``
(``tests/test_layering.py``). This file, ``helper_protocol`` and ``helper_client`` use the
standard library only: podman runs the helper with whatever Python the host has (a copy of
them goes into the podman 5 test chroot).
"""
