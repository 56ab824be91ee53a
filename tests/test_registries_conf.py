"""registries.conf v2 (layerstore.registry.registries_conf)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from layerstore.errors import BlockedRegistryError
from layerstore.registry.registries_conf import (
    PullSource,
    RegistriesConf,
    RegistriesConfError,
    WatchedRegistriesConf,
    describe,
    match_prefix,
)

MIRRORS = """
unqualified-search-registries = ["docker.io"]
short-name-mode = "enforcing"
some-future-key = 1

[[registry]]
prefix = "example.com/foo"
location = "internal.example.com/bar"
insecure = false

[[registry.mirror]]
location = "mirror-0.local/mirror-for-foo"

[[registry.mirror]]
location = "mirror-1.local/mirrors/foo"
insecure = true

[[registry]]
location = "registry.com"

[[registry.mirror]]
location = "mirror.registry.com"

[[registry]]
location = "digest.io"
mirror-by-digest-only = true

[[registry.mirror]]
location = "dmirror.io"

[[registry]]
location = "mixed.io"
[[registry.mirror]]
location = "all.io"
pull-from-mirror = "all"
[[registry.mirror]]
location = "digests.io"
pull-from-mirror = "digest-only"
[[registry.mirror]]
location = "tags.io"
pull-from-mirror = "tag-only"

[[registry]]
location = "bad.io"
blocked = true

[[registry]]
prefix = "*.wild.io"

[[registry]]
prefix = "*.rewrite.io"
location = "central.io/all"

[[registry]]
location = "insecure.local:5000"
insecure = true
"""


@pytest.fixture
def conf() -> RegistriesConf:
    return RegistriesConf.from_string(MIRRORS)


def locs(sources: list[PullSource]) -> list[tuple[str, bool, bool]]:
    return [(s.location, s.insecure, s.mirror) for s in sources]


def test_prefix_rewrite_and_mirrors_in_order(conf: RegistriesConf) -> None:
    assert locs(conf.pull_sources("example.com/foo/image", by_digest=False)) == [
        ("mirror-0.local/mirror-for-foo/image", False, True),
        ("mirror-1.local/mirrors/foo/image", True, True),
        ("internal.example.com/bar/image", False, False),
    ]


def test_mirrors_belong_to_their_table_only(conf: RegistriesConf) -> None:
    # registry.com/image matches only the registry.com table, not example.com/foo's mirrors
    assert locs(conf.pull_sources("registry.com/image", by_digest=True)) == [
        ("mirror.registry.com/image", False, True),
        ("registry.com/image", False, False),
    ]


def test_no_match_is_the_name_itself(conf: RegistriesConf) -> None:
    assert conf.pull_sources("quay.io/ns/img", by_digest=False) == [
        PullSource("quay.io/ns/img", False, False)
    ]
    assert conf.pull_sources("example.com/foobar/x", by_digest=False) == [
        PullSource("example.com/foobar/x", False, False)
    ]


def test_mirror_by_digest_only(conf: RegistriesConf) -> None:
    assert locs(conf.pull_sources("digest.io/a", by_digest=False)) == [
        ("digest.io/a", False, False)
    ]
    assert locs(conf.pull_sources("digest.io/a", by_digest=True)) == [
        ("dmirror.io/a", False, True),
        ("digest.io/a", False, False),
    ]


def test_pull_from_mirror(conf: RegistriesConf) -> None:
    assert [s.location for s in conf.pull_sources("mixed.io/a", by_digest=False)] == [
        "all.io/a",
        "tags.io/a",
        "mixed.io/a",
    ]
    assert [s.location for s in conf.pull_sources("mixed.io/a", by_digest=True)] == [
        "all.io/a",
        "digests.io/a",
        "mixed.io/a",
    ]


def test_blocked(conf: RegistriesConf) -> None:
    with pytest.raises(BlockedRegistryError, match=r"bad\.io"):
        conf.pull_sources("bad.io/x/y", by_digest=False)


def test_wildcard_prefix(conf: RegistriesConf) -> None:
    assert conf.pull_sources("a.b.wild.io/x", by_digest=False) == [
        PullSource("a.b.wild.io/x", False, False)
    ]
    assert match_prefix("a.rewrite.io:5000/x", "*.rewrite.io") == len("a.rewrite.io")
    assert conf.pull_sources("a.rewrite.io/x/y", by_digest=False) == [
        PullSource("central.io/all/x/y", False, False)
    ]
    # the bare domain and look-alikes do not match
    assert conf.find_registry("wild.io/x") is None
    assert conf.find_registry("evilwild.io/x") is None
    assert conf.find_registry("a.wild.io.evil/x") is None
    assert conf.find_registry("evil.com/a.wild.io/x") is None


def test_insecure(conf: RegistriesConf) -> None:
    assert conf.pull_sources("insecure.local:5000/x", by_digest=False) == [
        PullSource("insecure.local:5000/x", True, False)
    ]


def test_longest_prefix_wins() -> None:
    conf = RegistriesConf.from_string(
        """
