"""queuectl_web: the live dashboard and HTTP API of queuectl.

Standard library only.  ``queuectl`` imports this package lazily, for the
``dashboard`` and ``up`` commands; ``server.make_server()`` is the entry point.
"""
