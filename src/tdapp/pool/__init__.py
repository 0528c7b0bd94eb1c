"""The worker pool: tdapp runs queued on Celery (Redis broker) for workers on many hosts.

Owns the task message (:mod:`tdapp.pool.messages`, JSON only, no key or secret),
the Celery application's configuration (:mod:`tdapp.pool.app`: late
acknowledgement, redelivery when a worker dies, no pickle), the task a worker
runs (:mod:`tdapp.pool.tasks`) and what a submitter does
(:mod:`tdapp.pool.client`). The broker and the result store are untrusted: the
CAS decides every run, a redelivered task reports its first run instead of
running twice, and nothing here may put a key, a secret or plaintext into a
message (docs/pool.md).
"""
