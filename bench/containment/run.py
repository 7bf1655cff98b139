#!/usr/bin/env python3
"""From the first anomalous request to the quarantine enforced at every affected sidecar.

Real processes on 127.0.0.1: a control plane, two destination sidecars (orders-api and
payments-api, each in front of a python http.server) and a compromised caller's sidecar
(web/frontend). Each run: the frontend behaves (GETs both services past the detector's
warm-up), then scans closed ports of both destinations; the clock runs from the first scan
connection until both destination sidecars answer the frontend's GET with 403
`quarantined`. Then the quarantine is released (audited) and the next run starts.

  bash bench/containment/run.sh                 # 20 runs
  RUNS=50 MESHWARD_BIN=target/release/meshward bash bench/containment/run.sh

Settings measured (the Mesh's anomalyDetection): window 5s, warmup 3s, quarantineAfter 0s
(the quarantine follows the throttle at the next tick), detector tick 1 s, proxies ship
decisions every 200 ms. With quarantineAfter T, add T.
"""
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

MW = os.environ["MESHWARD_BIN"]
RUNS = int(os.environ.get("RUNS", "20"))
TD = "bench.example"
FRONTEND = f"spiffe://{TD}/ns/web/sa/frontend"
procs = []


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args, log, **kw):
    p = subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, **kw)
    procs.append(p)
    return p


def wait_for(what, check, secs=30):
    t = time.monotonic()
    while not check():
        if time.monotonic() - t > secs:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.05)


def get(port, path="/ok"):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except Exception as e:  # connection reset, refused
        return 0, str(e)


