//! A test network: hosts in their own network namespaces, wired to a bridge that itself
//! lives in a namespace of the test's (nothing is added to the machine's own network), and
//! the processes that run on them. Everything is removed when the `Net` is dropped; the
//! namespaces of an earlier run that crashed are removed when the next one starts.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Runs a command and returns its output (never panics on failure).
pub fn run(prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"))
}

/// Runs a command that must succeed.
pub fn must(prog: &str, args: &[&str]) {
    let o = run(prog, args);
    assert!(
        o.status.success(),
        "`{prog} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A process that is killed when dropped; its stdout is drained in the background.
#[derive(Debug)]
pub struct Proc(pub Child);

impl Proc {
    pub fn kill9(&mut self) {
        must("kill", &["-9", &self.0.id().to_string()]);
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `cmd` and waits for a line containing `marker` on its stdout.
pub fn spawn_until(cmd: &mut Command, marker: &str) -> (Proc, Vec<String>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let Some(stdout) = child.stdout.take() else {
        panic!("no stdout")
    };
    let mut reader = BufReader::new(stdout);
    let mut lines = vec![];
    let start = Instant::now();
    let proc = Proc(child);
    loop {
        let mut l = String::new();
        if reader.read_line(&mut l).unwrap_or(0) == 0 {
            panic!("{cmd:?} exited before printing `{marker}`: {lines:?}");
        }
        lines.push(l.trim().to_owned());
        if l.contains(marker) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no `{marker}` from {cmd:?} in 60s: {lines:?}"
        );
    }
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    (proc, lines)
}

/// Polls `f` every 200 ms until it returns `Some`, for at most `secs` seconds.
pub fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out after {secs}s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

static NETS: AtomicUsize = AtomicUsize::new(0);

/// A network of hosts on one bridge, `SUBNET.N/24`.
#[derive(Debug)]
pub struct Net {
    pub prefix: String,
    pub subnet: String,
    hosts: Vec<String>,
}

/// One host: a network namespace with `eth0` on the bridge.
#[derive(Debug, Clone)]
pub struct Host {
    pub ns: String,
    pub ip: String,
    /// The bridge port of this host (in the switch namespace), for cutting its link.
    pub port: String,
}

fn alive(pid: &str) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether this machine lets the test create network namespaces (root with iproute2).
pub fn available() -> Result<(), String> {
    let probe = format!(
        "mwt-{}-probe{}",
        std::process::id(),
        NETS.fetch_add(1, Ordering::Relaxed)
    );
    let o = Command::new("ip").args(["netns", "add", &probe]).output();
    match o {
        Ok(o) if o.status.success() => {
            let _ = run("ip", &["netns", "del", &probe]);
            Ok(())
        }
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).into_owned()),
        Err(e) => Err(format!("cannot run `ip`: {e}")),
    }
}

impl Net {
    /// A new network `SUBNET.0/24` (e.g. `10.231.1`).
    pub fn new(subnet: &str) -> Net {
        if let Err(e) = available() {
            panic!(
                "these tests need root, iproute2 and iptables (bash scripts/test.sh installs them): {e}"
            );
        }
        // Namespaces left by a run that died: `mwt-PID-...` whose PID is gone.
        let list = run("ip", &["netns", "list"]);
        for l in String::from_utf8_lossy(&list.stdout).lines() {
            let name = l.split_whitespace().next().unwrap_or("");
            if let Some(rest) = name.strip_prefix("mwt-") {
                let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
                if !alive(&pid) {
                    let _ = run("ip", &["netns", "del", name]);
                }
            }
        }
        let n = NETS.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("mwt-{}-{n}", std::process::id());
        let sw = format!("{prefix}-sw");
        must("ip", &["netns", "add", &sw]);
        must("ip", &["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        must("ip", &["-n", &sw, "link", "set", "br0", "up"]);
        Net {
            prefix,
            subnet: subnet.to_owned(),
            hosts: vec![sw],
        }
    }

    fn sw(&self) -> &str {
        &self.hosts[0]
    }

    /// Adds host `name` at `SUBNET.n`.
    pub fn host(&mut self, name: &str, n: u8) -> Host {
        let ns = format!("{}-{name}", self.prefix);
        let port = format!("p{n}");
        let ip = format!("{}.{n}", self.subnet);
        must("ip", &["netns", "add", &ns]);
        self.hosts.push(ns.clone());
        let sw = self.sw().to_owned();
        must(
            "ip",
            &[
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ],
        );
        must(
            "ip",
            &["-n", &sw, "link", "set", &port, "master", "br0", "up"],
        );
        must(
            "ip",
            &["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        );
        must("ip", &["-n", &ns, "link", "set", "eth0", "up"]);
        must("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        must("ip", &["-n", &ns, "route", "add", "default", "dev", "eth0"]);
        Host { ns, ip, port }
    }

    /// Takes a host's link down or up (at the bridge).
    pub fn link(&self, h: &Host, up: bool) {
        must(
            "ip",
            &[
                "-n",
                self.sw(),
                "link",
                "set",
                &h.port,
                if up { "up" } else { "down" },
            ],
        );
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for h in self.hosts.iter().rev() {
            // Whatever still runs inside (a process the test leaked) goes first.
            let pids = run("ip", &["netns", "pids", h]);
            for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                let _ = run("kill", &["-9", pid]);
            }
            let _ = run("ip", &["netns", "del", h]);
        }
    }
}

impl Host {
    /// A command that runs inside this host.
    pub fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, prog]);
        c
    }

    /// Runs a command inside this host.
    pub fn run(&self, prog: &str, args: &[&str]) -> Output {
        self.cmd(prog)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {prog} in {}: {e}", self.ns))
    }

    /// `curl` from this host: `(exit code, HTTP status, body)`.
    pub fn curl(&self, args: &[&str]) -> (i32, String, String) {
        let mut a = vec!["-s", "-m", "5", "-w", "\n%{http_code}"];
        a.extend_from_slice(args);
        let o = self.run("curl", &a);
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or((&text, ""));
        (
            o.status.code().unwrap_or(-1),
            code.to_owned(),
            body.to_owned(),
        )
    }

    /// Starts `python3 -m http.server PORT --bind ADDR` serving `dir`, and waits until it
    /// answers (from inside the host).
    pub fn http_server(&self, dir: &std::path::Path, bind: &str, port: u16) -> Proc {
        let child = self
            .cmd("python3")
            .args(["-m", "http.server", &port.to_string(), "--bind", bind])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start python3: {e}"));
        let p = Proc(child);
        let target = if bind == "0.0.0.0" { "127.0.0.1" } else { bind };
        wait_for(20, "the app to listen", || {
            let o = self.run(
                "curl",
                &["-s", "-o", "/dev/null", &format!("http://{target}:{port}/")],
            );
            o.status.success().then_some(())
        });
        p
    }
}

/// Reads JSON lines from `path` and waits until one satisfies `f`.
pub fn wait_record(
    path: &std::path::Path,
    what: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(v) = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| f(v))
        {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no decision-log record in 15s: {what}; the log `{}` has:\n{text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
