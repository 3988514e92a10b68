"""Print a short hash of the project's dependency lists: the cached virtualenv's key."""

import hashlib
import json
import sys
import tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
key = json.dumps([sys.version_info[:2], project["dependencies"], project["optional-dependencies"]])
print(hashlib.sha256(key.encode()).hexdigest()[:12])
