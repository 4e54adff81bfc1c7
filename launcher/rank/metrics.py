"""A rank's metrics records: metrics.jsonl on rank 0, fed to the TensorBoard / W&B sinks."""

from __future__ import annotations

import json
import time
from pathlib import Path


class Metrics:
    """Rank 0 appends one JSON object per line; the launching terminal tails the file."""

    def __init__(self, path: Path, enabled: bool):
        self.fh = open(path, "a", buffering=1) if enabled else None
        self.sinks: list = []  # TensorBoard / W&B (launcher.rank.sinks), fed the same records

    def __call__(self, event: str, **fields) -> None:
        if self.fh:
            record = {"event": event, "time": time.time(), **fields}
            self.fh.write(json.dumps(record) + "\n")
            for sink in self.sinks:
                sink.write(record)

    def close(self) -> None:  # idempotent: the session closes on every way out
        if self.fh:
            self.fh.close()
            self.fh = None
        for sink in self.sinks:
            sink.close()
        self.sinks = []
