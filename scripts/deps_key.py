"""Print a short hash of the project's dependency lists: the cached virtualenv's key."""

import hashlib
import json
import sys
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
key = json.dumps([sys.version_info[:2], project["dependencies"], project["optional-dependencies"]])
print(hashlib.sha256(key.encode()).hexdigest()[:12])
