"""Small builders from core decisions to Envoy's ext_proc protobufs.

Kept apart from the stream loop so protobuf assembly never leaks into policy code and
the loop stays short (the service-extensions callouts' style).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3.http_status_pb2 import HttpStatus

from extproc.decisions import Forward, Headers, Reply

_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def metadata_string(metadata: Any, namespace: str, key: str) -> str | None:
    """A string of Envoy's dynamic metadata (``filter_metadata``), or ``None``."""
    struct = metadata.get(namespace)
    value = struct.fields.get(key) if struct is not None else None
    return str(value.string_value) if value is not None and value.string_value else None


def header_map(headers: pb.HttpHeaders) -> dict[str, str]:
    """Envoy's header list as a dict of lower-case names (last value wins)."""
    return {
        h.key: (h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value)
        for h in headers.headers.headers
    }


def header_mutation(set_headers: Headers, remove: Iterable[str] = ()) -> pb.HeaderMutation:
    return pb.HeaderMutation(
        set_headers=[
            HeaderValueOption(
                header=HeaderValue(key=name, raw_value=value.encode("utf-8")),
                append_action=_OVERWRITE,
            )
            for name, value in set_headers
        ],
        remove_headers=list(remove),
    )


def common_response(forward: Forward, *, body_length: bool) -> pb.CommonResponse:
    """Header and body changes for a phase that continues towards the upstream;
    ``body_length``: a replaced body's ``content-length`` is set to match (a request's)."""
    set_headers = forward.set_headers
    if forward.body is not None and body_length:
        set_headers = (*set_headers, ("content-length", str(len(forward.body))))
    response = pb.CommonResponse(clear_route_cache=forward.clear_route_cache)
    if set_headers or forward.remove_headers:
        response.header_mutation.CopyFrom(header_mutation(set_headers, forward.remove_headers))
    if forward.body is not None:
        response.body_mutation.body = forward.body
    return response


def immediate_response(reply: Reply) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=HttpStatus(code=reply.status),
            headers=header_mutation(reply.headers),
            body=reply.body,
            details=reply.details,
        )
    )
