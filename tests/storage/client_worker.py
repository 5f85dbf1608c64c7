"""A separate engine-like process for the storage tests: ``python client_worker.py MODE ADDRESS TAG N``.

ADDRESS is the store's unix socket or ``pdx-store://HOST:PORT`` (token from
``PDX_STORE_REMOTE_TOKEN``). MODE ``save`` stores N chunks derived from TAG and waits for
them; ``load`` loads them and checks every byte; ``churn`` and ``read-loop`` save or load
random runs of the N keys for ``ROUNDS`` rounds (5th argument), checking every byte read;
``hold`` leases the N chunks for reading and N chunks of TAG-new for writing, prints
``holding`` and sleeps (to be killed). Prints one JSON line with the outcome.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402

from pdx.storage.client import StoreClient, create_client  # noqa: E402
from tests.storage.helpers import CHUNK, make_chunk, make_keys  # noqa: E402


def main() -> None:
    mode, socket_path, tag, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    keys = make_keys(n, tag)
    with create_client(socket_path, timeout_s=5.0, verify_loads=True) as client:
        if mode == "hold":
            new = make_keys(n, f"{tag}-new")
            with client.read_views(keys) as views, client.write_views(new, [CHUNK] * n) as slots:
                print(json.dumps({"holding": len(views), "reserved": sum(v is not None for v in slots)}),
                      flush=True)  # fmt: skip
                time.sleep(600)
        elif mode in ("churn", "read-loop"):
            print(json.dumps(loop(client, mode, keys, int(sys.argv[5]))))
        elif mode == "save":
            num = client.save(keys, [make_chunk(k) for k in keys]).result(timeout=30)
            print(json.dumps({"num_saved": num}))
        else:
            dsts = [np.zeros(CHUNK, np.uint8) for _ in keys]
            num = client.load(keys, dsts)
            intact = all(
                np.array_equal(d, make_chunk(k)) for d, k in zip(dsts[:num], keys, strict=False)
            )
            print(
                json.dumps(
                    {"num_loaded": num, "intact": intact, "lookup": client.lookup_prefix(keys)}
                )
            )


def loop(client: StoreClient, mode: str, keys: list[bytes], rounds: int) -> dict[str, int]:
    rng = np.random.default_rng(os.getpid())
    num_ops = num_chunks = num_bad = 0
    for _ in range(rounds):
        start = int(rng.integers(0, len(keys)))
        run = keys[start : start + int(rng.integers(1, 9))]
        if mode == "churn":
            num_chunks += client.save(run, [make_chunk(k) for k in run]).result(timeout=30)
        else:
            dsts = [np.zeros(CHUNK, np.uint8) for _ in run]
            num = client.load(run, dsts)
            num_chunks += num
            num_bad += sum(
                not np.array_equal(d, make_chunk(k)) for d, k in zip(dsts[:num], run, strict=False)
            )
        num_ops += 1
    return {
        "ops": num_ops,
        "chunks": num_chunks,
        "bad": num_bad,
        "corrupt": client.stats().num_corrupt,
    }


if __name__ == "__main__":
    main()
