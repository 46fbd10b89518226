"""The KVS keys Droplet itself uses (users' keys are anything else)."""

from __future__ import annotations

__all__ = ["FUNCTION_PREFIX", "REGISTRY_KEY", "RESULT_PREFIX", "function_key", "is_result_key"]

#: Registered functions' code, one LWW value per name.
FUNCTION_PREFIX = "__droplet/functions/"
#: The scheduler's registry (function versions, DAG definitions): one map lattice,
#: so a scheduler that restarts, or a second one, finds what was registered.
REGISTRY_KEY = "__droplet/registry"
#: Call results (futures' ``obj_id``); kept for ``result_ttl`` seconds.
RESULT_PREFIX = "__droplet/results/"


def function_key(name: str) -> str:
    return FUNCTION_PREFIX + name


def is_result_key(key: str) -> bool:
    return key.startswith(RESULT_PREFIX)
