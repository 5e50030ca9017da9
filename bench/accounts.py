"""Broker accounts at 10,000 devices: rendering the account files (cloud.accounts), parsing
the embedded broker's file, one table lookup (with its stat) and one ACL check
(fog.brokerauth). ``python -m bench.accounts``; figures in docs/security.md."""

import json
import os
import tempfile
import time
import timeit

from cloud.accounts import render_amqtt, render_mosquitto
from fog.brokerauth import ROLE_DEVICE, Account, AccountTable, allowed, parse_accounts

secret = bytes(range(32))
devs = [os.urandom(32) for _ in range(10_000)]
t = time.perf_counter()
data = render_amqtt(devs, secret, {})
t_amqtt = time.perf_counter() - t
t = time.perf_counter()
render_mosquitto(devs, secret, "")
t_mosq = time.perf_counter() - t
t = time.perf_counter()
table = parse_accounts(json.loads(data))
t_parse = time.perf_counter() - t
d = tempfile.mkdtemp()
path = os.path.join(d, "a.json")
open(path, "wb").write(data)
tab = AccountTable({}, path)
name = devs[0].hex()
tab.get(name)
n = 100_000
per_get = timeit.timeit(lambda: tab.get(name), number=n) / n
acc = Account(name, ROLE_DEVICE, "0" * 64)
topic = f"fogpay/1/f/intent/{name}"
per_acl = timeit.timeit(lambda: allowed(acc, topic, write=True), number=n) / n
print(
    f"10000 devices: render amqtt file {t_amqtt * 1e3:.0f} ms ({len(data)} bytes), "
    f"mosquitto passwd {t_mosq * 1e3:.0f} ms, parse {t_parse * 1e3:.0f} ms; "
    f"table lookup incl. stat {per_get * 1e6:.1f} us, ACL check {per_acl * 1e6:.2f} us"
)
