"""Where ``Cgroup.create()`` makes its cgroup: below the caller's own cgroup, on fake
hierarchies (plain directories in tmp_path). The real delegated subtree, owned by another
user on a pure cgroup v2 hierarchy, is tested in the environment matrix
(tests/integration/test_environments.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from treeguard._delegation import SYSTEMD_SCOPE, creatable, parent_for, refusal
from treeguard._mounts import Discovery, Hierarchy
from treeguard.errors import CgroupUnavailableError

SCOPE = "/user.slice/user-1000.slice/app.scope"


def _hierarchy(tmp_path: Path, **kwargs: Any) -> tuple[Hierarchy, Path]:
    mount = tmp_path / "cg"
    own = mount / SCOPE.lstrip("/")
    own.mkdir(parents=True)
    for d in (mount, own):
        (d / "cgroup.procs").write_text("")
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
