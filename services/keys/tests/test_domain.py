"""The identity aggregates and token helpers, without infrastructure."""

from __future__ import annotations

import pytest

from shipyard_core.errors import AlreadyExists, NotFound
from shipyard_keys.domain import Group, TokenIssued, User, UserCreated, tokens


def test_tokens_have_their_shape_and_only_the_hash_is_recorded() -> None:
    user = User("alice")
    user.create(admin=False, created_by="root")
    new = user.issue_token(description="ci", issued_by="root")
    assert new.token.startswith("sy_") and len(new.token) == 46
    assert tokens.is_token_id(new.token_id)
    assert new.token not in repr(new)  # never logged by accident
    issued = user.pending[-1]
    assert isinstance(issued, TokenIssued)
    assert issued.token_hash == tokens.hash_token(new.token)
    assert new.token not in issued.model_dump_json()
    assert tokens.hashes_match(issued.token_hash, new.token)
    assert not tokens.hashes_match(issued.token_hash, new.token + "x")


def test_user_decisions() -> None:
    user = User("alice")
    with pytest.raises(NotFound, match="user 'alice' does not exist"):
        user.issue_token(description="", issued_by="root")
    user.create(admin=True, created_by="root")
    assert isinstance(user.pending[0], UserCreated) and user.admin
    with pytest.raises(AlreadyExists, match="exists already"):
        user.create(admin=False, created_by="root")
    first = user.issue_token(description="", issued_by="root")
    assert user.revoke_token(first.token_id, revoked_by="root") is True
    assert user.revoke_token(first.token_id, revoked_by="root") is False  # idempotent
    with pytest.raises(NotFound, match="has no token 'tok_00000000'"):
        user.revoke_token("tok_00000000", revoked_by="root")


def test_group_membership_is_idempotent() -> None:
    group = Group("team-a")
    with pytest.raises(NotFound, match="create it first"):
        group.add_member("alice", added_by="root")
    group.create(description="", created_by="root")
    assert group.add_member("alice", added_by="root") is True
    assert group.add_member("alice", added_by="root") is False
    assert group.remove_member("alice", removed_by="root") is True
    assert group.remove_member("alice", removed_by="root") is False
    assert len(group.pending) == 3 and group.members == set()


def test_token_checks_refuse_what_cannot_be_a_token() -> None:
    assert tokens.looks_like_token(tokens.new_token())
    assert not tokens.looks_like_token("tok_12345678")
    assert not tokens.looks_like_token("sy_" + "a" * 300)
    assert not tokens.is_token_id(tokens.new_token())
