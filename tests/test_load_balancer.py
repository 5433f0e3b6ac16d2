"""Load balancers: policies, priorities, panic, locality weighting, hash policies.

Expected numbers come from Envoy's source (load_balancer_impl.cc, ring_hash_lb.cc,
maglev_lb.cc, hash_policy.cc) and its docs (priority levels, panic threshold); the ring and
maglev stats were checked against real Envoy 1.40 (``cluster.<c>.ring_hash_lb.size: 1026``
and ``maglev_lb.{min,max}_entries_per_host: 21845/21846`` for three equal hosts).
"""

from __future__ import annotations

import collections
import os
import random
from collections.abc import Sequence
from typing import Any

import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.route.v3.route_components_pb2 import RouteAction
from google.protobuf.json_format import ParseDict

from pyenvoy.config import parse_message
from pyenvoy.config.errors import ConfigError
from pyenvoy.http.headers import RequestHeaders
from pyenvoy.stats import Store
from pyenvoy.stream_info import StreamInfo
from pyenvoy.upstream import hashing
from pyenvoy.upstream.hash_policy import compile_hash_policy, hash_policy_for, parse_cookie_value
from pyenvoy.upstream.host import DEGRADED_ACTIVE_HC, FAILED_ACTIVE_HC, PENDING_ACTIVE_HC, Host
from pyenvoy.upstream.load_balancer import (
    HashingLoadBalancer,
    LeastRequestLoadBalancer,
    LoadBalancerContext,
    LoadBalancerFactory,
    PriorityLoadBalancer,
    RandomLoadBalancer,
    RoundRobinLoadBalancer,
    compute_priority_state,
    edf_schedule,
)
from pyenvoy.upstream.maglev import MaglevTable
from pyenvoy.upstream.ring_hash import Ring
from tests.support.upstream import HttpUpstream

TYPED = "type.googleapis.com/envoy.extensions.load_balancing_policies."


# -- helpers ----------------------------------------------------------------------------------
def hosts_of(n: int, *, port0: int = 9000, weight: int = 1, priority: int = 0) -> list[Host]:
    return [Host(("127.0.0.1", port0 + i), weight=weight, priority=priority) for i in range(n)]


def cluster_proto(**extra: Any) -> Cluster:
    d = {"name": "c", "type": "STATIC", "connect_timeout": "1s", **extra}
    return parse_message(d, Cluster)


def factory(**extra: Any) -> LoadBalancerFactory:
    return LoadBalancerFactory(cluster_proto(**extra), "clusters[0]")


def typed(name: str, msg: str, **cfg: Any) -> dict[str, Any]:
    return {
        "load_balancing_policy": {
            "policies": [
                {
                    "typed_extension_config": {
                        "name": f"envoy.load_balancing_policies.{name}",
                        "typed_config": {"@type": f"{TYPED}{name}.v3.{msg}", **cfg},
                    }
                }
            ]
        }
    }


def ports(lb: Any, n: int, context: Any = None) -> collections.Counter[int]:
    return collections.Counter(lb.choose_host(context).address[1] for _ in range(n))


def request(
    path: bytes = b"/",
    headers: Sequence[tuple[bytes, bytes]] = (),
    remote: str = "10.0.0.1",
) -> Any:
    h = RequestHeaders(path=path, authority=b"a", headers=[[k, v] for k, v in headers])
    si = StreamInfo(
        downstream_remote_address=(remote, 5555), downstream_local_address=("127.0.0.1", 80)
    )
    return h, si


