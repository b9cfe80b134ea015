"""Round-trip latency of one connection through the TLS frontend, two builds interleaved.

A stopgap beside proxy-bench, whose client speaks plain TCP only: 64-byte echoes every 0.5 ms
over one tunnel (`https` proxy, CONNECT, then the echoes), p50 and p99 per round. Python's own
time per round trip is in both columns alike.

    target/release/proxy-certs --out /tmp/tpki --cluster bench
    python3 bench/tls_frontend_latency.py NEW_BIN_DIR OLD_BIN_DIR [ROUNDS] [PKI_DIR]
"""
import socket, ssl, subprocess, sys, threading, time
PKI = sys.argv[4] if len(sys.argv) > 4 else "/tmp/tpki"
def echo_server():
    l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(64)
    def serve(c):
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                d = c.recv(65536)
                if not d: break
                c.sendall(d)
        except OSError:
            pass
    def loop():
        while True:
            c, _ = l.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()
    return l.getsockname()
def start(bindir, up):
    srv = subprocess.Popen([f"{bindir}/proxy-server", "--agent-addr", "127.0.0.1:0", "--frontend-addr", "127.0.0.1:0",
        "--admin-addr", "127.0.0.1:0", "--agent-tls-cert", f"{PKI}/server.pem", "--agent-tls-key", f"{PKI}/server.key",
        "--agent-ca", f"{PKI}/proxy-ca.pem", "--frontend-tls-cert", f"{PKI}/server.pem", "--frontend-tls-key", f"{PKI}/server.key"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={"RUST_LOG": "warn"})
    line = srv.stdout.readline().decode()
    f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
    ag = subprocess.Popen([f"{bindir}/proxy-agent", "--server", f["agent"], "--server-name", "localhost",
        "--tls-cert", f"{PKI}/agent-bench.pem", "--tls-key", f"{PKI}/agent-bench.key", "--server-ca", f"{PKI}/proxy-ca.pem",
        "--upstream", f"{up[0]}:{up[1]}", "--admin-addr", "127.0.0.1:0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={"RUST_LOG": "warn"})
    host, port = f["frontend"].rsplit(":", 1)
    return srv, ag, (host, int(port))
def tunnel(front):
    ctx = ssl.create_default_context(cafile=f"{PKI}/proxy-ca.pem")
    for _ in range(100):
        try:
            raw = socket.create_connection(front); raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s = ctx.wrap_socket(raw, server_hostname="localhost")
            s.sendall(b"CONNECT bench:443 HTTP/1.1\r\nHost: bench:443\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head: head += s.recv(1)
            if head.startswith(b"HTTP/1.1 200"): return s
            s.close()
        except OSError: pass
        time.sleep(0.1)
    raise SystemExit("no tunnel")
def measure(front, n=4000):
    s = tunnel(front); msg = b"x" * 64; out = []
    for i in range(n + 200):
        t = time.perf_counter_ns(); s.sendall(msg); got = 0
        while got < 64: got += len(s.recv(64 - got))
        if i >= 200: out.append((time.perf_counter_ns() - t) / 1000)
        time.sleep(0.0005)
    s.close(); out.sort()
    return out[len(out) // 2], out[int(len(out) * 0.99)]
up = echo_server()
dirs = {"new": sys.argv[1], "old": sys.argv[2]}
for rnd in range(int(sys.argv[3]) if len(sys.argv) > 3 else 3):
    for name, d in dirs.items():
        srv, ag, front = start(d, up)
        try:
            p50, p99 = measure(front)
            print(f"round {rnd} {name}: p50 {p50:.0f} us, p99 {p99:.0f} us", flush=True)
        finally:
            ag.kill(); srv.kill(); ag.wait(); srv.wait()
