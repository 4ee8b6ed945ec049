"""Mail end to end: welcome e-mails of CreateUser, and the one-time codes of e-mail
verification, on a real server delivering to a real SMTP server.

The server runs its outbox dispatcher with short polls and backoffs. The SMTP server listens
on a port fixed for the module, so a test can stop it (a mail outage) and start it again.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from sqlalchemy import delete, select
from sqlalchemy.engine import Engine, RowMapping

from tests.e2e.conftest import ADMIN_EMAIL, CapturedLogs
from tests.secrets_registry import Detector, remember
from tests.smtp_server import ReceivedMail, SmtpServer
from tests.support import (
    ADMIN_PASSWORD,
    ServerThread,
    details_of,
    ensure_admin,
    login,
    make_settings,
    throwaway_sqlite,
    with_bearer,
)
from userservice.v1 import auth_service_pb2 as auth_pb
from userservice.v1 import user_pb2
from userservice.v1 import user_service_pb2 as pb
from userservice.v1.auth_service_pb2_grpc import AuthServiceStub
from userservice.v1.user_service_pb2_grpc import UserServiceStub
from usersvc.adapters.tables import outbox
from usersvc.bootstrap import DISPATCHER_OFF_MESSAGE
from usersvc.notifications.code_emails import CODE_MAILS
from usersvc.notifications.welcome_email import WELCOME_SUBJECT

SENDER = "usersvc <welcome@example.com>"
PASSWORD = "correct horse battery staple"
VERIFY_SUBJECT = CODE_MAILS["user.email_verification"].subject
RECOVERY_SUBJECT = CODE_MAILS["user.password_recovery"].subject


@pytest.fixture(scope="module")
def mail_server() -> Iterator[SmtpServer]:
    """The SMTP server the service is configured with; its port is fixed, it may be down."""
    server = SmtpServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def smtp(mail_server: SmtpServer) -> SmtpServer:
    """The SMTP server, up and with nothing received yet."""
    mail_server.start()
    mail_server.handler.clear()
    return mail_server


@pytest.fixture(scope="module")
def mailing_server(
    database_url: str, mail_server: SmtpServer, db: Engine
) -> Iterator[ServerThread]:
    with tempfile.TemporaryDirectory() as data_dir:
        settings = make_settings(
            database_url,
            data_dir,
            smtp_host="127.0.0.1",
            smtp_port=mail_server.port,
            smtp_sender=SENDER,
            smtp_timeout_seconds=2,
            outbox_poll_seconds=0.05,
            outbox_backoff_base_seconds=0.05,
            outbox_backoff_max_seconds=0.2,
            # Outages in these tests last a few polls; never long enough to give up.
            outbox_max_attempts=1000,
        )
        ensure_admin(settings, ADMIN_EMAIL)
        # Records of earlier tests (and of the admin) are not this module's to deliver.
        with db.begin() as conn:
            conn.execute(delete(outbox))
        thread = ServerThread(settings).start()
        try:
            yield thread
        finally:
            thread.stop()


@pytest.fixture(scope="module")
def mailing_users(mailing_server: ServerThread) -> Iterator[UserServiceStub]:
    """UserService of the mailing server, as the admin."""
    with grpc.insecure_channel(mailing_server.address) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        token = login(channel, ADMIN_EMAIL, ADMIN_PASSWORD).access_token
        yield UserServiceStub(with_bearer(channel, token))


def create(
    stub: UserServiceStub, *, name: str = "Ada Lovelace", request_id: str | None = None
) -> user_pb2.User:
    request = pb.CreateUserRequest(
        email=f"welcome-{uuid.uuid4().hex[:10]}@example.com", name=name, password=PASSWORD
    )
    metadata = (("x-request-id", request_id),) if request_id else None
    response: pb.CreateUserResponse = stub.CreateUser(request, metadata=metadata, timeout=10)
    return response.user


def welcome_record(db: Engine, user_id: str) -> RowMapping:
    with db.connect() as conn:
        query = select(outbox).where(outbox.c.aggregate_id == uuid.UUID(user_id))
        return conn.execute(query).mappings().one()


def wait_until(check: Callable[[], Any], timeout: float = 30.0) -> Any:
    """The first truthy result of `check`, polled until `timeout`; fails the test after.

    Generous: delivery takes well under a second, but a loaded 2-core machine has stalled it
    past 10 s, and a passing wait returns as soon as the check holds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {check}")
        time.sleep(0.02)


