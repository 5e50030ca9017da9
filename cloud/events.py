"""What goes into the cloud's core and what comes out of it: two closed sets of frozen
dataclasses, in the manner of h11's events.

The MQTT shell (``cloud/service.py``), the command line and the simulator turn what they
receive into an input and hand it to ``CloudCore.handle``; they get back a list of outputs and
act on them (publish, count, log). Time is part of every input that needs it (``now_ms``):
the core never reads a clock, so a simulator with a virtual clock drives the same core.

Inputs (where from: what the core does):

- ``BatchArrived(wire, now_ms, topic)``, from ``fogpay/1/up/{fog_id}/batch``: verify once,
  chain, book, ack;
- ``LeaseRequestArrived(wire, now_ms)``, from ``.../lreq``: grant a lease, or refuse;
- ``LeaseReportArrived(wire, now_ms)``, from ``.../lrep``: record it, close leases;
- ``RetainedWanted()``, at start, reconnect and refresh: everything published retained.

There is no ``Tick``: the cloud has no timers of its own. Every decision it makes answers a
message (a lease expires for the fog, which reports it; a held batch waits for the batch
that fills its gap), and the periodic re-publication of the retained state is the shell's
(it diffs ``RetainedWanted``'s answer against what it published).

Outputs:

- ``Publish(topic, payload, retain)``: publish (QoS 1); an empty retained payload clears;
- ``AlarmRaised(kind, subject, fog_id, detail)``: a new alarm, stored in the same
  transaction (one per kind and subject);
- ``BatchJudged(status, ...)``: what became of a batch, with its counts; exactly one per
  ``BatchArrived``;
- ``LeaseAnswered(kind, result, reason)``: what became of an ``lreq``/``lrep``; exactly one
  per lease input.

Every output of an input is durable before the core returns it: the store's transaction
committed, so an ack, a lease or a clearing never leaves before what it states.
"""

import enum
from dataclasses import dataclass
from typing import Literal

from protocol.reasons import Reason

# ---- inputs -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchArrived:
    wire: bytes
    now_ms: int
    # the topic it came on; None when it did not come over MQTT (a file, a test): then the
    # fog the header names is not checked against a topic
    topic: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseRequestArrived:
    wire: bytes
    now_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseReportArrived:
    wire: bytes
    now_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RetainedWanted:
    pass


Input = BatchArrived | LeaseRequestArrived | LeaseReportArrived | RetainedWanted

# ---- outputs ------------------------------------------------------------------------------


class Status(enum.StrEnum):
    """What became of a batch (stable: counted as ``batch_{status}`` and logged)."""

    BOOKED = "booked"
    DUPLICATE = "duplicate"
    HELD = "held"
    FORK = "fork"
    REFUSED = "refused"
    DEFERRED = "deferred"  # the store gave up under contention; nothing written, no ack
    DROPPED = "dropped"  # came on another fog's topic: nothing written, no ack


@dataclass(frozen=True, slots=True, kw_only=True)
class Publish:
    topic: str
    payload: bytes
    retain: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class AlarmRaised:
    kind: str
    subject: str  # hex of the device, lease or batch the alarm is about
    fog_id: str
    detail: str  # the evidence, in a line


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchJudged:
    status: Status
    fog_id: str = ""
    number: int = 0
    reason: Reason | None = None  # why REFUSED or DROPPED
    booked: int = 0  # transfers written, held batches booked behind this one included
    duplicates: int = 0  # records whose intent was booked before
    rejected: int = 0  # records rejected with a fault
    batches: int = 0  # batches booked: this one and the held ones it released


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseAnswered:
    kind: Literal["lreq", "lrep"]
    result: Literal["granted", "no_credit", "accepted", "refused"]
    reason: Reason | None = None  # why refused
    lease_id: bytes = b""  # the lease granted


Output = Publish | AlarmRaised | BatchJudged | LeaseAnswered
