"""Where ``Cgroup.create()`` makes its cgroup: below the caller's own cgroup, on fake
hierarchies (plain directories in tmp_path). The real delegated subtree, owned by another
user on a pure cgroup v2 hierarchy, is tested in the environment matrix
(tests/integration/test_environments.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from treeguard import _delegation
from treeguard._delegation import SYSTEMD_SCOPE, choose, creatable, parent_for, refusal
from treeguard._doctor import diagnose
from treeguard._mounts import Discovery, Hierarchy
from treeguard.errors import CgroupUnavailableError
from treeguard.procfs import ProcFS

SCOPE = "/user.slice/user-1000.slice/app.scope"


def _hierarchy(tmp_path: Path, **kwargs: Any) -> tuple[Hierarchy, Path]:
    mount = tmp_path / "cg"
    own = mount / SCOPE.lstrip("/")
    own.mkdir(parents=True)
    for d in (mount, own):
        (d / "cgroup.procs").write_text("")
    for d in own.parents:  # the non-root ones, as a 5.2+ kernel shows them
        if d != mount and mount in d.parents:
            (d / "cgroup.events").write_text("")
            (d / "cgroup.freeze").write_text("0")
    (own / "cgroup.events").write_text("")
    (own / "cgroup.freeze").write_text("0")
    return Hierarchy(2, str(mount), **kwargs), own


def test_the_own_cgroup_is_the_parent_not_the_root(tmp_path: Path) -> None:
    hierarchy, own = _hierarchy(tmp_path)
    found = Discovery(v2=hierarchy, freezer=None, own={"": SCOPE})
    assert parent_for(found, hierarchy) == str(own)
    assert creatable(found, hierarchy) == (str(own), None)


def test_a_caller_in_the_root_cgroup_makes_it_there(tmp_path: Path) -> None:
    hierarchy, _ = _hierarchy(tmp_path)
    found = Discovery(v2=hierarchy, freezer=None, own={"": "/"})
    assert parent_for(found, hierarchy) == hierarchy.mountpoint


def test_an_invisible_own_cgroup_is_refused_with_what_to_do(tmp_path: Path) -> None:
    mount = tmp_path / "cg"
    mount.mkdir()
    # A mount of another part of the hierarchy: the caller's cgroup is not shown in it.
    hierarchy = Hierarchy(2, str(mount), root="/machine.slice")
    found = Discovery(v2=hierarchy, freezer=None, own={"": SCOPE})
    with pytest.raises(CgroupUnavailableError, match="not visible") as caught:
        parent_for(found, hierarchy)
    assert SYSTEMD_SCOPE in str(caught.value)
    parent, why = creatable(found, hierarchy)
    assert parent is None and why is not None and "not visible" in why


def test_read_only_is_named(tmp_path: Path) -> None:
    hierarchy, _ = _hierarchy(tmp_path, read_only=True)
    found = Discovery(v2=hierarchy, freezer=None, own={"": SCOPE})
    with pytest.raises(CgroupUnavailableError, match="read-only"):
        parent_for(found, hierarchy)


def test_the_common_ancestors_cgroup_procs_must_be_writable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A directory of one's own is not enough: moving a process needs the cgroup.procs of
    # the closest common ancestor of its old and new cgroup (cgroup-v2.rst).
    hierarchy, own = _hierarchy(tmp_path)
    other = Path(hierarchy.mountpoint) / "other.slice"
    other.mkdir()
    real = os.access
    root_procs = os.path.join(hierarchy.mountpoint, "cgroup.procs")
    monkeypatch.setattr(
        os, "access", lambda path, mode, **kw: path != root_procs and real(path, mode, **kw)
    )
    assert refusal(hierarchy, str(own), str(own)) is None
    why = refusal(hierarchy, str(other), str(own))
    assert why is not None and root_procs in why
    found = Discovery(v2=hierarchy, freezer=None, own={"": SCOPE})
    with pytest.raises(CgroupUnavailableError, match="cgroup.procs"):
        parent_for(found, hierarchy, str(other))


def test_an_unwritable_own_cgroup_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hierarchy, own = _hierarchy(tmp_path)
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False)
    found = Discovery(v2=hierarchy, freezer=None, own={"": SCOPE})
    with pytest.raises(CgroupUnavailableError, match="may not create") as caught:
        parent_for(found, hierarchy)
    assert caught.value.path == str(own)  # never falls back to the hierarchy's root
    assert SYSTEMD_SCOPE in str(caught.value)


def test_a_missing_parent_is_named_as_missing(tmp_path: Path) -> None:
    hierarchy, own = _hierarchy(tmp_path)
    found = Discovery(v2=hierarchy, freezer=None, own={"": SCOPE})
    gone = str(own / "gone")
    with pytest.raises(CgroupUnavailableError, match="no such directory") as caught:
        parent_for(found, hierarchy, gone)
    assert caught.value.path == gone
    assert "run as root" not in str(caught.value)  # no advice about rights


def _v1(tmp_path: Path) -> tuple[Hierarchy, Path]:
    mount = tmp_path / "freezer"
    own = mount / "ci"
    own.mkdir(parents=True)
    (own / "freezer.state").write_text("THAWED\n")
    return Hierarchy(1, str(mount)), own


def test_create_falls_back_to_v1_when_v2_is_read_only(tmp_path: Path) -> None:
    v2, _ = _hierarchy(tmp_path, read_only=True)
    v1, own1 = _v1(tmp_path)
    found = Discovery(v2=v2, freezer=v1, own={"": SCOPE, "freezer": "/ci"})
    assert choose(found) == (v1, str(own1))
    with pytest.raises(CgroupUnavailableError, match="read-only"):
        choose(found, version=2)


def test_a_kernel_without_the_v2_freezer_is_refused_before_anything_is_made(
    tmp_path: Path,
) -> None:
    # Linux 5.0/5.1 on a hybrid host: non-root v2 cgroups without cgroup.freeze.
    v2, own2 = _hierarchy(tmp_path)
    (own2 / "cgroup.freeze").unlink()
    v1, own1 = _v1(tmp_path)
    found = Discovery(v2=v2, freezer=v1, own={"": SCOPE, "freezer": "/ci"})
    assert choose(found) == (v1, str(own1))
    with pytest.raises(CgroupUnavailableError, match="5.2"):
        choose(found, version=2)
    assert not [p for p in own2.iterdir() if p.is_dir()]  # nothing was made
    found_v2_only = Discovery(v2=v2, freezer=None, own={"": SCOPE})
    with pytest.raises(CgroupUnavailableError, match="5.2"):
        choose(found_v2_only)


def test_the_root_cgroup_asks_a_child_or_the_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "cgroup.procs").write_text("")
    monkeypatch.setattr(os, "uname", lambda: os.uname_result(("Linux", "h", "5.1.21", "", "")))
    assert "5.1.21" in str(_delegation.no_v2_freezer(str(root)))
    monkeypatch.setattr(os, "uname", lambda: os.uname_result(("Linux", "h", "5.10.0-8", "", "")))
    assert _delegation.no_v2_freezer(str(root)) is None
    (root / "init.scope").mkdir()  # a child answers before the release does
    assert "5.2" in str(_delegation.no_v2_freezer(str(root)))
    (root / "init.scope" / "cgroup.freeze").write_text("0")
    assert _delegation.no_v2_freezer(str(root)) is None


def test_every_refusal_is_named(tmp_path: Path) -> None:
    v2, _ = _hierarchy(tmp_path, read_only=True)
    v1, _ = _v1(tmp_path)
    found = Discovery(v2=v2, freezer=Hierarchy(1, v1.mountpoint, read_only=True), own={})
    with pytest.raises(CgroupUnavailableError) as caught:
        choose(found)
    said = str(caught.value)
    assert "v2: " in said and "v1: " in said and v2.mountpoint in said and v1.mountpoint in said


def test_doctor_reports_the_hierarchy_create_uses(tmp_path: Path) -> None:
    # A hybrid host with a read-only v2 mount: the doctor names v1, as create() uses.
    v2, _ = _hierarchy(tmp_path)
    v1, own1 = _v1(tmp_path)
    (tmp_path / "proc" / "self").mkdir(parents=True)
    (tmp_path / "proc" / "self" / "mountinfo").write_text(
        f"37 31 0:34 / {v1.mountpoint} rw - cgroup cgroup rw,freezer\n"
        f"41 31 0:38 / {v2.mountpoint} ro - cgroup2 cgroup2 rw\n"
    )
    (tmp_path / "proc" / "self" / "cgroup").write_text(f"6:freezer:/ci\n0::{SCOPE}\n")
    fs = ProcFS(str(tmp_path / "proc"))
    d = diagnose(fs)
    assert d.create_version == 1
    assert d.backends["cgroup"].available
    assert f"v1 freezer, for a tree spawned into Cgroup.create()'s cgroup (made in {own1})" in (
        d.backends["cgroup"].note
    )
    assert d.v2 is not None and d.v2.create_in is None and "read-only" in str(d.v2.why_not)