def mail_to(smtp: SmtpServer, address: str) -> list[ReceivedMail]:
    return [m for m in smtp.handler.received if address in m.rcpt_tos]


def test_a_new_user_gets_one_welcome_email(
    mailing_users: UserServiceStub, smtp: SmtpServer, db: Engine
) -> None:
    name = "Zoë <script>alert(1)</script>"
    user = create(mailing_users, name=name)

    [mail] = wait_until(lambda: mail_to(smtp, user.email))
    record = wait_until(lambda: (r := welcome_record(db, user.id))["status"] == "delivered" and r)
    assert mail.rcpt_tos == (user.email,)
    assert mail.message["To"] == user.email
    assert mail.message["From"] == SENDER
    assert mail.message["Subject"] == WELCOME_SUBJECT
    assert mail.message_id == f"<{record['id']}@usersvc>"
    assert name in mail.body("plain")
    assert "Zoë &lt;script&gt;alert(1)&lt;/script&gt;" in mail.body("html")
    assert "<script>" not in mail.body("html")
    assert record["attempts"] == 1
    assert len(mail_to(smtp, user.email)) == 1


def test_a_mail_outage_never_fails_create_user_and_the_email_arrives_afterwards(
    mailing_users: UserServiceStub, mail_server: SmtpServer, db: Engine, logs: CapturedLogs
) -> None:
    mail_server.stop()
    mail_server.handler.clear()
    request_id = f"welcome-outage-{uuid.uuid4().hex[:8]}"

    started = time.monotonic()
    user = create(mailing_users, request_id=request_id)
    elapsed = time.monotonic() - started

    # CreateUser succeeded while nothing listened on the SMTP port, and did not wait for it.
    assert user.id
    assert elapsed < 2.0
    [warning, *_] = logs.wait_for(
        lambda line: line["level"] == "WARNING" and line.get("recipient") == user.email
    )
    assert warning["request_id"] == request_id
    assert warning["recipient"] == user.email
    # The address may be logged, the e-mail body never.
    assert "Your account has been created" not in logs.text
    assert welcome_record(db, user.id)["status"] == "pending"

    mail_server.start()
    [mail] = wait_until(lambda: mail_to(mail_server, user.email))
    record = wait_until(lambda: (r := welcome_record(db, user.id))["status"] == "delivered" and r)
    assert mail.message_id == f"<{record['id']}@usersvc>"
    assert record["attempts"] >= 2
    assert len(mail_to(mail_server, user.email)) == 1


def test_a_4xx_reply_is_retried_and_the_email_delivered_once(
    mailing_users: UserServiceStub, smtp: SmtpServer, db: Engine
) -> None:
    smtp.handler.refuse_next(1, "451 4.7.1 Greylisted, try again later")
    user = create(mailing_users)

    [mail] = wait_until(lambda: mail_to(smtp, user.email))
    record = wait_until(lambda: (r := welcome_record(db, user.id))["status"] == "delivered" and r)
    assert smtp.handler.refused == 1
    assert mail.message_id == f"<{record['id']}@usersvc>"
    assert record["attempts"] == 2
    assert len(mail_to(smtp, user.email)) == 1


def test_a_user_deleted_before_delivery_gets_no_email(
    mailing_users: UserServiceStub, mail_server: SmtpServer, db: Engine
) -> None:
    mail_server.stop()
    mail_server.handler.clear()
    user = create(mailing_users)
    mailing_users.DeleteUser(pb.DeleteUserRequest(id=user.id), timeout=10)
    # Skipped while mail is still down: an attempt that claimed the record before the deletion
    # committed fails on the closed port instead of racing a restarted server.
    wait_until(lambda: welcome_record(db, user.id)["status"] == "skipped")
    mail_server.start()
    # A user created after the deletion still gets mail: proof the dispatcher is delivering.
    later = create(mailing_users)

    wait_until(lambda: mail_to(mail_server, later.email))
    assert welcome_record(db, user.id)["status"] == "skipped"
    assert mail_to(mail_server, user.email) == []


def mailed_code(mail: ReceivedMail) -> str:
    """The one-time code of a code mail (its plain-text body has a line "code: <code>")."""
    match = re.search(r"^\s*code:\s+(\S+)", mail.body("plain"), re.MULTILINE)
    assert match is not None, "no code in the mail"
    return match.group(1)


