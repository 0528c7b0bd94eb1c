"""The three-party DApp: reports what the CAS released to it, inside its encrypted output.

It reads the imported dataset (/dataset), the secrets the CAS filled into its
environment (APP_KEY, REQUESTER_TOKEN) and the certificate it injected
(/etc/app/cert.pem), and writes result.txt to the output volume: the dataset's
files, the SHA-256 of each secret, whether the certificate parses, and whether
the dataset could be written to (it is imported, so it must not be). It never
prints a secret: stdout and stderr reach the host. The secrets' values go only
into the encrypted output (secrets.txt), so that the test can look for them
everywhere else.
"""

import base64
import hashlib
import os
import sys
import time

OUTPUT = "/encryptedOutputs"
DATASET = "/dataset"
CERTIFICATE = "/etc/app/cert.pem"


def _der_length(data: bytes, at: int) -> tuple[int, int]:
    """The length of the DER element whose length octets start at ``at``, and where it starts."""
    first = data[at]
    if first < 0x80:
        return first, at + 1
    count = first & 0x7F
    return int.from_bytes(data[at + 1:at + 1 + count], "big"), at + 1 + count


def certificate_loads(text: str) -> bool:
    """Whether ``text`` is one PEM certificate whose DER is a well-formed outer SEQUENCE
    holding the to-be-signed SEQUENCE (the image has no TLS library to do more)."""
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    if text.count(begin) != 1 or end not in text:
        return False
    body = text.split(begin, 1)[1].split(end, 1)[0]
    try:
        der = base64.b64decode("".join(body.split()), validate=True)
    except ValueError:
        return False
    if len(der) < 4 or der[0] != 0x30:
        return False
    length, start = _der_length(der, 1)
    return start + length == len(der) and der[start] == 0x30


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def main() -> int:
    lines = []
    for name in sorted(os.listdir(DATASET)):
        with open(os.path.join(DATASET, name), encoding="utf-8") as data:
            lines.append(f"dataset {name}: {data.read().strip()}")
    app_key = os.environ.get("APP_KEY", "")
    token = os.environ.get("REQUESTER_TOKEN", "")
    lines.append(f"app_key sha256 {sha256(app_key)} length {len(app_key)}")
    lines.append(f"requester_token sha256 {sha256(token)} length {len(token)}")
    try:
        with open(CERTIFICATE, encoding="ascii") as pem:
            loads = certificate_loads(pem.read())
    except OSError:
        loads = False
    lines.append(f"certificate loads: {'yes' if loads else 'no'}")
    try:
        with open(os.path.join(DATASET, "x"), "w") as written:
            written.write("changed by the application")
        lines.append("dataset write: allowed")
    except OSError as error:
        lines.append(f"dataset write: refused ({error.strerror})")
    with open(os.path.join(OUTPUT, "result.txt"), "w", encoding="utf-8") as result:
        result.write("\n".join(lines) + "\n")
    # In clear, but only inside the encrypted output: how a test learns the values.
    with open(os.path.join(OUTPUT, "secrets.txt"), "w", encoding="utf-8") as clear:
        clear.write(f"APP_KEY={app_key}\nREQUESTER_TOKEN={token}\n")
    with open(CERTIFICATE, encoding="ascii") as pem, \
            open(os.path.join(OUTPUT, "cert.pem"), "w", encoding="ascii") as copy:
        copy.write(pem.read())  # public: the requester can check what the CAS issued
    time.sleep(float(os.environ.get("APP_SLEEP", "0")))  # lets a test watch the run
    print(f"three_parties: wrote result.txt ({len(lines)} lines)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
