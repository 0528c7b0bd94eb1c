"""The configuration and attestation service (CAS): sessions, key release, volume tags.

The only place where trust decisions are made. Must never store a key or a
secret in plaintext nor release one to an unattested caller (docs/cas.md).
"""
