"""Regenerates `pdserve_pb2.py`, `pdserve_pb2.pyi` and `pdserve_pb2_grpc.py` from `pdserve.proto`
(needs grpcio-tools, in the `test` extra): `python -m pdserve.proto.generate [--check]`."""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
GENERATED = ("pdserve_pb2.py", "pdserve_pb2.pyi", "pdserve_pb2_grpc.py")


def generate(out_root: Path) -> Path:
    """Runs protoc with the repository root as include path, so modules import as `pdserve.proto.*`."""
    from grpc_tools import protoc

    root = PROTO_DIR.parent.parent
    args = [
        "protoc",
        f"-I{root}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(PROTO_DIR / "pdserve.proto"),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on pdserve/proto/pdserve.proto")
    return out_root / "pdserve" / "proto"


def stale_files() -> list[str]:
    """Generated files that differ from what pdserve.proto generates now."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [
            name
            for name in GENERATED
            if not (PROTO_DIR / name).is_file() or not filecmp.cmp(fresh / name, PROTO_DIR / name, shallow=False)
        ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the generated files are stale")
    if parser.parse_args().check:
        stale = stale_files()
        print("stale: " + ", ".join(stale) if stale else "up to date")
        return 1 if stale else 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        for name in GENERATED:
            shutil.copy(fresh / name, PROTO_DIR / name)
    print("generated " + ", ".join(GENERATED))
    return 0


if __name__ == "__main__":
    sys.exit(main())
