"""Connection failures mapped to what an operator can act on: refused (fatal: fix the
settings) or unreachable (retry), never echoing the password."""

from __future__ import annotations

import socket
import ssl

import pytest
from aiokafka.errors import KafkaConnectionError, SaslAuthenticationFailed

from worker.errors import ConfigError
from worker.settings import Settings
from worker.stream.kafka import (
    BrokerRefused,
    BrokerUnreachable,
    check_connection,
    connection_error,
)

SECRET = "Zq-secret-9-never-logged"


def _settings(**over: object) -> Settings:
    values: dict[str, object] = {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": "alice",
        "sasl_password": SECRET,
    }
    values.update(over)
    return Settings(**values)  # type: ignore[arg-type]


def test_a_rejected_login_is_fatal_and_names_the_user_not_the_password() -> None:
    err = connection_error(SaslAuthenticationFailed("invalid credentials"), _settings(), "h:1")
    assert isinstance(err, BrokerRefused) and isinstance(err, ConfigError)
    assert not err.retriable
    assert "'alice'" in str(err) and "h:1" in str(err) and SECRET not in str(err)


def test_an_untrusted_certificate_is_fatal_and_names_the_trust_store() -> None:
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed")
    exc.verify_message = "self-signed certificate in certificate chain"
    err = connection_error(exc, _settings(ssl_cafile="/etc/ca.pem"), "h:1")
    assert isinstance(err, BrokerRefused)
    assert "/etc/ca.pem" in str(err) and "self-signed" in str(err)


@pytest.mark.parametrize(
    "exc", [ConnectionRefusedError(111, "refused"), TimeoutError(), KafkaConnectionError("x")]
)
def test_no_answer_is_retriable(exc: BaseException) -> None:
    err = connection_error(exc, _settings(), "h:1")
    assert isinstance(err, BrokerUnreachable) and err.retriable


async def test_a_closed_port_is_unreachable() -> None:
    with socket.socket() as sock:  # bound, never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        settings = Settings(bootstrap_servers=f"127.0.0.1:{port}")
        with pytest.raises(BrokerUnreachable, match=f"127.0.0.1:{port}"):
            await check_connection(settings, timeout_s=5)
