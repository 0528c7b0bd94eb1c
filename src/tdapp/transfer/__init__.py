"""The transfer service and its client backends (http, s3, file).

Must never expose a partially uploaded object. Not yet built.
"""
