"""The README's commands are what CI and users run; keep them in step with the repository."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_has_two_commands_and_ci_runs_the_test_one():
    demo, tests = readme_commands()
    assert demo.endswith("mixtune demo")
    assert tests.endswith("python -m pytest")
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


def test_every_example_file_named_in_the_readme_exists():
    text = (ROOT / "README.md").read_text()
    for path in set(re.findall(r"(examples/[\w./-]+\.yaml)", text)):
        assert (ROOT / path).is_file(), path
