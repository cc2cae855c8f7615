"""Error answers: one exception type for every 4xx/5xx, and the two JSON shapes it takes.

DistServe's routes answer {"error": message}; OpenAI-compatible routes (/v1/..., and vLLM's
/tokenize and /detokenize) answer vLLM's
ErrorResponse, {"error": {"message", "type", "param", "code"}}, with vLLM's type names and the
HTTP status as `code`, which the openai client turns into its exception classes.
"""
from __future__ import annotations

from http import HTTPStatus

# vLLM's `type` per status (vllm/entrypoints/.../error_response.py); others: the HTTP phrase.
ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               422: "UnprocessableEntityError", 500: "InternalServerError",
               501: "NotImplementedError"}


class ApiError(Exception):
    """An HTTP error answer: status, a message naming the problem and its fix, the request field
    at fault (if one is), extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.param = param


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "")


def openai_error(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type(status), "param": param,
                      "code": status}}


# vLLM's own routes outside /v1/ that answer its ErrorResponse too.
VLLM_ROUTES = ("/tokenize", "/detokenize")


def error_body(path: str, status: int, message: str, param: str | None = None) -> dict:
    """vLLM's shape under /v1/ and on vLLM's routes, DistServe's {"error": message} elsewhere."""
    if path.startswith("/v1/") or path in VLLM_ROUTES:
        return openai_error(status, message, param)
    return {"error": message}
