"""Node configuration: defaults < TOML file < environment < command-line flags."""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
import tomllib
from pathlib import Path
from typing import Any

import attrs

from .autoscale import DEFAULT_DOWN_AFTER, DEFAULT_UP_AFTER, DEFAULT_UP_QUEUE
from .executor.cache import DEFAULT_CACHE_BYTES
from .scheduler.placement import DEFAULT_POLICY, check_policy_name
from .transports.base import TransportOptions
from .transports.registry import normalize_address, parse_address

__all__ = ["FSYNC_POLICIES", "IN_MEMORY", "ROLES", "Config", "default_data_root",
           "is_loopback", "parse_executors", "parse_resources"]

ROLES = ("all", "kvs", "scheduler", "executor")
DEFAULT_LISTEN = "tcp://127.0.0.1:5000"
#: ``--data-dir :memory:``: keep the store in memory only (nothing survives a restart)
IN_MEMORY = ":memory:"
FSYNC_POLICIES = ("always", "everysec", "no")


def default_data_root(environ: dict[str, str] | None = None) -> Path:
    """Where nodes keep their data unless told: ``$XDG_DATA_HOME/droplet``.

    (``~/.local/share/droplet`` when ``XDG_DATA_HOME`` is unset.)
    """
    env = os.environ if environ is None else environ
    base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "droplet"