[[registry]]
location = "r.io"
insecure = true
[[registry]]
prefix = "r.io/team"
location = "other.io/t"
[[registry]]
prefix = "r.io/team/sub"
location = "third.io"
"""
    )
    assert conf.pull_sources("r.io/x", by_digest=False) == [PullSource("r.io/x", True, False)]
    assert conf.pull_sources("r.io/team/x", by_digest=False) == [
        PullSource("other.io/t/x", False, False)
    ]
    assert conf.pull_sources("r.io/team/sub/x", by_digest=False) == [
        PullSource("third.io/x", False, False)
    ]
    assert conf.pull_sources("r.io/teamx/y", by_digest=False) == [
        PullSource("r.io/teamx/y", True, False)
    ]


def test_match_prefix() -> None:
    assert match_prefix("example.com/foo/bar", "example.com/foo") == len("example.com/foo")
    assert match_prefix("example.com/foo", "example.com/foo") == len("example.com/foo")
    assert match_prefix("example.com/foobar", "example.com/foo") == -1
    assert match_prefix("example.com:5000/x", "example.com") == len("example.com")
    assert match_prefix("x.example.com/a", "*.example.com") == len("x.example.com")
    assert match_prefix("example.com/a", "*.example.com") == -1


def test_first_table_of_a_prefix_wins_within_a_file() -> None:
    conf = RegistriesConf.from_string(
        """