def main():
    w = tempfile.mkdtemp(prefix="mw-containment-")
    data = os.path.join(w, "data")
    api, proxy_api = free_port(), free_port()
    spawn([MW, "control", "--data", data, "--trust-domain", TD, "--listen", f"127.0.0.1:{api}",
           "--proxy-listen", f"127.0.0.1:{proxy_api}"], os.path.join(w, "control.log"))
    wait_for("the control plane", lambda: os.path.exists(os.path.join(data, "admin.token")))
    subprocess.run([MW, "operator", "add", "second", "--data", data, "--role", "platform-security"],
                   check=True, capture_output=True)
    conn = ["--server", f"127.0.0.1:{api}", "--ca-file", os.path.join(data, "bundle.pem")]
    admin = conn + ["--token-file", os.path.join(data, "admin.token")]
    # Two destinations, each an HTTP app and four closed TCP ports.
    dests = {}
    for name in ["orders-api", "payments-api"]:
        app, inbound = free_port(), free_port()
        closed = [(free_port(), free_port()) for _ in range(4)]
        www = os.path.join(w, name)
        os.makedirs(www)
        open(os.path.join(www, "ok"), "w").write("ok")
        spawn(["python3", "-m", "http.server", str(app), "--bind", "127.0.0.1"], os.path.join(w, f"{name}-app.log"), cwd=www)
        dests[name] = {"app": app, "inbound": inbound, "closed": closed}
    repo = os.path.join(w, "repo")
    os.makedirs(repo)
    docs = [f"""apiVersion: meshward.io/v1alpha1
kind: Mesh
metadata: {{name: bench}}
spec:
  trustDomain: {TD}
  anomalyDetection:
    mode: quarantine
    window: 5s
    warmup: 3s
    quarantineAfter: 0s
    thresholds: {{minSamples: 5, fanOut: 6, newEdges: 4, denyRatio: 0.5}}
""", """apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {name: frontend, namespace: web}
spec: {}
"""]
    for name, d in dests.items():
        ports = [f'{{port: {d["app"]}, protocol: HTTP, inbound: "127.0.0.1:{d["inbound"]}"}}']
        ports += [f'{{port: {p}, protocol: TCP, inbound: "127.0.0.1:{i}"}}' for p, i in d["closed"]]
        svc = [f'{{port: 80, targetPort: {d["app"]}}}']
        svc += [f'{{port: {100 + k}, targetPort: {p}, protocol: TCP}}' for k, (p, _) in enumerate(d["closed"])]
        docs.append(f"""apiVersion: meshward.io/v1alpha1
kind: Workload
metadata: {{name: {name}, namespace: shop, labels: {{app: {name}}}}}
spec: {{ports: [{", ".join(ports)}]}}
---
apiVersion: meshward.io/v1alpha1
kind: Service
metadata: {{name: {name}, namespace: shop}}
spec: {{selector: {{app: {name}}}, ports: [{", ".join(svc)}]}}
---
apiVersion: meshward.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: shop}}
spec:
  tier: service
  action: ALLOW
  target: {{workloads: [{name}]}}
  rules:
    - from: [{{namespaces: [web]}}]
      to: [{{methods: [GET], paths: ["/ok"]}}]
""")
    open(os.path.join(repo, "mesh.yaml"), "w").write("---\n".join(docs))
    subprocess.run([MW, "apply", "-f", repo, "--reason", "bench"] + admin, check=True, capture_output=True)
    subprocess.run([MW, "approve", "1"] + conn + ["--token-file", os.path.join(data, "second.token")],
                   check=True, capture_output=True)

    def token(identity):
        return subprocess.run([MW, "workload", "token", "--identity", identity] + admin,
                              check=True, capture_output=True, text=True).stdout.strip()

    def proxy(workload, identity, upstreams):
        tok = os.path.join(w, workload.replace("/", "-") + ".tok")
        open(tok, "w").write(token(identity))
        args = [MW, "proxy", "--workload", workload, "--control", f"127.0.0.1:{proxy_api}",
                "--ca-file", os.path.join(data, "bundle.pem"), "--join-token-file", tok,
                "--state-dir", os.path.join(w, "state-" + workload.replace("/", "-")),
                "--admin", f"127.0.0.1:{free_port()}"]
        for local, target in upstreams:
            args += ["--upstream", f"127.0.0.1:{local}={target}"]
        spawn(args, os.path.join(w, workload.replace("/", "-") + ".log"))

    for name in dests:
        proxy(f"shop/{name}", f"spiffe://{TD}/ns/shop/sa/{name}", [])
    ups, http, scan = [], {}, []
    for name, d in dests.items():
        http[name] = free_port()
        ups.append((http[name], f"shop/{name}:80"))
        for k in range(len(d["closed"])):
            port = free_port()
            scan.append(port)
            ups.append((port, f"shop/{name}:{100 + k}"))
    proxy("web/frontend", FRONTEND, ups)
    for name, port in http.items():
        wait_for(f"{name} through the sidecars", lambda port=port: get(port)[0] == 200)

    figures = []
    for run in range(RUNS):
        # Behave past the warm-up (it starts again after every release), for a random
        # extra fraction of a second: the scan starts at every phase of the detector's tick.
        t_end = time.monotonic() + 4.0 + random.random()
        while time.monotonic() < t_end:
            for port in http.values():
                assert get(port)[0] == 200, "the frontend is served while it behaves"
            time.sleep(0.1)
        t0 = time.monotonic()
        enforced = {}
        while len(enforced) < len(http):
            for port in scan:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                        s.sendall(b"probe\n")
                except OSError:
                    pass
            for name, port in http.items():
                if name not in enforced:
                    code, body = get(port)
                    if code == 403 and "quarantined" in body:
                        enforced[name] = time.monotonic() - t0
            if time.monotonic() - t0 > 60:
                sys.exit(f"run {run}: not quarantined within 60 s ({enforced})")
            time.sleep(0.02)
        figures.append(max(enforced.values()))
        print(f"run {run + 1}/{RUNS}: quarantine enforced at both sidecars after {figures[-1]:.2f} s", flush=True)
        subprocess.run([MW, "quarantine", "release", FRONTEND, "--reason", "bench run done"] + admin,
                       check=True, capture_output=True)
        for port in http.values():
            wait_for("the release", lambda port=port: get(port)[0] == 200)
        # Let the scan's records leave the window.
        time.sleep(5.5)

    figures.sort()
    rank = lambda q: figures[min(len(figures) - 1, max(0, int(-(-q * len(figures) // 1)) - 1))]
    print()
    print("| runs | p50 | p90 | p99 | max |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {len(figures)} | {rank(0.5):.2f} s | {rank(0.9):.2f} s | {rank(0.99):.2f} s | {figures[-1]:.2f} s |")


try:
    main()
finally:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
