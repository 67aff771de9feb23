"""``import treeguard`` is cheap: the public names are imported on first use, and what only
one feature needs is imported by that feature (benchmarks/importtime.py measures it)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest

import treeguard

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from importtime import imported_seconds  # noqa: E402

#: What no program should pay for by importing treeguard alone.
HEAVY = {
    "anyio",
    "ctypes",
    "dataclasses",
    "hashlib",
    "inspect",
    "json",
    "psutil",
    "secrets",
    "subprocess",
    "threading",
    "typing",
}
#: What the guard needs not: the async face, the tokens, cgroup children, the bindings.
NOT_FOR_THE_GUARD = {"anyio", "ctypes", "hashlib", "psutil", "secrets", "subprocess"}

#: The budget of ``import treeguard`` as ``-X importtime`` reports it (best of 5 runs).
#: benchmarks/importtime.py measured 2.4 ms (best of 31) on a loaded 2-core machine where
#: the import of every module at once (what ``import treeguard`` did before it was lazy)
#: took 97 ms: the margin is for a busier CI machine; an eager import would not fit.
BUDGET_SECONDS = 0.010


def imported_by(statement: str) -> set[str]:
    """The modules a fresh interpreter loads to run ``statement``, beyond its start-up."""
    code = (
        "import sys, json\n"
        "before = set(sys.modules)\n"
        f"{statement}\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return set(json.loads(done.stdout))


def test_importing_the_package_loads_nothing_heavy() -> None:
    loaded = imported_by("import treeguard")
    assert not loaded & HEAVY
    assert {m for m in loaded if m.startswith("treeguard")} == {"treeguard", "treeguard._version"}


@pytest.mark.parametrize(
    "statement",
    ["from treeguard import ProcessesGuard", "from treeguard import snapshot, FreezeError"],
)
def test_the_guard_loads_only_what_it_needs(statement: str) -> None:
    assert not imported_by(statement) & NOT_FOR_THE_GUARD


#: What a signal guard's freeze needs not: the other backends (the cgroup freezers, ptrace,
#: the kernel's process events), snapshots and their schemas.
NOT_FOR_A_SIGNAL_FREEZE = {
    "importlib.resources",
    "socket",
    "treeguard._backends._cgroup",
    "treeguard._backends._ptrace",
    "treeguard._backends._auto",
    "treeguard._proc_events",
    "treeguard._snapshot",
    "treeguard._jsonshape",
}


def test_a_signal_freeze_loads_no_other_backend() -> None:
    # (the caller's descendants: none here, so the freeze stops nothing)
    loaded = imported_by("import treeguard\nwith treeguard.ProcessesGuard() as g:\n    pass")
    assert "treeguard._backends._signal" in loaded
    assert not loaded & NOT_FOR_A_SIGNAL_FREEZE


def test_the_pytest_plugin_loads_the_guard_only_for_a_test_that_uses_it() -> None:
    # pytest loads the plugin in every session of a project that has treeguard installed.
    loaded = imported_by("import treeguard.pytest_plugin")
    assert {m for m in loaded if m.startswith("treeguard")} == {
        "treeguard",
        "treeguard._version",
        "treeguard.pytest_plugin",
    }


def test_the_import_fits_its_budget() -> None:
    def once() -> float:
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "import treeguard"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return imported_seconds(done.stderr)

    best = min(once() for _ in range(5))
    assert 0 < best < BUDGET_SECONDS


def test_every_public_name_is_there_and_says_treeguard() -> None:
    for name in treeguard.__all__:
        obj = getattr(treeguard, name)
        if isinstance(obj, (type, types.FunctionType)):  # not the type aliases, not cgroup
            assert obj.__module__ == "treeguard", name
    assert set(treeguard.__all__) == set(treeguard._HOMES)  # each name has a home
    # the lazy table lists each public module's names itself: none may be forgotten
    assert {n for n, home in treeguard._HOMES.items() if home == "errors"} == set(
        treeguard.errors.__all__
    )
    assert set(treeguard.__all__) <= set(dir(treeguard))
    assert {"__version__", "__all__"} <= set(dir(treeguard))
    typo = "ProcesGuard"
    with pytest.raises(AttributeError, match="no attribute 'ProcesGuard'"):
        getattr(treeguard, typo)
    from treeguard import _version

    assert treeguard.__version__ == _version.__version__
    error = treeguard.StopTimeoutError(1.0, [(1, 1, "R")])
    assert type(pickle.loads(pickle.dumps(error))) is treeguard.StopTimeoutError


def test_the_public_names_work_in_a_fresh_interpreter() -> None:
    # Each name is reached first through the package, as a user's program reaches it.
    code = (
        "import treeguard\n"
        "for name in treeguard.__all__:\n"
        "    assert getattr(treeguard, name) is not None, name\n"
        "from treeguard import *\n"
        "print(ProcessesGuard.__module__, guard.__module__, cgroup.__name__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.split() == ["treeguard", "treeguard", "treeguard.cgroup"]


def test_type_hints_resolve_whichever_name_is_reached_first() -> None:
    # typing.get_type_hints() (pydantic, cattrs, typeguard) resolves a public class's
    # annotations in the package's namespace: they must be there even when that class is
    # the only name a program reached.
    code = "import sys, typing, treeguard\ntyping.get_type_hints(getattr(treeguard, sys.argv[1]))\n"
    names = [name for name in treeguard.__all__ if isinstance(getattr(treeguard, name), type)]
    assert {"TreeSnapshot", "ProcessRecord", "FreezeReport", "ProcessesGuard"} <= set(names)
    for name in names:
        done = subprocess.run(
            [sys.executable, "-c", code, name], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, (name, done.stderr[-2000:])
