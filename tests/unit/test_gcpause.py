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
