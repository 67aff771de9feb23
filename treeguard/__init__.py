"""treeguard: freeze a whole process tree, prove it stopped, and always thaw it."""

from . import cgroup as cgroup
from ._async import AsyncGuard as AsyncGuard
from ._async import guard as guard
from ._freezethaw import freezethaw as freezethaw
from ._guard import ProcessesGuard as ProcessesGuard
from ._guard import freeze_child_processes as freeze_child_processes
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

__version__ = "0.1.0"

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

for _name in __all__:
    _obj = globals()[_name]
    if not isinstance(_obj, type(cgroup)) and getattr(_obj, "__module__", "").startswith(
        "treeguard."
    ):
        try:
            _obj.__module__ = "treeguard"
        except (AttributeError, TypeError):
            pass
del _name, _obj