def _url(_: Any, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None:
        parse_address(value)  # raises ValueError naming the address


def _storage(_: Any, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is None or value == "memory":
        return
    if value.startswith(("redis://", "rediss://")):
        from .kvs.backends.redis.resp import parse_redis_url

        parse_redis_url(value)  # raises ValueError naming what is wrong
        return
    raise ValueError(f"storage must be 'memory', redis://HOST:PORT/DB or rediss://..., "
                     f"not {value!r}")


def _positive(_: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:  # NaN too
        raise ValueError(f"{attribute.name} must be positive, not {value!r}")


def _non_negative(_: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value >= 0:  # NaN too
        raise ValueError(f"{attribute.name} must not be negative, not {value!r}")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# TOML value checks by field annotation: (what to say, check).
_KINDS: dict[str, tuple[str, Any]] = {
    "str": ("a string", lambda v: isinstance(v, str)),
    "str | None": ("a string", lambda v: isinstance(v, str)),
    "int": ("an integer", lambda v: type(v) is int),
    "int | None": ("an integer", lambda v: type(v) is int),
    "float": ("a number", lambda v: type(v) in (int, float)),
    "bool": ("true or false", lambda v: type(v) is bool),
}


_KEY_KINDS: dict[str, tuple[str, Any]] = {
    "cache_size": ('a size in bytes, an integer or a string such as "512M"',
                   lambda v: type(v) is int or isinstance(v, str)),
    "executors": ('a count or "MIN:MAX" (e.g. 2, or "1:4" for adaptive executors)',
                  lambda v: type(v) is int or isinstance(v, str)),
    "resources": ('NAME=COUNT pairs, a string ("gpu=1") or a table ({gpu = 1})',
                  lambda v: isinstance(v, str | dict)),
}


def _placement(_: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"placement must be a policy name, not {value!r}")
    check_policy_name(value)


def _log_level(_: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if not isinstance(value, str) or value.upper() not in LOG_LEVELS:
        raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, not {value!r}")


def parse_resources(text: str | None) -> dict[str, int]:
    """An executor's resource labels, from ``--resources gpu=1,tpu=2``.

    >>> parse_resources("gpu=1, tpu=2")
    {'gpu': 1, 'tpu': 2}
    >>> parse_resources("gpu")
    {'gpu': 1}
    """
    found: dict[str, int] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, eq, amount = part.partition("=")
        name = name.strip()
        try:
            count = int(amount) if eq else 1
        except ValueError:
            count = -1
        if not name.isidentifier() or count < 0:
            raise ValueError(f"resources: {part!r} is not NAME=COUNT (e.g. gpu=1)")
        found[name] = count
    return found


def parse_executors(value: Any) -> tuple[int, int | None]:
    """``(minimum, maximum)`` executors from ``N``, ``"N"``, ``"MIN:MAX"`` or ``(MIN, MAX)``.

    A plain count is a fixed number (maximum None); MIN:MAX makes them adaptive.

    >>> parse_executors("1:4"), parse_executors(2), parse_executors((1, 3))
    ((1, 4), (2, None), (1, 3))
    """
    if isinstance(value, tuple | list) and len(value) == 2:
        low, high = value
    elif type(value) is int:
        return value, None
    elif isinstance(value, str):
        low, colon, high = value.strip().partition(":")
        try:
            low = int(low)
            high = int(high) if colon else None
        except ValueError:
            low = high = None
        if low is None:
            raise ValueError(f"executors must be an integer or MIN:MAX (e.g. 1:4), "
                             f"not str {value!r}") from None
        if high is None:
            return low, None
    else:
        raise ValueError(f"executors must be an integer or (MIN, MAX), "
                         f"not {type(value).__name__} {value!r}")
    if type(low) is not int or type(high) is not int or not 1 <= low <= high:
        raise ValueError(f"executors MIN:MAX needs whole numbers 1 <= MIN <= MAX, "
                         f"not {value!r}")
    return low, high


def _resources(value: Any) -> str | None:
    """Accept ``"gpu=1"`` or a TOML table ``{gpu = 1}``; keep the canonical string."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = ",".join(f"{k}={v}" for k, v in value.items())
    if not isinstance(value, str):
        raise ValueError(f"resources must be NAME=COUNT pairs, not {value!r}")
    return ",".join(f"{k}={v}" for k, v in parse_resources(value).items()) or None


_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(value: Any) -> int:
    """A size in bytes from ``512M``, ``2G``, ``65536`` (K, M, G, T are powers of 1024).

    >>> parse_size("512M"), parse_size("1.5k"), parse_size(0), parse_size("2 GiB")
    (536870912, 1536, 0, 2147483648)
    """
    if type(value) is int:
        if value < 0:
            raise ValueError(f"a size must not be negative, not {value!r}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"a size is bytes (an integer) or text like 512M, not {value!r}")
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([kmgt]?)(?:i?b)?\s*", value.lower())
    if match is None:
        raise ValueError(f"{value!r} is not a size (try 536870912, 512M or 2G)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def is_loopback(address: str) -> bool:
    """Whether only this machine can reach ``address``.

    A host name other than ``localhost`` counts as reachable from outside: it
    may resolve to any interface (``127.evil.example`` is not 127.0.0.1).

    >>> is_loopback("tcp://127.0.0.2:5000"), is_loopback("ws://[::1]:80")
    (True, True)
    >>> is_loopback("tcp://0.0.0.0:5000"), is_loopback("tcp://127.example.com:1")
    (False, False)
    """
    scheme, host, _ = parse_address(address)
    if scheme == "inproc" or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@attrs.frozen(kw_only=True)
class Config:
    """Everything a node needs. Attribute names are the TOML keys."""

    role: str = attrs.field(default="all", validator=attrs.validators.in_(ROLES))
    listen: str | None = attrs.field(default=None, validator=_url)
    scheduler: str | None = attrs.field(default=None, validator=_url)
    kvs: str | None = attrs.field(default=None, validator=_url)
    #: executor workers of an all-in-one (or executor) node: the fixed count, or
    #: the minimum when ``max_executors`` is set (``--executors MIN:MAX``)
    executors: int = attrs.field(default=2, validator=attrs.validators.ge(0))
    #: adaptive executors: at most this many (None: always ``executors``)
    max_executors: int | None = attrs.field(default=None)
    #: adaptive executors: start one more when the queued calls per executor
    #: stay at or above this for ``scale_up_after`` seconds
    scale_up_queue: float = attrs.field(default=DEFAULT_UP_QUEUE, validator=_positive)
    scale_up_after: float = attrs.field(default=DEFAULT_UP_AFTER, validator=_non_negative)
    #: adaptive executors: stop one (beyond the minimum) idle this many seconds
    scale_down_after: float = attrs.field(default=DEFAULT_DOWN_AFTER,
                                          validator=_non_negative)
    threads: int = attrs.field(default=32, validator=attrs.validators.ge(1))
    #: a placement policy by name (``data``, ``locality``, ``spread``) or ``module:Class``
    placement: str = attrs.field(default=DEFAULT_POLICY, validator=_placement)
    token: str | None = attrs.field(default=None, repr=False)  # reprs reach logs
    insecure: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    max_frame_size: int = attrs.field(default=64 * 1024 * 1024, validator=_positive)
    read_timeout: float = attrs.field(default=30.0, validator=_positive)
    max_inflight: int = attrs.field(default=10_000, validator=_positive)
    result_ttl: float = attrs.field(default=600.0, validator=_positive)
    #: where a storage node keeps lattices: None/"memory" (this process), or a
    #: redis:// / rediss:// URL (a Redis server or any node of a Redis Cluster)
    storage: str | None = attrs.field(default=None, validator=_storage, repr=False)
    #: the durable store's directory; None: the default for the role (see storage_dir)
    data_dir: str | None = None
    fsync: str = attrs.field(default="always", validator=attrs.validators.in_(FSYNC_POLICIES))
    #: also log call results (they expire after result_ttl; by default memory only)
    log_results: bool = False
    #: log bytes since the last snapshot that trigger a new one (if also past its size)
    compact_bytes: int = attrs.field(default=64 * 1024 * 1024, validator=_positive)
    #: executor resource labels, e.g. ``"gpu=1"``: DAGs' gpu_functions run only there
    resources: str | None = attrs.field(default=None, converter=_resources)
    #: most queued calls of a batching function an executor serves in one call
    max_batch: int = attrs.field(default=16, validator=attrs.validators.ge(1))
    #: seconds between an executor's load and call reports to its scheduler
    report_interval: float = attrs.field(default=1.0, validator=_positive)
    #: bytes of values the node's cache holds (LRU), shared by its executors
    cache_size: int = attrs.field(default=DEFAULT_CACHE_BYTES, converter=parse_size)
    #: set by an all-in-one node on its worker processes: the node whose cache they use
    node_cache: str | None = attrs.field(default=None, validator=_url)
    #: where to serve Prometheus metrics over HTTP (``tcp://127.0.0.1:9100``); None: off
    metrics_listen: str | None = attrs.field(default=None, validator=_url)
    log_level: str = attrs.field(default="INFO", validator=_log_level)

    @max_executors.validator
    def _check_max_executors(self, attribute: attrs.Attribute[Any], value: int | None
                             ) -> None:
        if value is not None and (type(value) is not int or not 1 <= self.executors <= value):
            raise ValueError(f"executors MIN:MAX needs 1 <= MIN <= MAX, not "
                             f"{self.executors}:{value}")

    @property
    def executor_range(self) -> tuple[int, int]:
        """``(minimum, maximum)`` executor workers (equal when not adaptive)."""
        return self.executors, (self.executors if self.max_executors is None
                                else self.max_executors)

    @property
    def listen_url(self) -> str:
        """Where this node listens: executors pick a free port unless told."""
        if self.listen:
            return normalize_address(self.listen)
        return "tcp://127.0.0.1:0" if self.role == "executor" else DEFAULT_LISTEN

    @property
    def storage_dir(self) -> Path | None:
        """The data directory of this node's store, or None to keep it in memory.

        An explicit ``data_dir`` wins (``:memory:`` opts out). Otherwise the
        all-in-one node keeps its data under :func:`default_data_root`, in a
        directory named after its address (``127.0.0.1-5000``), so nodes on
        different ports keep separate state; a node on port 0 (a new address
        each start) and every other role keep their store in memory.

        >>> Config(data_dir="/srv/droplet").storage_dir
        PosixPath('/srv/droplet')
        >>> Config(data_dir=":memory:").storage_dir is None
        True
        >>> Config(listen="tcp://127.0.0.1:0").storage_dir is None
        True
        """
        if self.data_dir == IN_MEMORY:
            return None
        if self.data_dir:
            return Path(self.data_dir).expanduser()
        if self.role != "all":
            return None
        scheme, host, port = parse_address(self.listen_url)
        if scheme == "inproc" or not port:
            return None
        return default_data_root() / re.sub(r"[^A-Za-z0-9.-]", "_", f"{host}-{port}")

    @classmethod
    def from_toml(cls, path: str) -> dict[str, Any]:
        """The settings in a TOML file; unknown keys and wrong types are refused by name."""
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ValueError(f"cannot read the configuration file {path}: "
                             f"{exc.strerror or exc}") from None
        data = data.get("droplet", data)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: [droplet] must be a table of settings")
        kinds = {a.name: str(a.type) for a in attrs.fields(cls)}
        unknown = sorted(set(data) - set(kinds))
        if unknown:
            raise ValueError(
                f"{path}: unknown setting(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(kinds))}")
        for key, value in data.items():
            expected, check = _KEY_KINDS.get(key) or _KINDS[kinds[key]]
            if not check(value):
                raise ValueError(f"{path}: {key} must be {expected}, "
                                 f"not {type(value).__name__} {value!r}")
        return dict(data)

    @classmethod
    def load(cls, flags: dict[str, Any], config_file: str | None = None,
             environ: dict[str, str] | None = None) -> Config:
        """Merge the layers: file, then environment, then the flags the user gave.

        Raises:
            ValueError: a setting is invalid; the message names the setting,
                and the file when the value came from one.
        """
        from_file: dict[str, Any] = cls.from_toml(config_file) if config_file else {}
        settings = dict(from_file)
        env = os.environ if environ is None else environ
        if env.get("DROPLET_TOKEN"):
            settings["token"] = env["DROPLET_TOKEN"]
        settings.update({k: v for k, v in flags.items() if v is not None})
        try:
            if "executors" in settings:  # "MIN:MAX" sets both bounds
                low, high = parse_executors(settings["executors"])
                settings["executors"] = low
                if high is not None:
                    settings["max_executors"] = high
                elif "executors" in flags and flags["executors"] is not None:
                    settings.pop("max_executors", None)  # a flag N means a fixed N
            return cls(**settings)
        except (ValueError, TypeError) as exc:
            # attrs validators put the readable message first, then internals.
            message = str(exc.args[0]) if exc.args else str(exc)
            culprit = next((k for k in settings if k in message), None)
            if config_file and culprit is not None and settings[culprit] is from_file.get(
                    culprit, object()):
                message = f"{config_file}: {message}"
            raise ValueError(message) from None

    def validate(self) -> None:
        """Refuse settings that cannot work together, before anything starts.

        Raises:
            ValueError: naming the setting and the fix.
        """
        if self.role == "scheduler" and not self.kvs:
            raise ValueError("--role scheduler needs --kvs URL (the storage node)")
        if self.role == "executor" and not self.scheduler:
            raise ValueError("--role executor needs --scheduler URL")
        self.check_exposure()
        self.server_options()  # loads the TLS certificate, if any: a bad one fails here
        if self.tls_ca:
            self.client_options()

    def check_exposure(self) -> None:
        """Refuse to listen beyond loopback without a token, unless --insecure."""
        if not is_loopback(self.listen_url) and not self.token and not self.insecure:
            raise ValueError(
                f"refusing to listen on {self.listen_url} without a cluster token: anyone who "
                "can reach it could run code on this machine. Pass --token (token= in "
                "Python, or set DROPLET_TOKEN), or --insecure (insecure=True) if the "
                "network is trusted.")
        if self.metrics_listen is not None:
            scheme = parse_address(self.metrics_listen)[0]
            if scheme != "tcp":
                raise ValueError(f"metrics_listen must be a tcp:// address (HTTP), not "
                                 f"{self.metrics_listen}")
            if (not is_loopback(self.metrics_listen) and not self.token
                    and not self.insecure):
                raise ValueError(
                    f"refusing to serve metrics on {self.metrics_listen} without a cluster "
                    "token: they name your functions and load. Pass --token (scrapers then "
                    "send it as 'Authorization: Bearer TOKEN'), or --insecure.")

    def server_options(self) -> TransportOptions:
        ctx = None
        scheme = parse_address(self.listen_url)[0]
        if scheme in ("tls", "wss"):
            if not (self.tls_cert and self.tls_key):
                raise ValueError(f"{self.listen_url} needs --tls-cert FILE and --tls-key FILE "
                                 "(tls_cert and tls_key in a configuration file)")
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                ctx.load_cert_chain(self.tls_cert, self.tls_key)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"cannot load the TLS certificate {self.tls_cert} with the "
                                 f"key {self.tls_key}: {exc}") from exc
        return TransportOptions(max_frame_size=self.max_frame_size,
                                read_timeout=self.read_timeout, ssl_context=ctx)

    def client_options(self) -> TransportOptions:
        ctx = None
        if self.tls_ca:
            try:
                ctx = ssl.create_default_context(cafile=self.tls_ca)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(
                    f"cannot load the CA bundle {self.tls_ca}: {exc}") from exc
        return TransportOptions(max_frame_size=self.max_frame_size,
                                read_timeout=self.read_timeout, ssl_context=ctx)
