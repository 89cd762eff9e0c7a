"""Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}` with the status OpenAI uses.

Every error a request can meet is an `ApiError` raised where it is found (the parameter it names, the status it
maps to); the app turns it, and anything unexpected, into this shape, so a client never sees a stack trace.
"""

from __future__ import annotations

import json

# status -> the `type` OpenAI puts in its error objects
TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """A request that cannot be served, with what to tell the client."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error" if status < 500
                                                              else "server_error"),
                      "param": param, "code": code}}


def bad_param(param: str, message: str, code: str | None = "invalid_value") -> ApiError:
    """A 400 naming the parameter at fault."""
    return ApiError(400, message, param=param, code=code)


def sse_error(err: ApiError) -> str:
    """An error inside an event stream that has already started (its status line is long sent)."""
    return f"data: {json.dumps(err.body())}\n\n"
