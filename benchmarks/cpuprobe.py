"""CPU per sequential no-op call: python benchmarks/cpuprobe.py EXECUTORS [extra node flags]. Prints p50, CPU us/call per process."""
import os, sys, time, subprocess, socket, statistics
import droplet
def cpu(pid):
    tot=0
    for t in os.listdir(f"/proc/{pid}/task"):
        f=open(f"/proc/{pid}/task/{t}/stat").read().rsplit(")",1)[1].split()
        tot+=int(f[11])+int(f[12])
    return tot/os.sysconf("SC_CLK_TCK")
def allcpu(pids):
    return sum(cpu(p) for p in pids)
s_=socket.socket(); s_.bind(("127.0.0.1",0)); port=s_.getsockname()[1]; s_.close()
p=subprocess.Popen([sys.executable,"-m","droplet.node","--listen",f"tcp://127.0.0.1:{port}","--executors",sys.argv[1] if len(sys.argv)>1 else "1","--data-dir",":memory:"]+sys.argv[2:],stderr=subprocess.DEVNULL)
for _ in range(300):  # wait (up to 30 s) until the node accepts connections
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        break
    except OSError:
        time.sleep(0.1)
time.sleep(0.5)
conn=droplet.DropletConnection(f"tcp://127.0.0.1:{port}")
f=conn.register(lambda lib, x: x, "noop")
for i in range(300): f(1).get()
def desc(pid):
    out=[pid]
    for k in subprocess.run(["pgrep","-P",str(pid)],capture_output=True,text=True).stdout.split():
        out+=desc(int(k))
    return out
pids=desc(p.pid)
N=3000
cpu0={q:cpu(q) for q in pids}; c0=allcpu(pids); m0=time.process_time(); t0=time.perf_counter()
lat=[]
for i in range(N):
    a=time.perf_counter(); f(1).get(); lat.append(time.perf_counter()-a)
t1=time.perf_counter(); cpu1={q:cpu(q) for q in pids}; c1=allcpu(pids); m1=time.process_time()
print(f"p50 {statistics.median(lat)*1e3:.3f} ms; node cpu/call {(c1-c0)/N*1e6:.0f} us; client cpu/call {(m1-m0)/N*1e6:.0f} us; wall/call {(t1-t0)/N*1e6:.0f}")
for pid in pids:
    print(pid, (cpu1[pid]-cpu0[pid])/N*1e6, "us/call",  open(f"/proc/{pid}/cmdline").read().replace("\0"," ")[:100])
conn.close(); p.terminate(); p.wait()
