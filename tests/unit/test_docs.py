"""The docs match the code: every RINGTRAIN_* variable is in env.py's table and in README."""

import re
from pathlib import Path

from ringtrain import env

ROOT = Path(__file__).resolve().parents[2]


def _names_in(paths) -> set[str]:
    found = set()
    for path in paths:
        found |= set(re.findall(r"RINGTRAIN_[A-Z][A-Z_]*[A-Z]", path.read_text()))
    return found


def test_every_variable_the_package_reads_is_in_the_table():
    used = _names_in((ROOT / "ringtrain").rglob("*.py"))
    unknown = used - set(env.VARS) - set(env.INTERNAL)
    assert not unknown, f"add these to ringtrain/env.py: {sorted(unknown)}"


def test_every_variable_tests_scripts_and_benchmarks_use_is_in_the_table():
    folders = ("tests", "scripts", "benchmarks", "examples")
    used = _names_in(
        p for folder in folders for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".sh")
    )
    unknown = used - set(env.VARS) - set(env.INTERNAL)
    assert not unknown, f"add these to ringtrain/env.py: {sorted(unknown)}"


def test_readme_documents_every_variable():
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in env.VARS if name not in readme]
    assert not missing, f"README.md does not mention {missing}"


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./scripts/test.sh" in readme and "./scripts/test.sh" in ci
    assert "./scripts/example.sh" in readme
