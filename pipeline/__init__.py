"""Orchestration: CLI, config, Ray (Data, Train, actors), storage, reports.

Importing this package changes nothing in the process environment. The loopback-only settings of a local Ray
cluster (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, ``GLOO_SOCKET_IFNAME=lo``, ENV.md §9) are applied by
:func:`pipeline.local_ray.start_ray`, and only to clusters it starts itself.
"""
