"""Reading a JSON request body: any bytes a client sends are a 400 or a value, never a 500.

Rules:
- The body must be UTF-8 JSON. Invalid UTF-8 (msgspec raises ``UnicodeDecodeError``,
  which litestar does not expect) is refused as malformed JSON.
- Nesting is capped at ``MAX_JSON_DEPTH`` containers. msgspec's decoder recurses in C
  and raises ``RecursionError`` at a depth that depends on how deep the Python stack
  already is (about 320 levels under uvicorn), and a value just under that would blow
  the stack of the next recursive step (conversion, re-encoding for the database).
  No request of ours nests more than a few levels.
- Every refusal is litestar's ``SerializationException``, which the framework turns
  into a client error and ``gateway/errors.py`` renders as 400 ``invalid_request``
  ("body: malformed JSON (…)"), on every route that takes a body.
"""

from typing import Any, Final

from litestar import Request
from litestar.exceptions import SerializationException
from litestar.serialization import decode_json
from litestar.types import Empty

MAX_JSON_DEPTH: Final = 64


def deeper_than(value: Any, limit: int) -> bool:
    """True if ``value`` nests more than ``limit`` lists or objects (without recursing)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def decode_body(body: bytes) -> Any:
    """A request body's JSON value, or SerializationException naming what is wrong."""
    try:
        value = decode_json(body or b"null")
    except UnicodeDecodeError:
        raise SerializationException("not valid UTF-8") from None
    except RecursionError:
        raise SerializationException(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    if deeper_than(value, MAX_JSON_DEPTH):
        raise SerializationException(f"nested deeper than {MAX_JSON_DEPTH} levels")
    return value


class GatewayRequest(Request[Any, Any, Any]):
    """litestar's Request, with ``json()`` that refuses what ``decode_body`` refuses."""

    async def json(self) -> Any:
        if self._json is Empty:
            if (cached := self._connection_state.json) is not Empty:
                self._json = cached
            else:
                self._json = self._connection_state.json = decode_body(await self.body())
        return self._json
