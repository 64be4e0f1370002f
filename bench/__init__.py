"""The benchmark harness: ``python -m bench.run [--quick] [--peers]`` (see bench/README.md)."""
