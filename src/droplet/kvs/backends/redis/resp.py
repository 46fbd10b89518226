"""Pure parts of the Redis client: command encoding, key slots, ``redis://`` URLs.

No I/O here. Replies are parsed by ``hiredis.Reader`` (a sans-IO RESP parser:
feed bytes, get replies) in :mod:`.connection`; this module builds what we
send and decides where a key lives in a Redis Cluster.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Sequence

import attrs

__all__ = ["CLUSTER_SLOTS", "RedisUrl", "key_slot", "pack_command", "parse_redis_url"]

CLUSTER_SLOTS = 16384

Arg = bytes | str | int | float


def _arg_bytes(arg: Arg) -> bytes:
    if type(arg) is bytes:
        return arg
    if type(arg) is str:
        return arg.encode("utf-8", "surrogatepass")
    if type(arg) is int or type(arg) is float:
        return repr(arg).encode()
    if isinstance(arg, bytes | bytearray | memoryview):
        return bytes(arg)
    raise TypeError(f"a Redis command argument must be bytes, str or a number, "
                    f"not {type(arg).__name__}")


def pack_command(*args: Arg) -> bytes:
    """One command as a RESP array of bulk strings.

    >>> pack_command("GET", "k")
    b'*2\\r\\n$3\\r\\nGET\\r\\n$1\\r\\nk\\r\\n'
    """
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = _arg_bytes(arg)
        parts.append(b"$%d\r\n" % len(raw))
        parts.append(raw)
        parts.append(b"\r\n")
    return b"".join(parts)


def pack_commands(commands: Sequence[Sequence[Arg]]) -> bytes:
    return b"".join(pack_command(*command) for command in commands)


def _crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM), the checksum Redis Cluster hashes keys with."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFF00) ^ _CRC_TABLE[((crc >> 8) ^ byte) & 0xFF]
    return crc


def _table() -> list[int]:
    table = []
    for i in range(256):
        crc = i << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_CRC_TABLE = _table()


def key_slot(key: bytes) -> int:
    """The Redis Cluster hash slot of ``key``, honouring ``{hash tags}``.

    >>> key_slot(b"123456789") == 0x31C3 % 16384   # the CRC16 check value
    True
    >>> key_slot(b"{user1}.a") == key_slot(b"{user1}.b") == key_slot(b"user1")
    True
    """
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1:end]
    return _crc16(key) % CLUSTER_SLOTS


@attrs.frozen
class RedisUrl:
    """What a ``redis://`` / ``rediss://`` URL says."""

    host: str
    port: int
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    prefix: str = "droplet:"
    ca_file: str | None = None
    verify: bool = True

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def redacted(self) -> str:
        """The URL without its password (for logs and errors)."""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisUrl:
    """Parse ``redis[s]://[[user]:password@]host[:port][/db][?prefix=..&ssl_ca_certs=..]``.

    ``prefix`` (default ``droplet:``) is put before every Droplet key, so a
    Redis database can be shared; ``ssl_ca_certs`` is the CA file that signs
    the server's certificate for ``rediss://``; ``ssl_cert_reqs=none`` skips
    verification (testing only).

    >>> parse_redis_url("redis://127.0.0.1:6380/2")
    RedisUrl(host='127.0.0.1', port=6380, db=2, tls=False, username=None, prefix='droplet:', \
ca_file=None, verify=True)
    >>> parse_redis_url("rediss://:pw@cache.example").password
    'pw'

    Raises:
        ValueError: not a Redis URL, naming what is wrong.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"storage URL {url!r} must start with redis:// or rediss://")
    if not parts.hostname:
        raise ValueError(f"storage URL {url!r} names no host")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"storage URL {url!r} has a bad port") from None
    path = parts.path.strip("/")
    try:
        db = int(path) if path else 0
    except ValueError:
        raise ValueError(f"storage URL {url!r}: the path must be a database number, "
                         f"not {path!r}") from None
    if db < 0:
        raise ValueError(f"storage URL {url!r}: database number must be >= 0")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    known = {"prefix", "ssl_ca_certs", "ssl_cert_reqs"}
    unknown = sorted(set(query) - known)
    if unknown:
        raise ValueError(f"storage URL {url!r}: unknown option(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(known))}")
    reqs = query.get("ssl_cert_reqs", ["required"])[-1]
    if reqs not in ("required", "none"):
        raise ValueError(f"storage URL {url!r}: ssl_cert_reqs must be 'required' or 'none'")

    def unquote(text: str | None) -> str | None:
        return None if text is None else urllib.parse.unquote(text)

    return RedisUrl(
        host=parts.hostname, port=port, db=db, tls=parts.scheme == "rediss",
        username=unquote(parts.username) or None, password=unquote(parts.password),
        prefix=query.get("prefix", ["droplet:"])[-1],
        ca_file=query.get("ssl_ca_certs", [None])[-1], verify=reqs == "required")
