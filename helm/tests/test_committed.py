"""What is committed from the chart is up to date: the default render under helm/rendered/
(so reviewers see what a chart change does) and the README's values table.
Regenerate both with `helm/tests/run.sh --update`."""

import difflib

import update

HINT = "stale; regenerate with helm/tests/run.sh --update and commit the result"


def _diff(path, want: str) -> str:
    have = path.read_text() if path.exists() else ""
    return "".join(difflib.unified_diff(have.splitlines(True), want.splitlines(True),
                                        str(path), "expected", n=2))


def test_committed_default_render_is_current():
    diff = _diff(update.RENDER_FILE, update.expected_render())
    assert not diff, f"{update.RENDER_FILE} is {HINT}:\n{diff[:6000]}"


def test_committed_notes_are_current():
    diff = _diff(update.NOTES_FILE, update.expected_notes())
    assert not diff, f"{update.NOTES_FILE} is {HINT}:\n{diff[:6000]}"


def test_readme_values_table_is_current():
    path = update.readme.readme_path(update.chart.CHART)
    diff = _diff(path, update.expected_readme())
    assert not diff, f"the values table in {path} is {HINT}:\n{diff[:6000]}"
