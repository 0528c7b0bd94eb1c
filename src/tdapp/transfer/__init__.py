"""The transfer service and its client backends (http, s3, file).

Client: :func:`upload` (returns the download URL), :func:`download` and
:func:`delete`, dispatching on the URL scheme to a :class:`Backend`. Service:
:mod:`tdapp.transfer.server` (``tdapp transfer serve``), storing in a folder or
an S3 bucket (:mod:`tdapp.transfer.store`, :mod:`tdapp.transfer.s3store`),
expiring and sweeping (:mod:`tdapp.transfer.sweep`), within a quota and for
holders of an upload token (:mod:`tdapp.transfer.access`). Must never expose a
partially uploaded object, nor leave a partial download at its target.
"""

from tdapp.transfer.client import (
    BACKENDS,
    Backend,
    backend_for,
    check_upload_target,
    delete,
    download,
    upload,
)

__all__ = ["BACKENDS", "Backend", "backend_for", "check_upload_target", "delete", "download",
           "upload"]