[[registry]]
prefix = "r.io"
location = "first.io"
[[registry]]
prefix = "r.io"
location = "second.io"
"""
    )
    assert conf.pull_sources("r.io/x", by_digest=False)[0].location == "first.io/x"


def test_auth_helper_value(conf: RegistriesConf) -> None:
    assert conf.additional_layer_store_auth_helper == ""
    c = RegistriesConf.from_string('additional-layer-store-auth-helper = "stargz-store-helper"\n')
    assert c.additional_layer_store_auth_helper == "stargz-store-helper"
    assert any("stargz-store-helper" in line for line in describe(c))


def test_trailing_slash_trimmed() -> None:
    conf = RegistriesConf.from_string('[[registry]]\nprefix = "r.io/a/"\nlocation = "m.io/b/"\n')
    assert conf.pull_sources("r.io/a/x", by_digest=False)[0].location == "m.io/b/x"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[[registry]\nlocation = 'x'", "malformed TOML"),
        ("[[registry]]\ninsecure = true\n", "both location and prefix are unset"),
        ("[[registry]]\nprefix = 'r.io'\n", "location is unset"),
        ("[[registry]]\nlocation = 'https://r.io'\n", "URI schemes"),
        ("[[registry]]\nprefix = '*.r.io/x'\n", "wildcard"),
        ("[[registry]]\nlocation = 'r.io'\ninsecure = 'yes'\n", "true or false"),
        ("[[registry]]\nlocation = 'r.io'\npull-from-mirror = 'all'\n", "non-mirror"),
        (
            "[[registry]]\nlocation = 'r.io'\n[[registry.mirror]]\ninsecure = true\n",
            "mirror location",
        ),
        (
            "[[registry]]\nlocation = 'r.io'\n[[registry.mirror]]\nlocation = 'm'\n"
            "pull-from-mirror = 'sometimes'\n",
            "unsupported pull-from-mirror",
        ),
        (
            "[[registry]]\nlocation = 'r.io'\nmirror-by-digest-only = true\n"
            "[[registry.mirror]]\nlocation = 'm'\npull-from-mirror = 'all'\n",
            "at the same time",
        ),
        (
            "[[registry]]\nlocation = 'r.io'\ninsecure = true\n"
            "[[registry]]\nprefix = 'p.io'\nlocation = 'r.io'\n",
            "conflicting 'insecure'",
        ),
        (
            "[[registry]]\nlocation = 'r.io'\nblocked = true\n"
            "[[registry]]\nprefix = 'p.io'\nlocation = 'r.io'\n",
            "conflicting 'blocked'",
        ),
        ("registry = 'x'\n", "array of tables"),
        ("additional-layer-store-auth-helper = 1\n", "expected a string"),
        (
            "unqualified-search-registries = ['a']\n[registries.block]\nregistries = ['b.io']\n",
            "mixing",
        ),
    ],
)
def test_errors(text: str, fragment: str) -> None:
    with pytest.raises(RegistriesConfError, match=fragment):
        RegistriesConf.from_string(text, source="/etc/x.conf")


def test_v1_format_converted() -> None:
    conf = RegistriesConf.from_string(
        "[registries.search]\nregistries = ['docker.io']\n"
        "[registries.insecure]\nregistries = ['ins.io']\n"
        "[registries.block]\nregistries = ['blk.io', 'ins.io']\n"
    )
    with pytest.raises(BlockedRegistryError):
        conf.pull_sources("blk.io/x", by_digest=False)
    with pytest.raises(BlockedRegistryError):
        conf.pull_sources("ins.io/x", by_digest=False)
    assert conf.pull_sources("docker.io/library/x", by_digest=False) == [
        PullSource("docker.io/library/x", False, False)
    ]


# --- files and drop-ins -------------------------------------------------------------------------
@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    etc = tmp_path / "etc"
    (etc / "registries.conf.d").mkdir(parents=True)
    home = tmp_path / "home"
    home.mkdir()
    return {
        "conf": etc / "registries.conf",
        "dir": etc / "registries.conf.d",
        "home": home,
        "user_conf": home / ".config" / "containers" / "registries.conf",
        "user_dir": home / ".config" / "containers" / "registries.conf.d",
    }


def load(layout: dict[str, Path], env: dict[str, str] | None = None) -> RegistriesConf:
    return RegistriesConf.load(
        env=env if env is not None else {},
        system_conf=layout["conf"],
        system_conf_dir=layout["dir"],
        home=str(layout["home"]),
    )


def test_missing_system_file_is_empty(layout: dict[str, Path]) -> None:
    conf = load(layout)
    assert conf.registries == ()
    assert conf.pull_sources("r.io/x", by_digest=False) == [PullSource("r.io/x", False, False)]


def test_drop_ins_override_by_prefix_in_name_order(layout: dict[str, Path]) -> None:
    layout["conf"].write_text(
        '[[registry]]\nlocation = "r.io"\n[[registry.mirror]]\nlocation = "base-mirror.io"\n'
        '[[registry]]\nlocation = "keep.io"\ninsecure = true\n'
    )
    d = layout["dir"]
    (d / "20-second.conf").write_text(
        'additional-layer-store-auth-helper = "/usr/bin/stargz-store-helper"\n'
        '[[registry]]\nlocation = "r.io"\n[[registry.mirror]]\nlocation = "second.io"\n'
    )
    (d / "10-first.conf").write_text(
        'additional-layer-store-auth-helper = "first-helper"\n'
        '[[registry]]\nlocation = "r.io"\n[[registry.mirror]]\nlocation = "first.io"\n'
    )
    (d / "ignored.txt").write_text("not toml at all [[[")
    (d / "sub.conf").mkdir()
    conf = load(layout)
    assert [s.location for s in conf.pull_sources("r.io/x", by_digest=False)] == [
        "second.io/x",
        "r.io/x",
    ]
    assert conf.pull_sources("keep.io/x", by_digest=False) == [PullSource("keep.io/x", True, False)]
    assert conf.additional_layer_store_auth_helper == "/usr/bin/stargz-store-helper"
    assert [p.name for p in conf.sources] == ["registries.conf", "10-first.conf", "20-second.conf"]


def test_drop_in_empty_helper_does_not_reset(layout: dict[str, Path]) -> None:
    layout["conf"].write_text('additional-layer-store-auth-helper = "h"\n')
    (layout["dir"] / "x.conf").write_text('additional-layer-store-auth-helper = ""\n')
    assert load(layout).additional_layer_store_auth_helper == "h"


def test_drop_in_must_be_v2(layout: dict[str, Path]) -> None:
    (layout["dir"] / "old.conf").write_text("[registries.block]\nregistries = ['b.io']\n")
    with pytest.raises(RegistriesConfError, match="v2"):
        load(layout)


def test_malformed_drop_in_names_file(layout: dict[str, Path]) -> None:
    (layout["dir"] / "broken.conf").write_text("[[registry]\n")
    with pytest.raises(RegistriesConfError, match=r"broken\.conf"):
        load(layout)


def test_user_file_takes_precedence(layout: dict[str, Path]) -> None:
    layout["conf"].write_text('[[registry]]\nlocation = "r.io"\nblocked = true\n')
    (layout["dir"] / "sys.conf").write_text('[[registry]]\nlocation = "s.io"\nblocked = true\n')
    layout["user_conf"].parent.mkdir(parents=True)
    layout["user_conf"].write_text('[[registry]]\nlocation = "u.io"\ninsecure = true\n')
    layout["user_dir"].mkdir()
    (layout["user_dir"] / "u.conf").write_text(
        '[[registry]]\nlocation = "ud.io"\ninsecure = true\n'
    )
    conf = load(layout)
    # neither the system file nor the system drop-ins are read
    assert conf.pull_sources("r.io/x", by_digest=False)[0].location == "r.io/x"
    assert conf.pull_sources("s.io/x", by_digest=False)[0].location == "s.io/x"
    assert conf.pull_sources("u.io/x", by_digest=False)[0].insecure
    assert conf.pull_sources("ud.io/x", by_digest=False)[0].insecure


def test_user_drop_ins_apply_after_system_ones(layout: dict[str, Path]) -> None:
    (layout["dir"] / "a.conf").write_text('[[registry]]\nlocation = "r.io"\ninsecure = true\n')
    layout["user_dir"].mkdir(parents=True)
    (layout["user_dir"] / "a.conf").write_text('[[registry]]\nlocation = "r.io"\n')
    assert not load(layout).pull_sources("r.io/x", by_digest=False)[0].insecure


def test_env_path_and_explicit_path(layout: dict[str, Path], tmp_path: Path) -> None:
    layout["conf"].write_text('[[registry]]\nlocation = "sys.io"\nblocked = true\n')
    mine = tmp_path / "mine.conf"
    mine.write_text('[[registry]]\nlocation = "env.io"\nblocked = true\n')
    conf = load(layout, env={"CONTAINERS_REGISTRIES_CONF": str(mine)})
    with pytest.raises(BlockedRegistryError):
        conf.pull_sources("env.io/x", by_digest=False)
    conf.pull_sources("sys.io/x", by_digest=False)  # the system file is not read
    with pytest.raises(RegistriesConfError, match="does not exist"):
        load(layout, env={"CONTAINERS_REGISTRIES_CONF": str(tmp_path / "missing.conf")})
    explicit = RegistriesConf.load(
        mine, env={}, system_conf=layout["conf"], system_conf_dir=layout["dir"], home="/nonexistent"
    )
    assert explicit.sources == (mine,)


def test_malformed_main_file(layout: dict[str, Path]) -> None:
    layout["conf"].write_text("this is = = not toml")
    with pytest.raises(RegistriesConfError, match="malformed TOML"):
        load(layout)


# --- reloading ----------------------------------------------------------------------------------
def bump(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def watched(layout: dict[str, Path]) -> WatchedRegistriesConf:
    return WatchedRegistriesConf(
        env={},
        system_conf=layout["conf"],
        system_conf_dir=layout["dir"],
        home=str(layout["home"]),
        min_interval=0,
    )


def test_watched_reloads_on_edit_and_drop_in(layout: dict[str, Path]) -> None:
    w = watched(layout)
    assert w.pull_sources("r.io/x", by_digest=False) == [PullSource("r.io/x", False, False)]
    layout["conf"].write_text('[[registry]]\nlocation = "r.io"\ninsecure = true\n')
    assert w.pull_sources("r.io/x", by_digest=False)[0].insecure
    (layout["dir"] / "50-block.conf").write_text(
        'additional-layer-store-auth-helper = "h"\n[[registry]]\nlocation = "r.io"\n'
        "insecure = true\nblocked = true\n"
    )
    with pytest.raises(BlockedRegistryError):
        w.pull_sources("r.io/x", by_digest=False)
    assert w.additional_layer_store_auth_helper == "h"
    (layout["dir"] / "50-block.conf").unlink()
    assert w.pull_sources("r.io/x", by_digest=False)[0].insecure


def test_watched_broken_edit_raises_until_fixed(layout: dict[str, Path]) -> None:
    layout["conf"].write_text('[[registry]]\nlocation = "r.io"\nblocked = true\n')
    w = watched(layout)
    layout["conf"].write_text("[[registry]\nbroken")
    bump(layout["conf"])
    with pytest.raises(RegistriesConfError):
        w.pull_sources("r.io/x", by_digest=False)
    layout["conf"].write_text('[[registry]]\nlocation = "r.io"\nblocked = true\n')
    bump(layout["conf"])
    with pytest.raises(BlockedRegistryError):
        w.pull_sources("r.io/x", by_digest=False)


def test_watched_fails_early(layout: dict[str, Path]) -> None:
    layout["conf"].write_text("= broken")
    with pytest.raises(RegistriesConfError):
        watched(layout)


def test_watched_interval_caches(layout: dict[str, Path]) -> None:
    w = WatchedRegistriesConf(
        env={},
        system_conf=layout["conf"],
        system_conf_dir=layout["dir"],
        home=str(layout["home"]),
        min_interval=3600,
    )
    layout["conf"].write_text('[[registry]]\nlocation = "r.io"\nblocked = true\n')
    # not re-checked within the interval
    assert w.pull_sources("r.io/x", by_digest=False) == [PullSource("r.io/x", False, False)]


def test_credential_helpers(layout: dict[str, Path]) -> None:
    assert load(layout).credential_helpers == ("containers-auth.json",)
    layout["conf"].write_text('credential-helpers = ["secretservice", "containers-auth.json"]\n')
    assert load(layout).credential_helpers == ("secretservice", "containers-auth.json")
    (layout["dir"] / "a.conf").write_text('credential-helpers = ["pass"]\n')
    assert load(layout).credential_helpers == ("pass",)
    (layout["dir"] / "b.conf").write_text("credential-helpers = []\n")
    assert load(layout).credential_helpers == ("containers-auth.json",)
    (layout["dir"] / "c.conf").write_text("credential-helpers = [1]\n")
    with pytest.raises(RegistriesConfError, match="array of strings"):
        load(layout)
