"""Identity aggregates (User, Group, AdminBootstrap) and their events."""

from shipyard_keys.domain.bootstrap import BOOTSTRAP_ID, AdminBootstrap
from shipyard_keys.domain.events import (
    REGISTRY,
    AdminBootstrapped,
    GroupCreated,
    MemberAdded,
    MemberRemoved,
    TokenIssued,
    TokenRevoked,
    UserCreated,
)
from shipyard_keys.domain.group import Group
from shipyard_keys.domain.user import NewToken, User

__all__ = [
    "BOOTSTRAP_ID",
    "REGISTRY",
    "AdminBootstrap",
    "AdminBootstrapped",
    "Group",
    "GroupCreated",
    "MemberAdded",
    "MemberRemoved",
    "NewToken",
    "TokenIssued",
    "TokenRevoked",
    "User",
    "UserCreated",
]
