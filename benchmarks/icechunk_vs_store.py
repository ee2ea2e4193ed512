"""Icechunk against the project's own transaction layer over plain Zarr: throughput and concurrent commits.

Issue 11 asked to decide by measurement whether a transactional engine (Icechunk: serialisable commits,
snapshots a run can pin, conflict detection) should replace the hand-written stage-and-rename transactions
of ``phaseid_hpc.store``. This writes and reads one ``(meters, time)`` float32 array with the store's
codecs (blosc-zstd, CRC-32C) to a plain Zarr ``LocalStore`` and to an Icechunk repository on the local
file system, and runs the two-writer case: two sessions from one snapshot each write different meters;
the second commit is refused, rebased and committed, and both writes must be there.

Icechunk is not a dependency: ``pip install icechunk`` to run this.

Example
-------
    python benchmarks/icechunk_vs_store.py --meters 20000 --days 30 --repeat 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec


def _create(store, shape, chunks):
    """The store's voltage encoding: float32, blosc-zstd, then a CRC-32C checksum of every chunk."""
    return zarr.create_array(store, name="voltage", shape=shape, chunks=chunks, dtype="float32",
                             fill_value=np.nan, serializer=BytesCodec(),
                             compressors=[BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), Crc32cCodec()],
                             overwrite=True)


def plain_zarr(root: Path, data: np.ndarray, chunks) -> tuple[float, float]:
    store = zarr.storage.LocalStore(str(root / "plain.zarr"))
    t0 = time.perf_counter()
    arr = _create(store, data.shape, chunks)
    arr[:] = data
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = zarr.open_array(store, path="voltage", mode="r")[:]
    t_read = time.perf_counter() - t0
    assert np.array_equal(back, data, equal_nan=True)
    return t_write, t_read


def icechunk_repo(root: Path, data: np.ndarray, chunks) -> tuple[float, float]:
    import icechunk

    repo = icechunk.Repository.create(icechunk.local_filesystem_storage(str(root / "ice")))
    t0 = time.perf_counter()
    session = repo.writable_session("main")
    arr = _create(session.store, data.shape, chunks)
    arr[:] = data
    session.commit("write")
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = zarr.open_array(repo.readonly_session("main").store, path="voltage", mode="r")[:]
    t_read = time.perf_counter() - t0
    assert np.array_equal(back, data, equal_nan=True)
    return t_write, t_read


def two_writers(root: Path) -> str:
    """Two sessions from one snapshot write different meters; what happens to the second commit."""
    import icechunk

    repo = icechunk.Repository.create(icechunk.local_filesystem_storage(str(root / "ice2")))
    s0 = repo.writable_session("main")
    _create(s0.store, (200, 96), (100, 96))
    s0.commit("create")
    a, b = repo.writable_session("main"), repo.writable_session("main")
    zarr.open_array(a.store, path="voltage")[:100] = 1.0
    zarr.open_array(b.store, path="voltage")[100:] = 2.0
    a.commit("writer a")
    try:
        b.commit("writer b")
        outcome = "second commit accepted without a conflict"
    except icechunk.ConflictError:
        b.rebase(icechunk.ConflictDetector())
        b.commit("writer b, rebased")
        outcome = "second commit refused (ConflictError), rebased and committed"
    v = zarr.open_array(repo.readonly_session("main").store, path="voltage", mode="r")[:]
    kept = bool((v[:100] == 1.0).all() and (v[100:] == 2.0).all())
    return f"{outcome}; both writes kept: {kept}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--meters", type=int, default=20000)
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--meter-chunk", type=int, default=8192)
    a = p.parse_args(argv)
    n_t = 96 * a.days
    rng = np.random.default_rng(0)
    data = (240 + rng.standard_normal((a.meters, n_t)).cumsum(axis=1) * 0.05).astype(np.float32)
    data = np.round(data * 10) / 10
    chunks = (min(a.meter_chunk, a.meters), n_t)
    rows = {"plain Zarr (the phaseid store's layout)": [], "Icechunk (local file system)": []}
    for _ in range(a.repeat):
        root = Path(tempfile.mkdtemp(prefix="ice-bench-"))
        try:
            rows["plain Zarr (the phaseid store's layout)"].append(plain_zarr(root, data, chunks))
            rows["Icechunk (local file system)"].append(icechunk_repo(root, data, chunks))
            conflict = two_writers(root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    mb = data.nbytes / 2**20
    print(f"{a.meters} meters x {n_t} samples float32 ({mb:.0f} MiB), chunks {chunks}, median of {a.repeat}")
    print("| storage | write [s] | read [s] | read [MiB/s] |")
    print("| --- | --- | --- | --- |")
    for name, r in rows.items():
        w = statistics.median(x[0] for x in r)
        rd = statistics.median(x[1] for x in r)
        print(f"| {name} | {w:.2f} | {rd:.2f} | {mb / rd:.0f} |")
    print(f"two writers from one snapshot: {conflict}")


if __name__ == "__main__":
    main()
