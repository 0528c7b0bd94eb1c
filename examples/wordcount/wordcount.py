"""Word count, a trusted DApp written in Python.

Reads every file under /encryptedInputs (streaming, so inputs larger than
memory work), counts words (whitespace-separated, case-folded), and writes
/encryptedOutputs/counts.tsv (word<TAB>count, most frequent first) and
/encryptedOutputs/summary.txt. It knows nothing of encryption: tdapp's
runtime decrypts the inputs for it and seals what it writes.
"""

from __future__ import annotations

import collections
import os
import sys

INPUTS = "/encryptedInputs"
OUTPUTS = "/encryptedOutputs"
BLOCK = 1 << 20


def count_file(path: str, counts: collections.Counter[str]) -> int:
    words = 0
    carry = b""
    with open(path, "rb") as handle:
        while block := handle.read(BLOCK):
            block = carry + block
            cut = max(block.rfind(b" "), block.rfind(b"\n"), block.rfind(b"\t"))
            if cut < 0:
                carry = block
                continue
            carry = block[cut + 1:]
            found = block[:cut].decode("utf-8", "replace").casefold().split()
            counts.update(found)
            words += len(found)
    found = carry.decode("utf-8", "replace").casefold().split()
    counts.update(found)
    return words + len(found)


def main() -> int:
    counts: collections.Counter[str] = collections.Counter()
    files = words = 0
    for folder, _, names in os.walk(INPUTS):
        for name in sorted(names):
            words += count_file(os.path.join(folder, name), counts)
            files += 1
    with open(os.path.join(OUTPUTS, "counts.tsv"), "w", encoding="utf-8") as out:
        for word, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
            out.write(f"{word}\t{count}\n")
    with open(os.path.join(OUTPUTS, "summary.txt"), "w", encoding="utf-8") as out:
        out.write(f"files {files}\nwords {words}\ndistinct {len(counts)}\n")
    print(f"wordcount: {words} words in {files} files, {len(counts)} distinct", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
