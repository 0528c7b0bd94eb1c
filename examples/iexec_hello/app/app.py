"""An iExec-style application: reads IEXEC_IN, writes its result and computed.json to IEXEC_OUT.

As any iExec app: it knows its task from IEXEC_TASK_ID, reads the input files
the requester gave (IEXEC_INPUT_FILE_NAME_n in IEXEC_IN), writes result.txt to
IEXEC_OUT and declares it in computed.json (deterministic-output-path). The
runtime then fills computed.json's task-id, result-digest and
enclave-signature. It also writes env.txt: the names of the environment
variables it was given, so a test can check that no key reached it.
"""

import json
import os

iexec_in, iexec_out = os.environ["IEXEC_IN"], os.environ["IEXEC_OUT"]
count = int(os.environ.get("IEXEC_INPUT_FILES_NUMBER", "0"))
names = [os.environ[f"IEXEC_INPUT_FILE_NAME_{n}"] for n in range(1, count + 1)]
lines = [f"task {os.environ['IEXEC_TASK_ID']}"]
for name in names:
    with open(os.path.join(iexec_in, name), encoding="utf-8") as handle:
        words = handle.read().split()
    lines.append(f"{name}: {len(words)} words")
with open(os.path.join(iexec_out, "result.txt"), "w", encoding="utf-8") as out:
    out.write("\n".join(lines) + "\n")
with open(os.path.join(iexec_out, "env.txt"), "w", encoding="utf-8") as out:
    out.write("\n".join(f"{key}={value}" for key, value in sorted(os.environ.items())) + "\n")
with open(os.path.join(iexec_out, "computed.json"), "w", encoding="utf-8") as out:
    json.dump({"deterministic-output-path": "/iexec_out/result.txt"}, out)
