"""Read what an offline W&B run logged, from its run-*.wandb file.

wandb (0.31) no longer ships a Python reader for this file. It is a LevelDB-style log: a 7-byte
header (':W&B', 2-byte magic, version), then 32 KiB blocks of records, each with a 7-byte
header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and a protobuf `Record`."""

import glob
import json
import os
import struct

BLOCK = 32768
HEADER = 7


def _payloads(path: str):
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, pieces = HEADER, []
    while position + HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < HEADER:  # the block's tail is padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + HEADER])
        pieces.append(data[position + HEADER:position + HEADER + length])
        position += HEADER + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            yield b"".join(pieces)
            pieces = []


def history(run_dir: str) -> dict[str, list]:
    """Every logged value, by key, in the order logged (images appear as their JSON description)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(os.path.join(run_dir, "*.wandb"))
    values = {}
    for payload in _payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                values.setdefault(key, []).append(json.loads(item.value_json))
    return values
