"""The control plane on Kubernetes: discovery from EndpointSlices, identity by TokenReview, a Lease.

Built on ``kubernetes_asyncio`` (the official client generated from the API's OpenAPI spec, on
aiohttp, which meshc already ships: no second HTTP stack, and typed request bodies and errors
for TokenReview and Lease). Watches read the chunked JSON-lines stream themselves, so the
resourceVersion bookkeeping and the relist on 410 Gone are meshc's and tested, not implicit.
Imported only when the control plane runs with ``--kubernetes``.
"""
