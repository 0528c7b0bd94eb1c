"""tdapp: trusted DApps. Unmodified programs whose data stays encrypted and
tamper-evident outside a trusted execution environment, and which receive their
keys only after remote attestation.

Parts (one sub-package each): ``volume`` (encrypted volumes), ``policy``
(sessions), ``attest`` (evidence and verification), ``cas`` (configuration and
attestation service), ``runtime`` (runs a DApp), ``transfer`` (upload and
download), ``client`` (user-side workflow), ``builder`` (measured images),
``cli`` (the ``tdapp`` command).
"""

__version__ = "0.1.0"