def test_email_verification_by_mailed_code_leaves_the_code_nowhere_else(
    mailing_server: ServerThread,
    mailing_users: UserServiceStub,
    smtp: SmtpServer,
    logs: CapturedLogs,
    db: Engine,
) -> None:
    user = create(mailing_users)
    sent = mailing_users.SendVerificationEmail(
        pb.SendVerificationEmailRequest(user_id=user.id), timeout=10
    )
    [mail] = wait_until(
        lambda: [m for m in mail_to(smtp, user.email) if m.message["Subject"] == VERIFY_SUBJECT]
    )
    code = mailed_code(mail)
    remember(code)  # the end-of-session audit scan looks for it too
    assert user.id in mail.body("plain")
    assert code in mail.body("html")
    assert code not in str(mail.message["Subject"])

    with grpc.insecure_channel(mailing_server.address) as channel:
        anonymous = UserServiceStub(channel)
        with pytest.raises(grpc.RpcError) as wrong:
            anonymous.VerifyEmail(
                pb.VerifyEmailRequest(user_id=user.id, code=code[::-1]), timeout=10
            )
        with pytest.raises(grpc.RpcError) as stranger:
            anonymous.VerifyEmail(
                pb.VerifyEmailRequest(user_id=str(uuid.uuid4()), code=code), timeout=10
            )
        assert (
            anonymous.VerifyEmail(pb.VerifyEmailRequest(user_id=user.id, code=code), timeout=10)
            == pb.VerifyEmailResponse()
        )
        with pytest.raises(grpc.RpcError) as reused:
            anonymous.VerifyEmail(pb.VerifyEmailRequest(user_id=user.id, code=code), timeout=10)

    refusals = [details_of(e.value) for e in (wrong, stranger, reused)]
    assert {(d.code, d.reason, d.message, tuple(d.violations.items())) for d in refusals} == {
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_CODE",
            "invalid request: code",
            (("code", "the code is wrong, expired or already used"),),
        )
    }
    after = mailing_users.GetUser(pb.GetUserRequest(id=user.id), timeout=10).user
    assert after.email_verified and not user.email_verified
    assert sent.expire_time.seconds > time.time() + 23 * 3600
    events = mailing_users.ListAuditEvents(
        pb.ListAuditEventsRequest(user_id=user.id), timeout=10
    ).events
    assert [e.action for e in events][:2] == ["user.email_verified", "user.verification_email_sent"]
    # The code is in the mail only: not in any log line, audit event or answer.
    assert logs.wait_for(lambda line: line.get("method", "").endswith("/VerifyEmail"))
    scanned = logs.text + str(events) + str(after) + str(sent)
    assert code not in scanned
    assert Detector.for_suite(also=[code]).findings(scanned) == []
    # The scan can fail: the code in a line is found.
    assert Detector.for_suite(also=[code]).findings(scanned + code)
    # Nor in the database: the outbox row lost it when it was settled as delivered.
    query = select(outbox.c.topic, outbox.c.status, outbox.c.payload).where(
        outbox.c.aggregate_id == uuid.UUID(user.id)
    )

    def settled() -> list[Any]:
        with db.connect() as conn:
            rows = list(conn.execute(query).all())
        return rows if rows and all(r.status != "pending" for r in rows) else []

    rows = wait_until(settled)
    assert "user.email_verification" in {r.topic for r in rows}
    assert code not in str([r.payload for r in rows])


