"""The Group aggregate: a team of users that owns quotas and deployments."""

from __future__ import annotations

from shipyard_core.aggregate import Aggregate, DomainEvent
from shipyard_core.errors import AlreadyExists, NotFound
from shipyard_keys.domain.events import GroupCreated, MemberAdded, MemberRemoved


class Group(Aggregate):
    """A group (id = name) and its members.

    Membership changes are idempotent (adding a member twice, or removing a non-member,
    emits nothing): the command asks for a state, and a retried command after a lost
    answer must not fail. Whether the *user* exists is the command handler's check, since
    it needs the User aggregate."""

    aggregate_type = "group"

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.description = ""
        self.members: set[str] = set()

    # -- decisions ---------------------------------------------------------------------

    def create(self, *, description: str, created_by: str) -> None:
        """Creates the group; refuses a name that is taken."""
        if self.exists:
            raise AlreadyExists(f"group {self.id!r} exists already; choose another name")
        self.emit(GroupCreated(name=self.id, description=description, created_by=created_by))

    def add_member(self, user: str, *, added_by: str) -> bool:
        """Adds ``user``; returns whether anything changed."""
        self.require_exists()
        if user in self.members:
            return False
        self.emit(MemberAdded(group=self.id, user=user, added_by=added_by))
        return True

    def remove_member(self, user: str, *, removed_by: str) -> bool:
        """Removes ``user``; returns whether anything changed."""
        self.require_exists()
        if user not in self.members:
            return False
        self.emit(MemberRemoved(group=self.id, user=user, removed_by=removed_by))
        return True

    def require_exists(self) -> None:
        """Raises NotFound unless the group exists."""
        if not self.exists:
            raise NotFound(
                f"group {self.id!r} does not exist; create it first "
                f"(`shipyard groups create {self.id}`)"
            )

    # -- state -------------------------------------------------------------------------

    def apply(self, event: DomainEvent) -> None:
        """Evolves state from one of the group's events."""
        if isinstance(event, GroupCreated):
            self.description = event.description
        elif isinstance(event, MemberAdded):
            self.members.add(event.user)
        elif isinstance(event, MemberRemoved):
            self.members.discard(event.user)
