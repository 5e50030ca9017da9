"""deploy/install-pi.sh into a scratch root, and the fog it installs working as
deploy/README.md says: a wheel built from this checkout (it must carry the deploy files),
installed by the script with ``--prefix`` into a real venv (Debian's python3, dependencies from
pip's configured index), as a service user that is not root when the tests run as root
("nobody"). Then: owners and modes, ``systemd-analyze verify`` on the installed units,
Mosquitto started through a copy of Debian's stock mosquitto.conf including the installed
conf.d file, and a standalone fog provisioned with the README's commands answering a payment.

The install takes ~40 s (one venv for the whole module)."""

import grp
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port, mosquitto_passwd_path, require_mosquitto, wait_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCRIPT = DEPLOY / "install-pi.sh"
FOG_ID = "fog-pi"
IS_ROOT = os.geteuid() == 0
SERVICE_USER = "nobody" if IS_ROOT else pwd.getpwuid(os.geteuid()).pw_name
DEBIAN_PYTHON = "/usr/bin/python3"
INSTALL_TIMEOUT_S = 600
WAIT_S = 30.0

# Debian 12's /etc/mosquitto/mosquitto.conf (package mosquitto 2.0.11-1.2+deb12u1), verbatim
# but for the paths, which the test moves into the scratch root.
DEBIAN_STOCK_MOSQUITTO_CONF = """\
# Place your local configuration in /etc/mosquitto/conf.d/
#
# A full description of the configuration file is at
# /usr/share/doc/mosquitto/examples/mosquitto.conf.example

pid_file /run/mosquitto/mosquitto.pid

persistence true
persistence_location /var/lib/mosquitto/

log_dest file /var/log/mosquitto/mosquitto.log

include_dir /etc/mosquitto/conf.d
"""


def debian_venv_missing() -> str | None:
    """Why the script cannot make its venv here (it uses Debian's python3 and its venv)."""
    if not os.access(DEBIAN_PYTHON, os.X_OK):
        return f"{DEBIAN_PYTHON} missing: not Debian"
    done = subprocess.run([DEBIAN_PYTHON, "-c", "import ensurepip, venv"], capture_output=True)
    if done.returncode != 0:
        return "python3-venv not installed: run `sudo apt-get install python3-venv`"
    return None


def build_wheel(out: Path) -> Path:
    """A wheel of this checkout, built from a copy (the build writes build/ and egg-info)."""
    src = _mkdir(out / "src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    for package in ("protocol", "runtime", "fog", "edge", "cloud", "fogpay", "deploy"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
        timeout=INSTALL_TIMEOUT_S,
    )
    (wheel,) = out.glob("fogpay-*.whl")
    return wheel


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def install(prefix: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), "--prefix", str(prefix), "--user", SERVICE_USER, *args],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
    )


