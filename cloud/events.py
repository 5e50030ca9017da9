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
- ``TransferArrived(wire, now_ms)``, from ``.../xfer``: record a peer transfer (18.2);
- ``RetainedWanted()``, at start, reconnect and refresh: everything published retained;
- ``HeldArrived(payload, device, now_ms)``, from ``fogpay/1/held/{device_hex}/records``:
  book the records a device hands in that no batch has brought, answer a ``hack``.

A batch relayed by another fog (``fogpay/1/up/{carrier}/relay``) is a ``BatchArrived``
with ``relayed_by`` = the carrier.

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
  per lease input;
- ``HeldJudged(device, ...)``: what became of a held payload; exactly one per
  ``HeldArrived``.

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
    # the fog that relayed it on fogpay/1/up/{carrier}/relay (section 17.8): ingested as a
    # batch of the header's fog, whatever the carrier; the topic is then not checked
    relayed_by: str | None = None


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


@dataclass(frozen=True, slots=True, kw_only=True)
class HeldArrived:
    """A device's held payload (section 17.7) from ``fogpay/1/held/{device_hex}/records``."""

    payload: bytes
    device: bytes  # the topic's device
    now_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferArrived:
    """A peer transfer (``xfer``, docs/protocol.md 18.2) from ``fogpay/1/up/{fog}/xfer``."""

    wire: bytes
    now_ms: int


Input = (
    BatchArrived
    | LeaseRequestArrived
    | LeaseReportArrived
    | RetainedWanted
    | HeldArrived
    | TransferArrived
)

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
    kind: Literal["lreq", "lrep", "xfer"]
    result: Literal["granted", "no_credit", "accepted", "refused"]
    reason: Reason | None = None  # why refused
    lease_id: bytes = b""  # the lease granted


@dataclass(frozen=True, slots=True, kw_only=True)
class HeldJudged:
    """What became of one held payload: exactly one per ``HeldArrived``. ``refused``: the
    payload did not decode (nothing is answered); else the counts of its records, and the
    ``hack`` is among the outputs (a ``Publish``, not retained)."""

    device: bytes
    refused: bool = False
    booked: int = 0  # records booked by this upload
    already: int = 0  # records whose intent was booked before (a batch, an earlier upload)
    rejected: int = 0  # records not booked, with a fault
    deferred: bool = False  # the store gave up under contention: nothing written, no hack


Output = Publish | AlarmRaised | BatchJudged | LeaseAnswered | HeldJudged
