"""The control plane: watch policies, compile, push changed bundles, track data planes, serve a GUI.

Small modules, each owning one thing:

* ``watcher``: change events from the work tree (watchfiles, debounced) or a Git ref (polled).
* ``release``: the current good release; a failed compile keeps it and records its diagnostics.
* ``registry``: data planes that registered, their heartbeats, Online/Offline.
* ``endpoints``: the endpoint set of a mesh, derived from the registry.
* ``generation``: push generation numbers that keep growing across restarts.
* ``pusher``: per data plane reconciliation (endpoints, mesh bundle, service bundle), ACK/NACK.
* ``pieces``: recent mesh bundles as pieces (delta pushes) and what each service bundle names
  (a data plane's scope).
* ``status``: the per data plane sync view (SYNCED / STALE / NOT SENT).
* ``metrics``: the control plane's Prometheus metrics.
* ``traffic``: the live traffic split, scraped from the data planes' metrics.
* ``api`` and ``gui``: the HTTP API under ``/api/`` and the dashboard at ``/gui``.
* ``store``: where the state lives (the state dir, or PostgreSQL shared by replicas) and who
  leads (``Elector``: the only replica, or a PostgreSQL lock row with a lease and a fencing token).
* ``config``: the control plane's settings.
* ``server``: wires them together (``api`` and ``security`` type it by a Protocol, never import it).
"""
