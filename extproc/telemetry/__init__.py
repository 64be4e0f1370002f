"""What the gateway tells operators: one record per exchange, fed to metrics and the audit log.

record   the exchange → one JSON-ready audit record (no keys, no raw text)
metrics  Prometheus metrics, updated from the same record
audit    a bounded queue and sinks (JSON-lines file with rotation, stdout, Redis Stream)
"""
