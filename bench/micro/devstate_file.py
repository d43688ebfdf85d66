#!/usr/bin/env python3
# Micro-benchmark: where QEMU saves a checkpoint's device state.
# Starts one idle TCG QEMU (256 MiB, a virtio-net NIC, device-only state
# settings), then 300 times each, alternating places, two rounds:
# `stop`, `xen-save-devices-state` into a file on the disk file system
# (DIR, default /var/tmp) and on tmpfs (/dev/shm), `cont`; prints p50 and
# p99 of the save. Then the backup's write + rename of 80 KB in each.
# Needs qemu-system-x86_64; removes what it made. Do not run beside a QEMU
# test suite (2-core machines).
#
#   python3 bench/micro/devstate_file.py [DIR]
import json, os, socket, subprocess, sys, tempfile, time
d = tempfile.mkdtemp(dir="/dev/shm")  # tmpfs
qmp = os.path.join(d, "qmp.sock")
p = subprocess.Popen(["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-nodefaults",
    "-display", "none", "-m", "256", "-qmp", f"unix:{qmp},server=on,wait=off",
    "-global", "migration.send-configuration=off",
    "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,romfile=",
    "-serial", "null"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
for _ in range(100):
    if os.path.exists(qmp): break
    time.sleep(0.05)
s = socket.socket(socket.AF_UNIX); s.connect(qmp); f = s.makefile("rw")
def rd():
    while True:
        m = json.loads(f.readline())
        if "event" not in m: return m
rd(); 
def cmd(c, a=None):
    f.write(json.dumps({"execute": c, **({"arguments": a} if a else {})}) + "\n"); f.flush(); return rd()
cmd("qmp_capabilities")
time.sleep(1)
def bench(target, n=300):
    ts = []
    for i in range(n):
        cmd("stop")
        t = time.perf_counter()
        r = cmd("xen-save-devices-state", {"filename": target, "live": False})
        ts.append((time.perf_counter() - t) * 1e3)
        assert "return" in r, r
        cmd("cont")
    ts.sort(); return ts[len(ts)//2], ts[int(len(ts)*0.99)], os.path.getsize(target)
ext = tempfile.mkdtemp(dir=sys.argv[1] if len(sys.argv) > 1 else "/var/tmp")
for rnd in range(2):
    for name, target in [("disk", os.path.join(ext, "dev.out")), ("tmpfs", os.path.join(d, "dev.out"))]:
        print(rnd, name, "save p50 %.3f p99 %.3f ms, %d bytes" % bench(target))
# the backup's write + rename
data = os.urandom(80000)
for name, base in [("disk", ext), ("tmpfs", d)]:
    ts = []
    for i in range(300):
        t = time.perf_counter()
        with open(os.path.join(base, "dev.tmp"), "wb") as g: g.write(data)
        os.rename(os.path.join(base, "dev.tmp"), os.path.join(base, "dev.committed"))
        ts.append((time.perf_counter() - t) * 1e3)
    ts.sort(); print(name, "write+rename p50 %.3f p99 %.3f ms" % (ts[150], ts[297]))
cmd("quit"); p.wait()
import shutil; shutil.rmtree(d); shutil.rmtree(ext)
