"""The AdminBootstrap singleton: at most one first admin, ever.

Its only stream is ``bootstrap:admin``. ``bootstrap-admin`` saves ``AdminBootstrapped``
on it at expected version 0 *in the same atomic append* as the admin's ``UserCreated``,
so of two racing bootstraps exactly one commits; the loser reloads, sees the marker and
reports the existing admin.
"""

from __future__ import annotations

from shipyard_core.aggregate import Aggregate, DomainEvent
from shipyard_keys.domain.events import AdminBootstrapped

BOOTSTRAP_ID = "admin"
"""The id of the one bootstrap stream."""


class AdminBootstrap(Aggregate):
    """Remembers which user (if any) was bootstrapped as the first admin."""

    aggregate_type = "bootstrap"

    def __init__(self, aggregate_id: str = BOOTSTRAP_ID) -> None:
        super().__init__(aggregate_id)
        self.user: str | None = None

    def record(self, user: str) -> None:
        """Marks ``user`` as the bootstrapped admin. Callers check ``exists`` first; a
        racing second bootstrap is stopped by the expected version, not here."""
        self.emit(AdminBootstrapped(user=user))

    def apply(self, event: DomainEvent) -> None:
        """Evolves state from the bootstrap event."""
        if isinstance(event, AdminBootstrapped):
            self.user = event.user
