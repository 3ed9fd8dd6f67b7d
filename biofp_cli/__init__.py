"""The top layer: the ``biofp`` command and the deployment code under it.

``cli.py`` and ``commands/`` (one module per command group) parse the user's arguments and call
the layers below; ``certs``, ``preflight``, ``supervise``, ``superlink`` and ``supernode`` check
a hospital's or a coordinator's setup and start Flower's SuperLink or SuperNode; ``health`` is the
server container's health check. Nothing below imports this package.
"""
