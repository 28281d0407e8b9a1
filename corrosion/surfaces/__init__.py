"""What clients and operators talk to: the HTTP API (``api``, served by ``asgi_server``), the
admin socket (``admin``; its client half ``admin_client``), the Prometheus endpoint
(``metrics``) and the HTTP client (``client``).

Each server depends on its narrow view of the agent (``interfaces``), not on the agent class.
May import: the runtime, the core, and the package's shared modules. Never ops.
"""
