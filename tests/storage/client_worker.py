"""A separate engine-like process for the storage tests: ``python client_worker.py MODE SOCKET TAG N``.

MODE ``save`` stores N chunks derived from TAG and waits for them; ``load`` loads them
and checks every byte. Prints one JSON line with the outcome.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402

from pdx.storage.client import StoreClient  # noqa: E402
from tests.storage.helpers import CHUNK, make_chunk, make_keys  # noqa: E402


def main() -> None:
    mode, socket_path, tag, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    keys = make_keys(n, tag)
    with StoreClient(socket_path, timeout_s=5.0, verify_loads=True) as client:
        if mode == "save":
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


if __name__ == "__main__":
    main()
