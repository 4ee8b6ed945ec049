"""Rate limits per caller and method class, and for Login per peer and per e-mail and peer."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator

import grpc
import pytest

from tests.e2e.auth_helpers import PASSWORD
from tests.support import ServerThread, details_of, ensure_admin, make_settings, mint_token
from userservice.v1 import auth_service_pb2 as auth_pb
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.auth_service_pb2_grpc import AuthServiceStub
from userservice.v1.user_service_pb2_grpc import UserServiceStub
from usersvc.interceptors.rate_limit import peer_host

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture
def limited(sqlite_url: str) -> Iterator[ServerThread]:
    with tempfile.TemporaryDirectory() as data_dir:
        settings = make_settings(
            sqlite_url,
            data_dir,
            rate_limit_reads="5/minute",
            rate_limit_writes="10/minute",
            rate_limit_login_per_peer="8/minute",
            rate_limit_login_per_email="3/minute",
        )
        thread = ServerThread(settings).start()
        thread.admin_id = ensure_admin(settings)  # type: ignore[attr-defined]
        yield thread
        thread.stop()


def _code(call: object) -> grpc.StatusCode:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_reads_are_limited_per_caller_with_retry_info(limited: ServerThread) -> None:
    admin = (("authorization", f"Bearer {mint_token(limited.admin_id)}"),)  # type: ignore[attr-defined]
    with grpc.insecure_channel(limited.address) as channel:
        users = UserServiceStub(channel)
        request = pb.GetUserRequest(id=limited.admin_id)  # type: ignore[attr-defined]
        codes = [_code(lambda: users.GetUser(request, metadata=admin)) for _ in range(5)]
        assert codes == [grpc.StatusCode.OK] * 5
        with pytest.raises(grpc.RpcError) as exc:
            users.GetUser(request, metadata=admin)
        details = details_of(exc.value)
        assert details.code == EXHAUSTED
        assert details.reason == "RATE_LIMITED"
        assert details.retry_delay_seconds is not None
        assert 0 < details.retry_delay_seconds <= 60
        # Writes are another class: still allowed for the same caller.
        created = users.CreateUser(
            pb.CreateUserRequest(
                email=f"rl-{uuid.uuid4().hex[:8]}@example.com",
                name="Rate Limited",
                password=PASSWORD,
            ),
            metadata=admin,
        ).user
        # Another caller has a budget of its own.
        other = (("authorization", f"Bearer {mint_token(created.id, roles=())}"),)
        assert _code(lambda: users.GetUser(pb.GetUserRequest(id=created.id), metadata=other)) == (
            grpc.StatusCode.OK
        )


def test_login_is_limited_per_email_and_peer_before_any_password_work(
    limited: ServerThread,
) -> None:
    with grpc.insecure_channel(limited.address) as channel:
        auth = AuthServiceStub(channel)
        users = UserServiceStub(channel)
        admin = (("authorization", f"Bearer {mint_token(limited.admin_id)}"),)  # type: ignore[attr-defined]
        email = f"victim-{uuid.uuid4().hex[:8]}@example.com"
        users.CreateUser(
            pb.CreateUserRequest(email=email, name="Victim", password=PASSWORD), metadata=admin
        )
        wrong = auth_pb.LoginRequest(email=email, password="not the password 1")
        codes = [_code(lambda: auth.Login(wrong)) for _ in range(3)]
        assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 3
        with pytest.raises(grpc.RpcError) as exc:
            auth.Login(auth_pb.LoginRequest(email=email, password=PASSWORD))
        details = details_of(exc.value)
        assert details.code == EXHAUSTED
        assert details.retry_delay_seconds
        # Another account from the same peer is not held up by this one.
        other = f"other-{uuid.uuid4().hex[:8]}@example.com"
        assert (
            _code(lambda: auth.Login(auth_pb.LoginRequest(email=other, password="x" * 12)))
            == grpc.StatusCode.UNAUTHENTICATED
        )


def test_login_is_limited_per_peer(limited: ServerThread) -> None:
    with grpc.insecure_channel(limited.address) as channel:
        auth = AuthServiceStub(channel)
        codes = [
            _code(
                lambda: auth.Login(
                    auth_pb.LoginRequest(
                        email=f"n{uuid.uuid4().hex[:8]}@example.com", password="x" * 12
                    )
                )
            )
            for _ in range(9)
        ]
    assert codes[:8] == [grpc.StatusCode.UNAUTHENTICATED] * 8
    assert codes[8] == EXHAUSTED


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:10.1.2.3:5555", "10.1.2.3"),
        ("ipv6:[::1]:5555", "::1"),
        ("ipv6:[2001:db8::7]:80", "2001:db8::7"),
        ("unix:/run/usersvc.sock", "unix:/run/usersvc.sock"),
    ],
)
def test_the_peer_host_leaves_out_the_port(peer: str, host: str) -> None:
    assert peer_host(peer) == host


def test_an_invalid_rate_limit_setting_names_the_variable() -> None:
    from pydantic import ValidationError

    from usersvc.config import Settings, settings_problems

    with pytest.raises(ValidationError) as exc:
        Settings(rate_limit_reads="lots")
    assert any(
        line.startswith("USERSVC_RATE_LIMIT_READS: ") for line in settings_problems(exc.value, {})
    )


def test_change_password_guesses_share_the_per_account_limit(limited: ServerThread) -> None:
    with grpc.insecure_channel(limited.address) as channel:
        users = UserServiceStub(channel)
        admin = (("authorization", f"Bearer {mint_token(limited.admin_id)}"),)  # type: ignore[attr-defined]
        user = users.CreateUser(
            pb.CreateUserRequest(
                email=f"cp-{uuid.uuid4().hex[:8]}@example.com", name="Guessed", password=PASSWORD
            ),
            metadata=admin,
        ).user
        own = (("authorization", f"Bearer {mint_token(user.id, roles=())}"),)

        def guess(n: int) -> grpc.StatusCode:
            request = pb.ChangePasswordRequest(
                id=user.id, current_password=f"guess {n} wrong", new_password="new secret 77 x"
            )
            return _code(lambda: users.ChangePassword(request, metadata=own))

        codes = [guess(n) for n in range(4)]
    assert codes[:3] == [grpc.StatusCode.INVALID_ARGUMENT] * 3
    assert codes[3] == EXHAUSTED


def test_one_time_code_guesses_share_the_per_account_limit(limited: ServerThread) -> None:
    with grpc.insecure_channel(limited.address) as channel:
        users = UserServiceStub(channel)  # no token: both methods are public
        target = str(uuid.uuid4())
        verify = pb.VerifyEmailRequest(user_id=target, code="guessed-code")
        recover = pb.RecoverPasswordRequest(
            user_id=target, code="guessed-code", new_password="new secret 77 x"
        )
        codes = [
            _code(lambda: users.VerifyEmail(verify)),
            _code(lambda: users.RecoverPassword(recover)),
            _code(lambda: users.VerifyEmail(verify)),
            _code(lambda: users.RecoverPassword(recover)),
        ]
        # Another account from the same peer has its own budget.
        other = pb.VerifyEmailRequest(user_id=str(uuid.uuid4()), code="guessed-code")
        codes.append(_code(lambda: users.VerifyEmail(other)))
    assert codes[:3] == [grpc.StatusCode.INVALID_ARGUMENT] * 3
    assert codes[3] == EXHAUSTED
    assert codes[4] == grpc.StatusCode.INVALID_ARGUMENT
