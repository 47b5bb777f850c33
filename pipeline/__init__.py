"""Orchestration: CLI, config, Ray (Data, Train, actors), storage, reports.

Ray listens on every interface by default; the project's local clusters are loopback-only unless a user
sets ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` themselves (ENV.md §9). It must be set before ``import ray``,
which is why it happens at package import.
"""
import os as _os

_os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
_os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