def hash_policy(*policies: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(ParseDict(p, RouteAction.HashPolicy()) for p in policies)


# -- hash functions ---------------------------------------------------------------------------
def test_pure_python_xxhash64_matches_reference_vectors() -> None:
    # XXH64 reference values (seed 0): "" and "abc".
    assert hashing.xxhash64_py(b"") == 0xEF46DB3751D8E999
    assert hashing.xxhash64_py(b"abc") == 0x44BC2CF5AD770999
    rnd = random.Random(7)
    for n in [0, 1, 3, 4, 7, 8, 15, 31, 32, 33, 63, 64, 100, 257]:
        data = bytes(rnd.randrange(256) for _ in range(n))
        for seed in (0, 1, 2**64 - 1):
            assert hashing.xxhash64_py(data, seed) == hashing.xxhash64(data, seed)


def test_murmur_hash2_matches_libstdcxx_std_hash() -> None:
    # g++ std::hash<std::string>{} on x86_64 (what Envoy's MURMUR_HASH_2 ring uses).
    assert hashing.murmur_hash2_64(b"hello") == 2762169579135187400
    assert hashing.murmur_hash2_64(b"") == 6142509188972423790
    assert hashing.murmur_hash2_64(b"127.0.0.1:8080_0") == 16027637164591516499
    assert hashing.murmur_hash2_64(b"abcdefghijklmnopq") == 16399385603263873375


# -- round robin ------------------------------------------------------------------------------
def test_round_robin_cycles_in_order_from_a_random_start() -> None:
    hosts = hosts_of(3)
    lb = RoundRobinLoadBalancer(hosts)
    first = lb.choose_host()
    assert first is not None
    start = hosts.index(first)
    seq = [first] + [lb.choose_host() for _ in range(5)]
    assert seq == [hosts[(start + i) % 3] for i in range(6)]


def test_weighted_round_robin_exact_proportions_and_edf_interleaving() -> None:
    hosts = hosts_of(3)
    for h, w in zip(hosts, (1, 2, 5), strict=True):
        h.weight = w
    schedule = edf_schedule(hosts)
    assert schedule is not None and len(schedule) == 8
    # EDF deadlines k/w: 0.2(c) 0.4(c) 0.5(b) 0.6(c) 0.8(c) 1.0(a) 1.0(b) 1.0(c)
    assert [h.address[1] for h in schedule] == [9002, 9002, 9001, 9002, 9002, 9000, 9001, 9002]
    lb = RoundRobinLoadBalancer(hosts)
    counts = ports(lb, 8000)
    assert counts == {9000: 1000, 9001: 2000, 9002: 5000}


def test_weighted_round_robin_reduces_weights_by_gcd_and_falls_back_to_edf_heap() -> None:
    hosts = hosts_of(2)
    hosts[0].weight, hosts[1].weight = 300, 100
    assert edf_schedule(hosts) == [hosts[0], hosts[0], hosts[0], hosts[1]]
    hosts[0].weight, hosts[1].weight = 1_000_003, 1_000_033  # coprime, sum too big to expand
    assert edf_schedule(hosts) is None
    lb = RoundRobinLoadBalancer(hosts)
    counts = ports(lb, 20000)
    assert abs(counts[9000] - 10000) <= 2 and abs(counts[9001] - 10000) <= 2


def test_round_robin_index_survives_rebuilds_like_envoy_rr_indexes() -> None:
    f = factory()
    hosts = hosts_of(4)
    lb, panic = f.build(hosts)
    assert not panic
    seq = [lb.choose_host() for _ in range(3)]
    lb2, _ = f.build(hosts)  # e.g. a health change elsewhere: same source, index continues
    nxt = lb2.choose_host()
    assert nxt is not None and seq[-1] is not None
    assert hosts.index(nxt) == (hosts.index(seq[-1]) + 1) % 4


# -- random and least request -----------------------------------------------------------------
def test_random_is_uniform_and_ignores_weights() -> None:
    hosts = hosts_of(4)
    hosts[0].weight = 10
    counts = ports(RandomLoadBalancer(hosts), 8000)
    for p in range(9000, 9004):
        assert 1700 < counts[p] < 2300, counts


def test_least_request_p2c_prefers_idle_hosts() -> None:
    hosts = hosts_of(4)
    busy = {9000: 10, 9001: 5, 9002: 0, 9003: 1}
    for h in hosts:
        h.stats.rq_active.set(busy[h.address[1]])
    counts = ports(LeastRequestLoadBalancer(hosts), 8000)
    # Two random choices, the less busy wins: P(idle 9002) = 1 - (3/4)^2 = 7/16,
    # P(9003) = 5/16, P(9001) = 3/16, P(9000) = 1/16.
    assert counts[9002] > counts[9003] > counts[9001] > counts[9000]
    assert abs(counts[9002] / 8000 - 7 / 16) < 0.03
    assert abs(counts[9000] / 8000 - 1 / 16) < 0.02


def test_least_request_choice_count_and_full_scan() -> None:
    hosts = hosts_of(5)
    for i, h in enumerate(hosts):
        h.stats.rq_active.set(i + 1)
    many = LeastRequestLoadBalancer(hosts, choice_count=20)
    counts = ports(many, 2000)
    assert counts[9000] > 1950  # 1 - (4/5)^20 = 98.8%
    scan = LeastRequestLoadBalancer(hosts, full_scan=True)
    assert ports(scan, 100) == {9000: 100}
    hosts[3].stats.rq_active.set(1)  # a tie: reservoir sampling splits evenly
    counts = ports(scan, 4000)
    assert set(counts) == {9000, 9003} and abs(counts[9000] - 2000) < 200


def test_weighted_least_request_uses_weight_over_active_requests() -> None:
    hosts = hosts_of(2)
    hosts[0].weight, hosts[1].weight = 1, 3
    lb = LeastRequestLoadBalancer(hosts)
    counts = ports(lb, 4000)  # idle: plain weights
    assert abs(counts[9001] / 4000 - 0.75) < 0.01
    hosts[1].stats.rq_active.set(5)  # 3 / 6 = 0.5 vs 1 / 1
    lb = LeastRequestLoadBalancer(hosts)
    counts = ports(lb, 3000)
    assert abs(counts[9000] / 3000 - 2 / 3) < 0.01
    lb = LeastRequestLoadBalancer(hosts, active_request_bias=0.0)  # bias 0: plain weighted RR
    counts = ports(lb, 4000)
    assert abs(counts[9001] / 4000 - 0.75) < 0.01


# -- priorities and panic ---------------------------------------------------------------------
def level(total: int, healthy: int, priority: int, port0: int) -> list[Host]:
    hs = hosts_of(total, priority=priority, port0=port0)
    for h in hs[healthy:]:
        h.health_flags = FAILED_ACTIVE_HC
    return hs


@pytest.mark.parametrize(
    "p0,p1,load",
    [
        # Envoy docs (priority levels), P=1 100% healthy
        ((100, 100), (100, 100), [100, 0]),
        ((100, 72), (100, 100), [100, 0]),
        ((100, 71), (100, 100), [99, 1]),
        ((100, 50), (100, 100), [70, 30]),
        ((100, 25), (100, 100), [35, 65]),
        ((100, 0), (100, 100), [0, 100]),
        # both levels degraded: normalized total health
        ((100, 71), (100, 71), [99, 1]),
        ((100, 50), (100, 50), [70, 30]),
        ((100, 25), (100, 25), [50, 50]),
    ],
)
def test_priority_load_matches_envoy_docs(
    p0: tuple[int, int], p1: tuple[int, int], load: list[int]
) -> None:
    hosts = level(*p0, 0, 1000) + level(*p1, 1, 2000)
    state = compute_priority_state(hosts)
    assert state.healthy_load == load
    assert state.degraded_load == [0, 0]


@pytest.mark.parametrize(
    "healthy,load",
    [
        ((100, 100, 100), [100, 0, 0]),
        ((72, 72, 100), [100, 0, 0]),
        ((71, 71, 100), [99, 1, 0]),
        ((50, 50, 100), [70, 30, 0]),
        ((25, 100, 100), [35, 65, 0]),
        ((25, 25, 100), [35, 35, 30]),
        # The docs' table says 36/36/28 (rounded shares); Envoy's integer maths gives the
        # 2% rounding remainder to the first available level: 35+2, 35, 28.
        ((25, 25, 20), [37, 35, 28]),
    ],
)
def test_three_priority_levels(healthy: tuple[int, int, int], load: list[int]) -> None:
    hosts: list[Host] = []
    for p, pct in enumerate(healthy):
        hosts += level(100, pct, p, 1000 * (p + 1))
    # The docs' tables leave panic out: with the default 50% threshold the last row (total
    # 98 < 100, every level under 50% healthy) is total panic, loads by host count.
    assert compute_priority_state(hosts, panic_threshold=0).healthy_load == load
    if healthy == (25, 25, 20):
        assert compute_priority_state(hosts).healthy_load == [34, 33, 33]
    else:
        assert compute_priority_state(hosts).healthy_load == load


def test_normalized_total_health_twenty_thirty_becomes_forty_sixty() -> None:
    # Envoy docs: health {20, 30} (normalized total 50) -> priority load {40, 60}.
    # 20 = 1.4 * healthy share -> 1 of 7 hosts healthy (140 * 1 // 7 = 20), 3 of 14 -> 30.
    hosts = level(7, 1, 0, 1000) + level(14, 3, 1, 2000)
    state = compute_priority_state(hosts, panic_threshold=0)
    assert [lv.health for lv in state.levels] == [20, 30]
    assert state.healthy_load == [40, 60]


def test_excluded_hosts_do_not_count_in_health() -> None:
    # Envoy docs: P0 {healthy, excluded, excluded}, P1 {healthy, healthy}: all traffic to P0.
    p0 = hosts_of(3, priority=0)
    for h in p0[1:]:
        h.health_flags = FAILED_ACTIVE_HC | PENDING_ACTIVE_HC
    p1 = hosts_of(2, priority=1, port0=9100)
    f = factory()
    state = compute_priority_state(p0 + p1)
    assert state.healthy_load == [100, 0] and state.panic == [False, False]
    lb, panic = f.build(p0 + p1)
    assert not panic and ports(lb, 50) == {9000: 50}


def test_degraded_hosts_take_load_after_healthy_ones() -> None:
    # P0: 1 healthy + 1 degraded of 2 -> health 70, degraded 70; P1 all healthy -> 100.
    p0 = hosts_of(2, priority=0)
    p0[1].health_flags = DEGRADED_ACTIVE_HC
    p1 = hosts_of(2, priority=1, port0=9100)
    state = compute_priority_state(p0 + p1)
    assert state.healthy_load == [70, 30] and state.degraded_load == [0, 0]
    # Only degraded left in P0 and nothing else: the degraded hosts take the traffic.
    p0[0].health_flags = DEGRADED_ACTIVE_HC
    state = compute_priority_state(p0)
    assert state.healthy_load == [0] and state.degraded_load == [100] and state.panic == [False]
    lb, panic = factory().build(p0)
    assert not panic and set(ports(lb, 50)) == {9000, 9001}


def test_weighted_priority_health_uses_host_weights() -> None:
    p0 = hosts_of(2, priority=0)
    p0[0].weight = 3  # healthy weight 3 of 4 -> 140 * 3 // 4 = 105 -> 100
    p0[1].health_flags = FAILED_ACTIVE_HC
    p1 = hosts_of(1, priority=1, port0=9100)
    assert compute_priority_state(p0 + p1).healthy_load == [70, 30]
    assert compute_priority_state(p0 + p1, weighted_priority_health=True).healthy_load == [100, 0]
    f = factory(load_assignment={"policy": {"weighted_priority_health": True}})
    assert f.weighted_priority_health


def test_overprovisioning_factor_from_load_assignment_policy() -> None:
    f = factory(load_assignment={"policy": {"overprovisioning_factor": 100}})
    assert f.overprovisioning_factor == 100
    p0 = level(10, 8, 0, 1000)
    p1 = level(10, 10, 1, 2000)
    lb, _ = f.build(p0 + p1)
    counts = collections.Counter(lb.choose_host().priority for _ in range(4000))  # type: ignore[union-attr]
    assert abs(counts[1] / 4000 - 0.2) < 0.03  # 80% healthy * 1.0 -> 80/20


def test_priority_spillover_distribution() -> None:
    # P0 50% healthy -> 70% of picks, P1 the other 30%.
    p0 = level(4, 2, 0, 1000)
    p1 = level(2, 2, 1, 2000)
    lb, panic = factory().build(p0 + p1)
    assert isinstance(lb, PriorityLoadBalancer) and not panic
    counts = ports(lb, 10000)
    p0_share = (counts[1000] + counts[1001]) / 10000
    assert abs(p0_share - 0.7) < 0.02
    assert not set(counts) & {1002, 1003}  # unhealthy P0 hosts get nothing
    assert sorted(h.address[1] for h in lb.hosts) == [1000, 1001, 2000, 2001]


def test_panic_threshold_balances_over_all_hosts() -> None:
    f = factory()
    hosts = level(4, 1, 0, 1000)  # 25% healthy < 50%
    lb, panic = f.build(hosts)
    assert panic
    assert set(ports(lb, 100)) == {1000, 1001, 1002, 1003}
    hosts = level(4, 2, 0, 1000)  # exactly 50%: not in panic
    lb, panic = f.build(hosts)
    assert not panic and set(ports(lb, 100)) == {1000, 1001}


def test_panic_threshold_zero_disables_panic() -> None:
    f = factory(common_lb_config={"healthy_panic_threshold": {"value": 0}})
    assert f.panic_threshold == 0
    lb, panic = f.build(level(4, 1, 0, 1000))
    assert not panic and ports(lb, 20) == {1000: 20}
    lb, panic = f.build(level(4, 0, 0, 1000))
    assert not panic and lb.choose_host() is None
    lb, panic = f.build([])
    assert not panic and lb.choose_host() is None


def test_panic_threshold_percent_rounding_and_custom_value() -> None:
    f = factory(common_lb_config={"healthy_panic_threshold": {"value": 79.5}})
    assert f.panic_threshold == 80  # std::round
    lb, panic = f.build(level(10, 7, 0, 1000))  # 70% < 80%
    assert panic


def test_empty_cluster_is_in_total_panic() -> None:
    lb, panic = factory().build([])
    assert panic and lb.choose_host() is None and lb.hosts == []


def test_no_panic_while_lower_priorities_make_up_the_total() -> None:
    # P0 10% healthy would panic alone, but P1 is healthy: normalized total 100 -> no panic.
    p0 = level(10, 1, 0, 1000)
    p1 = level(2, 2, 1, 2000)
    state = compute_priority_state(p0 + p1)
    assert state.panic == [False, False] and state.healthy_load == [14, 86]


def test_partial_panic_counts_only_picks_of_the_panicking_level() -> None:
    # P0 60% healthy (health 84, not in panic), P1 10% healthy (health 14, in panic);
    # normalized total 98 < 100 -> loads 85+1 / 14, and P1 balances over all its hosts.
    store = Store()
    f = factory()
    f.bind_stats(store.scope("cluster.c"))
    p0 = level(10, 6, 0, 1000)
    p1 = level(10, 1, 1, 2000)
    state = compute_priority_state(p0 + p1)
    assert state.healthy_load == [86, 14] and state.panic == [False, True]
    lb, panic = f.build(p0 + p1)
    assert not panic
    counts = ports(lb, 10000)
    p1_picks = sum(v for k, v in counts.items() if k >= 2000)
    assert abs(p1_picks / 10000 - 0.14) < 0.02
    assert len([k for k in counts if k >= 2000]) == 10  # all P1 hosts, healthy or not
    assert store.counters["cluster.c.lb_healthy_panic"].value == p1_picks


def test_total_panic_loads_follow_host_counts() -> None:
    p0 = level(3, 0, 0, 1000)
    p1 = level(1, 0, 1, 2000)
    state = compute_priority_state(p0 + p1)
    assert state.panic == [True, True]
    assert state.healthy_load == [75, 25]


# -- locality weighted ------------------------------------------------------------------------
def locality_hosts() -> list[Host]:
    out: list[Host] = []
    for zone, lw, n in (("a", 1, 2), ("b", 3, 2)):
        for _ in range(n):
            h = Host(("127.0.0.1", 9000 + len(out)))
            h.locality = ("r", zone, "")
            h.locality_weight = lw
            out.append(h)
    return out


def test_locality_weighted_balancing() -> None:
    f = factory(common_lb_config={"locality_weighted_lb_config": {}})
    hosts = locality_hosts()
    lb, _ = f.build(hosts)
    counts = ports(lb, 8000)
    zone_b = counts[9002] + counts[9003]
    assert zone_b == 6000  # EDF over localities: exactly 3:1
    assert counts[9000] == counts[9001] == 1000
    # Half of zone b unhealthy: effective weight 3 * min(1, 1.4 * 0.5) = 2.1 vs 1.
    hosts[3].health_flags = FAILED_ACTIVE_HC
    lb, _ = f.build(hosts)
    counts = ports(lb, 6200)
    assert abs(counts[9002] - 4200) <= 2 and set(counts) == {9000, 9001, 9002}
    # Without locality_weighted_lb_config the locality weights are ignored.
    lb, _ = factory().build(locality_hosts())
    assert ports(lb, 400) == {9000: 100, 9001: 100, 9002: 100, 9003: 100}


def test_locality_weights_all_zero_fall_back_to_hosts() -> None:
    f = factory(common_lb_config={"locality_weighted_lb_config": {}})
    hosts = locality_hosts()
    for h in hosts:
        h.locality_weight = 0
    lb, _ = f.build(hosts)
    assert set(ports(lb, 40)) == {9000, 9001, 9002, 9003}


# -- hash policies ----------------------------------------------------------------------------
def test_header_hash_is_xxhash_of_the_value_and_multi_values_sorted_and_chained() -> None:
    hp = compile_hash_policy(hash_policy({"header": {"header_name": "x-user"}}))
    h, si = request(headers=[(b"x-user", b"alice")])
    assert hp.generate(h, si) == hashing.xxhash64(b"alice")
    h, si = request(headers=[(b"x-user", b"b"), (b"x-user", b"a")])
    # Sorted, then chained: xxHash64("b", seed=xxHash64("a")) (as real Envoy 1.40 does).
    assert hp.generate(h, si) == hashing.xxhash64(b"b", hashing.xxhash64(b"a"))
    h, si = request()
    assert hp.generate(h, si) is None
    hp = compile_hash_policy(hash_policy({"header": {"header_name": ":path"}}))
    h, si = request(path=b"/x")
    assert hp.generate(h, si) == hashing.xxhash64(b"/x")
    hp = compile_hash_policy(hash_policy({"header": {"header_name": "Host"}}))
    assert hp.generate(h, si) == hashing.xxhash64(b"a")  # "host" is :authority, as in Envoy


def test_header_hash_regex_rewrite() -> None:
    hp = compile_hash_policy(
        hash_policy(
            {
                "header": {
                    "header_name": ":path",
                    "regex_rewrite": {"pattern": {"regex": "^/(\\w+)/.*$"}, "substitution": "\\1"},
                }
            }
        )
    )
    h, si = request(path=b"/users/42")
    assert hp.generate(h, si) == hashing.xxhash64(b"users")


def test_cookie_parsing_like_envoy() -> None:
    h, _ = request(headers=[(b"cookie", b'a=1; session="xyz";bad; b=2'), (b"cookie", b"c=3")])
    assert parse_cookie_value(h, b"session") == b"xyz"
    assert parse_cookie_value(h, b"b") == b"2"
    assert parse_cookie_value(h, b"c") == b"3"
    assert parse_cookie_value(h, b"bad") == b""
    assert parse_cookie_value(h, b"zzz") == b""


def test_cookie_hash_and_generated_cookie_with_ttl() -> None:
    hp = compile_hash_policy(hash_policy({"cookie": {"name": "sticky"}}))
    h, si = request(headers=[(b"cookie", b"sticky=abc")])
    assert hp.generate(h, si) == hashing.xxhash64(b"abc")
    h, si = request()
    assert hp.generate(h, si) is None
    hp = compile_hash_policy(
        hash_policy({"cookie": {"name": "sticky", "ttl": "60s", "path": "/p"}})
    )
    ctx = LoadBalancerContext(h, si, hp)
    value = b"%016x" % hashing.xxhash64(b"10.0.0.1:5555127.0.0.1:80")
    assert ctx.compute_hash() == hashing.xxhash64(value)
    assert ctx.response_headers_to_add == [
        (b"set-cookie", b'sticky="' + value + b'"; Max-Age=60; Path=/p; HttpOnly')
    ]


def test_source_ip_and_query_parameter_hashes() -> None:
    hp = compile_hash_policy(hash_policy({"connection_properties": {"source_ip": True}}))
    h, si = request(remote="192.168.1.9")
    assert hp.generate(h, si) == hashing.xxhash64(b"192.168.1.9")
    hp = compile_hash_policy(hash_policy({"query_parameter": {"name": "u"}}))
    h, si = request(path=b"/p?a=1&u=bob&u=carol")
    assert hp.generate(h, si) == hashing.xxhash64(b"bob")
    h, si = request(path=b"/p?a=1&u")
    assert hp.generate(h, si) == hashing.xxhash64(b"")
    h, si = request(path=b"/p?a=1")
    assert hp.generate(h, si) is None
    h, si = request(path=b"/p?x=%75")  # not decoded
    assert hp.generate(h, si) is None


def test_combined_policies_rotate_and_xor_and_terminal_stops() -> None:
    a, b = hashing.xxhash64(b"A"), hashing.xxhash64(b"B")
    h, si = request(headers=[(b"x-a", b"A"), (b"x-b", b"B")])
    hp = compile_hash_policy(
        hash_policy({"header": {"header_name": "x-a"}}, {"header": {"header_name": "x-b"}})
    )
    rotl = ((a << 1) | (a >> 63)) & 0xFFFFFFFFFFFFFFFF
    assert hp.generate(h, si) == rotl ^ b
    # Duplicates do not cancel out.
    hp = compile_hash_policy(
        hash_policy({"header": {"header_name": "x-a"}}, {"header": {"header_name": "x-a"}})
    )
    assert hp.generate(h, si) == rotl ^ a != 0
    hp = compile_hash_policy(
        hash_policy(
            {"header": {"header_name": "x-a"}, "terminal": True}, {"header": {"header_name": "x-b"}}
        )
    )
    assert hp.generate(h, si) == a
    # A terminal policy that produced nothing does not stop the walk.
    hp = compile_hash_policy(
        hash_policy(
            {"header": {"header_name": "x-missing"}, "terminal": True},
            {"header": {"header_name": "x-b"}},
        )
    )
    assert hp.generate(h, si) == b


def test_filter_state_hash_policy_is_rejected() -> None:
    with pytest.raises(ConfigError) as e:
        compile_hash_policy(
            hash_policy({"filter_state": {"key": "k"}}), "routes[0].route.hash_policy"
        )
    assert e.value.path == "routes[0].route.hash_policy[0].filter_state"


def test_route_hash_policy_tuples_are_compiled_once() -> None:
    protos = hash_policy({"header": {"header_name": "x-user"}})
    assert hash_policy_for(protos) is hash_policy_for(protos)
    assert hash_policy_for(()) is None


# -- ring hash --------------------------------------------------------------------------------
def ring_lb(hosts: list[Host], **cfg: Any) -> tuple[Any, LoadBalancerFactory]:
    f = factory(lb_policy="RING_HASH", **cfg)
    lb, _ = f.build(hosts)
    return lb, f


def ctx_for(key: str) -> LoadBalancerContext:
    h, si = request(headers=[(b"x-key", key.encode())])
    return LoadBalancerContext(h, si, hash_policy({"header": {"header_name": "x-key"}}))


def test_ring_size_and_stats_match_envoy() -> None:
    store = Store()
    hosts = [Host(("127.0.0.1", p)) for p in (1, 2, 3)]
    lb, f = ring_lb(hosts)
    assert f.uses_hash and isinstance(lb, HashingLoadBalancer)
    f.bind_stats(store.scope("cluster.c"))
    f.build(hosts)
    g = store.gauges
    assert g["cluster.c.ring_hash_lb.size"].value == 1026
    assert g["cluster.c.ring_hash_lb.min_hashes_per_host"].value == 342
    assert g["cluster.c.ring_hash_lb.max_hashes_per_host"].value == 342
    ring = Ring([(h, 1 / 3) for h in hosts], 1 / 3, min_ring_size=10)
    assert ring.size == 12  # typed RingHash minimum_ring_size: 10 -> 4 per host (Envoy: 12)


def test_ring_lookup_is_first_point_at_or_after_the_hash() -> None:
    hosts = hosts_of(3)
    ring = Ring([(h, 1 / 3) for h in hosts], 1 / 3)
    for i in (0, 1, len(ring.hashes) // 2, len(ring.hashes) - 1):
        assert ring.choose(ring.hashes[i]) is ring.hosts[i]
        assert (
            ring.choose(ring.hashes[i] - 1) is ring.hosts[i]
            or ring.hashes[i - 1] == ring.hashes[i] - 1
        )
    assert ring.choose(ring.hashes[-1] + 1) is ring.hosts[0]  # wraps around


def test_ring_hash_consistency_and_minimal_disruption() -> None:
    hosts = hosts_of(5)
    lb, f = ring_lb(hosts)
    keys = [f"user-{i}" for i in range(2000)]
    before = {k: lb.choose_host(ctx_for(k)) for k in keys}
    assert all(lb.choose_host(ctx_for(k)) is before[k] for k in keys[:200])  # same key, same host
    shares = collections.Counter(h.address[1] for h in before.values())
    assert all(250 < v < 550 for v in shares.values()), shares  # ~400 each
    gone = hosts[2]
    lb2, _ = f.build([h for h in hosts if h is not gone])
    after = {k: lb2.choose_host(ctx_for(k)) for k in keys}
    owned = [k for k in keys if before[k] is gone]
    others_moved = [k for k in keys if before[k] is not gone and after[k] is not before[k]]
    assert all(after[k] is not gone for k in owned)  # the removed host's keys all move
    # Envoy rescales the ring: 5 hosts get ceil(1024 / 5) = 205 points each, 4 get 256, so the
    # survivors' new points (``<addr>_205``..``_255``) also take over some keys from each
    # other (about 10% of all keys); everything else stays where it was.
    assert len(others_moved) < 0.15 * len(keys)
    lb3, _ = f.build(hosts)
    assert all(lb3.choose_host(ctx_for(k)) is before[k] for k in keys)  # back to the same ring


def test_ring_hash_weights_and_murmur() -> None:
    hosts = hosts_of(2)
    hosts[1].weight = 3
    lb, _ = ring_lb(hosts, ring_hash_lb_config={"hash_function": "MURMUR_HASH_2"})
    counts = collections.Counter(lb.choose_host(ctx_for(f"k{i}")).address[1] for i in range(4000))
    assert abs(counts[9001] / 4000 - 0.75) < 0.05


def test_hash_lb_without_hash_is_random() -> None:
    lb, _ = ring_lb(hosts_of(3))
    counts = ports(lb, 3000)  # no context: random, like Envoy
    assert all(800 < v < 1200 for v in counts.values())
    h, si = request()
    counts = ports(lb, 3000, LoadBalancerContext(h, si, ()))
    assert len(counts) == 3


def test_ring_hash_typed_config_and_its_own_hash_policy() -> None:
    f = factory(
        **typed(
            "ring_hash",
            "RingHash",
            minimum_ring_size=64,
            consistent_hashing_lb_config={"hash_policy": [{"header": {"header_name": "x-lb"}}]},
        )
    )
    assert f.policy == "RING_HASH" and f.min_ring_size == 64 and f.hash_policy is not None
    lb, _ = f.build(hosts_of(3))
    h, si = request(headers=[(b"x-lb", b"k1"), (b"x-key", b"other")])
    route_ctx = LoadBalancerContext(h, si, hash_policy({"header": {"header_name": "x-key"}}))
    picks = {lb.choose_host(route_ctx) for _ in range(20)}
    assert len(picks) == 1  # the LB's hash policy wins over the route's


def test_ring_hash_in_panic_hashes_over_all_hosts() -> None:
    hosts = level(4, 1, 0, 1000)
    lb, f = ring_lb(hosts)
    assert f.build(hosts)[1]  # in panic
    got = {lb.choose_host(ctx_for(f"k{i}")).address[1] for i in range(200)}
    assert got == {1000, 1001, 1002, 1003}


def test_ring_hash_priorities_pick_by_hash() -> None:
    p0 = level(2, 1, 0, 1000)  # health 70
    p1 = level(2, 2, 1, 2000)
    lb, f = ring_lb(p0 + p1)
    assert not f.build(p0 + p1)[1]
    counts = collections.Counter(lb.choose_host(ctx_for(f"k{i}")).priority for i in range(4000))
    assert abs(counts[0] / 4000 - 0.7) < 0.03
    # Deterministic: the priority is hash % 100 against the loads.
    h = hashing.xxhash64(b"k7")
    assert lb.choose_host(ctx_for("k7")).priority == (0 if h % 100 < 70 else 1)


def test_use_hostname_and_metadata_hash_key() -> None:
    a, b = Host(("127.0.0.1", 1), hostname="alpha"), Host(("127.0.0.2", 1), hostname="beta")
    f = factory(
        lb_policy="RING_HASH",
        common_lb_config={"consistent_hashing_lb_config": {"use_hostname_for_hashing": True}},
    )
    lb1, _ = f.build([a, b])
    a2, b2 = Host(("10.0.0.1", 9), hostname="alpha"), Host(("10.0.0.2", 9), hostname="beta")
    lb2, _ = f.build([a2, b2])
    for i in range(50):
        c = ctx_for(f"k{i}")
        assert lb1.choose_host(c).hostname == lb2.choose_host(c).hostname  # type: ignore[union-attr]


# -- maglev -----------------------------------------------------------------------------------
def test_maglev_table_matches_envoy_stats_and_is_consistent() -> None:
    store = Store()
    f = factory(lb_policy="MAGLEV")
    f.bind_stats(store.scope("cluster.c"))
    hosts = [Host(("127.0.0.1", p)) for p in (1, 2, 3)]
    lb, _ = f.build(hosts)
    assert store.gauges["cluster.c.maglev_lb.min_entries_per_host"].value == 21845
    assert store.gauges["cluster.c.maglev_lb.max_entries_per_host"].value == 21846
    keys = [f"user-{i}" for i in range(2000)]
    before = {k: lb.choose_host(ctx_for(k)) for k in keys}
    assert all(lb.choose_host(ctx_for(k)) is before[k] for k in keys[:100])


def test_maglev_removing_a_host_moves_mostly_its_keys() -> None:
    f = factory(lb_policy="MAGLEV", maglev_lb_config={"table_size": 5003})
    hosts = hosts_of(5)
    lb, _ = f.build(hosts)
    keys = [f"user-{i}" for i in range(3000)]
    before = {k: lb.choose_host(ctx_for(k)) for k in keys}
    lb2, _ = f.build(hosts[:4])
    moved = [k for k in keys if lb2.choose_host(ctx_for(k)) is not before[k]]
    owned = [k for k in keys if before[k] is hosts[4]]
    assert set(owned) <= set(moved)
    assert len(moved) - len(owned) < 0.05 * len(keys)  # Maglev: small extra disruption


def test_maglev_weights() -> None:
    hosts = hosts_of(2)
    hosts[0].weight = 3
    t = MaglevTable([(hosts[0], 0.75), (hosts[1], 0.25)], 0.75, 65537)
    share = t.table.count(hosts[0]) / 65537
    assert abs(share - 0.75) < 0.01


# -- config -----------------------------------------------------------------------------------
def test_typed_policies_first_supported_wins() -> None:
    cfg = {
        "load_balancing_policy": {
            "policies": [
                {
                    "typed_extension_config": {
                        "name": "custom",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.client_side_weighted_round_robin.v3.ClientSideWeightedRoundRobin"
                        },
                    }
                },
                typed("least_request", "LeastRequest", choice_count=3)["load_balancing_policy"][
                    "policies"
                ][0],
                typed("random", "Random")["load_balancing_policy"]["policies"][0],
            ]
        }
    }
    f = factory(**cfg)
    assert f.policy == "LEAST_REQUEST" and f.choice_count == 3
    assert factory(**typed("maglev", "Maglev", table_size=5003)).table_size == 5003
    assert factory(**typed("random", "Random")).policy == "RANDOM"
    f = factory(
        **typed("round_robin", "RoundRobin", locality_lb_config={"locality_weighted_lb_config": {}})
    )
    assert f.policy == "ROUND_ROBIN" and f.locality_weighted


def test_wrr_locality_wraps_an_endpoint_policy() -> None:
    inner = typed("least_request", "LeastRequest")["load_balancing_policy"]
    f = factory(**typed("wrr_locality", "WrrLocality", endpoint_picking_policy=inner))
    assert f.policy == "LEAST_REQUEST" and f.locality_weighted


def test_no_supported_typed_policy_is_an_error_like_envoy() -> None:
    cfg = {
        "load_balancing_policy": {
            "policies": [
                {
                    "typed_extension_config": {
                        "name": "x",
                        "typed_config": {"@type": "type.googleapis.com/google.protobuf.Struct"},
                    }
                }
            ]
        }
    }
    with pytest.raises(ConfigError) as e:
        factory(**cfg)
    assert e.value.message == (
        "cluster: didn't find a registered load balancer factory implementation for cluster: 'c' "
        "with names from [x]"
    )
    assert e.value.path == "clusters[0].load_balancing_policy"


@pytest.mark.parametrize(
    "cfg,message,field",
    [
        (
            {"lb_policy": "CLUSTER_PROVIDED"},
            "cluster provided LB specified but cluster 'c' did not provide one",
            "lb_policy",
        ),
        (
            {"lb_policy": "LOAD_BALANCING_POLICY_CONFIG"},
            "field load_balancing_policy need to be set",
            "lb_policy",
        ),
        (
            {"lb_policy": "MAGLEV", "maglev_lb_config": {"table_size": 100}},
            "The table size of maglev must be prime number",
            "",
        ),
        (
            {
                "lb_policy": "RING_HASH",
                "ring_hash_lb_config": {"minimum_ring_size": 2000, "maximum_ring_size": 1000},
            },
            "ring hash: minimum_ring_size (2000) > maximum_ring_size (1000)",
            "",
        ),
        (
            {"round_robin_lb_config": {"slow_start_config": {}}},
            "slow_start_config is not supported",
            "round_robin_lb_config.slow_start_config",
        ),
        (
            {
                "lb_policy": "RING_HASH",
                "common_lb_config": {"consistent_hashing_lb_config": {"hash_balance_factor": 150}},
            },
            "hash_balance_factor (bounded load) is not supported",
            "common_lb_config.consistent_hashing_lb_config.hash_balance_factor",
        ),
        (
            {"lb_subset_config": {"subset_selectors": [{"keys": ["v"]}]}},
            "lb_subset_config is not supported",
            "lb_subset_config",
        ),
    ],
)
def test_config_errors(cfg: dict[str, Any], message: str, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        factory(**cfg)
    assert message in e.value.message
    assert e.value.path == ("clusters[0]." + field if field else "clusters[0]")


def test_least_request_legacy_config() -> None:
    f = factory(
        lb_policy="LEAST_REQUEST",
        least_request_lb_config={
            "choice_count": 4,
            "active_request_bias": {"default_value": 0.5, "runtime_key": "k"},
        },
    )
    assert (f.choice_count, f.active_request_bias) == (4, 0.5)
    lb, _ = f.build(hosts_of(3))
    assert isinstance(lb, LeastRequestLoadBalancer) and lb.choice_count == 4


@pytest.mark.skipif(not os.environ.get("PYENVOY_LB_BENCH"), reason="micro-benchmark")
def test_bench_round_robin_choose_host() -> None:  # pragma: no cover
    import timeit

    lb, _ = factory().build(hosts_of(3))
    n = 200_000
    t = min(timeit.repeat(lb.choose_host, number=n, repeat=5)) / n
    print(f"round robin choose_host: {t * 1e9:.0f} ns")


# -- end to end (embedding API, three real upstreams) -----------------------------------------
def proxy_config(
    upstream_ports: list[int], weights: list[int], route: dict[str, Any], **cluster: Any
) -> dict[str, Any]:
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "lb",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "svc", **route}}],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    endpoints = [
        {
            "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}},
            "load_balancing_weight": w,
        }
        for p, w in zip(upstream_ports, weights, strict=True)
    ]
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "front",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "svc",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "svc",
                        "endpoints": [{"lb_endpoints": endpoints}],
                    },
                    **cluster,
                }
            ],
        }
    }


