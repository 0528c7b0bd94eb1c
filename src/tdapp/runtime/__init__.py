"""The runtime: fetch volumes, attest, run the program sandboxed, seal and report outputs.

Must never let the host change the program's command or environment, nor write
plaintext outside memory (docs/runtime.md).
"""
