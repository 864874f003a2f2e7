"""Delivery over SMTP to a real server: security, AUTH, failures, reuse."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from services.sender.compose import compose, message_id_for, recipients
from services.sender.smtp import Reply, SmtpConnection
from shared.accounts import Security, SmtpAccount
from shared.errors import PermanentDeliveryError, TemporaryDeliveryError
from shared.models import Address, OutboundEmail
from shared.settings import MIB
from tests.support.smtp import AuthAttempt, SmtpServer, Stage
from tests.support.tls import make_pki

Factory = Callable[..., SmtpServer]

USER = "support@example.com"
PASSWORD = "s3cret-Pässwörd"
SENDER = "support@example.com"
MESSAGE = (
    b"From: support@example.com\r\n"
    b"To: ann@example.org\r\n"
    b"Subject: Your order\r\n"
    b"\r\n"
    b"Hello Ann,\r\n"
    b".a line that starts with a dot\r\n"
)


def connect(
    server: SmtpServer, password: str | None = PASSWORD, **account: object
) -> SmtpConnection:
    return SmtpConnection(
        server.account(**account),
        password,
        timeout=5,
        local_hostname="localhost",
    )


def unencrypted(port: int) -> SmtpAccount:
    return SmtpAccount(
        host="127.0.0.1", port=port, security=Security.NONE, username="nobody"
    )


@pytest.fixture
def plain(smtp_server_factory: Factory) -> SmtpServer:
    return smtp_server_factory("plain", username=USER, password=PASSWORD)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def test_a_message_is_delivered_over_plain_smtp_with_auth_plain(
    plain: SmtpServer,
) -> None:
    with connect(plain) as connection:
        result = connection.send(SENDER, ["ann@example.org"], MESSAGE)

    received = plain.wait_for(1)[0]
    assert (SENDER, ("ann@example.org",), MESSAGE, USER, False) == (
        received.mail_from,
        received.rcpt_tos,
        received.data,
        received.login,
        received.tls,
    )
    assert [AuthAttempt("PLAIN", USER, True)] == plain.logins
    assert (["ann@example.org"], {}, Reply(250, "2.0.0 OK queued as 1")) == (
        result.accepted,
        result.refused,
        result.reply,
    )


def test_auth_login_is_used_where_plain_is_not_offered(
    smtp_server_factory: Factory,
) -> None:
    server = smtp_server_factory(
        "plain", username=USER, password=PASSWORD, mechanisms=["LOGIN"]
    )

    with connect(server) as connection:
        connection.send(SENDER, ["ann@example.org"], MESSAGE)

    assert [AuthAttempt("LOGIN", USER, True)] == server.logins
    assert 1 == len(server.wait_for(1))


def test_starttls_is_verified_against_the_channels_ca(
    smtp_server_factory: Factory,
) -> None:
    server = smtp_server_factory("starttls", username=USER, password=PASSWORD)

    with connect(server) as connection:
        connection.send(SENDER, ["ann@example.org"], MESSAGE)

    received = server.wait_for(1)[0]
    assert (True, USER, MESSAGE) == (received.tls, received.login, received.data)


def test_implicit_tls_is_verified_against_the_channels_ca(
    smtp_server_factory: Factory,
) -> None:
    server = smtp_server_factory("tls", username=USER, password=PASSWORD)

    with connect(server) as connection:
        connection.send(SENDER, ["ann@example.org"], MESSAGE)

    received = server.wait_for(1)[0]
    assert (True, USER, MESSAGE) == (received.tls, received.login, received.data)


@pytest.mark.parametrize("mode", ["starttls", "tls"])
def test_a_certificate_from_an_unknown_ca_is_refused_before_auth(
    smtp_server_factory: Factory, mode: str
) -> None:
    server = smtp_server_factory(mode, username=USER, password=PASSWORD)

    with pytest.raises(PermanentDeliveryError) as refused:
        connect(server, ca_file=None).send(SENDER, ["ann@example.org"], MESSAGE)

    assert "TLS certificate of SMTP server 127.0.0.1" in str(refused.value)
    assert ([], []) == (server.logins, server.messages)


def test_a_certificate_for_another_host_name_is_refused(
    smtp_server_factory: Factory, tmp_path: Path
) -> None:
    elsewhere = make_pki(tmp_path, "mail.example.net")
    server = smtp_server_factory("tls", pki=elsewhere)

    with pytest.raises(PermanentDeliveryError) as refused:
        connect(server, password=None).send(SENDER, ["ann@example.org"], MESSAGE)

    assert "is not trusted (IP address mismatch" in str(refused.value)


def test_an_untrusted_certificate_is_accepted_when_verification_is_off(
    smtp_server_factory: Factory,
) -> None:
    server = smtp_server_factory("starttls", username=USER, password=PASSWORD)

    with connect(server, ca_file=None, verify_tls=False) as connection:
        connection.send(SENDER, ["ann@example.org"], MESSAGE)

    assert (True, MESSAGE) == (server.wait_for(1)[0].tls, server.messages[0].data)


def test_tls_against_a_plain_port_is_a_permanent_error_about_the_settings(
    plain: SmtpServer,
) -> None:
    with pytest.raises(PermanentDeliveryError) as refused:
        connect(plain, security="tls").send(SENDER, ["ann@example.org"], MESSAGE)

    assert "check that the channel's port and security" in str(refused.value)


def test_a_server_without_starttls_is_refused_rather_than_used_unencrypted(
    plain: SmtpServer,
) -> None:
    with pytest.raises(PermanentDeliveryError) as refused:
        connect(plain, security="starttls").send(SENDER, ["ann@example.org"], MESSAGE)

    assert "does not offer STARTTLS" in str(refused.value)
    assert ([], []) == (plain.logins, plain.messages)


def test_a_wrong_password_is_permanent_and_never_shows_the_password(
    plain: SmtpServer,
) -> None:
    wrong = "wrong-Pässwörd-123"
    connection = connect(plain, password=wrong)

    with pytest.raises(PermanentDeliveryError) as refused:
        connection.send(SENDER, ["ann@example.org"], MESSAGE)

    text = f"{refused.value} {refused.value.__cause__} {connection!r}"
    assert (535, True, False, False) == (
        refused.value.code,
        "check the channel's SMTP username and password" in text,
        wrong in text,
        PASSWORD in text,
    )
    assert [AuthAttempt("PLAIN", USER, False)] == plain.logins


def test_sending_without_a_password_where_auth_is_required_is_permanent(
    plain: SmtpServer,
) -> None:
    with pytest.raises(PermanentDeliveryError) as refused:
        connect(plain, password=None).send(SENDER, ["ann@example.org"], MESSAGE)

    assert 530 == refused.value.code


@pytest.mark.parametrize("stage", ["mail", "rcpt", "data"])
def test_a_451_reply_is_a_temporary_error(plain: SmtpServer, stage: Stage) -> None:
    plain.fail_next(stage, "451 4.3.0 try again later")

    with pytest.raises(TemporaryDeliveryError) as failed:
        connect(plain).send(SENDER, ["ann@example.org"], MESSAGE)

    assert (451, []) == (failed.value.code, plain.messages)


@pytest.mark.parametrize("stage", ["mail", "rcpt", "data"])
def test_a_550_reply_is_a_permanent_error(plain: SmtpServer, stage: Stage) -> None:
    plain.fail_next(stage, "550 5.7.1 rejected by policy")

    with pytest.raises(PermanentDeliveryError) as failed:
        connect(plain).send(SENDER, ["ann@example.org"], MESSAGE)

    assert (550, []) == (failed.value.code, plain.messages)
    assert "550 5.7.1 rejected by policy" in str(failed.value)


def test_a_refused_recipient_is_reported_and_the_others_get_the_message(
    plain: SmtpServer,
) -> None:
    plain.fail_next("rcpt", "550 5.1.1 no such user", address="gone@example.org")

    with connect(plain) as connection:
        result = connection.send(
            SENDER, ["ann@example.org", "gone@example.org"], MESSAGE
        )

    assert (
        ["ann@example.org"],
        {"gone@example.org": Reply(550, "5.1.1 no such user")},
    ) == (
        result.accepted,
        result.refused,
    )
    assert ("ann@example.org",) == plain.wait_for(1)[0].rcpt_tos
    assert "refused gone@example.org (550 5.1.1 no such user)" in result.summary()


def test_when_every_recipient_is_refused_nothing_is_sent_and_the_connection_stays(
    plain: SmtpServer,
) -> None:
    plain.fail_next("rcpt", "550 5.1.1 no such user", times=2)

    with connect(plain) as connection:
        with pytest.raises(PermanentDeliveryError) as refused:
            connection.send(SENDER, ["a@example.org", "b@example.org"], MESSAGE)

        connection.send(SENDER, ["ann@example.org"], MESSAGE)

    assert (550, 1, 1) == (refused.value.code, len(plain.messages), plain.connections)


def test_a_421_reply_is_temporary_and_the_next_send_opens_a_new_connection(
    plain: SmtpServer,
) -> None:
    plain.fail_next("rcpt", "421 4.3.2 shutting down")

    with connect(plain) as connection:
        with pytest.raises(TemporaryDeliveryError) as failed:
            connection.send(SENDER, ["ann@example.org"], MESSAGE)

        connection.send(SENDER, ["ann@example.org"], MESSAGE)

    assert (421, 2) == (failed.value.code, plain.connections)
    assert 2 == plain.wait_for(1)[0].connection


def test_a_connection_dropped_after_the_message_was_sent_is_temporary(
    plain: SmtpServer,
) -> None:
    plain.drop_next_connection("data")

    with pytest.raises(TemporaryDeliveryError) as failed:
        connect(plain).send(SENDER, ["ann@example.org"], MESSAGE)

    assert (None, []) == (failed.value.code, plain.messages)
    assert "closed the connection during DATA" in str(failed.value)


def test_a_server_that_never_answers_is_temporary(silent_port: int) -> None:
    connection = SmtpConnection(
        unencrypted(silent_port),
        None,
        timeout=0.3,
        local_hostname="localhost",
    )

    with pytest.raises(TemporaryDeliveryError) as failed:
        connection.send(SENDER, ["ann@example.org"], MESSAGE)

    assert "did not answer within 0.3 s during connect" in str(failed.value)


def test_a_port_nobody_listens_on_is_temporary() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    connection = SmtpConnection(
        unencrypted(port),
        None,
        timeout=2,
        local_hostname="localhost",
    )

    with pytest.raises(TemporaryDeliveryError) as failed:
        connection.send(SENDER, ["ann@example.org"], MESSAGE)

    assert "could not be reached during connect" in str(failed.value)


def test_a_message_over_the_servers_size_limit_is_permanent(
    smtp_server_factory: Factory,
) -> None:
    server = smtp_server_factory("plain", size_limit=len(MESSAGE) - 1)

    with pytest.raises(PermanentDeliveryError) as refused:
        connect(server, password=None).send(SENDER, ["ann@example.org"], MESSAGE)

    assert 552 == refused.value.code


@pytest.mark.parametrize("mode", ["plain", "starttls", "tls"])
def test_one_connection_carries_many_messages(
    smtp_server_factory: Factory, mode: str
) -> None:
    server = smtp_server_factory(mode, username=USER, password=PASSWORD)

    with connect(server) as connection:
        for number in range(5):
            connection.send(SENDER, [f"customer{number}@example.org"], MESSAGE)

    received = server.wait_for(5)
    assert ([1] * 5, 1, 1) == (
        [message.connection for message in received],
        server.connections,
        len(server.logins),
    )


@pytest.mark.parametrize("mode", ["plain", "starttls", "tls"])
def test_a_connection_the_server_closed_while_idle_is_opened_again(
    smtp_server_factory: Factory, mode: str
) -> None:
    server = smtp_server_factory(mode, username=USER, password=PASSWORD)

    with connect(server) as connection:
        connection.send(SENDER, ["ann@example.org"], MESSAGE)
        server.disconnect_all()
        connection.send(SENDER, ["bob@example.org"], MESSAGE)

    received = server.wait_for(2)
    assert ([1, 2], 2) == ([m.connection for m in received], server.connections)


def test_a_server_that_keeps_hanging_up_is_reconnected_only_once(
    plain: SmtpServer,
) -> None:
    with connect(plain) as connection:
        connection.send(SENDER, ["ann@example.org"], MESSAGE)
        plain.fail_next("mail", "421 4.3.2 too busy", times=2)

        with pytest.raises(TemporaryDeliveryError) as failed:
            connection.send(SENDER, ["bob@example.org"], MESSAGE)

    assert (421, 2, 1) == (failed.value.code, plain.connections, len(plain.messages))


def test_an_address_that_could_break_the_smtp_command_is_refused(
    plain: SmtpServer,
) -> None:
    with pytest.raises(PermanentDeliveryError) as refused:
        connect(plain).send(SENDER, ["ann@example.org>\r\nRCPT TO:<eve@x"], MESSAGE)

    assert (0, []) == (plain.connections, plain.messages)
    assert "cannot go in an SMTP envelope" in str(refused.value)


def test_a_composed_reply_reaches_bcc_recipients_without_naming_them(
    plain: SmtpServer,
) -> None:
    out = OutboundEmail(
        idempotency_key="reply-1",
        channel_id=1,
        to=[Address(name="Ann", email="ann@example.org")],
        bcc=[Address(name="Supervisor", email="boss@example.com")],
        subject="Re: Your order",
        text_body="It has shipped.\n",
    )
    message = compose(
        out,
        sender=Address(name="Support", email=SENDER),
        attachments=[],
        message_id=message_id_for(out.idempotency_key, "example.com"),
        attachment_limit=MIB,
    )

    with connect(plain) as connection:
        connection.send(SENDER, recipients(out), message)

    received = plain.wait_for(1)[0]
    assert (("ann@example.org", "boss@example.com"), message, False) == (
        received.rcpt_tos,
        received.data,
        b"boss@example.com" in received.data,
    )
