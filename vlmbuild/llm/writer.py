"""A safetensors writer that streams: tensors go to disk as they come, the header is written last.

The file format is `u64 header_len | JSON header | raw bytes`, with offsets relative to the data
section. Data is appended to a spool file; `close()` writes header + spool into the final file.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int8: "I8",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.uint8: "U8",
}


class StreamingSafetensorsWriter:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._spool_path = self.path.with_name(self.path.name + ".spool")
        self._spool = self._spool_path.open("wb")
        self._header: dict[str, dict] = {}
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._header:
            raise ValueError(f"duplicate tensor {name}")
        t = tensor.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        self._spool.write(raw)
        end = self._offset + len(raw)
        self._header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [self._offset, end]}
        self._offset = end

    def close(self) -> None:
        self._spool.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # keep the data section 8-byte aligned
        with self.path.open("wb") as out, self._spool_path.open("rb") as spool:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(spool, out, length=16 << 20)
        self._spool_path.unlink()
