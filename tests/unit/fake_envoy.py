"""A fake Envoy for driving the ext_proc adapter in memory, one phase message at a time."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

import orjson
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue, Metadata
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.struct_pb2 import Struct

from extproc.adapters.ext_proc import ExternalProcessor


def request_headers(
    path: str,
    headers: dict[str, str] | None = None,
    *,
    method: str = "POST",
    end_of_stream: bool = False,
    metadata: dict[str, dict[str, Any]] | None = None,
) -> pb.ProcessingRequest:
    values = {":path": path, ":method": method, ":authority": "gateway", **(headers or {})}
    message = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=HeaderMap(
                headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()]
            ),
            end_of_stream=end_of_stream,
        )
    )
    for namespace, fields in (metadata or {}).items():
        struct = Struct()
        struct.update(fields)
        message.metadata_context.CopyFrom(Metadata(filter_metadata={namespace: struct}))
    return message


def request_body(payload: object | bytes) -> pb.ProcessingRequest:
    raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=raw, end_of_stream=True))


def response_headers(
    status: int = 200, content_type: str = "application/json", **more: str
) -> pb.ProcessingRequest:
    values = {":status": str(status), "content-type": content_type, **more}
    return pb.ProcessingRequest(
        response_headers=pb.HttpHeaders(
            headers=HeaderMap(
                headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in values.items()]
            )
        )
    )


def response_body(payload: object | bytes, *, end_of_stream: bool = True) -> pb.ProcessingRequest:
    raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=raw, end_of_stream=end_of_stream))


async def exchange(
    processor: ExternalProcessor, messages: Iterable[pb.ProcessingRequest]
) -> list[pb.ProcessingResponse]:
    """Send ``messages`` on one stream and collect every answer, as Envoy would."""

    async def stream() -> AsyncIterator[pb.ProcessingRequest]:
        for message in messages:
            yield message

    return [answer async for answer in processor.Process(stream(), None)]


def headers_set(response: pb.CommonResponse | pb.ImmediateResponse) -> dict[str, str]:
    mutation = (
        response.headers if isinstance(response, pb.ImmediateResponse) else response.header_mutation
    )
    return {o.header.key: o.header.raw_value.decode() for o in mutation.set_headers}
