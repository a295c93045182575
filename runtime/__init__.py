"""The data plane: everything from a received bundle to enforced traffic.

``bundle`` and ``protocol`` are the contracts shared with the compiler; the rest never imports
``compiler``. Layers, from policy to bytes:

* ``engine`` (+ ``_match``, ``_lb``, ``_hosts``, ``_policy``): sans-io. Bundles + endpoints compile
  into an immutable ``Snapshot`` (routes, split wheels, per-subset policy, inbound and gateway
  tables); per-host state (ejection, health, in-flight) lives in a registry that survives swaps.
  Randomness and the clock are injected.
* ``proxy`` (aiohttp HTTP handlers), ``tcp`` (CONNECT tunnels, TCP listeners, the outbound
  protocol sniffer), ``healthcheck`` (active checks): move bytes, ask the engine, report outcomes.
  ``fastproxy`` is the asyncio Protocol + httptools HTTP path over the same engine (``--dataplane``).
* ``server`` (one process: state dir, pushes, listeners, drain), ``admin`` (the admin API),
  ``state`` (last-known-good on disk), ``metrics`` (Prometheus), ``registration`` (control plane
  client), ``cli`` (``sidecar_main`` / ``gateway_main``; ``python -m runtime.sidecar|gateway``).
"""
