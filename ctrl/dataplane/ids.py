"""Stable ids: a frontend keeps its service id and an (address, port,
protocol) keeps its backend id for as long as it exists, and both are read
back from the pinned maps after a restart. Conntrack entries name them, so
an id that changed under a flow would move the flow."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from itertools import compress, repeat
from operator import is_

from ..model.plan import Backend
from .changeset import Rows


class BackendIds:
    """Backend <-> id, and how many frontends use each id (refs). New ids
    count up from one past the highest ever seen, never reusing one a
    conntrack entry may still name."""

    def __init__(self, backends: dict[int, Backend] | None = None):
        self.backends: dict[int, Backend] = dict(backends or {})
        self.ids: dict[Backend, int] = {b: i for i, b in self.backends.items()}
        # backend id -> frontends using it. A Counter: a missing id reads
        # 0, and update() counts a whole list of ids in C.
        self.refs: Counter[int] = Counter()
        self.next_id = max(list(self.backends) + [0]) + 1

    def __len__(self) -> int:
        return len(self.backends)

    def get(self, bs: Collection[Backend], new: Rows, looked: list[int | None] | None = None) -> list[int]:
        """Ids of these backends, allocating new ones in order of first
        appearance (appended to `new`, the backends to write). looked:
        their ids as self.ids held them now (None for the new ones), if
        the caller has them."""
        ids = self.ids
        if looked is not None:
            out = looked
        elif ids:
            out = list(map(ids.get, bs))
        else:  # none known yet (a first sync)
            out = [None] * len(bs)
        n_new = out.count(None)
        if not n_new:
            return out  # type: ignore[return-value]
        # Allocated in bulk, the whole list staying in C: a new Service,
        # a first sync (many Services' backends at once), 100 of a slice.
        # One int object per id, shared by both dicts, the rows to write
        # and the caller's slots (a range would make a new one for each:
        # at 100,000 backends, 2.8 MiB a copy).
        cand = bs if n_new == len(out) else list(compress(bs, map(is_, out, repeat(None))))
        first = self.next_id
        fresh = list(range(first, first + len(cand)))
        before = len(ids)
        ids.update(zip(cand, fresh, strict=False))
        if len(ids) != before + len(cand):
            # A backend listed twice (the dict says so without a set of
            # them all): undone, and allocated once each.
            for b in cand:
                ids.pop(b, None)
            cand = list(dict.fromkeys(cand))
            fresh = fresh[: len(cand)]
            ids.update(zip(cand, fresh, strict=True))
        self.next_id += len(cand)
        self.backends.update(zip(fresh, cand, strict=True))
        new_ids, new_backends = new.cols
        new_ids.extend(fresh)
        new_backends.extend(cand)
        if n_new == len(out) and len(fresh) == len(out):
            return fresh
        return list(map(ids.__getitem__, bs))

    def drop(self, bid: int) -> Backend:
        """Forget a backend id (its entry is deleted from the map)."""
        b = self.backends.pop(bid)
        del self.ids[b]
        self.refs.pop(bid, None)
        return b

    def unused(self) -> list[int]:
        """Ids no frontend uses."""
        refs = self.refs
        return [b for b in self.backends if refs.get(b, 0) <= 0]


class ServiceIds:
    """Service ids (the key of a frontend's slots, name and source ranges),
    counting up from one past the highest seen."""

    def __init__(self, seen: Collection[int] = ()):
        self.next_id = max(list(seen) + [0]) + 1

    def new(self) -> int:
        sid = self.next_id
        self.next_id += 1
        return sid
