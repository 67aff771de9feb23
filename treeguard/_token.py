"""Freeze in one place, thaw in another: ``freeze() -> Token``, ``thaw(token)``.

A :class:`Token` is what a backend's :meth:`~treeguard._backends.Backend.describe` says
another process needs to thaw the freeze, plus the backend's name. For the signal backend
that is ``(pid, starttime)`` of every process stopped, in stop order (parent-first), of
every process found stopped by someone else (never resumed), and of every job-control relay
above the tree (a parent that stops itself when its child stops: resumed after the tree if
it did). The thaw goes through the core's :func:`~treeguard._backends.thaw_described`, which
signals a PID only while it still names the process that was frozen (same starttime), so a
token that outlived its processes is harmless.

The JSON form carries a format name, a version and a SHA-256 digest of its content. The
digest catches a token that was edited or damaged; it is not a signature (anyone can
recompute it), so the starttime check at thaw time is what actually protects other processes.
"""

from __future__ import annotations

# hashlib (OpenSSL) is loaded with the tokens, not with the package, and before any thaw:
# a token read while the descriptor table is full must not need to open a module.
import hashlib
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, final

from . import _backends
from ._guard import new_guard
from ._types import FreezeOptions, Target
from .errors import InvalidArgumentError, TokenError

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Token", "freeze", "thaw"]

FORMAT = "treeguard-token"
VERSION = 1
_KEYS = frozenset({"format", "version", "backend", "payload", "digest"})


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validator(backend: str) -> Callable[[dict[str, Any]], None]:
    # Each backend checks its own payload (``validate_described`` in treeguard._backends,
    # next to its branch of ``thaw_described``), raising TokenError.
    if not isinstance(backend, str) or backend not in _backends.BACKENDS:
        raise TokenError(f"unknown backend {backend!r} (this treeguard knows {_backends.BACKENDS})")

    def check(payload: dict[str, Any]) -> None:
        try:
            _backends.validate_described(backend, payload)
        except TokenError:
            raise
        except (ValueError, TypeError, KeyError) as err:
            raise TokenError(f"{backend} payload: {err}") from err

    return check


def _key_problem(what: str, keys: set[str], expected: frozenset[str]) -> str:
    missing = sorted(expected - keys)
    extra = sorted(keys - expected)
    parts = [f"missing {missing}" if missing else "", f"unexpected {extra}" if extra else ""]
    return f"{what}: " + ", ".join(p for p in parts if p)


def _canonical(backend: str, payload: dict[str, Any]) -> str:
    body = {"format": FORMAT, "version": VERSION, "backend": backend, "payload": payload}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise TokenError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise TokenError(f"{name} is not a valid number in a token")


