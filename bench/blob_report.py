"""GPU box: how the methods of a CUDA export share their AOTI weights blobs, and why not when they don't.

ExecuTorch 1.2.0 stores each method's constants as one dense blob in ``aoti_cuda_blob.ptd`` and keeps one
copy of byte-identical blobs. prefill and target_verify read the same target weights, so their blobs
should be one; if they are not, the .ptd holds the target twice. This prints each method's blob size and
whether it is shared, and for prefill vs target_verify the first place their constant tables (order,
FQN, size) or constant bytes differ.

    python bench/blob_report.py ART_DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from etspec.runtime.aoti_container import AotiContainer
from etspec.runtime.pte_reader import read_program


def tables(art: Path) -> dict[str, tuple[list, memoryview, str]]:
    """method -> (constant infos in blob order, its weights blob, the blob's named-data key)."""
    prog = read_program(art, [art / "aoti_cuda_blob.ptd"])
    out = {}
    for name in prog.executable_methods():
        payload = prog.aoti_payload(name, 0)
        with AotiContainer(prog.named_data.get(payload.so_key), name=name) as c:
            consts = [x for x in c.constants() if not x.from_folded]
        out[name] = (consts, prog.named_data.get(payload.weights_key), payload.weights_key)
    return out


def compare(a: tuple[list, memoryview, str], b: tuple[list, memoryview, str]) -> str:
    """The first difference between two methods' blobs, or "identical"."""
    (ca, ba, _), (cb, bb, _) = a, b
    for i, (x, y) in enumerate(zip(ca, cb)):
        if (x.fqn, x.data_size, x.kind) != (y.fqn, y.data_size, y.kind):
            return f"#{i}: {x.fqn} ({x.kind}, {x.data_size} B) vs {y.fqn} ({y.kind}, {y.data_size} B)"
    if len(ca) != len(cb):
        return f"{len(ca)} vs {len(cb)} constants (the first {min(len(ca), len(cb))} agree)"
    off = 0
    for x in ca:
        if bytes(ba[off : off + x.data_size]) != bytes(bb[off : off + x.data_size]):
            return f"same table; the bytes of {x.fqn} ({x.kind}) differ"
        off += x.data_size
    return "identical"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("art", type=Path)
    art = ap.parse_args().art
    t = tables(art)
    for name, (consts, blob, key) in t.items():
        print(f"{name}: {len(consts)} constants, blob {len(blob) / 2**20:.1f} MiB ({key})")
    if "prefill" in t and "target_verify" in t:
        diff = compare(t["prefill"], t["target_verify"])
        print(f"prefill vs target_verify: {diff}")
        return 0 if diff == "identical" else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
