"""Deterministic simulation of fogs, the cloud and the network (``python -m tests.sim``).

See ``tests/sim/README.md``: what is simulated, the faults, the invariants, how to replay.
"""
