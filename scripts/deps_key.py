"""Print a short hash of the project's dependency lists: the cached virtualenv's key.

``--no-deps`` prints instead the requirements installed with ``pip install --no-deps``
(``[tool.openledger] no-deps``), which are part of the key too.
"""

import hashlib
import json
import sys
import tomllib

with open("pyproject.toml", "rb") as f:
    pyproject = tomllib.load(f)
project = pyproject["project"]
no_deps = pyproject.get("tool", {}).get("openledger", {}).get("no-deps", [])
if sys.argv[1:] == ["--no-deps"]:
    print(" ".join(no_deps))
    sys.exit(0)
key = json.dumps([sys.version_info[:2], project["dependencies"], project["optional-dependencies"], no_deps])
print(hashlib.sha256(key.encode()).hexdigest()[:12])
