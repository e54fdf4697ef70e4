"""Headers, Request and Response in-process: no server."""

from __future__ import annotations

import pytest
from sockworker import Headers, Request, Response


def test_names_are_case_insensitive_and_values_join() -> None:
    headers = Headers([("X-Tag", "a"), ("x-tag", "b"), ("Host", "h")])
    assert headers["X-TAG"] == "a, b"
    assert headers.get_all("x-Tag") == ["a", "b"]
    assert "HOST" in headers and "absent" not in headers
    assert headers.get("absent", "d") == "d"
    assert len(headers) == 2
    assert list(headers) == ["x-tag", "host"]


def test_set_replaces_append_adds_delete_removes() -> None:
    headers = Headers({"A": "1"})
    headers.append("a", "2")
    assert headers.getAll("a") == ["1", "2"]
    headers["A"] = "3"
    assert headers.get_all("a") == ["3"]
    headers.set("b", "4")
    assert headers.has("B")
    headers.delete("b")
    headers.delete("never-there")
    assert not headers.has("b")
    with pytest.raises(KeyError):
        headers["b"]


def test_raw_is_lowercase_latin1_pairs_in_order() -> None:
    headers = Headers([("X-A", "é"), ("x-a", "2"), ("B", "3")])
    assert headers.raw() == [("x-a", "é".encode("latin-1")), ("x-a", b"2"), ("b", b"3")]
    assert Headers._from_raw(headers.raw()).get_all("x-a") == ["é", "2"]


def test_request_splits_the_url_and_keeps_the_first_query_value() -> None:
    request = Request("get", "http://h/p/q?a=1&a=2&b=", Headers({"Host": "h"}), b'{"x": 1}')
    assert request.method == "GET"
    assert request.path == "/p/q"
    assert request.query_string == request.queryString == "a=1&a=2&b="
    assert dict(request.query) == {"a": "1", "b": ""}
    assert Request("GET", "http://h").path == "/"


async def test_request_body_as_text_and_json() -> None:
    request = Request("POST", "http://h/", body=b'{"x": [1]}')
    assert await request.text() == '{"x": [1]}'
    assert await request.json() == {"x": [1]}
    with pytest.raises(UnicodeDecodeError):
        await Request("POST", "http://h/", body=b"\xff").text()


def test_response_bodies_and_content_type() -> None:
    text = Response("héllo")
    assert text.body == "héllo".encode()
    assert text.headers["content-type"] == "text/plain; charset=utf-8"
    assert Response("x", headers={"Content-Type": "text/html"}).headers["content-type"] == (
        "text/html"
    )
    assert Response(None).body == b""
    assert Response(bytearray(b"ab")).body == b"ab"
    data = Response.json({"a": 1}, status=201)
    assert (data.status, data.body, data.headers["content-type"]) == (
        201,
        b'{"a": 1}',
        "application/json",
    )


@pytest.mark.parametrize("status", [99, 1000, "200", 200.0])
def test_response_refuses_a_bad_status(status: object) -> None:
    with pytest.raises(ValueError, match="status must be an int"):
        Response(status=status)  # type: ignore[arg-type]


def test_response_refuses_a_bad_body_and_both_websocket_names() -> None:
    with pytest.raises(TypeError, match=r"str, bytes, None, or an \(async\) iterator"):
        Response(3)  # type: ignore[arg-type]
    from sockworker import WebSocketPair

    client, _server = WebSocketPair()
    with pytest.raises(TypeError, match="not both"):
        Response(status=101, websocket=client, webSocket=client)
    assert Response(status=101, webSocket=client).websocket is client
