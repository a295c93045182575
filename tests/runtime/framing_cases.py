"""Request framings every listener refuses with 400 (issue 20 #4): the smuggling and ambiguity
cases of RFC 9112 section 6 that llhttp's strict mode and ``runtime.h1`` reject. The admin and
control-plane tests and the data-listener tests send the same bytes."""

from __future__ import annotations

import pytest

FRAMING_CASES = [
    pytest.param(
        b"PUT /endpoints HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
        id="duplicate-content-length",
    ),
    pytest.param(
        b"PUT /endpoints HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}x",
        id="conflicting-content-length",
    ),
    pytest.param(b"GET /config HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n", id="nul-in-header"),
    pytest.param(b"GET /con\x00fig HTTP/1.1\r\nHost: a\r\n\r\n", id="nul-in-target"),
    pytest.param(
        b"PUT /endpoints HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        id="te-chunked-identity",
    ),
    pytest.param(
        b"PUT /endpoints HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        id="cl-and-te",
    ),
    pytest.param(b"GET /config HTTP/1.1\r\nHost: a\r\nX-A: a\r\n b\r\n\r\n", id="obs-fold"),
    pytest.param(b"GET /config HTTP/1.1\nHost: a\n\n", id="bare-lf"),
    pytest.param(b"PUT /endpoints HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", id="negative-length"),
]
