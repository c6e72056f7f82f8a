"""The documentation that is generated from code is current, and the README's commands are the ones CI runs."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_flag_reference_is_current():
    proc = subprocess.run([sys.executable, str(REPO / "applications" / "flag_reference.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    blocks = readme.split("```")
    test_command = next(b for b in blocks[1::2] if "pytest" in b).strip().splitlines()[-1].strip()
    assert test_command in ci, f"README test command {test_command!r} is not what .ci/run runs"
