import json

from pydantic import BaseModel

from tgi_server.router.streaming import sse_event


class Token(BaseModel):
    text: str


def test_an_event_stays_one_line_whatever_the_model_writes():
    # U+0085, U+2028 and U+2029 are line breaks to str.splitlines (so to httpx's iter_lines)
    # but not escaped by JSON: raw, they split one event into two unparseable lines.
    text = "a\x85b\u2028c\u2029d\n\r\x1ce é"
    data, blank = sse_event(Token(text=text)).decode().splitlines()
    assert data.startswith("data:") and blank == ""
    assert json.loads(data[5:]) == {"text": text}
    assert "é" in data  # the rest of the text stays as it was, not \u-escaped


def test_a_plain_string_event_is_framed_as_it_is():
    assert sse_event("[DONE]", "data: ") == b"data: [DONE]\n\n"
