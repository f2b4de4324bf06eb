"""JSON-RPC 2.0 framing for the venue simulator: parse a request, check params, build replies.

Everything that can go wrong with a frame becomes an ``RpcError`` value (never an exception):

* a frame over the size limit -> 11050 ``bad_request`` (reason ``frame_too_large``);
* a binary frame or an HTTP request that cannot be read -> 11050 ``bad_request``;
* text that is not JSON -> -32700 ``Parse error``;
* JSON that is not a request object (array, scalar, ``jsonrpc`` not "2.0", ``method`` missing or
  not a string, ``id`` neither int, string nor null) -> -32600 ``Invalid Request``;
* ``params`` not an object, a required param missing, a param of the wrong type or outside its
  choices -> -32602 ``Invalid params`` with ``data.param``;
* an unknown method -> -32601 ``Method not found`` (raised by the dispatcher).

Params arrive as JSON values over WebSocket (types are checked strictly) or as query strings
over HTTP GET (``coerce_query`` turns ``"10"``/``"true"`` into the declared type first).
Unknown params are ignored, so clients that send extra Deribit options keep working.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
MUST_BE_WEBSOCKET = 10030
BAD_REQUEST = 11050

ParamKind = Literal["str", "int", "number", "bool", "str_list", "object"]


@dataclass(frozen=True)
class RpcError:
    """A refused frame or call: JSON-RPC/Deribit ``code`` and ``message``, our ``reason``."""

    code: int
    message: str
    reason: str
    param: str | None = None

    def to_error(self) -> dict[str, object]:
        data: dict[str, object] = {"reason": self.reason}
        if self.param is not None:
            data["param"] = self.param
        return {"code": self.code, "message": self.message, "data": data}


def bad_request(reason: str) -> RpcError:
    return RpcError(BAD_REQUEST, "bad_request", reason)


def invalid_params(reason: str, param: str | None = None) -> RpcError:
    return RpcError(INVALID_PARAMS, "Invalid params", reason, param)


def method_not_found(method: str) -> RpcError:
    return RpcError(METHOD_NOT_FOUND, "Method not found", "method_unknown", method[:100])


def websocket_only(method: str) -> RpcError:
    return RpcError(MUST_BE_WEBSOCKET, "must_be_websocket_request", "websocket_only", method)


RequestId = int | str | None


@dataclass(frozen=True)
class Request:
    id: RequestId
    method: str
    params: dict[str, object]


@dataclass(frozen=True)
class BadFrame:
    """A frame that cannot be dispatched: the error and the request id if one was readable."""

    error: RpcError
    id: RequestId = None


def _valid_id(value: object) -> bool:
    return value is None or isinstance(value, str) or (
        isinstance(value, int) and not isinstance(value, bool))


def parse_request(frame: str, max_bytes: int) -> Request | BadFrame:
    """One JSON-RPC request from a text frame (see the module doc for the error cases)."""
    if len(frame) > max_bytes or len(frame.encode("utf-8", "replace")) > max_bytes:
        return BadFrame(bad_request("frame_too_large"))
    try:
        msg = json.loads(frame)
    except (ValueError, RecursionError):
        return BadFrame(RpcError(PARSE_ERROR, "Parse error", "invalid_json"))
    return parse_object(msg)


def parse_object(msg: object) -> Request | BadFrame:
    """A decoded JSON value as a request (used for WebSocket frames and HTTP POST bodies)."""
    if not isinstance(msg, dict):
        return BadFrame(RpcError(INVALID_REQUEST, "Invalid Request", "not_an_object"))
    rid = msg.get("id")
    if not _valid_id(rid):
        return BadFrame(RpcError(INVALID_REQUEST, "Invalid Request", "id_invalid"))
    if msg.get("jsonrpc") != "2.0":
        return BadFrame(RpcError(INVALID_REQUEST, "Invalid Request", "jsonrpc_not_2.0"), rid)
    method = msg.get("method")
    if not isinstance(method, str) or not method:
        return BadFrame(RpcError(INVALID_REQUEST, "Invalid Request", "method_missing"), rid)
    params = msg.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        return BadFrame(invalid_params("params_not_object", "params"), rid)
    return Request(rid, method, params)


# --- params ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One declared param. ``choices`` limits string values; ``default`` fills a missing one."""

    name: str
    kind: ParamKind
    required: bool = False
    default: object = None
    choices: tuple[str, ...] | None = None


def _type_ok(kind: ParamKind, value: object) -> bool:
    if kind == "str":
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str_list":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, dict)


def _from_text(kind: ParamKind, text: str) -> object:
    """A query-string value as ``kind``; the text itself when it does not convert (the type
    check then refuses it)."""
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            return text
    if kind == "number":
        try:
            return float(text)
        except ValueError:
            return text
    if kind == "bool":
        return {"true": True, "false": False}.get(text.lower(), text)
    if kind == "str_list":
        if text.startswith("["):
            try:
                return json.loads(text)
            except ValueError:
                return text
        return [part for part in text.split(",") if part]
    if kind == "object":
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def coerce_query(specs: Sequence[Param], query: Mapping[str, str]) -> dict[str, object]:
    """HTTP GET params (all strings) converted to the declared kinds; undeclared ones kept
    as text."""
    kinds = {p.name: p.kind for p in specs}
    return {k: _from_text(kinds[k], v) if k in kinds else v for k, v in query.items()}


def check_params(specs: Sequence[Param], params: Mapping[str, object]
                 ) -> dict[str, object] | RpcError:
    """The declared params with defaults filled in, or the first problem found."""
    out: dict[str, object] = {}
    for spec in specs:
        if spec.name not in params or params[spec.name] is None:
            if spec.required:
                return invalid_params(f"{spec.name}_missing", spec.name)
            out[spec.name] = spec.default
            continue
        value = params[spec.name]
        if not _type_ok(spec.kind, value):
            return invalid_params(f"{spec.name}_wrong_type", spec.name)
        if spec.choices is not None and value not in spec.choices:
            return invalid_params(f"{spec.name}_invalid", spec.name)
        out[spec.name] = value
    return out


# --- replies --------------------------------------------------------------------------------
def _finite(obj: object) -> object:
    """JSON has no NaN/inf: they are sent as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def dumps(obj: object) -> str:
    try:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False)
    except ValueError:
        return json.dumps(_finite(obj), separators=(",", ":"), allow_nan=False)


def reply(rid: RequestId, *, result: object = None, error: dict[str, object] | None = None,
          us_in: int = 0, us_out: int = 0) -> dict[str, object]:
    """A response object with Deribit's ``usIn``/``usOut``/``usDiff``/``testnet`` extras."""
    out: dict[str, object] = {"jsonrpc": "2.0", "id": rid}
    if error is not None:
        out["error"] = error
    else:
        out["result"] = result
    out.update(usIn=us_in, usOut=us_out, usDiff=us_out - us_in, testnet=True)
    return out


def subscription(channel: str, data: object) -> str:
    """A ``subscription`` notification frame."""
    return dumps({"jsonrpc": "2.0", "method": "subscription",
                  "params": {"channel": channel, "data": data}})


def heartbeat(kind: Literal["heartbeat", "test_request"]) -> str:
    return dumps({"jsonrpc": "2.0", "method": "heartbeat", "params": {"type": kind}})
