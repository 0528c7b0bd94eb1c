"""Attestation evidence: producing it (LAS, TEE attesters) and verifying it (policies).

Must never report evidence as verified unless its whole chain was checked.
Not yet built: see the project's open issues.
"""
