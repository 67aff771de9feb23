"""``scope="namespace"``: every process of the caller's PID namespace but PID 1, the caller
and its ancestors. Run ONLY inside a fresh PID namespace with its own /proc, never on the
machine itself: a supervisor script becomes PID 1 there, builds processes that are not
descendants of the caller (its siblings, an orphan re-parented to PID 1), freezes through
every face, checks through /proc from inside, thaws, and prints a JSON verdict per face.
When the script (the namespace's PID 1) exits, the kernel kills everything left in there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_root

ROOT = str(Path(__file__).resolve().parents[2])

SCRIPT = r'''
import ctypes, json, mmap, os, signal, struct, sys, threading, time
sys.path.insert(0, sys.argv[1])  # the repository: the tests' own /proc reader
from tests.proc import ppid, task_states

libc = ctypes.CDLL(None, use_errno=True)
mem = mmap.mmap(-1, 8 * 32)  # one counter per slot, shared by every fork below


def tick(slot):
    n = 0
    while True:
        n += 1
        struct.pack_into("q", mem, slot * 8, n)
        time.sleep(0.002)


def counters(slots):
    return [struct.unpack_from("q", mem, s * 8)[0] for s in slots]


def spawn(slot, threads=0, child_slot=None):
    """Fork a ticking worker (with extra ticking threads, and a ticking child)."""
    pid = os.fork()
    if pid == 0:
        try:
            if child_slot is not None:
                spawn(child_slot)
            for t in range(threads):
                threading.Thread(target=tick, args=(slot + 1 + t,), daemon=True).start()
            tick(slot)
        finally:
            os._exit(0)
    return pid



def all_pids():
    return sorted(int(n) for n in os.listdir("/proc") if n.isdigit())


def wait_until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def caller(middle, excluded, excluded_subtree, slots_frozen, slots_free):
    """The supervisor: freezes the namespace through every face and judges from /proc."""
    import anyio
    import treeguard

    me = os.getpid()
    spawn(14, child_slot=15)  # the caller's own descendants are frozen too
    wait_until(lambda: all(counters([14, 15])))
    protected = {1, middle, me}
    free = protected | set(excluded_subtree)
    slots_frozen = slots_frozen + [14, 15]

    def judge_frozen(reported):
        others = [p for p in all_pids() if p not in free]
        late = {p: s for p in others for s in task_states(p).values() if s not in "TZX"}
        wrongly = {p: s for p in free for s in task_states(p).values() if s in "Tt"}
        first = counters(slots_frozen + slots_free)
        time.sleep(0.05)  # 25 tick periods: a frozen counter must not move in that time
        now = counters(slots_frozen + slots_free)
        n = len(slots_frozen)
        return {
            "others": len(others),
            "not_stopped": late,
            "protected_stopped": wrongly,
            "reported_is_others": sorted(reported) == sorted(
                p for p in others if set(task_states(p).values()) != {"Z"}
            ),
            "frozen_counters_still": first[:n] == now[:n],
            "free_counters_move": all(a != b for a, b in zip(first[n:], now[n:])),
        }

    def judge_thawed():
        first = counters(slots_frozen)
        return {
            "none_stopped": wait_until(
                lambda: not any(s in "Tt" for p in all_pids() for s in task_states(p).values())
            ),
            "counters_move": wait_until(
                lambda: all(a != b for a, b in zip(first, counters(slots_frozen)))
            ),
        }

    options = {"scope": "namespace", "exclude": excluded}
    verdicts = {}

    g = treeguard.ProcessesGuard(**options)
    with g:
        verdicts["ProcessesGuard"] = judge_frozen(g.pids)
    verdicts["ProcessesGuard"].update(judge_thawed())

    async def through_guard():
        async with treeguard.guard(**options) as g:
            return judge_frozen(g.pids)

    for backend in ("asyncio", "trio"):
        verdicts[f"guard/{backend}"] = anyio.run(through_guard, backend=backend)
        verdicts[f"guard/{backend}"].update(judge_thawed())

    token = treeguard.freeze(**options)
    verdicts["token"] = judge_frozen(token.pids)
    treeguard.thaw(treeguard.Token.from_json(token.to_json()))
    verdicts["token"].update(judge_thawed())

    verdicts["freezethaw"] = treeguard.freezethaw(lambda: judge_frozen(frozen_pids()), **options)
    verdicts["freezethaw"].update(judge_thawed())
    return verdicts


def frozen_pids():
    return [p for p in all_pids() if set(task_states(p).values()) <= set("TZX")]


def main():
    assert os.getpid() == 1, "run me as PID 1 of a fresh PID namespace"
    # Our own bound: init of a namespace ignores signals it has no handler for.
    signal.signal(signal.SIGALRM, lambda *_: os._exit(3))
    signal.alarm(90)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: if unshare dies, so does the namespace

    sibling = spawn(0, threads=2)          # slots 0, 1, 2: not a descendant of the caller
    with_child = spawn(4, child_slot=5)    # slots 4, 5
    r, w = os.pipe()
    middle_man = os.fork()                 # double fork: slot 8 ends up a child of PID 1
    if middle_man == 0:
        if os.fork() == 0:
            os.write(w, str(os.getpid()).encode())
            tick(8)
        os._exit(0)
    os.waitpid(middle_man, 0)
    orphan = int(os.read(r, 32))
    excluded = spawn(10, child_slot=11)    # slots 10, 11: left running, with its subtree
    slots_frozen, slots_free = [0, 1, 2, 4, 5, 8], [10, 11]
    wait_until(lambda: all(counters(slots_frozen + slots_free)))
    excluded_child = int(open(f"/proc/{excluded}/task/{excluded}/children").read().split()[0])
    orphan_ppid = ppid(orphan)

    rv, wv = os.pipe()
    middle = os.fork()                     # an ancestor of the caller, other than PID 1
    if middle == 0:
        me = os.fork()
        if me == 0:
            try:
                verdicts = caller(
                    os.getppid(), [excluded], [excluded, excluded_child], slots_frozen, slots_free
                )
                os.write(wv, json.dumps(verdicts).encode() + b"\n")
            except BaseException:
                import traceback

                traceback.print_exc()
                os.write(wv, b"null\n")
            finally:
                os._exit(0)
        os.waitpid(me, 0)
        os._exit(0)
    os.close(wv)
    chunks = [b""]
    while not chunks[-1].endswith(b"\n"):  # the caller's children hold the pipe open
        chunk = os.read(rv, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.waitpid(middle, 0)
    print(json.dumps({
        "orphan_ppid": orphan_ppid,
        "sibling": sibling,
        "with_child": with_child,
        "excluded": [excluded, excluded_child],
        "verdicts": json.loads(b"".join(chunks) or b"null"),
    }), flush=True)


main()
'''

FACES = ("ProcessesGuard", "guard/asyncio", "guard/trio", "token", "freezethaw")


@pytest.fixture(scope="module")
def verdict(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_root("a fresh PID namespace")
    unshare = shutil.which("unshare")
    assert unshare, "util-linux unshare is needed (CI has it)"
    script = Path(tmp_path_factory.mktemp("namespace")) / "supervisor.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [unshare, "--pid", "--fork", "--mount-proc", sys.executable, str(script), ROOT],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_the_namespace_was_built_as_intended(verdict: dict[str, Any]) -> None:
    assert verdict["orphan_ppid"] == 1  # the double-forked process belongs to PID 1 now
    assert verdict["verdicts"] is not None, "the caller died before judging"
    assert set(verdict["verdicts"]) == set(FACES)


@pytest.mark.parametrize("face", FACES)
def test_every_other_process_is_frozen_then_thawed(face: str, verdict: dict[str, Any]) -> None:
    judged = verdict["verdicts"][face]
    # the sibling (3 tasks), a parent and its child, the orphan, the caller's child and
    # grandchild: 6 processes, 3 of them not descendants of the caller
    assert judged["others"] == 6
    assert judged["not_stopped"] == {}
    assert judged["protected_stopped"] == {}
    assert judged["reported_is_others"]
    assert judged["frozen_counters_still"]
    assert judged["free_counters_move"]
    assert judged["none_stopped"]
    assert judged["counters_move"]
