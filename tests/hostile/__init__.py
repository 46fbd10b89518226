"""Hostile peers, wrong tokens and TLS against real Droplet nodes."""
