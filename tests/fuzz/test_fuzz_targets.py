"""The fuzz targets of `fuzz/` (atheris): their seeds replay clean in-process, the seeds in git
are the ones `fuzz/make_seeds.py` writes, and each target runs a few seconds under the fuzzer
(`make fuzz` runs them longer)."""

from __future__ import annotations

import filecmp
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
FUZZ = REPO / "fuzz"
TARGETS = ("request_reader", "envelope")
SECONDS = 3


def target_module(name: str) -> ModuleType:
    """A target (or make_seeds) as `fuzz/run.py` imports it, without the instrumentation."""
    for folder in (FUZZ, REPO / "tests" / "unit"):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    return importlib.import_module(name)


@pytest.mark.parametrize("target", TARGETS)
def test_seed_corpus_replays_clean(target: str) -> None:
    module = target_module(target)
    seeds = sorted((FUZZ / "corpus" / target).iterdir())
    assert len(seeds) >= 10
    for seed in seeds:
        try:
            module.check(seed.read_bytes())
        except AssertionError as exc:
            raise AssertionError(f"seed {seed.name}: {exc}") from exc


def test_seeds_in_git_are_the_generated_ones(tmp_path: Path) -> None:
    target_module("make_seeds").main(tmp_path)
    for target in TARGETS:
        comparison = filecmp.dircmp(tmp_path / target, FUZZ / "corpus" / target)
        assert not comparison.left_only, f"not in git (run fuzz/make_seeds.py): {target}"
        assert not comparison.right_only, f"stale seeds of {target}: {comparison.right_only}"
        _, mismatch, errors = filecmp.cmpfiles(
            tmp_path / target, FUZZ / "corpus" / target, comparison.common_files, shallow=False
        )
        assert not mismatch and not errors, f"seeds of {target} differ: {mismatch + errors}"


@pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None,
    reason="atheris is not installed (the dev extra has it on Linux x86_64 only)",
)
@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_briefly(target: str, tmp_path: Path) -> None:
    findings = tmp_path / "findings"
    findings.mkdir()
    run = subprocess.run(
        [
            sys.executable,
            str(FUZZ / "run.py"),
            target,
            f"-max_total_time={SECONDS}",
            f"-artifact_prefix={findings}/",
            str(tmp_path),
            str(FUZZ / "corpus" / target),
        ],
        capture_output=True,
        text=True,
        timeout=SECONDS + 120,
        check=False,
    )
    found = [f"{path.name}: {path.read_bytes()!r}" for path in sorted(findings.iterdir())]
    assert run.returncode == 0 and not found, (
        f"fuzz/run.py {target} exited {run.returncode}; failing input (replay it with "
        f"`python fuzz/run.py {target} FILE`): {found}\n{run.stderr[-6000:]}"
    )
    assert "Done " in run.stderr, run.stderr[-2000:]
