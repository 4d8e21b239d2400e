"""ctrl.dataplane.drain.Drains against a plain model: random starts, stops
and due calls, with deadlines in and out of order, give the same drains,
the same due backends in the same order, and the same next end."""

import random

import pytest

from ctrl.dataplane.drain import Drains


def model_due(model: dict[int, float], now: float, in_use) -> list[tuple[int, bool]]:
    """What Drains.due must yield: in deadline order (ties by id, as
    adopted drains are sorted), until the first that is neither in use nor
    past its deadline."""
    out = []
    for bid, until in sorted(model.items(), key=lambda kv: (kv[1], kv[0])):
        if in_use(bid):
            out.append((bid, True))
        elif now >= until:
            out.append((bid, False))
        else:
            break
    for bid, _ in out:
        del model[bid]
    return out


@pytest.mark.parametrize("seed", range(30))
def test_drains_match_a_plain_model(seed):
    rnd = random.Random(seed)
    start = {b: float(rnd.randrange(0, 50)) for b in rnd.sample(range(1, 200), rnd.randrange(0, 40))}
    d = Drains(start)
    model = dict(start)
    now = 0.0
    for _ in range(400):
        op = rnd.random()
        if op < 0.4:
            bids = [b for b in rnd.sample(range(1, 300), rnd.randrange(1, 6)) if b not in model]
            until = now + rnd.choice([0.0, 5.0, 10.0, rnd.uniform(-20, 60)])  # out of order too
            d.start_many(bids, until)
            model.update(dict.fromkeys(bids, until))
        elif op < 0.7:
            bid = rnd.choice(list(model) or [0]) if rnd.random() < 0.8 else rnd.randrange(300, 310)
            assert d.stop(bid) == (bid in model)
            model.pop(bid, None)
        else:
            now += rnd.uniform(0, 8)
            busy = set(rnd.sample(list(model), min(len(model), rnd.randrange(0, 3))))
            want = model_due(model, now, busy.__contains__)
            got = list(d.due(now, busy.__contains__))
            assert got == want
        assert dict(d.until) == model
        assert len(d) == len(model) and bool(d) == bool(model)
        assert d.next_end() == (min(model.values()) if model else None)
    # The oldest, sparing some: by deadline, each once.
    spare = set(rnd.sample(list(model), len(model) // 3))
    order = [b for b, _ in sorted(model.items(), key=lambda kv: (kv[1], kv[0])) if b not in spare]
    got = d.oldest(10, spare.__contains__)
    assert len(got) == len(set(got)) == min(10, len(order))
    assert sorted(model[b] for b in got) == sorted(model[b] for b in order)[: len(got)]


def test_due_comes_in_deadline_order_after_many_early_stops():
    d = Drains()
    for b in range(1, 1001):
        d.start_many([b], float(b))
    for b in range(1, 1001, 2):  # half stopped early: stale heap entries
        assert d.stop(b)
    assert d.next_end() == 2.0
    got = [b for b, serving in d.due(500.0, lambda b: False)]
    assert got == list(range(2, 501, 2))
    assert d.next_end() == 502.0 and len(d) == 250


def test_a_drain_started_again_keeps_only_its_new_deadline():
    d = Drains({7: 10.0})
    d.stop(7)
    d.start_many([7], 30.0)
    assert d.next_end() == 30.0
    assert list(d.due(20.0, lambda b: False)) == []
    assert list(d.due(30.0, lambda b: False)) == [(7, False)]
    assert not d and d.next_end() is None
