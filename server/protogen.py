"""Regenerate the committed protobuf modules from proto/expunge/v1/*.proto.

``python -m expunge.server.protogen [OUT_DIR]``: writes ``*_pb2.py``, ``*_pb2.pyi`` and
``*_pb2_grpc.py`` under OUT_DIR (default: the repository's ``proto/``). The drift test
regenerates into a temporary directory and compares.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    return sorted((root / "expunge" / "v1").glob("*.proto"))


def generate(out_dir: Path, root: Path = PROTO_ROOT) -> list[Path]:
    """Run grpc_tools.protoc on every .proto; return the files written."""
    from grpc_tools import protoc  # dev dependency: imported only here

    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    files = [str(p.relative_to(root)) for p in proto_files(root)]
    args = [
        "protoc",
        f"-I{root}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    return sorted((out_dir / "expunge" / "v1").glob("*_pb2*.py*"))


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT)
