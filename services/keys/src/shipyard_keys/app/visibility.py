"""Read-your-writes for the keys service's commands: answer only once the projection
shows it.

The token check reads the ``identity`` projection, so "the token works the instant it is
returned" and "a revocation holds the instant RevokeToken returns" both mean: the
command waits until the projection has applied its events before answering. Client keys
work the same way over the ``client_keys`` projection.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import asyncpg

from shipyard_core.aggregate import Aggregate
from shipyard_core.errors import Unavailable
from shipyard_core.eventstore import EventStore, StoredEvent
from shipyard_core.projections import Projection
from shipyard_core.projections.consistency import wait_until_projected
from shipyard_keys.projections import IdentityProjection

log = logging.getLogger(__name__)


class ReadYourWrites:
    """Waits until ``projection`` (by default ``identity``) has applied a command's
    events."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        store: EventStore,
        timeout_seconds: float,
        projection: type[Projection] = IdentityProjection,
    ) -> None:
        self.pool = pool
        self.store = store
        self.timeout_seconds = timeout_seconds
        self.projection = projection

    async def settle(
        self,
        stored: Sequence[StoredEvent],
        unchanged: Sequence[Aggregate] = (),
        *,
        must_hold: str = "",
    ) -> bool:
        """Waits for ``stored`` and for the current version of each aggregate in
        ``unchanged`` (a command that decided nothing new still answers only once the
        state it reports is visible, e.g. a repeated revocation).

        On timeout the write stands (it is durable) and False is returned, unless
        ``must_hold`` says what the caller relies on: then the caller gets Unavailable and
        retries the (idempotent) command. Commands that return a secret never pass
        ``must_hold``: failing them would lose a token that is shown only once."""
        events = list(stored)
        for aggregate in unchanged:
            if aggregate.version > 0:
                stream = f"{aggregate.aggregate_type}:{aggregate.id}"
                events += await self.store.read_stream(stream, after_version=aggregate.version - 1)
        # Only the projection's own streams have positions to wait for (a command may
        # also write others, e.g. bootstrap:admin).
        followed = {aggregate for _, aggregate in self.projection.sources}
        events = [e for e in events if e.aggregate in followed]
        if await wait_until_projected(
            self.pool,
            self.projection.schema,
            self.projection.name,
            events,
            self.timeout_seconds,
        ):
            return True
        if must_hold:
            raise Unavailable(
                f"{must_hold} is recorded but not in effect yet (the {self.projection.name} "
                f"read model lags by more than {self.timeout_seconds:g}s); "
                "repeat the request to confirm"
            )
        log.warning(
            "%s projection did not apply %d event(s) within %ss; answering anyway",
            self.projection.name,
            len(events),
            self.timeout_seconds,
        )
        return False
