"""Operator HTTP API: stats, Prometheus metrics, lookup/pin/clear, clear errors for bad input."""

from __future__ import annotations

import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.storage.helpers import CHUNK, StoreProc, make_chunk, make_keys


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    store = StoreProc(tmp_path_factory.mktemp("http"))
    yield store
    store.stop()


def test_metrics_parse_and_count_hits_misses_and_bytes(store, client_factory):
    from prometheus_client.parser import text_string_to_metric_families

    client = client_factory(store.socket)
    keys = make_keys(3, "m")
    assert client.save(keys[:2], [make_chunk(k) for k in keys[:2]]).result(10) == 2
    assert client.load(keys, [np.zeros(CHUNK, np.uint8) for _ in keys]) == 2
    with urllib.request.urlopen(store.http + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    families = list(text_string_to_metric_families(text))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in families for s in fam.samples}
    assert all(f"# HELP {fam.name}" in text and fam.documentation for fam in families)
    assert samples[("pdx_store_hits_total", (("tier", "l1"),))] == 2
    assert samples[("pdx_store_misses_total", ())] == 1
    assert samples[("pdx_store_loaded_bytes_total", ())] == 2 * CHUNK
    assert samples[("pdx_store_saved_bytes_total", ())] == 2 * CHUNK
    assert samples[("pdx_store_chunks", ())] == 2
    assert samples[("pdx_store_capacity_bytes", ())] > 0
    assert samples[("pdx_store_load_speed_bytes_per_second", ())] > 0  # the stats op's load_gbps, in bytes/s


def test_lookup_pin_unpin_clear(store, client_factory):
    client = client_factory(store.socket)
    keys = make_keys(3, "ops")
    client.save(keys, [make_chunk(k) for k in keys]).result(10)
    hexes = [k.hex() for k in keys]
    assert store.post("/lookup", {"keys": hexes}) == {"num_chunks": 3, "num_l1": 3}
    assert store.post("/pin", {"keys": hexes[:1]}) == {"num_chunks": 1}
    assert store.stats()["num_pinned"] == 1
    assert store.post("/unpin", {"keys": hexes[:1]}) == {"num_chunks": 1}
    assert store.post("/clear", {}) == {"num_chunks": 3}
    assert store.post("/lookup", {"keys": hexes}) == {"num_chunks": 0, "num_l1": 0}
    assert store.stats()["used_bytes"] == 0


def test_chunk_keys_from_pdx_keys_are_accepted(store, client_factory):
    from pdx.keys import KeyExtras, chunk_keys

    keys = chunk_keys(np.arange(1024), KeyExtras("tiny"), chunk_size=256)
    client = client_factory(store.socket)
    assert client.save(keys, [make_chunk(k.digest) for k in keys]).result(10) == 4
    assert client.lookup_prefix(chunk_keys(np.arange(700), KeyExtras("tiny"), 256)) == 2


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/lookup", b'{"keys": ["zz"]}', 400, "hex"),
        ("/lookup", b'{"key": []}', 400, "keys"),
        ("/clear", b"not json", 400, "body"),
        ("/nope", b"{}", 404, "no such endpoint"),
        ("/stats", b"{}", 405, "not allowed"),
    ],
)
def test_bad_requests_get_4xx_naming_the_problem(shared_store, path, body, status, message):
    req = urllib.request.Request(shared_store.http + path, data=body, method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    assert info.value.code == status
    assert message in info.value.read().decode()
