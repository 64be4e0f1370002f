"""MCP governance: Model Context Protocol traffic through the same filter as LLM calls.

MCP clients (agents) POST JSON-RPC 2.0 to an MCP server's Streamable HTTP endpoint; the
gateway reads each message, refuses the tool calls, resource reads and prompt fetches the
caller's policy does not allow (answering with a JSON-RPC error that keeps the request's
``id``; nothing reaches the server), and narrows list answers to what the caller may use.

    config      policy models: McpConfig (servers), McpAccess (per team / user / key globs)
    access      compiled lookups: McpRegistry (server by path), McpPermissions (one caller)
    jsonrpc     parse a body into Request / Notification / Response / Invalid; error answers
    enforce     decide(): Forward or Answer; filter_list_response(); audit records (McpCall)
    stream      rewrite JSON and SSE answers (list filtering, guardrail rewriters)
    texts       the texts guardrails read, with JSON paths
    demo_server a demo MCP server on the official SDK (imports ``mcp``; nothing else does)

Errors: :class:`extproc.mcp.jsonrpc.JsonRpcError` (an unusable body; carries its answer)
and :class:`extproc.mcp.stream.McpStreamError` (an unreadable answer; end the stream).
Policy refusals are not exceptions but :class:`extproc.mcp.enforce.Answer` values.
"""
