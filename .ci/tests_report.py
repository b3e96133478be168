"""What CI's pytest runs did, from their JUnit XML files (artifacts/junit/*.xml).

    declared JUNIT...                  fail if a test skipped on a failed import instead of declaring what it needs
    once --deselected FILE JUNIT...    fail unless every test ran in exactly one of the runs (FILE: what the full
                                       stage's --stage deselected, i.e. the core stage's tests); print the counts
    summary --times TSV JUNIT...       the wall time of every stage, the tests per run and the slowest tests

A test "ran" in a run unless it was skipped there for a backend it needs: a skip that names a backend's install line
("needs the X backend: pip install ...", helpers/backends.py, or any "pip install -e plugins/..."), since CI's full
stage has every backend. A test skipped for another reason (no GPU, run as root) ran: that is its outcome here, and
`once` lists every test that was skipped wherever it ran, with the reason.
"""

from __future__ import annotations

import argparse
import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

BACKEND_SKIP = re.compile(r"needs the \w+ backend: pip install|pip install -e plugins/")
IMPORT_SKIP = re.compile(r"could not import|No module named")
SLOWEST = 30


@dataclass(frozen=True)
class Case:
    run: str  #: the JUnit file's name without .xml
    test: str  #: "dotted.module[.Class]::name[params]", as JUnit names it
    outcome: str  #: passed, failed, error or skipped
    seconds: float
    message: str  #: the skip, failure or error message


def read_cases(path: Path) -> list[Case]:
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                outcome = {"failure": "failed"}.get(kind, kind)
                message = found.get("message", "") or (found.text or "")
                break
        name = f"{case.get('classname')}::{case.get('name')}" if case.get("classname") else case.get("name")
        cases.append(Case(path.stem, name, outcome, float(case.get("time") or 0), message))
    return cases


def junit_name(nodeid: str) -> str:
    """A pytest node id as JUnit XML names the test (pytest's junitxml mangle_test_address)."""
    path, bracket, params = nodeid.partition("[")
    names = path.split("::")
    names[0] = re.sub(r"\.py$", "", names[0].replace("/", "."))
    names[-1] += bracket + params
    return ".".join(names[:-1]) + "::" + names[-1]


def ran(case: Case) -> bool:
    return case.test.count("::") > 0 and not (case.outcome == "skipped" and BACKEND_SKIP.search(case.message))


def declared(files: list[Path]) -> int:
    undeclared = [c for f in files for c in read_cases(f) if c.outcome == "skipped" and IMPORT_SKIP.search(c.message)]
    for case in undeclared:
        print(f"   {case.test}: skipped on a failed import ({case.message.strip()})")
    if undeclared:
        print(
            f"{len(undeclared)} test(s) do not say what they need: mark them @pytest.mark.backends(...) (conftest.py),"
            " so they skip naming the install line and run in the stage that has it"
        )
        return 1
    print("   every skipped test declared what it needs")
    return 0


def once(deselected: Path, files: list[Path]) -> int:
    cases = [c for f in files for c in read_cases(f)]
    runs: dict[str, list[Case]] = {}
    for case in cases:
        if ran(case):
            runs.setdefault(case.test, []).append(case)
    universe = set(runs) | {c.test for c in cases if c.test.count("::")}
    universe |= {junit_name(line.strip()) for line in deselected.read_text().splitlines() if line.strip()}
    never = sorted(t for t in universe if t not in runs)
    twice = sorted(t for t, where in runs.items() if len(where) > 1)
    counts = Counter(where[0].run for where in runs.values())
    width = max(map(len, counts), default=0)
    verdict = "each ran in exactly one of these runs" if not never and not twice else "NOT each ran exactly once"
    print(f"   {len(universe)} tests, {verdict}; the tests each run ran:")
    for name in (f.stem for f in files):
        print(f"   {name:<{width}}  {counts[name]:>4}")
    for test in never:
        print(f"   NEVER RAN: {test} (skipped for a backend everywhere, or deselected by both stages)")
    for test in twice:
        print(f"   RAN TWICE: {test} in {', '.join(c.run for c in runs[test])}")
    for test, where in sorted(runs.items()):
        if all(c.outcome == "skipped" for c in where):
            print(f"   skipped wherever it ran: {test} ({where[0].message.strip()})")
    return 1 if never or twice else 0


def summary(times: Path, files: list[Path]) -> int:
    print("== CI stages (wall time)")
    total = 0
    for line in times.read_text().splitlines() if times.exists() else []:
        name, seconds, status = line.split("\t")
        total += int(seconds)
        print(f"   {name:<60} {int(seconds) // 60:>3} min {int(seconds) % 60:>2} s  {status}")
    print(f"   {'total':<60} {total // 60:>3} min {total % 60:>2} s")
    cases = [c for f in files if f.exists() for c in read_cases(f)]
    print("== tests per pytest run (passed / failed / errors / skipped, seconds of test time)")
    for name in dict.fromkeys(c.run for c in cases):
        outcomes = Counter(c.outcome for c in cases if c.run == name)
        seconds = sum(c.seconds for c in cases if c.run == name)
        print(
            f"   {name:<24} {outcomes['passed']:>4} / {outcomes['failed']:>3} / {outcomes['error']:>3} / "
            f"{outcomes['skipped']:>4}  {seconds:8.1f} s"
        )
    print(f"== the {SLOWEST} slowest tests (setup + call + teardown, all runs)")
    for case in sorted(cases, key=lambda c: c.seconds, reverse=True)[:SLOWEST]:
        print(f"   {case.seconds:7.1f} s  {case.run:<20} {case.test}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("declared").add_argument("junit", nargs="+", type=Path)
    check = commands.add_parser("once")
    check.add_argument("--deselected", type=Path, required=True)
    check.add_argument("junit", nargs="+", type=Path)
    report = commands.add_parser("summary")
    report.add_argument("--times", type=Path, required=True)
    report.add_argument("junit", nargs="*", type=Path)
    args = parser.parse_args()
    if args.command == "declared":
        return declared(args.junit)
    if args.command == "once":
        return once(args.deselected, args.junit)
    return summary(args.times, args.junit)


if __name__ == "__main__":
    sys.exit(main())
