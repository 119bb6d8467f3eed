//! A Kafka-protocol broker owned by one test, so the test can kill it and
//! start it again: noida-db, from the binary `scripts/test.sh` installs.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Broker {
    bin: PathBuf,
    data: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

impl Broker {
    /// Start one, or `None` (said loudly) when the binary is not known.
    pub fn start() -> Option<Self> {
        let bin = super::test_server("WALDEN_TEST_NOIDA_BIN")?;
        let mut b = Self {
            bin: bin.into(),
            data: tempfile::tempdir().unwrap(),
            port: super::free_port(),
            child: None,
        };
        b.restart();
        Some(b)
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stop it with SIGTERM, as an operator would, and wait for it to exit.
    /// noida-db acks a produce before its data is on disk and writes it out
    /// within a few seconds, so a SIGKILL can lose acked records; a clean
    /// stop does not.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGKILL it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same port and data.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new(&self.bin)
            .args([
                "start",
                "--only",
                "kafka",
                "--host",
                "127.0.0.1",
                "--kafka-port",
            ])
            .arg(self.port.to_string())
            .arg("--data-dir")
            .arg(self.data.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start noida-db");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "noida-db did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A fresh tansu (from `WALDEN_TEST_TANSU_BIN`) on a free port, in memory,
/// owned by one test: group state left by other runs slows its joins down.
pub struct Tansu {
    pub port: u16,
    child: Child,
}

impl Tansu {
    /// Start one, or `None` (said loudly) when the binary is not known.
    pub fn start() -> Option<Self> {
        Self::start_advertising(None)
    }

    /// Start one that tells clients to reach it at `advertised` (a proxy in
    /// front of it) rather than at its own port.
    pub fn start_advertising(advertised: Option<u16>) -> Option<Self> {
        let bin = super::test_server("WALDEN_TEST_TANSU_BIN")?;
        let port = super::free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let shown = format!("tcp://127.0.0.1:{}", advertised.unwrap_or(port));
        let child = Command::new(bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &shown,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Self { port, child })
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
