"""Runs one fuzz target under atheris (libFuzzer), with the package's code instrumented.

    python fuzz/run.py TARGET [libFuzzer flags] [corpus dirs]

TARGET is `request_reader` or `envelope` (a module of this folder with `check(data)`). Without
corpus dirs it reads the seeds of `fuzz/corpus/TARGET` and writes what it finds new to
`fuzz/.corpus/TARGET` (not in git); `fuzz/TARGET.dict` is used as `-dict` when it exists.
A failing input is written to `fuzz/findings/TARGET-crash-<sha1>`; replay it with
`python fuzz/run.py TARGET fuzz/findings/TARGET-crash-<sha1>`.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TARGETS = ("request_reader", "envelope")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer flags] [corpus dirs]")
    name = sys.argv[1]
    args = sys.argv[2:]
    # This checkout's code, whatever the venv has installed; the unit tests' fakes and SSE parser.
    sys.path[:0] = [str(REPO / "src"), str(HERE), str(REPO / "tests" / "unit")]
    import atheris

    with atheris.instrument_imports(include=["sse_gateway"]):
        target = importlib.import_module(name)
    if not any(arg.startswith("-dict=") for arg in args) and (HERE / f"{name}.dict").exists():
        args.append(f"-dict={HERE / f'{name}.dict'}")
    if not any(arg.startswith("-artifact_prefix=") for arg in args):
        (HERE / "findings").mkdir(exist_ok=True)
        args.append(f"-artifact_prefix={HERE / 'findings' / name}-")
    if not any(arg.startswith("-timeout=") for arg in args):
        args.append("-timeout=60")  # an input that runs this long (seconds) is a hang
    if not any(not arg.startswith("-") for arg in args):
        work = HERE / ".corpus" / name
        work.mkdir(parents=True, exist_ok=True)
        args += [str(work), str(HERE / "corpus" / name)]
    atheris.Setup([sys.argv[0], *args], target.check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
