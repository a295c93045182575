"""The data plane: everything from a received bundle to enforced traffic.

``bundle`` and ``protocol`` are the contracts shared with the compiler; the rest (the sans-io
engine, the proxies, the admin API) never imports ``compiler``.
"""
