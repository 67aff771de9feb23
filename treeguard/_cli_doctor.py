"""``treeguard doctor``: which backends work for this user on this machine, and why the
others do not (the facts come from :mod:`treeguard._doctor`). Always exits 0: a backend
that is not available is an answer, not a failure."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

__all__ = ["cmd_doctor", "register"]

DESCRIPTION = (
    "Say what this machine and this user can do: the kernel and the identity check it "
    "allows (pidfs inode or start time), pidfd support, the children files, the cgroup "
    "layout (v2, v1, hybrid, none) and where Cgroup.create() may make a cgroup (a "
    "delegated subtree), ptrace permission and Yama's scope, and which backends are "
    "available, with the reason for each one that is not. Nothing is frozen or signalled."
)


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the ``doctor`` subcommand through the command line's ``add``."""
    doctor = add("doctor", "say which backends work here, and why the others do not", DESCRIPTION)
    doctor.add_argument("--json", action="store_true", help="print JSON (schema 1)")


def cmd_doctor(args: argparse.Namespace) -> int:
    from ._doctor import diagnose

    found = diagnose()
    print(json.dumps(found.to_dict(), indent=2) if args.json else found.render())
    return 0
