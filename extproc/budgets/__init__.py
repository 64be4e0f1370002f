"""Token budgets, rate limits and cost: enforced before the call, exact after it.

The pure core and the counter stores; the request pipeline wires them together.

    tokens           prompt-token counts: exact BPE for OpenAI models, an estimate otherwise
    pricing          per-model prices and exact integer costs in micro-USD
    windows          minute / hour / day / calendar-month windows in UTC
    keys             scopes, units and the logical counter-key layout
    store            the store protocol, its data types and ``StoreUnavailable``
    memory_store     in-process store (default, one worker)
    redis_store      Redis / Redis Cluster store (Lua, one round trip per call)
    resilient_store  fail-open / fail-closed wrapper with write-back after an outage

Importing this package imports nothing heavy: the tokenizer tables and the Redis client
load only when the module that needs them is imported or first used.
"""
