from openledger.local.toolchain import godebug_line, staging_replaces

GOMOD = """module k8s.io/kubernetes

go 1.25.0

godebug default=go1.25

require (
	k8s.io/api v0.0.0
	github.com/x/y v1.2.3
)

replace (
	k8s.io/api => ./staging/src/k8s.io/api
	k8s.io/client-go => ./staging/src/k8s.io/client-go
	github.com/x/y => github.com/x/y v1.2.4
)
"""


def test_every_staging_module_is_pinned_to_the_matching_minor_version() -> None:
    assert staging_replaces(GOMOD, "v0.36.3") == [
        "replace k8s.io/api => k8s.io/api v0.36.3",
        "replace k8s.io/client-go => k8s.io/client-go v0.36.3",
    ]


def test_godebug_line_is_copied() -> None:
    assert godebug_line(GOMOD) == "godebug default=go1.25"
    assert godebug_line("module x\n") == ""
