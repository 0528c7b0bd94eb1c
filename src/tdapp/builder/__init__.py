"""Measured images: build, measure, list, export and import.

Must never let a measurement depend on timestamps, paths or file order. Not yet built.
"""
