"""``DropletReference``: an argument that the executor replaces by a KVS value."""

from __future__ import annotations

import attrs

__all__ = ["DropletReference"]


@attrs.frozen
class DropletReference:
    """Stands for the value stored at ``key``, read on the executor through its cache.

    Args:
        key: the KVS key.
        deserialize: when True (default) the function receives the stored value
            (a plain value for ``put_object`` of a plain value, else the lattice);
            when False it receives the stored lattice object itself, unrevealed.
    """

    key: str
    deserialize: bool = True
