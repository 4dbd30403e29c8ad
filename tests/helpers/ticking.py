"""Proof that an await left the event loop free: a task that ticks every
10 ms for as long as the block runs.

    async with ticking() as ticks:
        await something()
    assert ticks            # a loop blocked throughout would never have ticked
"""
import asyncio
import contextlib


@contextlib.asynccontextmanager
async def ticking(every=0.01):
    ticks = []
    stop = asyncio.Event()

    async def ticker():
        while not stop.is_set():
            ticks.append(1)
            await asyncio.sleep(every)
    task = asyncio.ensure_future(ticker())
    try:
        yield ticks
    finally:
        stop.set()
        await task
