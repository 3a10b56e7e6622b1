"""deploy/systemd: the unit passes `systemd-analyze verify` (where systemd is installed) with
no warning, and agrees with the gateway: its Environment= and env.example name real
settings with values that parse, TimeoutStopSec outlasts the shutdown sequence, and
LimitNOFILE fits the example's streams. docs/operations.md ("systemd") describes the files.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.procs import REPO

from sse_gateway.cli import EXIT_USAGE, build_parser
from sse_gateway.settings import OPTIONS, Settings, load_settings, parse_duration

pytestmark = pytest.mark.timeout(60)

UNIT = REPO / "deploy" / "systemd" / "sse-gateway.service"
ENV_EXAMPLE = REPO / "deploy" / "systemd" / "env.example"
SETTING_NAMES = {option.env for option in OPTIONS}
#: The supervisor of `--workers` kills a worker still alive 2 s after delay + drain, and the
#: gateway takes about a second after its drain to exit (docs/operations.md, "Shutdown").
SUPERVISOR_SECONDS = 2.0
EXIT_SECONDS = 1.0
MARGIN_SECONDS = 5.0
#: Open files the gateway keeps besides its streams: 100 of headroom and a request-reader
#: budget of at most 1,024 (docs/operations.md, "Sizing").
OTHER_FILES = 100 + 1024


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for each `Key=Value` line of a unit file, in order."""
    entries = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key, value))
    return entries


def service(key: str) -> list[str]:
    return [v for s, k, v in unit_entries(UNIT.read_text()) if s == "Service" and k == key]


def unit_environment() -> dict[str, str]:
    env: dict[str, str] = {}
    for value in service("Environment"):
        for assignment in shlex.split(value):
            name, _, setting = assignment.partition("=")
            env[name] = setting
    return env


def example_environment() -> dict[str, str]:
    env: dict[str, str] = {}
    for raw in ENV_EXAMPLE.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name] = value
    return env


def stop_budget(settings: Settings) -> float:
    return (
        settings.shutdown_delay
        + settings.drain_seconds
        + SUPERVISOR_SECONDS
        + EXIT_SECONDS
        + MARGIN_SECONDS
    )


# --------------------------------------------------------------------------- systemd-analyze


def verify(unit: Path) -> tuple[int, list[str]]:
    """`systemd-analyze verify` of a unit; its exit status and the lines about this unit
    (it reports unknown keys and bad values as lines while still exiting 0)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (no systemd here): the unit is not verified")
    out = subprocess.run(
        [analyze, "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=unit.parent,
    )
    lines = (out.stdout + out.stderr).splitlines()
    return out.returncode, [line for line in lines if unit.name in line]


def runnable_copy(tmp_path: Path, text: str) -> Path:
    """The unit with ExecStart pointed at this venv's `sse-gateway` (verify checks that the
    binary exists and is executable)."""
    (exec_start,) = service("ExecStart")
    shipped_binary = exec_start.split()[0]
    here = Path(sys.executable).parent / "sse-gateway"
    assert here.exists(), f"{here}: the package's console script is not installed"
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(shipped_binary, str(here)))
    return copy


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    status, complaints = verify(runnable_copy(tmp_path, UNIT.read_text()))
    assert status == 0 and not complaints, complaints


def test_verify_reports_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key, a bad value and a missing binary are each
    reported."""
    text = UNIT.read_text()
    status, complaints = verify(runnable_copy(tmp_path, text.replace("KillMode=", "KillMod=")))
    assert any("KillMod" in line for line in complaints), complaints
    status, complaints = verify(
        runnable_copy(tmp_path, text.replace("KillMode=mixed", "KillMode=sometimes"))
    )
    assert any("sometimes" in line for line in complaints), complaints
    missing = tmp_path / "missing"
    missing.mkdir()
    copy = missing / UNIT.name
    copy.write_text(text)  # ExecStart under /opt/sse-gateway, not installed here
    status, complaints = verify(copy)
    assert status != 0 or complaints


# --------------------------------------------------------------------------- the code


def test_service_basics() -> None:
    # The gateway does not speak sd_notify: `notify` would time out every start.
    assert service("Type") == ["exec"]
    binary, *args = service("ExecStart")[0].split()
    assert Path(binary).name == "sse-gateway" and args == ["serve"]
    assert build_parser().parse_args(args).command == "serve"
    # Exit 2 is a configuration error (EXIT_USAGE): a restart cannot fix it.
    assert service("RestartPreventExitStatus") == [str(EXIT_USAGE)]
    assert service("KillSignal") == ["SIGTERM"]
    # The supervisor passes SIGTERM on; a second one from systemd would end the delay.
    assert service("KillMode") == ["mixed"]
    assert service("EnvironmentFile") == ["/etc/sse-gateway/env"]
    assert service("ExecReload") == ["/bin/kill -HUP $MAINPID"]
    for hardening in ("NoNewPrivileges", "DynamicUser", "PrivateTmp"):
        assert service(hardening) == ["yes"], hardening
    assert service("ProtectSystem") == ["strict"]


@pytest.mark.parametrize("source", ["unit", "env.example"])
def test_env_names_are_settings_and_values_parse(source: str) -> None:
    env = (
        unit_environment() if source == "unit" else {**unit_environment(), **example_environment()}
    )
    assert set(env) <= SETTING_NAMES, f"not settings: {set(env) - SETTING_NAMES}"
    load_settings(env, {}, dev=False)  # SettingsError names a bad value


@pytest.mark.parametrize("source", ["unit", "env.example"])
def test_stop_timeout_outlasts_the_shutdown(source: str) -> None:
    """With the unit's defaults, and with the example's settings (the EnvironmentFile is
    read after Environment= and wins)."""
    env = (
        unit_environment() if source == "unit" else {**unit_environment(), **example_environment()}
    )
    settings = load_settings(env, {}, dev=False)
    (timeout,) = service("TimeoutStopSec")
    assert parse_duration(timeout) >= stop_budget(settings), (timeout, stop_budget(settings))


def test_stop_timeout_check_can_fail() -> None:
    slow = load_settings({"SSE_DRAIN_SECONDS": "60s"}, {}, dev=False)
    (timeout,) = service("TimeoutStopSec")
    assert parse_duration(timeout) < stop_budget(slow)


def test_open_file_limit_fits_the_example_streams() -> None:
    settings = load_settings({**unit_environment(), **example_environment()}, {}, dev=False)
    (limit,) = service("LimitNOFILE")
    per_process = -(-settings.connection_limit // settings.workers)
    assert int(limit) >= per_process + OTHER_FILES, (limit, per_process)
