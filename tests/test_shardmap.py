"""Shard maps, alone: parsing, coverage checks, addresses, and each shard's share of the routing."""

from __future__ import annotations

import numpy as np
import pytest

from larql.shardmap import Endpoint, ShardSpecError, parse_address, parse_shards, split_work


def test_parse_shards_ok():
    s = parse_shards("64-127=tcp://b.example:9000, 0-63=10.0.0.5:8080|[::1]:8081", 128)
    assert [(x.first, x.last) for x in s] == [(0, 63), (64, 127)]
    assert s[0].replicas == [Endpoint("10.0.0.5", 8080, False), Endpoint("::1", 8081, False)]
    assert s[1].replicas == [Endpoint("b.example", 9000, False)]
    assert [(x.first, x.last) for x in parse_shards("0=a:1,1-7=b:2", 8)] == [(0, 0), (1, 7)]


def test_parse_shards_with_layer_ranges():
    s = parse_shards("0-63@0-14=a:1,64-127@0-14=b:1,0-127@15-29=c:1|d:2", 128, 30)
    assert [x.label for x in s] == ["0-63@0-14", "0-127@15-29", "64-127@0-14"]
    assert s[1].serves(15) and not s[1].serves(14) and s[0].serves(0)
    for spec, needle in (("0-127@0-14=a:1", "0-127 unserved at layer 15"),
                         ("0-127@0-14=a:1,0-127@14-29=b:1", "overlaps an earlier range at layer 14"),
                         ("0-127@0-30=a:1", "outside 0-29"), ("0-127@x=a:1", "bad layer range")):
        with pytest.raises(ShardSpecError, match=needle):
            parse_shards(spec, 128, 30)


@pytest.mark.parametrize("spec, needle", [
    ("", "empty"),
    ("0-63=a:1", "64-127 unserved"),                 # gap at the end
    ("0-10=a:1,20-127=b:2", "11-19 unserved"),       # gap in the middle
    ("0-6=a:1,8-127=b:2", "experts 7 unserved"),      # a one-expert gap reads as one id
    ("0-70=a:1,64-127=b:2", "overlaps"),
    ("0-128=a:1", "outside"),
    ("10-0=a:1,0-127=b:2", "after its end"),
    ("x-63=a:1", "bad expert range"),
    ("0-127", "expected RANGE=HOST:PORT"),
    ("0-127=a", "no port"),
    ("0-127=a:http", "not a number"),
    ("0-127=a:0", "out of range"),
    ("0-127=http://a.fly.dev", "use tls:// or https:// for TLS, or host:port for plain TCP"),
    ("0-127=https://a.fly.dev/experts", "not a path"),
    ("0-127=udp://a:1", "unknown scheme"),
    ("0-127=tls://a", "no port"),
    ("0-63=a:1,,64-127=b:2", "empty entry"),
])
def test_parse_shards_errors(spec, needle):
    with pytest.raises(ShardSpecError) as e:
        parse_shards(spec, 128)
    assert needle in str(e.value)


def test_parse_address_forms():
    assert parse_address("tcp://h:1/") == Endpoint("h", 1, False)
    assert parse_address("[fe80::1]:80") == Endpoint("fe80::1", 80, False)
    assert parse_address("h:1") == Endpoint("h", 1, False)


def test_tls_addresses():
    assert parse_address("tls://h:8443") == Endpoint("h", 8443, True)
    assert parse_address("https://a.fly.dev") == Endpoint("a.fly.dev", 443, True)   # fly's tls handler
    assert parse_address("https://a.fly.dev:8443/") == Endpoint("a.fly.dev", 8443, True)
    assert parse_address("HTTPS://[::1]") == Endpoint("::1", 443, True)
    assert parse_address("tls://[::1]:9") == Endpoint("::1", 9, True)
    # the text form parses back to the same endpoint
    for e in (Endpoint("h", 1, True), Endpoint("::1", 2, False), Endpoint("::1", 3, True)):
        assert parse_address(str(e)) == e
    s = parse_shards("0-3=tls://a:1|b:2,4-7=https://c", 8)
    assert [e.tls for e in s[0].replicas] == [True, False] and s[1].replicas == [Endpoint("c", 443, True)]
    assert str(s[0]) == "0-3=tls://a:1|b:2"


def test_split_work_keeps_order_and_compacts():
    ids = np.array([[3, 9, 1, 12], [8, 9, 10, 11], [0, 1, 2, 3]], dtype=np.int32)
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    rows, i_s, w_s = split_work(ids, w, 0, 7)
    assert rows.tolist() == [0, 2]
    assert i_s.tolist() == [[3, 1, -1, -1], [0, 1, 2, 3]]
    assert w_s.tolist() == [[0, 2, 0, 0], [8, 9, 10, 11]]
    rows, i_s, w_s = split_work(ids, w, 8, 15)
    assert rows.tolist() == [0, 1]
    assert i_s.tolist() == [[9, 12, -1, -1], [8, 9, 10, 11]]
    assert split_work(ids[2:], w[2:], 8, 15) is None


def test_shard_spec_text_parses_back_to_the_same_map():
    spec = "0-63@0-14=a:1|[::1]:2,64-127@0-14=b:3,0-127@15-29=c:4"
    shards = parse_shards(spec, 128, 30)
    again = parse_shards(",".join(str(s) for s in shards), 128, 30)
    assert again == shards


def test_split_work_single_token_fast_paths():
    ids = np.array([[1, 5, 9]], dtype=np.int32)
    w = np.array([[0.5, 0.25, 0.25]], dtype=np.float32)
    rows, i_s, w_s = split_work(ids, w, 0, 15)   # owns every slot: the input itself
    assert rows.tolist() == [0] and i_s is ids and w_s is w
    rows, i_s, w_s = split_work(ids, w, 4, 9)
    assert i_s.tolist() == [[5, 9]] and w_s.tolist() == [[0.25, 0.25]]
    assert split_work(ids, w, 10, 15) is None
