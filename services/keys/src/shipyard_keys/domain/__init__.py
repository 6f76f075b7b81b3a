"""The keys service's aggregates (User, Group, AdminBootstrap, ClientKeys) and their events."""

from shipyard_keys.domain.bootstrap import BOOTSTRAP_ID, AdminBootstrap
from shipyard_keys.domain.client_keys import (
    ClientKeys,
    ClientKeyState,
    NewClientKey,
    no_key_message,
)
from shipyard_keys.domain.events import (
    REGISTRY,
    AdminBootstrapped,
    ClientKeyCreated,
    ClientKeyRevoked,
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
    "ClientKeyCreated",
    "ClientKeyRevoked",
    "ClientKeyState",
    "ClientKeys",
    "Group",
    "GroupCreated",
    "MemberAdded",
    "MemberRemoved",
    "NewClientKey",
    "NewToken",
    "TokenIssued",
    "TokenRevoked",
    "User",
    "UserCreated",
    "no_key_message",
]
