"""The gRPC face of the identity handlers: protobuf in, app call, protobuf out.

Nothing is decided here. The kit's interceptor has authenticated the caller (except for
``Authenticate``, which is public: it *is* the token check) and maps domain errors to
status codes.
"""

from __future__ import annotations

from typing import Any

from shipyard.keys.v1 import identity_pb2 as pb
from shipyard.keys.v1 import identity_pb2_grpc as pb_grpc
from shipyard_core.auth import Principal, current_principal
from shipyard_core.grpckit.convert import to_timestamp
from shipyard_keys.app import GroupView, IdentityCommands, IdentityQueries, UserView

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["IdentityService"].full_name
"""``shipyard.keys.v1.IdentityService``."""

PUBLIC_METHODS: tuple[str, ...] = (f"/{SERVICE_NAME}/Authenticate",)
"""Methods that need no token: only ``Authenticate``, which checks one."""


class IdentityServicer(pb_grpc.IdentityServiceServicer):
    """``shipyard.keys.v1.IdentityService`` over the identity commands and queries."""

    def __init__(self, commands: IdentityCommands, queries: IdentityQueries) -> None:
        self.commands = commands
        self.queries = queries

    async def CreateUser(
        self, request: pb.CreateUserRequest, context: Any
    ) -> pb.CreateUserResponse:
        """Creates a user and their first token (admin only)."""
        created = await self.commands.create_user(
            current_principal(), request.name, admin=request.admin, groups=request.groups
        )
        return pb.CreateUserResponse(
            user=user_message(created.user),
            token=created.token.token,
            token_id=created.token.token_id,
        )

    async def ListUsers(self, request: pb.ListUsersRequest, context: Any) -> pb.ListUsersResponse:
        """Lists users (admin only)."""
        users = await self.queries.list_users(current_principal())
        return pb.ListUsersResponse(users=[user_message(u) for u in users])

    async def IssueToken(
        self, request: pb.IssueTokenRequest, context: Any
    ) -> pb.IssueTokenResponse:
        """Issues another token (admins, or users for themselves)."""
        issued = await self.commands.issue_token(
            current_principal(), request.user, description=request.description
        )
        return pb.IssueTokenResponse(token=issued.token, token_id=issued.token_id)

    async def RevokeToken(
        self, request: pb.RevokeTokenRequest, context: Any
    ) -> pb.RevokeTokenResponse:
        """Revokes a token by id (admins, or users for their own)."""
        await self.commands.revoke_token(current_principal(), request.user, request.token_id)
        return pb.RevokeTokenResponse()

    async def CreateGroup(self, request: pb.CreateGroupRequest, context: Any) -> pb.Group:
        """Creates a group (admin only)."""
        group = await self.commands.create_group(
            current_principal(), request.name, description=request.description
        )
        return group_message(group)

    async def AddMember(self, request: pb.AddMemberRequest, context: Any) -> pb.Group:
        """Adds a user to a group (admin only)."""
        group = await self.commands.add_member(current_principal(), request.group, request.user)
        return group_message(group)

    async def RemoveMember(self, request: pb.RemoveMemberRequest, context: Any) -> pb.Group:
        """Removes a user from a group (admin only)."""
        group = await self.commands.remove_member(current_principal(), request.group, request.user)
        return group_message(group)

    async def ListGroups(
        self, request: pb.ListGroupsRequest, context: Any
    ) -> pb.ListGroupsResponse:
        """Lists groups: all for admins, the caller's own otherwise."""
        groups = await self.queries.list_groups(current_principal())
        return pb.ListGroupsResponse(groups=[group_message(g) for g in groups])

    async def WhoAmI(self, request: pb.WhoAmIRequest, context: Any) -> pb.Principal:
        """The caller."""
        return principal_message(await self.queries.whoami(current_principal()))

    async def Authenticate(self, request: pb.AuthenticateRequest, context: Any) -> pb.Principal:
        """Resolves a token to its principal (public; UNAUTHENTICATED when unknown or
        revoked)."""
        return principal_message(await self.queries.authenticate(request.token))


def user_message(user: UserView) -> pb.User:
    """A UserView as protobuf."""
    return pb.User(
        name=user.name,
        admin=user.admin,
        groups=user.groups,
        created_at=to_timestamp(user.created_at),
        created_by=user.created_by,
    )


def group_message(group: GroupView) -> pb.Group:
    """A GroupView as protobuf."""
    return pb.Group(
        name=group.name,
        description=group.description,
        members=group.members,
        created_at=to_timestamp(group.created_at),
    )


def principal_message(principal: Principal) -> pb.Principal:
    """A Principal as protobuf (groups sorted, so answers are stable)."""
    return pb.Principal(
        user=principal.user,
        admin=principal.admin,
        groups=sorted(principal.groups),
        token_id=principal.token_id,
    )
