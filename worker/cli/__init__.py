"""The `tokenheap` command line: thin over the engine (`fit`) and the Kafka service."""

from worker.cli.main import main

__all__ = ["main"]
