"""The KVS keys Droplet itself uses (users' keys are anything else)."""

from __future__ import annotations

__all__ = ["FUNCTION_PREFIX", "RESULT_PREFIX", "function_key", "is_result_key"]

#: Registered functions' code, one LWW value per name.
FUNCTION_PREFIX = "__droplet/functions/"
#: Call results (futures' ``obj_id``); kept for ``result_ttl`` seconds.
RESULT_PREFIX = "__droplet/results/"


def function_key(name: str) -> str:
    return FUNCTION_PREFIX + name


def is_result_key(key: str) -> bool:
    return key.startswith(RESULT_PREFIX)