@pytest.fixture
def upstreams():
    ups = [HttpUpstream().start() for _ in range(3)]
    try:
        yield ups
    finally:
        for u in ups:
            u.stop()


async def test_e2e_weighted_round_robin(upstreams: list[Any]) -> None:
    import httpx

    import pyenvoy

    cfg = proxy_config([u.port for u in upstreams], [1, 2, 3], {})
    async with pyenvoy.Proxy(cfg) as proxy:
        url = f"http://127.0.0.1:{proxy.port('front')}/echo"
        async with httpx.AsyncClient() as client:
            for _ in range(600):
                r = await client.get(url)
                assert r.status_code == 200
    assert [u.request_count for u in upstreams] == [100, 200, 300]


async def test_e2e_ring_hash_by_header(upstreams: list[Any]) -> None:
    import httpx

    import pyenvoy

    ports_ = [u.port for u in upstreams]
    cfg = proxy_config(
        ports_,
        [1, 1, 1],
        {"hash_policy": [{"header": {"header_name": "x-user"}}]},
        lb_policy="RING_HASH",
    )
    # Where each key must land: the same ring Envoy builds over "127.0.0.1:<port>_<i>".
    hosts = [Host(("127.0.0.1", p)) for p in ports_]
    ring = Ring([(h, 1 / 3) for h in hosts], 1 / 3)
    async with pyenvoy.Proxy(cfg) as proxy:
        url = f"http://127.0.0.1:{proxy.port('front')}/echo"
        async with httpx.AsyncClient() as client:
            for i in range(60):
                key = f"user-{i}"
                expect = ring.choose(hashing.xxhash64(key.encode())).address[1]  # type: ignore[union-attr]
                before = {u.port: u.request_count for u in upstreams}
                for _ in range(3):  # the same key sticks to its host
                    r = await client.get(url, headers={"x-user": key})
                    assert r.status_code == 200
                after = {u.port: u.request_count for u in upstreams}
                assert {p for p in ports_ if after[p] != before[p]} == {expect}
                assert after[expect] - before[expect] == 3
        stats = proxy.stats()
        assert stats["cluster.svc.ring_hash_lb.size"] == 1026
    assert all(u.request_count > 20 for u in upstreams)


def test_hashing_lb_with_a_non_http_context_picks_randomly() -> None:
    class TcpContext:  # what tcp_proxy passes: no headers, no compute_hash
        pass

    f = factory(
        **typed(
            "maglev",
            "Maglev",
            table_size=5003,
            consistent_hashing_lb_config={"hash_policy": [{"header": {"header_name": "x"}}]},
        )
    )
    lb, _ = f.build(hosts_of(3))
    assert len(ports(lb, 300, TcpContext())) == 3


def test_context_accepts_a_precompiled_hash_policy() -> None:
    hp = compile_hash_policy(hash_policy({"header": {"header_name": "x-key"}}))
    h, si = request(headers=[(b"x-key", b"v")])
    assert LoadBalancerContext(h, si, hp).compute_hash() == hashing.xxhash64(b"v")
