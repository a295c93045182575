"""The data plane: everything from a received bundle to enforced traffic.

``bundle``, ``pieces`` (the mesh bundle as content-addressed pieces, for delta pushes) and
``protocol`` are the contracts shared with the compiler; the rest never imports ``compiler``.
Layers, from policy to bytes:

* ``engine`` (+ ``_match``, ``_lb``, ``_hosts``, ``_policy``): sans-io. Bundles + endpoints compile
  into an immutable ``Snapshot`` (routes, split wheels, per-subset policy, inbound and gateway
  tables); per-host state (ejection, health, in-flight) lives in a registry that survives swaps.
  Randomness and the clock are injected.
* ``decide`` (+ ``headerops``): sans-io too. What every forwarding layer does with a request:
  ``Forward`` or ``Reply`` for outbound, inbound, gateway, CONNECT and TCP, one passthrough
  verdict, and ``RetryState`` (back off and retry, or give up) from each attempt's outcome.
* Byte layers that carry the verdicts out and never decide: ``fastconn`` / ``fastexchange``
  (client connection and its exchange), ``fastpool`` (upstream connections and their pool),
  ``fastplane`` (what the connections share), ``fastproxy`` (its server wiring; the default
  ``--dataplane``); ``proxy`` (the aiohttp HTTP handlers, ``--dataplane aiohttp``); ``tcp``
  (CONNECT tunnels, TCP listeners, the outbound protocol sniffer); ``healthcheck`` (active checks).
* ``server`` (one process: listeners, registration, drain), ``pushes`` (the running bundles and
  endpoints, the state dir, checked pushes), ``admin`` (the admin API),
  ``state`` (last-known-good on disk), ``metrics`` (Prometheus), ``registration`` (control plane
  client), ``cli`` (``sidecar_main`` / ``gateway_main``; ``python -m runtime.sidecar|gateway``).
"""
