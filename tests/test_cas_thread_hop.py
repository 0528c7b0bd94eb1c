"""The CAS's thread hop: results and exceptions come back unchanged, each call runs once,
a cancelled caller leaves the loop healthy, and a forked process gets its own threads."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from tdapp.cas.thread_hop import ThreadHop


def test_results_and_exceptions_come_back_and_each_call_runs_once() -> None:
    hop, ran = ThreadHop(threads=3), []
    lock = threading.Lock()

    def work(number: int) -> int:
        assert threading.current_thread() is not threading.main_thread()
        with lock:
            ran.append(number)
        if number % 7 == 0:
            raise KeyError(number)
        return number * 2

    async def main() -> list[object]:
        return await asyncio.gather(*(hop.run(lambda n=n: work(n)) for n in range(200)),
                                    return_exceptions=True)

    answers = asyncio.run(main())
    assert sorted(ran) == list(range(200))
    for number, answer in enumerate(answers):
        if number % 7 == 0:
            assert isinstance(answer, KeyError) and answer.args == (number,)
        else:
            assert answer == number * 2


def test_a_cancelled_caller_is_not_told_and_the_loop_goes_on() -> None:
    hop, release = ThreadHop(threads=1), threading.Event()

    async def main() -> int:
        slow = asyncio.ensure_future(hop.run(lambda: release.wait(10)))
        await asyncio.sleep(0.05)
        slow.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await slow
        return await hop.run(lambda: 42)  # the one thread is free again

    assert asyncio.run(main()) == 42


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_process_starts_its_own_threads() -> None:
    hop = ThreadHop(threads=2)
    assert asyncio.run(hop.run(lambda: os.getpid())) == os.getpid()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through its exit status
        try:
            code = 0 if asyncio.run(asyncio.wait_for(hop.run(os.getpid), 10)) == os.getpid() \
                else 1
        except BaseException:
            code = 2
        os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
