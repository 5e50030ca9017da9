"""The simulator's own parts: the scheduler's order, the network's faults and retained
topics, the swarm's fault mixes. (The invariants themselves are shown to bite by the planted
bugs in ``test_sim.py``.)"""

import random

from protocol import topics
from tests.sim.faults import FAULTS, FaultMix
from tests.sim.network import CLOUD, Network
from tests.sim.scheduler import T0_MS, Scheduler
from tests.sim.simulation import SimConfig, run

FOGS = ["fog-0", "fog-1", "fog-2"]
LEASE = bytes(range(16))


def drain(sched: Scheduler) -> None:
    while (event := sched.pop()) is not None:
        event.run()


def test_events_run_in_time_order_and_same_time_events_in_insertion_order() -> None:
    sched, seen = Scheduler(), []
    sched.after(10, "late", lambda: seen.append("late"))
    sched.after(5, "a", lambda: seen.append("a"))
    sched.after(5, "b", lambda: seen.append("b"))
    drain(sched)
    assert seen == ["a", "b", "late"] and sched.now_ms == T0_MS + 10


def network(mix: FaultMix) -> tuple[Scheduler, Network, list[tuple[str, str, bytes]]]:
    sched, got = Scheduler(), []
    net = Network(sched, random.Random(1), mix, FOGS, lambda d, t, p: got.append((d, t, p)))
    return sched, net, got


def test_a_message_in_flight_is_lost_when_the_link_is_cut_or_a_node_is_down() -> None:
    sched, net, got = network(FaultMix.none())
    net.send("fog-0", CLOUD, topics.batch_topic("fog-0"), b"1")
    net.cut.add("fog-0")  # cut while the message travels
    net.send("fog-2", CLOUD, topics.batch_topic("fog-2"), b"2")
    net.send(CLOUD, "fog-1", topics.ack_topic("fog-1"), b"3")
    net.send("fog-1", CLOUD, topics.batch_topic("fog-1"), b"4")
    net.down.add("fog-1")  # crashed: what it sent and what was sent to it are lost
    drain(sched)
    assert got == [(CLOUD, topics.batch_topic("fog-2"), b"2")]
    assert net.counts["dropped"] == 3


def test_retained_topics_reach_their_subscribers_again_on_resubscribe() -> None:
    sched, net, got = network(FaultMix.none())
    lease = topics.lease_topic("fog-1", LEASE)
    net.publish_retained([(topics.fog_topic("fog-0"), b"cred"), (lease, b"lease")])
    drain(sched)
    assert sorted(d for d, _, _ in got) == ["fog-0", "fog-1", "fog-1", "fog-2"]
    got.clear()
    net.publish_retained([(lease, b"")])  # cleared: sent empty once, then gone
    net.resubscribe("fog-1")
    drain(sched)
    assert got == [("fog-1", lease, b""), ("fog-1", topics.fog_topic("fog-0"), b"cred")]


def test_drop_and_duplicate_happen_at_their_rates() -> None:
    mix = FaultMix(0.3, 0.2, 100, 0.0, 0, 0.0, 0.0, 0, 0.0)
    sched, net, got = network(mix)
    for i in range(2_000):
        net.send("fog-0", CLOUD, topics.batch_topic("fog-0"), str(i).encode())
    drain(sched)
    assert 0.25 < net.counts["dropped"] / 2_000 < 0.35
    assert len(got) == 2_000 - net.counts["dropped"] + net.counts["duplicated"]
    order = [int(p) for _, _, p in got]
    assert order != sorted(order)  # delays reorder


def test_the_swarm_switches_every_fault_off_in_some_seeds_and_on_in_others() -> None:
    mixes = [FaultMix.draw(random.Random(seed)) for seed in range(200)]
    for name in FAULTS:
        on = sum(m.has(name) for m in mixes)
        assert 0 < on < len(mixes), name
    assert not FaultMix.draw(random.Random(3)).without(list(FAULTS)).describe().count("0.3")


def test_without_faults_every_payment_gets_its_receipt() -> None:
    for seed in range(3):
        r = run(seed, SimConfig(faults=False))
        assert r.ok, r.violations
        assert r.stats["receipts_ok"] > 0 and "payments_given_up" not in r.stats
        assert r.stats["net_dropped"] == 0
