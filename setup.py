"""Package layout only (everything else is in pyproject.toml): the ``agl`` packages, plus the
repository's top-level ``search_spaces/`` folder shipped inside the wheel as ``agl/search_spaces``
(one copy in git, where users and ``launch/tune.py --space NAME`` look for it)."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["agl*"]) + ["agl.search_spaces"],
      package_dir={"agl.search_spaces": "search_spaces"})
