"""The build driver's object-store round trips at paper scale: planning and folding the funnel, under latency.

Usage::

    python bench/bench_driver_io.py                 # 1,000 chunks, 30 ms per request
    python bench/bench_driver_io.py --chunks 500 --latency-ms 30

The paper's build is ≈ 46,875 chunks of 64 rows on object storage. Before issue 25 the driver wrote one plan
shard per chunk (one PUT each, serially, before Ray started) and, after every run (resumes included), read one
sink marker per chunk (a HEAD + GET each, serially). Now the plan is one Parquet object with one row group per
chunk (:func:`pipeline.build.write_plan`) and the funnel is folded from the markers the sink streams back; the
markers of chunks sunk by an earlier run are read ``READ_THREADS`` at a time (:func:`pipeline.build._aggregate`).

Setup: moto's S3 server on 127.0.0.1 behind a TCP proxy on 127.0.0.1 that holds each new request (client bytes
after the server has answered) for ``--latency-ms`` before forwarding it: one round trip of added latency per
request, as a client in one region talking to S3 in another sees. Every Storage call goes through the proxy
(``AWS_ENDPOINT_URL``); the markers the aggregate reads are put there directly beforehand (not timed).

Measured in one run, same chunks, same server:
* plan, earlier layout: one Parquet shard per chunk written in a loop (the function as it was, reproduced here);
* plan, now: ``write_plan`` on a ``generate``-kind config of ``chunks × 16`` sources (nothing is generated);
* aggregate, earlier: one ``read_json`` per chunk in a loop;
* aggregate, now, resume case: ``_aggregate`` with no marker known (every one read, threaded);
* aggregate, now, fresh run: ``_aggregate`` with every marker streamed back (no read).
Printed: seconds, the ratio earlier/now, and each figure extrapolated linearly to 46,875 chunks (minutes).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as U  # noqa: E402

PAPER_CHUNKS = 46_875


class LatencyProxy:
    """127.0.0.1:port → upstream; each request (client bytes after a server reply) waits ``delay_s`` first."""

    def __init__(self, upstream: tuple[str, int], delay_s: float):
        self.upstream, self.delay_s = upstream, delay_s
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.sock.accept()
            server = socket.create_connection(self.upstream)
            state = {"answered": True}
            threading.Thread(target=self._pipe, args=(client, server, state, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, state, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, state: dict, request: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if request and state["answered"]:
                    state["answered"] = False
                    time.sleep(self.delay_s)
                elif not request:
                    state["answered"] = True
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=1000)
    ap.add_argument("--latency-ms", type=float, default=30.0)
    args = ap.parse_args()
    print("\n".join(U.machine_lines()))

    import boto3
    import pyarrow as pa
    from moto.server import ThreadedMotoServer

    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"})
    direct = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=direct).create_bucket(Bucket="bench")
    proxy = LatencyProxy((host, port), args.latency_ms / 1000)
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{proxy.port}"

    from pipeline.build import _aggregate, stage_keys, write_plan
    from pipeline.store import Storage
    from tests.buildutil import as_config, tiny_build_config

    n = args.chunks
    per_chunk = 16  # paper.yaml: 64 rows per chunk, 4 instructions per source
    data = tiny_build_config("unused", sources={"kind": "generate", "classes": [f"c{i}" for i in range(10)],
                                                "num_per_class": n * per_chunk // 10},
                             rows_per_chunk=64,
                             instructions={"phrases": [f"phrase {i}" for i in range(8)], "per_source": 4})
    cfg = as_config(data)
    key = stage_keys(cfg, {})["plan"]
    rows: dict[str, float] = {}

    # plan, earlier layout: one shard per chunk, serially (the sources come from the same listing)
    from pipeline.sources import iter_sources
    import json

    sources = [json.dumps(s, sort_keys=True) for s in iter_sources(cfg)]
    old = Storage("s3://bench/old")
    t0 = time.perf_counter()
    for i in range(n):
        old.write_parquet(f"_work/plan/{key}/{i:06d}.parquet",
                          pa.table({"source": sources[i * per_chunk:(i + 1) * per_chunk]}))
    rows["plan, one object per chunk (earlier)"] = time.perf_counter() - t0
    new = Storage("s3://bench/new")
    t0 = time.perf_counter()
    chunks = write_plan(cfg, new, key, [])
    rows["plan, parts of 1,024 chunks (now)"] = time.perf_counter() - t0
    assert len(chunks) == n, (len(chunks), n)

    # the sink markers of n chunks, put directly (not timed)
    from pipeline.build import FUNNEL_ORDER

    marker = {"funnel": {st: {"stage": st, "unit": "rows", "in": 64, "out": 64, "removed": {}} for st in FUNNEL_ORDER},
              "kept": 60, "candidates": 64, "quarantined": 0, "dataset_hash": "0" * 64,
              "dataset_bytes": 1 << 20}
    s3 = boto3.client("s3", endpoint_url=direct)
    body = json.dumps(marker).encode()

    def put(i: int) -> None:
        s3.put_object(Bucket="bench", Key=f"new/_work/sink/k/{i:06d}.json", Body=body)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(n)))
    t0 = time.perf_counter()
    for c in chunks:
        new.read_json(f"_work/sink/k/{c}.json")
    rows["aggregate, one read per chunk in a loop (earlier)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, counts, _ = _aggregate(new, "k", chunks)
    rows["aggregate, resume: every marker read, threaded (now)"] = time.perf_counter() - t0
    assert counts["kept"] == 60 * n
    t0 = time.perf_counter()
    _aggregate(new, "k", chunks, {c: marker for c in chunks})
    rows["aggregate, fresh run: markers streamed back (now)"] = time.perf_counter() - t0

    print(f"\n{n} chunks, {args.latency_ms:g} ms added per request (moto S3 on 127.0.0.1 behind a latency proxy)\n")
    print(f"| step | seconds | per chunk (ms) | at {PAPER_CHUNKS:,} chunks (min) |")
    print("| --- | --- | --- | --- |")
    for name, secs in rows.items():
        print(f"| {name} | {secs:.2f} | {1000 * secs / n:.2f} | {secs / n * PAPER_CHUNKS / 60:.1f} |")
    names = list(rows)
    print(f"\nratios earlier/now: plan {rows[names[0]] / rows[names[1]]:.0f}×, "
          f"aggregate after a resume {rows[names[2]] / rows[names[3]]:.1f}× (a fresh run reads no marker)")
    server.stop()


if __name__ == "__main__":
    main()