def test_password_recovery_by_mailed_code_ends_old_sessions_and_leaves_no_secret_behind(
    mailing_server: ServerThread,
    mailing_users: UserServiceStub,
    smtp: SmtpServer,
    logs: CapturedLogs,
) -> None:
    user = create(mailing_users)
    new_password = f"recovered {uuid.uuid4().hex[:8]}"
    remember(new_password)
    with grpc.insecure_channel(mailing_server.address) as channel:
        old = login(channel, user.email, PASSWORD)
        created = mailing_users.CreateRecoveryCode(
            pb.CreateRecoveryCodeRequest(user_id=user.id), timeout=10
        )
        # The answer is the expiry, nothing else: the code goes by mail only.
        assert [f.name for f, _ in created.ListFields()] == ["expire_time"]
        assert time.time() + 3500 < created.expire_time.seconds < time.time() + 3700
        [mail] = wait_until(
            lambda: [
                m for m in mail_to(smtp, user.email) if m.message["Subject"] == RECOVERY_SUBJECT
            ]
        )
        code = mailed_code(mail)
        remember(code)
        anonymous = UserServiceStub(channel)
        with pytest.raises(grpc.RpcError) as wrong:
            anonymous.RecoverPassword(
                pb.RecoverPasswordRequest(
                    user_id=user.id, code=code[::-1], new_password=new_password
                ),
                timeout=10,
            )
        assert details_of(wrong.value).reason == "INVALID_CODE"
        anonymous.RecoverPassword(
            pb.RecoverPasswordRequest(user_id=user.id, code=code, new_password=new_password),
            timeout=10,
        )
        with pytest.raises(grpc.RpcError) as reused:
            anonymous.RecoverPassword(
                pb.RecoverPasswordRequest(
                    user_id=user.id, code=code, new_password="another new password"
                ),
                timeout=10,
            )
        assert details_of(reused.value).reason == "INVALID_CODE"
        # The old login is over: its refresh token and (after the token cache) access token.
        refresh = AuthServiceStub(channel).RefreshToken
        with pytest.raises(grpc.RpcError) as refused:
            refresh(auth_pb.RefreshTokenRequest(refresh_token=old.refresh_token), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        own = UserServiceStub(with_bearer(channel, old.access_token))
        wait_until(lambda: _unauthenticated(lambda: own.GetUser(pb.GetUserRequest(id=user.id))))
        with pytest.raises(grpc.RpcError):
            login(channel, user.email, PASSWORD)
        assert login(channel, user.email, new_password).access_token

    events = mailing_users.ListAuditEvents(
        pb.ListAuditEventsRequest(user_id=user.id), timeout=10
    ).events
    actions = [e.action for e in events]
    assert "user.password_recovered" in actions and "user.recovery_code_created" in actions
    assert logs.wait_for(lambda line: line.get("method", "").endswith("/RecoverPassword"))
    scanned = logs.text + str(events) + str(created)
    assert code not in scanned and new_password not in scanned
    assert Detector.for_suite(also=[code, new_password]).findings(scanned) == []


def _unauthenticated(call: Callable[[], object]) -> bool:
    try:
        call()
    except grpc.RpcError as err:
        return err.code() == grpc.StatusCode.UNAUTHENTICATED
    return False


def test_without_smtp_host_the_server_serves_and_says_once_that_mail_is_off(
    database_url: str, logs: CapturedLogs
) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        thread = ServerThread(make_settings(database_url, data_dir)).start()
        try:
            with grpc.insecure_channel(thread.address) as channel:
                grpc.channel_ready_future(channel).result(timeout=10)
        finally:
            thread.stop()
    assert [line["message"] for line in logs.lines()].count(DISPATCHER_OFF_MESSAGE) == 1


def _dispatch_env(database_url: str, data_dir: str, **env: str) -> dict[str, str]:
    return {
        **os.environ,
        "USERSVC_DATABASE_URL": database_url,
        "USERSVC_DATA_DIR": data_dir,
        "USERSVC_LOG_LEVEL": "INFO",
        **env,
    }


def test_usersvc_dispatch_delivers_on_its_own_until_sigterm() -> None:
    with throwaway_sqlite() as url, tempfile.TemporaryDirectory() as data_dir, SmtpServer() as smtp:
        settings = make_settings(url, data_dir)

        email = f"alone-{uuid.uuid4().hex[:8]}@example.com"
        ensure_admin(settings, email)  # a new user, with its welcome record
        env = _dispatch_env(
            url,
            data_dir,
            USERSVC_SMTP_HOST="127.0.0.1",
            USERSVC_SMTP_PORT=str(smtp.port),
            USERSVC_OUTBOX_POLL_SECONDS="0.05",
        )
        process = subprocess.Popen(
            [sys.executable, "-m", "usersvc", "dispatch"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            received = smtp.handler.wait_for(1, timeout=30)
        finally:
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=30)
        assert [m.rcpt_tos for m in received] == [(email,)]
        assert process.returncode == 0, stderr
        assert "e-mail dispatcher stopped" in stderr


def test_usersvc_dispatch_without_smtp_host_says_why_and_exits() -> None:
    with throwaway_sqlite() as url, tempfile.TemporaryDirectory() as data_dir:
        env = _dispatch_env(url, data_dir, USERSVC_SMTP_HOST="")
        done = subprocess.run(
            [sys.executable, "-m", "usersvc", "dispatch"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 2
    assert done.stderr.count(DISPATCHER_OFF_MESSAGE) == 1
