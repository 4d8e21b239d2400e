"""ctrl.dataplane.changeset.Rows reads as the list of tuples it stands
for, whichever way its rows went in."""

import random

import pytest

from ctrl.dataplane.changeset import ChangeSet, Rows, slot_rows


@pytest.mark.parametrize("seed", range(20))
def test_rows_behave_as_the_list_of_tuples(seed):
    rnd = random.Random(seed)
    rows, model = slot_rows(), []
    for _ in range(30):
        op = rnd.random()
        new = [(rnd.randrange(9), rnd.randrange(2**32), rnd.randrange(2**32)) for _ in range(rnd.randrange(0, 5))]
        if op < 0.3:
            rows.extend(new)
        elif op < 0.5:
            rows.extend(slot_rows(new))
        elif op < 0.7 and new:
            rows.append(new[0])
            new = new[:1]
        else:
            # the way slots.fill writes: the other columns, then the first
            sid = rnd.randrange(9)
            new = [(sid, i, b) for _, i, b in new]
            rows.cols[1].extend(i for _, i, _ in new)
            rows.cols[2].extend(b for _, _, b in new)
            rows.fill_first(sid)
        model.extend(new)
        assert rows == model and list(rows) == model and len(rows) == len(model) and bool(rows) == bool(model)
    a, b = sorted(rnd.sample(range(len(model) + 1), 2)) if len(model) > 1 else (0, 0)
    assert rows[a:b] == model[a:b]
    assert rows[:a] + rows[b:] == model[:a] + model[b:]


def test_a_slot_row_out_of_u32_is_refused():
    with pytest.raises(OverflowError):
        slot_rows([(1, 2, 2**32)])


def test_change_sets_take_rows_as_lists_too():
    cs = ChangeSet(slot_upd=[(1, 0, 5)], be_upd=[(5, (b"\0" * 16, 80, 6))])
    assert isinstance(cs.slot_upd, Rows) and isinstance(cs.be_upd, Rows)
    assert cs.slot_upd == [(1, 0, 5)] and [bid for bid, _ in cs.be_upd] == [5]
    assert cs.slot_upd != [(1, 0, 6)]
