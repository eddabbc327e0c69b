"""An offline W&B run read back with W&B's own record schema (``wandb.proto.wandb_internal_pb2.Record``).

wandb 0.31 ships no Python reader for a ``.wandb`` file's framing, which is LevelDB's log format behind a
``:W&B`` header, so this unframes it itself.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_wandb_records(path: Path) -> list:
    """Every ``Record`` in a ``.wandb`` transaction log."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < 7:  # a block's tail too short for a header is zero padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            records.append(wandb_internal_pb2.Record.FromString(payload))
        elif kind == _FIRST:
            pending = payload
        elif kind == _MIDDLE:
            pending += payload
        elif kind == _LAST:
            records.append(wandb_internal_pb2.Record.FromString(pending + payload))
    return records


def wandb_history(records: list) -> dict[int, dict]:
    history: dict[int, dict] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {item.nested_key[0] if item.nested_key else item.key: json.loads(item.value_json)
                   for item in record.history.item}
            history[int(row["_step"])] = row
    return history


def wandb_config(records: list) -> dict:
    """The run's config as W&B stored it: the run record's, then each config update's, by top-level key."""
    config: dict = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        items = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        for item in items:
            config[item.nested_key[0] if item.nested_key else item.key] = json.loads(item.value_json)
    return config
