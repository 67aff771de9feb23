"""treeguard: freeze a whole process tree, prove it stopped, and always thaw it.

The public names are imported on first use (PEP 562), so that ``import treeguard`` stays
cheap: a program that only reaches the CLI, the pytest plugin or one name does not pay for
the backends, anyio and the rest.
"""

import importlib as _importlib
import sys as _sys

from ._version import __version__ as __version__

__all__ = [
    "AsyncGuard",
    "BackendName",
    "CgroupError",
    "CgroupUnavailableError",
    "FreezeError",
    "FreezeOptions",
    "FreezePermissionError",
    "FreezeReport",
    "FrozenInterrupt",
    "GuardOptions",
    "HasPid",
    "InvalidArgumentError",
    "NoSuchProcessError",
    "Options",
    "ProcessRecord",
    "ProcessesGuard",
    "ProcfsParseError",
    "Scope",
    "SignalState",
    "Skip",
    "StateFileError",
    "StopTimeoutError",
    "Target",
    "ThreadRecord",
    "Token",
    "TokenError",
    "TreeSnapshot",
    "TreeUnstableError",
    "WatchdogError",
    "cgroup",
    "freeze",
    "freeze_child_processes",
    "freezethaw",
    "guard",
    "snapshot",
    "thaw",
]

#: Where each public name lives; ``None``: the name is the module itself.
_HOMES = {
    "AsyncGuard": "_async",
    "guard": "_async",
    "freezethaw": "_freezethaw",
    "ProcessesGuard": "_guard",
    "freeze_child_processes": "_child_processes",
    "FreezeReport": "_report",
    "Skip": "_report",
    "ProcessRecord": "_snapshot",
    "SignalState": "_snapshot",
    "ThreadRecord": "_snapshot",
    "TreeSnapshot": "_snapshot",
    "snapshot": "_snapshot_read",
    "Token": "_token",
    "freeze": "_token",
    "thaw": "_token",
    **dict.fromkeys(
        ["BackendName", "FreezeOptions", "GuardOptions", "HasPid", "Options", "Scope", "Target"],
        "_types",
    ),
    **dict.fromkeys(
        [
            "CgroupError",
            "CgroupUnavailableError",
            "FreezeError",
            "FreezePermissionError",
            "FrozenInterrupt",
            "InvalidArgumentError",
            "NoSuchProcessError",
            "ProcfsParseError",
            "StateFileError",
            "StopTimeoutError",
            "TokenError",
            "TreeUnstableError",
            "WatchdogError",
        ],
        "errors",
    ),
    "cgroup": None,
}

# typing.TYPE_CHECKING without importing typing (a type checker takes any TYPE_CHECKING as
# true). A type checker sees the imports, and no __getattr__: a misspelt name is an error
# for it; at run time, __getattr__ imports each name on first use.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from . import cgroup as cgroup
    from ._async import AsyncGuard as AsyncGuard
    from ._async import guard as guard
    from ._child_processes import freeze_child_processes as freeze_child_processes
    from ._freezethaw import freezethaw as freezethaw
    from ._guard import ProcessesGuard as ProcessesGuard
    from ._report import FreezeReport as FreezeReport
    from ._report import Skip as Skip
    from ._snapshot import ProcessRecord as ProcessRecord
    from ._snapshot import SignalState as SignalState
    from ._snapshot import ThreadRecord as ThreadRecord
    from ._snapshot import TreeSnapshot as TreeSnapshot
    from ._snapshot_read import snapshot as snapshot
    from ._token import Token as Token
    from ._token import freeze as freeze
    from ._token import thaw as thaw
    from ._types import BackendName as BackendName
    from ._types import FreezeOptions as FreezeOptions
    from ._types import GuardOptions as GuardOptions
    from ._types import HasPid as HasPid
    from ._types import Options as Options
    from ._types import Scope as Scope
    from ._types import Target as Target
    from .errors import CgroupError as CgroupError
    from .errors import CgroupUnavailableError as CgroupUnavailableError
    from .errors import FreezeError as FreezeError
    from .errors import FreezePermissionError as FreezePermissionError
    from .errors import FrozenInterrupt as FrozenInterrupt
    from .errors import InvalidArgumentError as InvalidArgumentError
    from .errors import NoSuchProcessError as NoSuchProcessError
    from .errors import ProcfsParseError as ProcfsParseError
    from .errors import StateFileError as StateFileError
    from .errors import StopTimeoutError as StopTimeoutError
    from .errors import TokenError as TokenError
    from .errors import TreeUnstableError as TreeUnstableError
    from .errors import WatchdogError as WatchdogError
else:

    def __getattr__(name: str) -> object:
        """Import a public name on first use, and keep it in the package's namespace."""
        home = _HOMES.get(name, "")
        if home == "":
            raise AttributeError(f"module 'treeguard' has no attribute {name!r}")
        _importlib.import_module(f"{__name__}.{home or name}")
        # Every public name whose module is loaded by now joins the namespace, not only the
        # one asked for: typing.get_type_hints() resolves a class's annotations in the
        # namespace of its __module__ (this package), where they must be found.
        for other, where in _HOMES.items():
            module = _sys.modules.get(f"{__name__}.{where or other}")
            if module is not None and other not in globals():
                globals()[other] = _published(module if where is None else getattr(module, other))
        return globals()[name]

    def _published(obj: object) -> object:
        if getattr(obj, "__module__", "").startswith("treeguard."):
            try:  # users see treeguard.Name (and pickle finds it there), as anyio does
                obj.__module__ = "treeguard"  # type: ignore[attr-defined]
            except (AttributeError, TypeError):  # a type alias (Literal, Union): read-only
                pass
        return obj


del TYPE_CHECKING


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
