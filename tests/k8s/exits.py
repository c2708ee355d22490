#!/usr/bin/env python3
"""Every process exit on the machine, from the kernel's taskstats (netlink), one JSON line
each, until SIGTERM: bench.sh's measure of a capture step, the same for all four modes.

    python3 exits.py OUT-FILE

Each line: t (when it was read, epoch seconds), pid (the thread's id; the process's for
its main thread), ppid (the parent process), comm, pcomm (the parent's comm, read then:
the parent is still alive when a child's exit is read, a runtime or a shim), etime_us
(since the thread started), cpu_ns (user and system time, exact: the scheduler's), rss_kb
(the process's high-water resident set). A multi-threaded process gives one line per
thread; all carry its ppid and the process's rss. Prints "ready" once registered.
"""

import json
import os
import signal
import socket
import struct
import sys
import time

NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
TASKSTATS_CMD_GET = 1
TASKSTATS_CMD_ATTR_REGISTER_CPUMASK = 3
TASKSTATS_TYPE_STATS = 3
TASKSTATS_TYPE_AGGR_PID = 4
NLM_F_REQUEST = 1
NLMSG_ERROR = 2

# struct taskstats (linux/taskstats.h), the fields read here: append-only since version 1.
OFF_VERSION = 0
OFF_CPU_RUN = 72  # cpu_run_virtual_total: the scheduler's sum_exec_runtime, ns
OFF_COMM = 80
OFF_PID = 128
OFF_PPID = 132
OFF_ETIME = 144  # us
OFF_HIWATER_RSS = 200  # KB


def attrs(buf):
    while len(buf) >= 4:
        length, kind = struct.unpack_from("HH", buf)
        if length < 4:
            return
        yield kind & 0x3FFF, buf[4:length]
        buf = buf[(length + 3) & ~3 :]


def attr(kind, payload):
    raw = struct.pack("HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def request(sock, family, cmd, payload):
    genl = struct.pack("BBH", cmd, 1, 0)
    body = genl + payload
    sock.send(struct.pack("IHHII", 16 + len(body), family, NLM_F_REQUEST, 1, 0) + body)


def family_id(sock):
    request(sock, GENL_ID_CTRL, CTRL_CMD_GETFAMILY, attr(CTRL_ATTR_FAMILY_NAME, b"TASKSTATS\0"))
    data = sock.recv(65536)
    _, kind, _, _, _ = struct.unpack_from("IHHII", data)
    if kind == NLMSG_ERROR:
        sys.exit("exits.py: no TASKSTATS netlink family (CONFIG_TASKSTATS)")
    for k, value in attrs(data[20:]):
        if k == CTRL_ATTR_FAMILY_ID:
            return struct.unpack_from("H", value)[0]
    sys.exit("exits.py: TASKSTATS has no family id")


def comm_of(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def main():
    out = open(sys.argv[1], "w", buffering=1)
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind((0, 0))
    family = family_id(sock)
    cpus = f"0-{os.cpu_count() - 1}".encode() + b"\0"
    request(sock, family, TASKSTATS_CMD_GET, attr(TASKSTATS_CMD_ATTR_REGISTER_CPUMASK, cpus))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    dropped = 0
    while True:
        try:
            data = sock.recv(1 << 20)
        except OSError:  # ENOBUFS: exits came faster than they were read
            dropped += 1
            out.write(json.dumps({"dropped": dropped}) + "\n")
            continue
        now = time.time()
        while len(data) >= 16:
            length, kind = struct.unpack_from("IH", data)
            message, data = data[:length], data[(length + 3) & ~3 :]
            if kind == NLMSG_ERROR or length < 20:
                continue
            for k, nested in attrs(message[20:]):
                if k != TASKSTATS_TYPE_AGGR_PID:
                    continue
                for k2, stats in attrs(nested):
                    if k2 != TASKSTATS_TYPE_STATS or len(stats) < OFF_HIWATER_RSS + 8:
                        continue
                    pid, ppid = struct.unpack_from("II", stats, OFF_PID)
                    out.write(json.dumps({
                        "t": now,
                        "pid": pid,
                        "ppid": ppid,
                        "comm": stats[OFF_COMM:OFF_COMM + 32].split(b"\0")[0].decode(errors="replace"),
                        "pcomm": comm_of(ppid),
                        "etime_us": struct.unpack_from("Q", stats, OFF_ETIME)[0],
                        "cpu_ns": struct.unpack_from("Q", stats, OFF_CPU_RUN)[0],
                        "rss_kb": struct.unpack_from("Q", stats, OFF_HIWATER_RSS)[0],
                    }) + "\n")


if __name__ == "__main__":
    main()
