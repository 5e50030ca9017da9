"""Shared runtime below the fog, the cloud and the device SDK: key files, logging set-up, the
MQTT loop helpers. Imports ``protocol`` at most; nothing of ``fog``, ``cloud``, ``edge`` or
``fogpay`` (the composition layer on top)."""
