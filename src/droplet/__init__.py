"""Droplet: low-latency stateful serverless functions on Trio and lattices."""

from .errors import AuthenticationError as AuthenticationError
from .errors import ConnectionError as ConnectionError
from .errors import DagError as DagError
from .errors import DropletError as DropletError
from .errors import FunctionError as FunctionError
from .errors import ProtocolError as ProtocolError
from .errors import RegistrationError as RegistrationError
from .errors import TimeoutError as TimeoutError

__version__ = "0.1.0"
