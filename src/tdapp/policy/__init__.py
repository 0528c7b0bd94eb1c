"""Sessions (security policies): parsing, templates, normalization and hashing.

Owns the session language. Must never accept a key it does not understand or
silently drop a value. Not yet built: see the project's open issues.
"""
