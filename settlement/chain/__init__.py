"""The chain edge of settlement: RPC wrapper, contract calldata, deployment, transaction manager.

``decisions`` is pure (what to do next for a persisted transaction); ``rpc`` is the
one place web3.py is called; ``txmanager`` is the crash-safe shell around both.
"""
