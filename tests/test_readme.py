"""The README's set-up commands are the contract with users; CI must run the same line.

The README's and the docs' Python examples run as doctests (``--doctest-glob=*.md``).
"""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_exactly_the_readme_test_command():
    blocks = [b.strip() for b in _bash_blocks((ROOT / "README.md").read_text())]
    test_lines = [b for b in blocks if "pytest" in b]
    assert len(test_lines) == 1 and "\n" not in test_lines[0]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_lines[0] in ci


def test_readme_example_command_runs_the_digits_example():
    blocks = [b.strip() for b in _bash_blocks((ROOT / "README.md").read_text())]
    (example,) = [b for b in blocks if "examples/" in b]
    assert "\n" not in example and (ROOT / "examples" / "digits.py").exists()
    assert 'pip install -e ".[examples]"' in example
