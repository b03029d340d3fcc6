"""gRPC addresses, channels, the retry policy and the error boundary of every client.

One place for what the castore clients (:mod:`stages.grpc.castore_client`,
async; :mod:`stages.grpc.castore_reader`, blocking) and the build client
(:mod:`stages.grpc.build_service`) share:

- addresses: ``grpc+unix:///abs/path``, ``grpc+http://host:port``,
  ``grpc+https://host:port`` (:func:`parse_address`), and the channels they
  open (:func:`aio_channel`, :func:`sync_channel`, :func:`channel_for`);
- deadlines and the one retry policy (:class:`GrpcOptions`,
  :meth:`GrpcOptions.retry_delay`);
- status codes to castore errors (:func:`translate_error`).
"""

from __future__ import annotations

import random
import re
import urllib.parse

import attrs
import grpc

from stages.castore.errors import (
    CastoreError,
    CorruptionError,
    NotFoundError,
    StoreError,
    ValidationError,
)
from stages.grpc.wire import CHANNEL_OPTIONS

__all__ = [
    "DEFAULT_OPTIONS",
    "SCHEMES",
    "GrpcOptions",
    "GrpcTarget",
    "aio_channel",
    "channel_for",
    "parse_address",
    "sync_channel",
    "translate_error",
]

SCHEMES = ("grpc+unix", "grpc+http", "grpc+https")
_HEX = re.compile(r"\b([0-9a-f]{64})\b")


@attrs.frozen(kw_only=True)
class GrpcOptions:
    """Deadlines and retries of a castore gRPC client (seconds)."""

    connect_timeout: float = 5.0   # first readiness of the channel
    call_timeout: float = 30.0     # deadline of one unary-shaped call
    idle_timeout: float = 60.0     # longest wait for the next message of a stream
    retries: int = 3               # extra attempts of idempotent calls on UNAVAILABLE
    backoff: float = 0.1           # first retry delay; doubles, with jitter

    def retry_delay(self, exc: grpc.RpcError, tries: int) -> float | None:
        """The retry policy of every client, async and blocking: how long to
        wait before trying an idempotent call again after it failed with
        ``exc`` for the ``tries``-th time (0 the first), or None to give up.

        Only UNAVAILABLE is retried (the server was not reached or went
        away before answering), at most ``retries`` times, after
        ``backoff`` doubled per try, with jitter (0.5-1.5x).
        """
        code = exc.code() if hasattr(exc, "code") else None
        if code != grpc.StatusCode.UNAVAILABLE or tries >= self.retries:
            return None
        return self.backoff * (2 ** tries) * (0.5 + random.random())


DEFAULT_OPTIONS = GrpcOptions()


@attrs.frozen(kw_only=True)
class GrpcTarget:
    """A parsed castore gRPC address."""

    address: str          # as given, for messages
    target: str           # what grpc dials: unix:///abs/path or host:port
    tls: bool


def parse_address(address: str) -> GrpcTarget:
    """Check a ``grpc+...`` address; StoreError saying what is wrong."""
    url = urllib.parse.urlsplit(address)
    if url.scheme not in SCHEMES:
        raise StoreError(address, f"not a gRPC castore address; expected one of "
                                  f"{', '.join(s + '://' for s in SCHEMES)}")
    if url.query or url.fragment:
        raise StoreError(address, "a gRPC castore address takes no query or fragment")
    if url.scheme == "grpc+unix":
        path = urllib.parse.unquote(url.path)
        if url.netloc or not path.startswith("/"):
            raise StoreError(address, "a unix socket address is grpc+unix:///absolute/path "
                                      "(three slashes, absolute path)")
        if path.endswith("/"):
            raise StoreError(address, "a unix socket address names a socket, not a directory")
        return GrpcTarget(address=address, target="unix://" + path, tls=False)
    if url.path not in ("", "/"):
        raise StoreError(address, f"a {url.scheme} address is {url.scheme}://host:port "
                                  f"with no path")
    try:
        port = url.port
    except ValueError as exc:
        raise StoreError(address, f"bad port: {exc}") from None
    host = url.hostname
    if not host:
        raise StoreError(address, f"missing host; expected {url.scheme}://host:port")
    if port is None:
        raise StoreError(address, f"missing port; expected {url.scheme}://host:port")
    if url.username or url.password:
        raise StoreError(address, "credentials in the address are not supported")
    host_part = f"[{host}]" if ":" in host else host
    return GrpcTarget(address=address, target=f"{host_part}:{port}",
                      tls=url.scheme == "grpc+https")


def channel_for(address: str) -> grpc.aio.Channel:
    """An asyncio channel to a ``grpc+...`` address (StoreError if malformed)."""
    return aio_channel(parse_address(address))


def aio_channel(target: GrpcTarget) -> grpc.aio.Channel:
    if target.tls:
        return grpc.aio.secure_channel(target.target, grpc.ssl_channel_credentials(),
                                       options=CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(target.target, options=CHANNEL_OPTIONS)


def sync_channel(target: GrpcTarget) -> grpc.Channel:
    if target.tls:
        return grpc.secure_channel(target.target, grpc.ssl_channel_credentials(),
                                   options=CHANNEL_OPTIONS)
    return grpc.insecure_channel(target.target, options=CHANNEL_OPTIONS)


# --- errors: the one boundary --------------------------------------------------

def translate_error(exc: grpc.RpcError, address: str, kind: str = "blob",
                    digest: bytes | None = None) -> CastoreError:
    """The castore error a failed call means (``raise translate_error(...) from exc``)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else str(exc)) or ""

    def named_digest() -> bytes:
        found = _HEX.search(details)
        if found:
            return bytes.fromhex(found.group(1))
        return digest if digest is not None else b""

    if code == grpc.StatusCode.NOT_FOUND:
        return NotFoundError(kind, named_digest())
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        rule, sep, rest = details.partition(": ")
        if not sep or " " in rule:
            rule, rest = "remote", details
        return ValidationError(rule, rest)
    if code == grpc.StatusCode.DATA_LOSS:
        return CorruptionError(kind, named_digest(), f"{address} ({details})")
    if code == grpc.StatusCode.UNAVAILABLE:
        return StoreError(address, f"server unavailable: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return StoreError(address, f"no answer before the deadline: {details}")
    if code == grpc.StatusCode.CANCELLED:
        return StoreError(address, f"call cancelled: {details}")
    return StoreError(address, f"{code.name}: {details}")
