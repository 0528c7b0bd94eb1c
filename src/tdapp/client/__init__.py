"""The user's side of the workflow: encryptedpush, decrypt, sessions, identity.

Must never talk to an unpinned CAS (docs/cli.md).
"""
