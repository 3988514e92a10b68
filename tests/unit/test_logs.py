import json
import logging

from openledger.logs import JsonFormatter


def test_structured_fields_are_keys_and_secrets_are_redacted() -> None:
    record = logging.LogRecord("openledger.x", logging.INFO, __file__, 1, "issued key", None, None)
    record.action = "agent.credentials"
    record.api_key = "olk_live_secret"
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "issued key"
    assert line["action"] == "agent.credentials"
    assert line["api_key"] == "[redacted]"
    assert "olk_live_secret" not in json.dumps(line)
