"""The identity part of the keys service: users, their API tokens, groups and membership."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from shipyard.client._channel import Transport
from shipyard.client._convert import PlainData, to_datetime
from shipyard.keys.v1 import identity_pb2 as pb
from shipyard.keys.v1 import identity_pb2_grpc as pb_grpc

SERVICE = "keys"


@dataclass(frozen=True)
class User(PlainData):
    """A person or robot that calls Shipyard with API tokens."""

    name: str
    admin: bool = False
    groups: list[str] = field(default_factory=list)
    created_at: datetime | None = None
    created_by: str = ""

    @classmethod
    def from_proto(cls, msg: pb.User) -> User:
        """Builds it from the protobuf message."""
        return cls(
            name=msg.name,
            admin=msg.admin,
            groups=list(msg.groups),
            created_at=to_datetime(msg.created_at),
            created_by=msg.created_by,
        )


@dataclass(frozen=True)
class Principal(PlainData):
    """Who a token belongs to, as the services see the caller."""

    user: str
    admin: bool = False
    groups: list[str] = field(default_factory=list)
    token_id: str = ""

    @classmethod
    def from_proto(cls, msg: pb.Principal) -> Principal:
        """Builds it from the protobuf message."""
        return cls(user=msg.user, admin=msg.admin, groups=list(msg.groups), token_id=msg.token_id)


@dataclass(frozen=True)
class Group(PlainData):
    """A team: quotas and deployments belong to groups, users are their members."""

    name: str
    description: str = ""
    members: list[str] = field(default_factory=list)
    created_at: datetime | None = None

    @classmethod
    def from_proto(cls, msg: pb.Group) -> Group:
        """Builds it from the protobuf message."""
        return cls(
            name=msg.name,
            description=msg.description,
            members=list(msg.members),
            created_at=to_datetime(msg.created_at),
        )


@dataclass(frozen=True)
class IssuedToken(PlainData):
    """A new API token. The secret is returned this once; the server keeps only a hash."""

    token: str
    token_id: str


@dataclass(frozen=True)
class CreatedUser(PlainData):
    """A new user with their first API token (shown this once)."""

    user: User
    token: str
    token_id: str


class IdentityClient:
    """Typed calls to the identity service (part of *keys*). Obtain it as ``Client().identity``."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    def _stub(self) -> pb_grpc.IdentityServiceStub:
        return self._transport.stub(SERVICE, pb_grpc.IdentityServiceStub)

    def create_user(
        self, name: str, *, admin: bool = False, groups: Iterable[str] = ()
    ) -> CreatedUser:
        """Creates a user (admin only) and their first token; each group must exist."""
        request = pb.CreateUserRequest(name=name, admin=admin, groups=list(groups))
        reply: pb.CreateUserResponse = self._transport.call(
            SERVICE, "CreateUser", self._stub().CreateUser, request
        )
        return CreatedUser(
            user=User.from_proto(reply.user), token=reply.token, token_id=reply.token_id
        )

    def list_users(self) -> list[User]:
        """Every user (admin only)."""
        reply: pb.ListUsersResponse = self._transport.call(
            SERVICE, "ListUsers", self._stub().ListUsers, pb.ListUsersRequest()
        )
        return [User.from_proto(u) for u in reply.users]

    def issue_token(self, user: str, *, description: str = "") -> IssuedToken:
        """Issues another token for a user (admins, or the user for themselves)."""
        reply: pb.IssueTokenResponse = self._transport.call(
            SERVICE,
            "IssueToken",
            self._stub().IssueToken,
            pb.IssueTokenRequest(user=user, description=description),
        )
        return IssuedToken(token=reply.token, token_id=reply.token_id)

    def revoke_token(self, user: str, token_id: str) -> None:
        """Revokes a token by its id (admins, or the user for their own tokens)."""
        self._transport.call(
            SERVICE,
            "RevokeToken",
            self._stub().RevokeToken,
            pb.RevokeTokenRequest(user=user, token_id=token_id),
        )

    def create_group(self, name: str, *, description: str = "") -> Group:
        """Creates a group (admin only)."""
        reply: pb.Group = self._transport.call(
            SERVICE,
            "CreateGroup",
            self._stub().CreateGroup,
            pb.CreateGroupRequest(name=name, description=description),
        )
        return Group.from_proto(reply)

    def add_member(self, group: str, user: str) -> Group:
        """Adds a user to a group (admin only); returns the group."""
        reply: pb.Group = self._transport.call(
            SERVICE,
            "AddMember",
            self._stub().AddMember,
            pb.AddMemberRequest(group=group, user=user),
        )
        return Group.from_proto(reply)

    def remove_member(self, group: str, user: str) -> Group:
        """Removes a user from a group (admin only); returns the group."""
        reply: pb.Group = self._transport.call(
            SERVICE,
            "RemoveMember",
            self._stub().RemoveMember,
            pb.RemoveMemberRequest(group=group, user=user),
        )
        return Group.from_proto(reply)

    def list_groups(self) -> list[Group]:
        """Groups: all for admins, the caller's own otherwise."""
        reply: pb.ListGroupsResponse = self._transport.call(
            SERVICE, "ListGroups", self._stub().ListGroups, pb.ListGroupsRequest()
        )
        return [Group.from_proto(g) for g in reply.groups]

    def whoami(self) -> Principal:
        """Who the caller's token belongs to."""
        reply: pb.Principal = self._transport.call(
            SERVICE, "WhoAmI", self._stub().WhoAmI, pb.WhoAmIRequest()
        )
        return Principal.from_proto(reply)

    def authenticate(self, token: str) -> Principal:
        """Resolves any token to its principal (raises
        :class:`~shipyard.client.errors.Unauthenticated` for an unknown or revoked one)."""
        reply: pb.Principal = self._transport.call(
            SERVICE,
            "Authenticate",
            self._stub().Authenticate,
            pb.AuthenticateRequest(token=token),
        )
        return Principal.from_proto(reply)
