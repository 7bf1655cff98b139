//! What the tests that run `meshward up` share: copying an example, starting the mesh and
//! waiting until it is up, and CLI commands against its control plane.

#![allow(dead_code, reason = "each test binary uses the part it needs")]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// `from` copied to `to`, without its dot-files (a previous run's `.meshward/`).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

pub fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

pub fn meshward() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshward"))
}

/// A running `meshward up DIR`, interrupted (Ctrl-C) when dropped.
pub struct Mesh {
    pub child: Child,
    pub dir: PathBuf,
    /// What `up` printed until the mesh was up.
    pub lines: Vec<String>,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Mesh {
    /// Starts `meshward up dir` and waits (at most a minute) for "mesh is up".
    pub fn start(dir: &Path) -> Mesh {
        let mut child = meshward()
            .arg("up")
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut reader = BufReader::new(child.stdout.take().unwrap());
        let mut mesh = Mesh {
            child,
            dir: dir.to_owned(),
            lines: vec![],
        };
        let start = Instant::now();
        loop {
            let mut l = String::new();
            assert!(
                reader.read_line(&mut l).unwrap() > 0,
                "`meshward up` exited: {:#?}",
                mesh.lines
            );
            mesh.lines.push(l.trim_end().to_owned());
            if l.contains("mesh is up") {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{:#?}",
                mesh.lines
            );
        }
        std::thread::spawn(move || for _ in reader.lines().map_while(Result::ok) {});
        mesh
    }

    /// `.meshward/up.json`: the control plane's address and credentials, the workloads.
    pub fn state(&self) -> Value {
        let p = self.dir.join(".meshward/up.json");
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    }

    /// A CLI command against its control plane.
    pub fn cli(&self) -> Command {
        let s = self.state();
        let mut c = meshward();
        c.env("MESHWARD_SERVER", s["control"].as_str().unwrap())
            .env("MESHWARD_CA_FILE", s["ca_file"].as_str().unwrap())
            .env("MESHWARD_TOKEN_FILE", s["token_file"].as_str().unwrap());
        c
    }
}
