"""Droplet: low-latency stateful serverless functions on Trio and lattices.

The public API (see API.md and the docs' reference pages) is re-exported here.
"""

from .client.aio import CAUSAL as CAUSAL
from .client.aio import NORMAL as NORMAL
from .client.aio import REPEATABLE_READ as REPEATABLE_READ
from .client.aio import AsyncDropletClient as AsyncDropletClient
from .client.aio import AsyncDropletFunction as AsyncDropletFunction
from .client.aio import AsyncDropletFuture as AsyncDropletFuture
from .client.aio import open_client as open_client
from .client.client import DropletConnection as DropletConnection
from .client.client import DropletFunction as DropletFunction
from .client.client import DropletFuture as DropletFuture
from .client.waiting import ALL_COMPLETED as ALL_COMPLETED
from .client.waiting import FIRST_COMPLETED as FIRST_COMPLETED
from .client.waiting import FIRST_EXCEPTION as FIRST_EXCEPTION
from .client.waiting import as_completed as as_completed
from .client.waiting import as_completed_async as as_completed_async
from .client.waiting import wait as wait
from .client.waiting import wait_async as wait_async
from .cluster import LocalCluster as LocalCluster
from .cluster import open_local_cluster as open_local_cluster
from .errors import AuthenticationError as AuthenticationError
from .errors import ConnectionError as ConnectionError
from .errors import DagError as DagError
from .errors import DropletError as DropletError
from .errors import FunctionError as FunctionError
from .errors import LatticeTypeError as LatticeTypeError
from .errors import ProtocolError as ProtocolError
from .errors import RegistrationError as RegistrationError
from .errors import StorageError as StorageError
from .errors import TimeoutError as TimeoutError
from .references import DropletReference as DropletReference
from .status import ClusterStatus as ClusterStatus
from .status import ExecutorStatus as ExecutorStatus
from .status import FunctionStatus as FunctionStatus

__version__ = "0.1.0"

__all__ = [
    "ALL_COMPLETED",
    "CAUSAL",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "NORMAL",
    "REPEATABLE_READ",
    "AsyncDropletClient",
    "AsyncDropletFunction",
    "AsyncDropletFuture",
    "AuthenticationError",
    "ClusterStatus",
    "ConnectionError",
    "DagError",
    "DropletConnection",
    "DropletError",
    "DropletFunction",
    "DropletFuture",
    "DropletReference",
    "ExecutorStatus",
    "FunctionError",
    "FunctionStatus",
    "LatticeTypeError",
    "LocalCluster",
    "ProtocolError",
    "RegistrationError",
    "StorageError",
    "TimeoutError",
    "as_completed",
    "as_completed_async",
    "open_client",
    "open_local_cluster",
    "wait",
    "wait_async",
]
