"""pytest set-up for the doctests in docs/*.md (the repository's conftest.py applies too).

The build helpers in _build_support/ import mkdocs and griffe, which only the docs
extra installs; they are not tests.
"""

collect_ignore = ["_build_support"]
