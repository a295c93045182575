"""Listen addresses as the flags take them, IPv6 included: ``meshc inject`` writes
``$(MESHC_POD_IP):PORT``, which on an IPv6 cluster expands to ``fd00:10:244::5:15001``."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from runtime_harness import Plane

from runtime.server import parse_addr


@pytest.mark.parametrize(
    ("flag", "addr"),
    [
        ("10.244.0.5:15001", ("10.244.0.5", 15001)),
        ("fd00:10:244::5:15001", ("fd00:10:244::5", 15001)),
        ("[fd00:10:244::5]:15001", ("fd00:10:244::5", 15001)),
        ("::1:0", ("::1", 0)),
        (":15001", ("127.0.0.1", 15001)),
        ("15001", ("127.0.0.1", 15001)),
    ],
)
def test_an_address_flag_takes_either_family(flag: str, addr: tuple[str, int]) -> None:
    assert parse_addr(flag) == addr


@pytest.mark.parametrize("flag", ["fd00::", "fd00:zz::1:80", "host", "127.0.0.1:99999", "[::1]"])
def test_an_address_that_is_not_one_is_refused_with_the_reason(flag: str) -> None:
    with pytest.raises(ValueError, match=r"host:port|not an IPv6 address"):
        parse_addr(flag)


def test_a_sidecar_listens_on_an_unbracketed_ipv6_address(plane: Callable[..., Plane]) -> None:
    """The form an IPv6 pod's inject args expand to, on a real process: it listens there, says
    so in the bracketed form, and answers."""
    sidecar = plane("--service", "benigno", "--admin", "::1:0")
    assert sidecar.listening["admin"].startswith("[::1]:")
    assert sidecar.admin[0] == "::1"
    assert sidecar.config()["service"] == "benigno"
