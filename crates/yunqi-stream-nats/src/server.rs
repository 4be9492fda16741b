//! A NATS server with JetStream in a process of its own, for tests and benchmarks: its own
//! port on 127.0.0.1 and its own store directory, killed when dropped.
//!
//! The binary is `$YUNQI_NATS_SERVER` (the project's `scripts/engines.sh` installs 2.15 and
//! prints that line), else `nats-server` on the `PATH`. Its JetStream settings are the ones
//! ARCHITECTURE.md recommends for yunqi: every write synced before it is acknowledged
//! (`sync_interval: always`, the embedded log's power-loss guarantee) and 8 MB messages.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running (or stopped) NATS server.
pub struct NatsServer {
    binary: PathBuf,
    dir: PathBuf,
    port: u16,
    sync_always: bool,
    child: Option<Child>,
}

/// The server binary tests use.
pub fn binary() -> PathBuf {
    std::env::var_os("YUNQI_NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("nats-server"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

impl NatsServer {
    /// Starts a server storing under `dir` (created) on a free port; panics with what to do
    /// when the binary is missing or does not come up.
    pub fn start(dir: &Path) -> NatsServer {
        NatsServer::start_with(dir, true)
    }

    /// Like [`NatsServer::start`]; with `sync_always` false, JetStream's default of syncing
    /// every two minutes (for benchmarks: what the fsyncs cost).
    pub fn start_with(dir: &Path, sync_always: bool) -> NatsServer {
        std::fs::create_dir_all(dir).expect("the NATS store directory");
        let mut s = NatsServer {
            binary: binary(),
            dir: dir.to_path_buf(),
            port: free_port(),
            sync_always,
            child: None,
        };
        s.restart();
        s
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server again on the same port and store (after [`NatsServer::kill`] or
    /// [`NatsServer::stop`]).
    pub fn restart(&mut self) {
        let extra = std::fs::read_to_string(self.dir.join("cluster.conf")).unwrap_or_default();
        self.launch(&extra);
    }

    fn launch(&mut self, extra: &str) {
        assert!(self.child.is_none(), "the NATS server is running");
        std::fs::write(self.dir.join("cluster.conf"), extra).expect("the NATS config file");
        let config = self.dir.join("nats.conf");
        let mut f = std::fs::File::create(&config).expect("the NATS config file");
        write!(
            f,
            "listen: 127.0.0.1:{port}\nmax_payload: 8MB\njetstream {{\n  store_dir: \"{store}\"\n{sync}}}\n{extra}",
            port = self.port,
            store = self.dir.join("store").display(),
            sync = if self.sync_always {
                "  sync_interval: always\n"
            } else {
                ""
            }
        )
        .expect("the NATS config file");
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e}; run `bash scripts/engines.sh` and export the line it prints (the test command does)",
                    self.binary.display()
                )
            });
        self.child = Some(child);
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let began = Instant::now();
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            assert!(
                began.elapsed() < Duration::from_secs(20),
                "the NATS server did not listen on {addr} within 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server with SIGKILL and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the server with SIGTERM (a clean shutdown) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let began = Instant::now();
            while began.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three (or more) NATS servers forming one JetStream cluster on 127.0.0.1, for replicated
/// (R3) streams under faults.
pub struct NatsCluster {
    /// The servers, in order.
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `n` servers storing under `dir/s<i>`, routed to each other.
    pub fn start(dir: &Path, n: usize) -> NatsCluster {
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, c)| format!("nats-route://127.0.0.1:{c}"))
            .collect();
        let mut servers = Vec::new();
        for (i, (port, cluster_port)) in ports.iter().enumerate() {
            let d = dir.join(format!("s{i}"));
            std::fs::create_dir_all(&d).expect("the NATS store directory");
            let extra = format!(
                "server_name: yunqi-test-{i}\ncluster {{\n  name: yunqi-test\n  listen: 127.0.0.1:{cluster_port}\n  routes: [{}]\n}}\n",
                routes.join(", ")
            );
            let mut s = NatsServer {
                binary: binary(),
                dir: d,
                port: *port,
                sync_always: true,
                child: None,
            };
            s.launch(&extra);
            servers.push(s);
        }
        NatsCluster { servers }
    }

    /// Every server's client URL, comma separated.
    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(|s| s.url())
            .collect::<Vec<_>>()
            .join(",")
    }
}
