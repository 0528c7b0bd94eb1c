"""iExec post-compute inside the runtime: the app's ``computed.json`` sealed for its task.

After an iExec task's program exits 0, and before its output is sealed into a
volume, the runtime reads ``computed.json`` from ``IEXEC_OUT`` (a volume the
task's image mounts), computes the result digest as iExec's PoCo contracts do
and signs it with the task's enclave challenge key, which the CAS released to
this runtime only (the program never sees it: it is not in its environment or
files). The filled ``computed.json`` goes back into the same folder, so it is
sealed, tagged and receipted with the rest of the output. A program that wrote
no valid ``computed.json`` fails the task, as iExec's worker does. Must never
put the key anywhere but the signing call.
"""

from __future__ import annotations

from collections.abc import Callable

from tdapp.attest.release import IexecGrant
from tdapp.core.atomic import write_atomically
from tdapp.errors import ProgramFailedError, TdappError
from tdapp.iexec.computed import FILE_NAME, read_computed_json, seal_computed
from tdapp.iexec.digest import EnclaveChallenge
from tdapp.runtime.sandbox import Mount

ZERO_WORKER = "0x" + "00" * 20


def seal_iexec_result(grant: IexecGrant, mounts: list[Mount], worker: str,
                      log: Callable[[str], None]) -> None:
    """Fill ``computed.json`` of the task in the host folder mounted at ``grant.output``."""
    mount = next((m for m in mounts if m.target == grant.output and m.writable), None)
    if mount is None:
        raise ProgramFailedError(f"the iExec task's IEXEC_OUT {grant.output} is not a "
                                 "writable volume of this run")
    folder = mount.source
    try:
        computed = read_computed_json(folder / FILE_NAME)
        sealed = seal_computed(computed, iexec_out=folder, task_id=grant.task_id,
                               worker=worker,
                               challenge=EnclaveChallenge.from_hex(
                                   grant.challenge.get_secret_value()))
    except TdappError as error:
        raise ProgramFailedError(f"iExec post-compute: {error.message}") from None
    write_atomically(folder / FILE_NAME, sealed.to_json(), permissions=0o644)
    log(f"iExec task {grant.task_id}: result digest {sealed.result_digest}, enclave "
        f"signature for worker {worker}")


def worker_address(text: str | None) -> str:
    """The worker's address for the result seal (the zero address when none is given)."""
    from tdapp.iexec.digest import checksum_address, parse_address

    return ZERO_WORKER if not text else checksum_address(parse_address(text))
