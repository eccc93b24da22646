"""Broker addresses: one host or several (the nodes of a RabbitMQ cluster), as text and in URLs.

A host list is comma-separated, each entry ``host`` or ``host:port`` (IPv6 in brackets:
``[fd00::1]:5672``); an entry without a port uses the connection's port (5672, or 5671 with TLS).
Clients try the addresses in the order given and use the first that answers.

The URL form puts the same list where the host goes::

    amqp://user:password@h1:5672,h2:5672,h3:5672/%2F?heartbeat=30

Only this package reads that form (``workqueue-consume``); ``amqp-consume`` and pika's URLParameters
take one host.
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import quote

from workqueue_provider.exceptions import ConfigurationError

HOST_LIST_EXAMPLE = "rabbit-0,rabbit-1:5673,rabbit-2"


class Address(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"{bracketed(self.host)}:{self.port}"


def bracketed(host: str) -> str:
    """``host`` as it goes before ``:port`` (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def parse_hosts(text: str, default_port: int) -> tuple[Address, ...]:
    """The addresses in ``text`` ("h1,h2:5673,[::1]:5672"), in order. Raises ConfigurationError naming the
    entry at fault and the expected form."""
    entries = [entry.strip() for entry in text.split(",")]
    if not any(entries):
        raise ConfigurationError("The broker connection has no host: set the connection's Host "
                                 f"(one host, or several comma-separated: {HOST_LIST_EXAMPLE}).")
    addresses = []
    for entry in entries:
        if not entry:
            raise ConfigurationError(f"The broker host list {text!r} has an empty entry: write it as "
                                     f"{HOST_LIST_EXAMPLE} (no leading, trailing or doubled commas).")
        host, port = _split_entry(entry, default_port)
        if not 0 < port < 65536:
            raise ConfigurationError(f"Broker port {port} (in {entry!r}) is out of range: use 1-65535 (AMQP is 5672).")
        addresses.append(Address(host, port))
    if len(set(addresses)) != len(addresses):
        raise ConfigurationError(f"The broker host list {text!r} names an address twice: name each node once.")
    return tuple(addresses)


def _split_entry(entry: str, default_port: int) -> tuple[str, int]:
    if entry.startswith("["):  # [IPv6] or [IPv6]:port
        host, _, rest = entry[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else None
        if not host or "]" not in entry or (rest and port_text is None):
            raise ConfigurationError(f"Broker address {entry!r} is malformed: write an IPv6 address as [fd00::1]:5672.")
    elif entry.count(":") > 1:  # a bare IPv6 address, no port
        host, port_text = entry, None
    else:
        host, colon, after = entry.partition(":")
        port_text = after if colon else None
    if not host:
        raise ConfigurationError(f"Broker address {entry!r} has no host: write host:5672.")
    if port_text is None:
        return host, default_port
    if not port_text.isdigit():
        raise ConfigurationError(f"Broker address {entry!r} has a port that is not a number: write host:5672.")
    return host, int(port_text)


def format_hosts(addresses: tuple[Address, ...]) -> str:
    """``h1:5672,h2:5673``: every address with its port, for messages and URLs."""
    return ",".join(str(address) for address in addresses)


def split_url_authority(netloc: str) -> tuple[str | None, str | None, str]:
    """A URL's ``user:password@hosts`` as (user, password, hosts), still percent-encoded. The host
    list is the text after the last ``@`` (a password may hold an encoded ``@``, never a bare one)."""
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        return None, None, netloc
    user, colon, password = userinfo.partition(":")
    return user, (password if colon else None), hosts


def url_authority(login: str, password: str, addresses: tuple[Address, ...]) -> str:
    """``user:password@h1:5672,h2:5672``, the credentials percent-encoded."""
    return f"{quote(login, safe='')}:{quote(password, safe='')}@{format_hosts(addresses)}"
