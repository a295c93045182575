"""Coverage-guided fuzzing of the HTTP/1 readers (``runtime.h1``) with atheris.

The first byte picks the request or the response reader and where the input is cut in two
(bytes arrive in pieces); a message or ``H1Error`` with its documented status is fine, anything
else is a crash. See ``bench/_atheris.py``.

    .venv/bin/python bench/atheris_h1.py -runs=100000
"""

from __future__ import annotations

import _atheris
import atheris

with atheris.instrument_imports(include=["runtime"]):
    from runtime import h1

SEEDS = [
    b"\x00GET /route1/x?a=1 HTTP/1.1\r\nHost: benigno:5000\r\n\r\n",
    b"\x11POST /p HTTP/1.1\r\nHost: b\r\nContent-Length: 5\r\n\r\nhello",
    b"\x20PUT /c HTTP/1.1\r\nHost: m\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"\x01HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"\x31HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"\x03HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nx",
]


class Sink:
    def request_head(self, req: h1.Request) -> None:
        assert req.method
        req.path(), req.authority()

    def request_body(self, req: h1.Request, data: bytes) -> None:
        pass

    def request_end(self, req: h1.Request) -> None:
        pass

    def response_head(self, resp: h1.Response) -> None:
        assert 100 <= resp.status <= 999

    def response_body(self, data: bytes) -> None:
        pass

    def response_end(self, resp: h1.Response) -> None:
        pass


def one_input(data: bytes) -> None:
    if not data:
        return
    response = data[0] & 1
    body = data[1:]
    cut = (data[0] >> 1) * len(body) // 128
    reader: h1.RequestReader | h1.ResponseReader = (
        h1.ResponseReader(Sink()) if response else h1.RequestReader(Sink())
    )
    try:
        for piece in (body[:cut], body[cut:]):
            if piece and reader.feed(piece) >= 0:
                return  # an Upgrade / CONNECT / 101: the rest is not HTTP
    except h1.H1Error as e:
        if e.status not in ((502,) if response else (400, 414, 431)):
            raise


if __name__ == "__main__":
    _atheris.run(one_input, SEEDS)
