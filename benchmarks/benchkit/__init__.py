"""Shared pieces of the tdapp benchmarks; each module owns one concern.

units        sizes (KiB, MiB, GiB, MB) and how to print them.
processes    the stderr progress log, deadlines, commands and pipelines, foreground FUSE
             mounts (ForegroundMount), FUSE unmount.
filesystems  the mount table, FileSystem, free space, choosing tmpfs and disk, page-cache drop.
trees        Workload, making, copying, comparing and deleting trees of files.
peers        the Tool protocol and the peers tdapp is set against: PlainCopy, Gocryptfs, Age.
harness      the measuring loop: each tool's write then read, per workload and file system.
report       Result, ratios, targets (Check), the rich tables and the last-line JSON summary.
"""
