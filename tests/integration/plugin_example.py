# docs/guide/pytest.md's pool example, as printed there; test_plugin.py runs it.
import multiprocessing
import time

# One flag per task, set by the workers. Lock-free on purpose: a worker frozen while it
# held a lock would block the test when it reads the flags.
done = None


def init(flags):
    global done
    done = flags


def task(i):
    time.sleep(0.01)
    done[i] = 1


def test_no_task_completes_while_paused(treeguard_freeze):
    flags = multiprocessing.RawArray("b", 100)
    with multiprocessing.Pool(2, initializer=init, initargs=(flags,)) as pool:
        result = pool.map_async(task, range(100), chunksize=1)
        while sum(flags) < 5:  # the workers are busy
            time.sleep(0.01)
        guard = treeguard_freeze()  # every descendant of this test: the pool's workers
        paused = sum(flags)
        time.sleep(0.2)
        assert sum(flags) == paused  # no task completed while paused
        guard.release()  # resume (teardown would, too)
        result.get(timeout=30)
        assert sum(flags) == 100
