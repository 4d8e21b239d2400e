"""Stable ids: a frontend keeps its service id and an (address, port,
protocol) keeps its backend id for as long as it exists, and both are read
back from the pinned maps after a restart. Conntrack entries name them, so
an id that changed under a flow would move the flow."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection

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
        """Ids of these backends, allocating new ones (appended to `new`,
        the backends to write). looked: their ids as self.ids held them
        now (None for the new ones), if the caller has them; it becomes
        the result."""
        ids = self.ids
        get = ids.get
        out = list(map(get, bs)) if looked is None else looked
        if out and out.count(None) == len(out):
            # All new (a new Service, a first sync): allocate in bulk.
            # One int object per id, shared by both dicts, the rows to
            # write and the caller's slots (a range would make a new one
            # for each: at 100,000 backends, 2.8 MiB a copy).
            first = self.next_id
            fresh = list(range(first, first + len(bs)))
            before = len(ids)
            ids.update(zip(bs, fresh, strict=False))
            if len(ids) == before + len(bs):
                self.next_id += len(bs)
                self.backends.update(zip(fresh, bs, strict=False))
                new_ids, new_backends = new.cols
                new_ids.extend(fresh)
                new_backends.extend(bs)
                return fresh
            # A backend listed twice (the dict says so without a set of
            # them all): undone, and taken one by one below.
            for b in bs:
                ids.pop(b, None)
        if None in out:
            for i, b in enumerate(bs):
                bid = out[i]
                if bid is None:
                    bid = ids.get(b)  # listed twice in bs: allocated above
                    if bid is None:
                        bid = self.next_id
                        self.next_id += 1
                        ids[b] = bid
                        self.backends[bid] = b
                        new.append((bid, b))
                    out[i] = bid
        return out  # type: ignore[return-value]

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
