"""``Reject``: the one way a request ends early, answered in its protocol's shape (``protocols.py``)."""

from __future__ import annotations

from openledger.gateway.records import AgentConfig


class Reject(Exception):
    """Answer the client now with an error in its protocol's shape."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        retry_after_s: float | None = None,
        param: str | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s
        self.param = param
        self.headers = headers
        self.agent = "-"  # metric labels of the request it ended
        self.model = "-"


class AdmissionUnknown(Reject):
    """Redis failed during admission: a slot and a reservation may or may not be held."""


def tag(rej: Reject, agent: AgentConfig, model_ref: str) -> Reject:
    """Label a rejection with its Agent and Model for the request counter."""
    rej.agent = agent.ref
    rej.model = model_ref
    return rej