@final
class Token:
    """What a freeze stopped, enough for any process of this machine to thaw it.

    Made by :func:`freeze`; serialised by :meth:`to_json`, read back by :meth:`from_json`,
    consumed by :func:`thaw`. Immutable, compared by content.

    :param backend: the name of the backend that froze (``"signal"``).
    :param payload: what that backend's ``describe()`` returned (JSON-able).
    :raises TokenError: if the payload is not exactly what ``backend`` describes.
    """

    __slots__ = ("_backend", "_text")

    def __init__(self, backend: str, payload: dict[str, Any]) -> None:
        if not isinstance(backend, str):
            raise TokenError(f"backend must be a string, not {type(backend).__name__}")
        if not isinstance(payload, dict):
            raise TokenError(f"payload must be an object, not {type(payload).__name__}")
        try:
            # A deep, JSON-shaped copy: tuples become lists, nothing shared with the caller.
            copy = json.loads(json.dumps(payload, allow_nan=False))
        except (TypeError, ValueError) as err:
            raise TokenError(f"payload is not JSON data: {err}") from err
        _validator(backend)(copy)
        self._backend = backend
        self._text = _canonical(backend, copy)

    # -- what it holds --------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """The backend that froze."""
        return self._backend

    @property
    def payload(self) -> dict[str, Any]:
        """A copy of the backend's description of the freeze."""
        payload: dict[str, Any] = json.loads(self._text)["payload"]
        return payload

    @property
    def identities(self) -> tuple[tuple[int, int], ...]:
        """``(pid, starttime)`` of each process stopped, in stop order (signal backend)."""
        return self._pairs("stopped")

    @property
    def already_stopped(self) -> tuple[tuple[int, int], ...]:
        """``(pid, starttime)`` of processes found stopped by someone else (never resumed)."""
        return self._pairs("already_stopped")

    @property
    def pids(self) -> tuple[int, ...]:
        """The processes stopped, in stop order (parent-first)."""
        return tuple(pid for pid, _ in self.identities)

    def _pairs(self, key: str) -> tuple[tuple[int, int], ...]:
        payload = self.payload
        # Signal-shaped payloads (also an ``auto`` freeze that used signals) list processes.
        records = payload.get(key, []) if "stopped" in payload else []
        return tuple((int(r[0]), int(r[1])) for r in records)

    # -- JSON -----------------------------------------------------------------------------

    def to_json(self) -> str:
        """The token as one line of JSON (format, version, backend, payload, digest)."""
        body = json.loads(self._text)
        body["digest"] = _digest(self._text)
        return json.dumps(body, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Token:
        """Read a token written by :meth:`to_json`, checking every field.

        :param text: the JSON text (str, or UTF-8 bytes).
        :raises TokenError: if the text is not a well-formed, unmodified token of a version
            and backend this treeguard knows. Nothing is signalled.
        """
        if isinstance(text, bytes | bytearray):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError as err:
                raise TokenError("not UTF-8 text") from err
        if not isinstance(text, str):
            raise TokenError(f"expected JSON text, not {type(text).__name__}")
        try:
            body = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
        except TokenError:
            raise
        except (ValueError, RecursionError) as err:
            raise TokenError(f"not JSON: {err}") from err
        if not isinstance(body, dict):
            raise TokenError(f"a token is a JSON object, not {type(body).__name__}")
        keys = set(body)
        if keys != _KEYS:
            raise TokenError(_key_problem("token", keys, _KEYS))
        if body["format"] != FORMAT:
            raise TokenError(f"format must be {FORMAT!r}, not {body['format']!r}")
        version = body["version"]
        if not _is_int(version) or version != VERSION:
            raise TokenError(
                f"version {version!r} is not supported (this treeguard reads {VERSION})"
            )
        digest = body["digest"]
        if not isinstance(digest, str):
            raise TokenError("digest must be a string")
        token = cls(body["backend"], body["payload"])
        expected = _digest(token._text)
        if digest != expected:
            raise TokenError("digest mismatch: the token was modified or damaged")
        return token

    # -- identity -------------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Token) and other._text == self._text

    def __hash__(self) -> int:
        return hash(self._text)

    def __repr__(self) -> str:
        if "stopped" in self.payload:
            shown = f"{len(self.identities)} stopped, {len(self.already_stopped)} already stopped"
        else:
            shown = "payload=" + json.dumps(self.payload, sort_keys=True)[:60]
        return f"<Token backend={self._backend} {shown}>"


def freeze(root: Target | None = None, **options: Unpack[FreezeOptions]) -> Token:
    """Freeze a tree and hand it over as a :class:`Token`: nothing here thaws it any more.

    ::

        token = treeguard.freeze(server.pid, include_root=True)
        Path("frozen.json").write_text(token.to_json())
        ...  # later, in this or any other process:
        treeguard.thaw(treeguard.Token.from_json(Path("frozen.json").read_text()))

    :param root: whose descendants to freeze (default: the calling process).
    :param options: the options of :class:`ProcessesGuard` except ``watchdog`` and
        ``max_frozen`` (the watchdog thaws when this process exits, a token outlives it).
    :returns: the token; the tree stays frozen until :func:`thaw` is called with it.
    :raises InvalidArgumentError: if an argument is of the wrong type or out of range.
    :raises FreezeError: as :meth:`ProcessesGuard.freeze` (nothing is left stopped).
    """
    given: dict[str, Any] = dict(options)
    for name in ("watchdog", "max_frozen"):
        if given.get(name) not in (None, False):
            raise InvalidArgumentError(
                name, "a token outlives this process, the watchdog would thaw at its exit"
            )
    if given.get("backend") == "ptrace":
        raise InvalidArgumentError(
            "backend", "a ptrace hold belongs to this process and cannot go in a token"
        )
    guard = new_guard({"root": root, **given})
    guard._portable = True  # no ptrace hold for auto: it would end with this process
    guard.freeze()
    try:
        backend = guard._backend
        assert backend is not None
        # The backend that ran (``auto`` names the one it chose): the thaw needs no guess.
        token = Token(guard.report.backend, backend.describe())
    except BaseException:
        guard.release()
        raise
    guard._detach()
    return token


def thaw(token: Token) -> int:
    """Thaw what ``token`` froze, from any process of the machine.

    Processes are resumed last-stopped first. One whose PID now names another process
    (different starttime), or that is gone, is skipped; one that was already stopped before
    the freeze stays stopped. Then each job-control relay above the tree (``su``,
    ``runuser``, a shell: a parent, running when the freeze began, that stopped itself when
    its child stopped) is resumed, if it is stopped and still the process recorded.
    Thawing twice resumes the same processes (or cgroup) again: harmless while they run,
    but a token has no way to know it was used, so a second thaw after something else
    stopped them again (a guard, another token's freeze) resumes them under it. Thaw a
    token once.

    :param token: from :func:`freeze` or :meth:`Token.from_json`.
    :returns: how many processes of the tree were resumed (relays are not counted).
    :raises InvalidArgumentError: if ``token`` is not a :class:`Token`.
    :raises FreezePermissionError: if some processes may not be signalled by this user (the
        others were resumed).
    :raises FreezeError: if this process's descriptor table is full: the processes it could
        not reach are named, the others were resumed; thaw again once descriptors are free.
    """
    if not isinstance(token, Token):
        raise InvalidArgumentError(
            "token", f"must be a Token (see Token.from_json), not {type(token).__name__}"
        )
    payload = token.payload
    _validator(token.backend)(payload)  # a Token is checked when made; this costs little
    return _backends.thaw_described(token.backend, payload)
