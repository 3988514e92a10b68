"""The one boundary to the chain: web3.py calls with timeouts, errors translated.

Every failure to talk to the node (connection refused, timeout, HTTP error, an
RPC error the caller did not expect) becomes ``ChainUnavailable`` and is counted
in ``openledger_settlement_chain_errors_total{operation}``. The RPC URL may hold
credentials, so it is never put into a message or a log line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from web3 import Web3
from web3.exceptions import ContractLogicError, TransactionNotFound, Web3RPCError

from openledger.settlement.chain.decisions import Receipt
from openledger.settlement.errors import ChainUnavailable, ContractReverted
from openledger.settlement.metrics import CHAIN_ERRORS

T = TypeVar("T")
RPC_TIMEOUT_S = 5.0


def make_web3(rpc_url: str, timeout_s: float = RPC_TIMEOUT_S) -> Web3:
    """A Web3 with a bounded request timeout and no hidden retries (we retry by design)."""
    provider = Web3.HTTPProvider(
        rpc_url,
        request_kwargs={"timeout": timeout_s},
        exception_retry_configuration=None,
    )
    return Web3(provider)


def _hex(value: Any) -> str:
    text = value.hex() if hasattr(value, "hex") else str(value)
    return text if text.startswith("0x") else "0x" + text


class Chain:
    """Thin, typed wrapper over the JSON-RPC calls the settlement path needs."""

    def __init__(self, w3: Web3) -> None:
        self.w3 = w3

    def _call(self, operation: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (TransactionNotFound, ChainUnavailable):
            raise
        except ContractLogicError as exc:
            raise ContractReverted(f"{operation} reverted: {str(exc)[:200]}") from None
        except Web3RPCError as exc:  # the node's own reply: it carries no URL
            CHAIN_ERRORS.labels(operation).inc()
            raise ChainUnavailable(f"chain RPC {operation} failed: {str(exc)[:200]}") from None
        except Exception as exc:  # noqa: BLE001 - every node failure is translated here, once
            CHAIN_ERRORS.labels(operation).inc()
            # Transport errors quote the URL (which may embed an API key): only the type is kept.
            raise ChainUnavailable(f"chain RPC {operation} failed: {type(exc).__name__}") from None

    def chain_id(self) -> int:
        return int(self._call("chain_id", lambda: self.w3.eth.chain_id))

    def head(self) -> int:
        return int(self._call("block_number", lambda: self.w3.eth.block_number))

    def nonce(self, address: str, block: str = "latest") -> int:
        checksum = Web3.to_checksum_address(address)
        return int(self._call("get_transaction_count", lambda: self.w3.eth.get_transaction_count(checksum, block)))  # type: ignore[arg-type]

    def next_base_fee(self) -> int:
        """The base fee of the next block (last entry of eth_feeHistory)."""
        history = self._call("fee_history", lambda: self.w3.eth.fee_history(1, "latest", []))
        return int(history["baseFeePerGas"][-1])

    def receipt(self, tx_hash: str) -> Receipt | None:
        try:
            raw = self._call("get_receipt", lambda: self.w3.eth.get_transaction_receipt(tx_hash))  # type: ignore[arg-type]
        except TransactionNotFound:
            return None
        if raw is None or raw.get("blockNumber") is None:
            return None
        return Receipt(
            tx_hash=tx_hash,
            block_number=int(raw["blockNumber"]),
            block_hash=_hex(raw["blockHash"]),
            status=int(raw["status"]),
            gas_used=int(raw.get("gasUsed", 0)),
            effective_gas_price=int(raw.get("effectiveGasPrice", 0)),
        )

    def in_pool(self, tx_hash: str) -> bool:
        try:
            tx = self._call("get_transaction", lambda: self.w3.eth.get_transaction(tx_hash))  # type: ignore[arg-type]
        except TransactionNotFound:
            return False
        return tx is not None and tx.get("blockNumber") is None

    def send_raw(self, raw: bytes) -> str:
        """Broadcast; a node that already has it (or mined its nonce) is not an error here."""
        try:
            return _hex(self.w3.eth.send_raw_transaction(raw))
        except Web3RPCError as exc:
            message = str(exc).lower()
            benign = (
                "already known",
                "nonce too low",
                "already imported",
                "known transaction",
                "replacement transaction underpriced",
            )
            if any(text in message for text in benign):
                return _hex(Web3.keccak(raw))
            CHAIN_ERRORS.labels("send_raw_transaction").inc()
            raise ChainUnavailable(f"chain RPC send_raw_transaction rejected: {str(exc)[:200]}") from None
        except Exception as exc:  # noqa: BLE001
            CHAIN_ERRORS.labels("send_raw_transaction").inc()
            raise ChainUnavailable(f"chain RPC send_raw_transaction failed: {type(exc).__name__}") from None

    def call(self, operation: str, fn: Callable[[], T]) -> T:
        """Run a contract read (``contract.functions.x().call()``) under the same translation."""
        return self._call(operation, fn)

    def rpc(self, method: str, params: list[Any]) -> Any:
        """A raw JSON-RPC request (anvil test methods, debugging)."""
        reply = self._call(method, lambda: self.w3.provider.make_request(method, params))  # type: ignore[arg-type]
        if "error" in reply:
            raise ChainUnavailable(f"chain RPC {method} failed: {reply['error']}")
        return reply.get("result")


__all__ = ["RPC_TIMEOUT_S", "Chain", "make_web3"]
