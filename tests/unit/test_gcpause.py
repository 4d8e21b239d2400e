import gc
import threading

from ctrl.util.gcpause import paused_gc


def test_nested_and_concurrent_pauses_restore_the_collector_once_all_end():
    assert gc.isenabled()
    entered, release = threading.Event(), threading.Event()

    def other():
        with paused_gc():
            entered.set()
            release.wait(5)

    t = threading.Thread(target=other)
    with paused_gc():
        t.start()
        entered.wait(5)
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()
    # The other thread still holds its pause.
    assert not gc.isenabled()
    release.set()
    t.join(5)
    assert gc.isenabled()


def test_a_collector_disabled_before_stays_disabled():
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_what_a_pause_made_is_frozen_not_walked_when_it_ends():
    """The collector counted the pause's allocations: enabled again as it
    was, its next allocation would start a collection walking them all.
    Frozen first, they are out of its way and nothing starts."""
    started: list[int] = []

    def watch(phase, info):
        if phase == "start":
            started.append(info["generation"])

    frozen = gc.get_freeze_count()
    gc.callbacks.append(watch)
    try:
        with paused_gc():
            made = [[i] for i in range(20_000)]  # 20,000 tracked containers
        after = [[]]  # the first allocations after the pause
        assert started == []
        assert gc.get_freeze_count() >= frozen + len(made)
        del after
    finally:
        gc.callbacks.remove(watch)
        gc.unfreeze()
