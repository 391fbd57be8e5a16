#!/usr/bin/env python3
# An asyncio workload for ferry's end-to-end tests: its event loop keeps an epoll
# instance and a socket pair (the self-pipe its signal handling writes to), and, as a
# JVM does, a Unix stream socket made and never connected (non-blocking). It holds
# ~8 MiB of patterned bytes, a ticker task appends `tick N` lines to the log (argv[1])
# and another task passes numbers to it through a queue; SIGTERM, delivered through
# the loop's self-pipe, makes it check everything and write PASS or FAIL: <what>.
import asyncio
import os
import signal
import socket
import struct
import sys

SEED = 0xA5EEDF00
PAGES = 2048


def page(p):
    return struct.pack("<QQ", p, SEED) * 256


def spare_fails(spare):
    """What is wrong with the socket never connected: it must still be a non-blocking
    Unix stream socket with no peer, and connect like a fresh one."""
    if (spare.family, spare.type, spare.getblocking()) != (socket.AF_UNIX, socket.SOCK_STREAM, False):
        return ["the spare socket is %r" % spare]
    try:
        spare.getpeername()
        return ["the spare socket has a peer"]
    except OSError:
        pass
    name = "\0ferry-asyncio-%d" % os.getpid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(name)
    listener.listen()
    spare.setblocking(True)
    spare.connect(name)
    conn, _ = listener.accept()
    conn.sendall(b"k")
    return [] if spare.recv(1) == b"k" else ["the spare socket does not connect"]


async def main(path):
    log = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def line(text):
        os.write(log, (text + "\n").encode())

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    big = bytearray(b"".join(page(p) for p in range(PAGES)))
    spare = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    spare.setblocking(False)
    queue = asyncio.Queue()

    async def producer():
        n = 0
        while True:
            n += 1
            await queue.put(n)
            await asyncio.sleep(0.005)

    failure = []

    async def ticker():
        tick, last = 0, 0
        while True:
            tick += 1
            line("tick %d" % tick)
            while not queue.empty():
                n = queue.get_nowait()
                if n != last + 1:
                    failure.append("queue gave %d after %d" % (n, last))
                last = n
            await asyncio.sleep(0.02)

    def died(task):
        # A task that ends other than cancelled is a failure, logged at once.
        if not task.cancelled() and task.exception() is not None:
            line("died: %r" % task.exception())
            failure.append("a task died: %r" % task.exception())

    line("ready")
    tasks = [asyncio.create_task(producer()), asyncio.create_task(ticker())]
    for t in tasks:
        t.add_done_callback(died)
    await stop.wait()
    for t in tasks:
        t.cancel()
    if not failure:
        for p in range(PAGES):
            if big[p * 4096:(p + 1) * 4096] != page(p):
                failure.append("page %d differs" % p)
                break
    if not failure:
        failure += spare_fails(spare)
    line("PASS" if not failure else "FAIL: " + failure[0])
    return 0 if not failure else 1


sys.exit(asyncio.run(main(sys.argv[1])))
