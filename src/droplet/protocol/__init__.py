"""Droplet's sans-IO wire layer: framing, plain-value encoding and messages.

Nothing in this package imports trio or touches a socket; it is fed bytes and
returns messages (and the reverse), so it is tested synchronously.
"""