@dataclass
class Installed:
    prefix: Path
    wheel: Path
    output: str  # both runs of the script
    issuer_dir: Path
    issuer_key: str

    @property
    def fogpay(self) -> Path:
        return self.prefix / "opt/fogpay/.venv/bin/fogpay"

    def cli(self, *args: str) -> dict[str, object]:
        done = subprocess.run([str(self.fogpay), *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
        return result


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    require_mosquitto()  # the script gives the fog a Mosquitto account (mosquitto_passwd)
    why = debian_venv_missing()
    if why is not None:
        pytest.skip(why)
    # under /tmp with 0755: the service user must reach its files through the scratch root
    top = Path(tempfile.mkdtemp(prefix="fogpay-deploy-"))
    try:
        top.chmod(0o755)
        prefix = _mkdir(top / "root")
        wheel = build_wheel(_mkdir(top / "wheel"))
        first = install(prefix, "--fog-id", FOG_ID, "--standalone", "--source", str(wheel))
        assert first.returncode == 0, first.stdout + first.stderr
        # deploy/README.md: the issuer's key, made with the installed CLI, then the script again
        issuer_dir = top / "issuer"
        fogpay = prefix / "opt/fogpay/.venv/bin/fogpay"
        done = subprocess.run(
            [str(fogpay), "issuer", "init", "--dir", str(issuer_dir)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        issuer_key = json.loads(done.stdout)["issuer_key"]
        again = install(
            prefix,
            "--fog-id",
            FOG_ID,
            "--issuer-key",
            issuer_key,
            "--verify-workers",
            "2",  # set in the existing fog.toml: the fog below runs with two verify workers
            "--source",
            str(wheel),
        )
        assert again.returncode == 0, again.stdout + again.stderr
        output = first.stdout + first.stderr + again.stdout + again.stderr
        yield Installed(prefix, wheel, output, issuer_dir, issuer_key)
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.mosquitto  # the install gives the fog a Mosquitto account
def test_the_wheel_and_the_installed_venv_carry_the_deploy_files(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    data = "fogpay-0.1.0.data/data/share/fogpay/deploy/"
    shipped = ["install-pi.sh", "README.md", "fog.example.toml", "cloud.example.toml"]
    shipped += ["fogpay-fog.service", "fogpay-cloud.service", "mosquitto/fogpay-pi.conf"]
    shipped += ["mosquitto/fogpay-server.conf", "mosquitto/fogpay-bridge.conf"]
    shipped += ["mosquitto/fogpay.acl"]
    assert [n for n in shipped if data + n not in names] == []
    share = installed.prefix / "opt/fogpay/.venv/share/fogpay/deploy"
    for name in shipped:
        assert (share / name).read_bytes() == (DEPLOY / name).read_bytes(), name


@pytest.mark.mosquitto  # the install gives the fog a Mosquitto account
def test_owners_and_modes(installed: Installed) -> None:
    p = installed.prefix
    group = grp.getgrgid(pwd.getpwnam(SERVICE_USER).pw_gid).gr_name
    expected = {
        "etc/fogpay": ("root", group, 0o750),
        "etc/fogpay/fog.key": (SERVICE_USER, group, 0o600),
        "etc/fogpay/fog.toml": ("root", group, 0o640),
        "var/lib/fogpay": (SERVICE_USER, group, 0o700),
        "opt/fogpay": ("root", "root", 0o755),
        "etc/mosquitto/fogpay.passwd": ("root", "mosquitto", 0o640),
        "etc/mosquitto/fogpay.acl": ("root", "mosquitto", 0o640),
        "etc/mosquitto/conf.d/fogpay.conf": ("root", "root", 0o644),
        "etc/systemd/system/fogpay-fog.service": ("root", "root", 0o644),
        "etc/systemd/system/fogpay-cloud.service": ("root", "root", 0o644),
    }
    for rel, (user, grp_name, mode) in expected.items():
        st = (p / rel).stat()
        assert stat.S_IMODE(st.st_mode) == mode, rel
        if IS_ROOT:
            owner = (pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name)
            if grp_name == "mosquitto" and not _group_exists("mosquitto"):
                grp_name = "root"
            assert owner == (user, grp_name), rel


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


@pytest.mark.mosquitto  # the install gives the fog a Mosquitto account
def test_the_config_is_checked_as_the_service_user_and_rerunning_keeps_secrets(
    installed: Installed,
) -> None:
    out = installed.output
    # once per run, as the service user (the script uses runuser when root)
    assert out.count(f"ok   database  {installed.prefix}/var/lib/fogpay/fog.sqlite") == 2
    assert (
        out.count(f"fog {FOG_ID}, key {installed.prefix}/etc/fogpay/fog.key, external broker") == 2
    )
    assert out.count("skip broker") == 2  # Mosquitto may not run yet: the fog reconnects
    assert "fog.key exists: kept" in out and "fog.toml exists: kept" in out
    text = (installed.prefix / "etc/fogpay/fog.toml").read_text()
    assert f'issuer_key = "{installed.issuer_key}"' in text
    assert "\nenabled = false" in text  # --standalone, kept by the second run
    assert "\nverify_workers = 2\n" in text  # --verify-workers, set by the second run
    assert f'url = "mqtt://{FOG_ID}:' in text and ":PASSWORD@" not in text
    # the password is in fog.toml only: not printed
    password = text.split(f"mqtt://{FOG_ID}:")[1].split("@")[0]
    assert len(password) == 32 and password not in out
    passwd = (installed.prefix / "etc/mosquitto/fogpay.passwd").read_text()
    assert [line.split(":")[0] for line in passwd.splitlines()] == [FOG_ID]


@pytest.mark.mosquitto  # the install gives the fog a Mosquitto account
def test_systemd_analyze_verify_is_clean_on_the_installed_units(installed: Installed) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed: apt-get install systemd")
    units = [installed.prefix / "etc/systemd/system" / u for u in ("fogpay-fog.service",)]
    units.append(installed.prefix / "etc/systemd/system/fogpay-cloud.service")
    done = subprocess.run(
        [analyze, "verify", *map(str, units)], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_start_limits_are_in_the_unit_section_of_the_shipped_units() -> None:
    """systemd ignores StartLimit* in [Service] (a warning), so Restart= would loop forever."""
    for name in ("fogpay-fog.service", "fogpay-cloud.service"):
        section = ""
        seen = {}
        for line in (DEPLOY / name).read_text().splitlines():
            if line.startswith("["):
                section = line
            elif line.startswith("StartLimit"):
                seen[line.split("=")[0]] = section
        assert seen == {"StartLimitIntervalSec": "[Unit]", "StartLimitBurst": "[Unit]"}, name


def test_dry_run_prints_the_steps_and_changes_nothing(tmp_path: Path) -> None:
    before = sorted(tmp_path.iterdir())
    done = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--fog-id", "fog-x", "--user", "fogpay-dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for step in ("+ apt-get install -y -qq mosquitto mosquitto-clients python3-venv",):
        assert step in done.stdout
    assert "+ useradd --system --home-dir /var/lib/fogpay" in done.stdout
    assert "+ install -d -m 0750 /etc/fogpay" in done.stdout
    assert "+ systemctl restart fogpay-fog" in done.stdout
    assert sorted(tmp_path.iterdir()) == before
    with pytest.raises(KeyError):
        pwd.getpwnam("fogpay-dry-run")


def test_a_bad_fog_id_is_refused_before_anything_happens(tmp_path: Path) -> None:
    for args, error in (
        (["--fog-id", "Bad/Id"], "--fog-id Bad/Id: must match"),
        (["--fog-id", "trust"], "--fog-id trust: must match"),
        (["--issuer-key", "00"], "--issuer-key: 64 lowercase hex characters"),
        (["--verify-workers", "65"], "--verify-workers: a number from 0 to 64"),
        (["--verify-workers", "two"], "--verify-workers: a number from 0 to 64"),
        (["--frobnicate"], "unknown option --frobnicate"),
    ):
        done = install(tmp_path, *args)
        assert (done.returncode, done.stdout) == (2, ""), args
        assert done.stderr.startswith(f"install-pi: {error}"), done.stderr
    assert list(tmp_path.iterdir()) == []


# --- Mosquitto through Debian's stock config, and a standalone fog answering a payment ------


@dataclass
class Broker:
    port: int
    process: subprocess.Popen[bytes]
    log: Path


def start_stock_mosquitto(prefix: Path, port: int) -> Broker:
    """Mosquitto with a copy of Debian's stock main config (paths moved into ``prefix``)
    including the installed conf.d, whose listener moves to 127.0.0.1:``port``."""
    binary = require_mosquitto()
    conf_d = prefix / "etc/mosquitto/conf.d"
    ours = conf_d / "fogpay.conf"
    ours.write_text(ours.read_text().replace("\nlistener 1883\n", f"\nlistener {port} 127.0.0.1\n"))
    for d in ("run/mosquitto", "var/lib/mosquitto", "var/log/mosquitto"):
        path = prefix / d
        path.mkdir(parents=True, exist_ok=True)
        if IS_ROOT:  # mosquitto drops to its user, as on Debian
            shutil.chown(path, "mosquitto", "mosquitto")
    main = prefix / "etc/mosquitto/mosquitto.conf"
    text = DEBIAN_STOCK_MOSQUITTO_CONF
    for d in ("/run/mosquitto/", "/var/lib/mosquitto/", "/var/log/mosquitto/", "/etc/mosquitto/"):
        text = text.replace(d, f"{prefix}{d}")
    main.write_text(text)
    log = prefix / "var/log/mosquitto/stderr.log"
    with log.open("wb") as out:
        process = subprocess.Popen([binary, "-c", str(main)], stdout=out, stderr=out)
    try:
        wait_port("127.0.0.1", port, process=process)
    except TimeoutError:
        process.kill()
        process.wait()
        raise AssertionError(log.read_text()) from None
    return Broker(port, process, log)


def add_account(prefix: Path, user: str, password: str) -> None:
    passwd = mosquitto_passwd_path()
    assert passwd is not None
    subprocess.run(
        [passwd, "-b", str(prefix / "etc/mosquitto/fogpay.passwd"), user, password],
        check=True,
        timeout=30,
    )


def wait_for_line(path: Path, text: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + WAIT_S
    while text not in path.read_text():
        assert process.poll() is None, path.read_text()
        assert time.monotonic() < deadline, f"no {text!r} in {path.read_text()}"
        time.sleep(0.05)


def stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait(timeout=WAIT_S)


@pytest.mark.mosquitto  # the install gives the fog a Mosquitto account
def test_mosquitto_through_debian_stock_config_and_a_standalone_fog_answers_a_payment(
    installed: Installed, tmp_path: Path
) -> None:
    require_mosquitto()
    p, port = installed.prefix, free_port()
    fog_toml = p / "etc/fogpay/fog.toml"
    fog_toml.write_text(fog_toml.read_text().replace("@127.0.0.1:1883", f"@127.0.0.1:{port}"))
    issuer_seed = str(installed.issuer_dir / "issuer.seed")
    fog_pub = installed.cli("keys", "show", str(p / "etc/fogpay/fog.key"))["public_key"]
    # README: the accounts of the issuer and of a device (username = its key hex)
    device_dir = _mkdir(tmp_path / "device")
    device_pub = installed.cli("keys", "new", str(device_dir / "device.key"))["public_key"]
    assert isinstance(fog_pub, str) and isinstance(device_pub, str)
    add_account(p, "issuer", "issuer-pw")
    add_account(p, device_pub, "device-pw")
    broker = start_stock_mosquitto(p, port)
    fog = None
    try:
        issuer_url = f"mqtt://issuer:issuer-pw@127.0.0.1:{port}"
        installed.cli("issuer", "certify-fog", "--issuer-key", issuer_seed, "--fog-id", FOG_ID,
                      "--fog-pub", fog_pub, "--broker", issuer_url)  # fmt: skip
        owner_key = str(installed.issuer_dir / "acme.key")
        installed.cli("owner", "add", "--issuer-key", issuer_seed, "--owner-id", "acme",
                      "--owner-key", owner_key, "--broker", issuer_url)  # fmt: skip
        installed.cli("device", "bind", "--owner-key", owner_key, "--owner-id", "acme",
                      "--device-key", str(device_dir / "device.key"), "--currency", "EUR",
                      "--tx-max", "1000000", "--day-max", "10000000",
                      "--broker", issuer_url)  # fmt: skip
        installed.cli("lease", "grant", "--issuer-key", issuer_seed, "--owner-id", "acme",
                      "--fog-id", FOG_ID, "--amount", "50000000", "--currency", "EUR",
                      "--broker", issuer_url)  # fmt: skip
        # the fog as its service user, as the unit runs it (setuid in the child: no runuser
        # in between to swallow the SIGTERM)
        user = pwd.getpwnam(SERVICE_USER)
        fog_log = tmp_path / "fog.log"
        with fog_log.open("wb") as out:
            fog = subprocess.Popen(
                [str(installed.fogpay), "fog", "run", "--config", str(fog_toml)],
                stdout=out,
                stderr=out,
                user=user.pw_uid,
                group=user.pw_gid,
                extra_groups=[] if IS_ROOT else None,
            )
        wait_for_line(fog_log, '"broker_connected"', fog)
        pay = [str(installed.fogpay), "edge", "pay", "--state", str(device_dir)]
        pay += ["--broker", f"mqtt://{device_pub}:device-pw@127.0.0.1:{port}"]
        pay += ["--fog-id", FOG_ID, "--fog-key", fog_pub, "--payee", "shop-1"]
        pay += ["--amount", "1500", "--currency", "EUR", "--timeout", "5"]
        done = subprocess.run(pay, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr + fog_log.read_text()
        result = json.loads(done.stdout)
        assert result["status"] == "ok" and result["device"] == device_pub
        assert result["lease"] is not None
        wait_for_line(fog_log, '"batch_sealed"', fog)  # [batch] age_ms after the payment
        assert stop(fog) == 0, fog_log.read_text()
        # standalone: nothing was sent towards a cloud
        assert "batch_sent" not in fog_log.read_text()
        # the two verify workers of --verify-workers 2 started from the installed venv (each
        # answered its ready frame); a lone payment is verified by the idle core itself
        text = fog_log.read_text()
        assert '"verify_workers_started"' in text and '"workers": 2' in text, text
    finally:
        if fog is not None:
            stop(fog)
        stop(broker.process)
    log = broker.log.read_text() + (p / "var/log/mosquitto/mosquitto.log").read_text()
    assert "Duplicate" not in log and "Error" not in log, log
