//! A SeaweedFS server (`weed mini`: master, volume server, filer and S3 gateway in one
//! process) for tests and benchmarks: its own ports on 127.0.0.1 and its own directory, one
//! bucket created at start, killed when dropped.
//!
//! The binary is `$YUNQI_WEED` (the project's `scripts/engines.sh` installs SeaweedFS 4.48
//! and prints that line), else `weed` on the `PATH`.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running (or stopped) SeaweedFS server.
pub struct WeedServer {
    binary: PathBuf,
    dir: PathBuf,
    bucket: String,
    ports: Vec<u16>,
    child: Option<Child>,
}

/// The server binary tests use.
pub fn binary() -> PathBuf {
    std::env::var_os("YUNQI_WEED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("weed"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

impl WeedServer {
    /// Starts a server storing under `dir` (created) with bucket `bucket`; panics with what to
    /// do when the binary is missing or does not come up.
    pub fn start(dir: &Path, bucket: &str) -> WeedServer {
        std::fs::create_dir_all(dir).expect("the SeaweedFS directory");
        let mut s = WeedServer {
            binary: binary(),
            dir: dir.to_path_buf(),
            bucket: bucket.to_string(),
            ports: Vec::new(),
            child: None,
        };
        // Ten ports picked free may be taken by another process before the server binds them
        // (tests run side by side): then it does not come up, and is started on fresh ones.
        for _ in 0..3 {
            // s3, master, volume, filer, admin, and their gRPC ports.
            s.ports = (0..10).map(|_| free_port()).collect();
            s.spawn();
            if s.ready_within(Duration::from_secs(20)) {
                return s;
            }
            s.kill();
        }
        panic!(
            "SeaweedFS did not serve bucket {bucket} after three starts on fresh ports (see {})",
            s.dir.join("weed.log").display()
        );
    }

    /// The S3 endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports[0])
    }

    /// `s3://bucket/prefix`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// Starts the server again on the same ports and directory (after [`WeedServer::kill`]).
    pub fn restart(&mut self) {
        self.spawn();
        assert!(
            self.ready_within(Duration::from_secs(60)),
            "SeaweedFS did not serve bucket {} on port {} within 60 s (see {})",
            self.bucket,
            self.ports[0],
            self.dir.join("weed.log").display()
        );
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "the SeaweedFS server is running");
        let p = &self.ports;
        let log = std::fs::File::create(self.dir.join("weed.log")).expect("the SeaweedFS log");
        let child = Command::new(&self.binary)
            .current_dir(&self.dir)
            .arg("mini")
            .arg(format!("-dir={}", self.dir.join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false"])
            .args(["-admin.ui=false", "-webdav=false"])
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg(format!("-bucket={}", self.bucket))
            .arg(format!("-s3.port={}", p[0]))
            .arg(format!("-master.port={}", p[1]))
            .arg(format!("-volume.port={}", p[2]))
            .arg(format!("-filer.port={}", p[3]))
            .arg(format!("-admin.port={}", p[4]))
            .arg(format!("-s3.port.grpc={}", p[5]))
            .arg(format!("-master.port.grpc={}", p[6]))
            .arg(format!("-volume.port.grpc={}", p[7]))
            .arg(format!("-filer.port.grpc={}", p[8]))
            .arg(format!("-admin.port.grpc={}", p[9]))
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e}; run `bash scripts/engines.sh` and export the lines it prints (the test command does)",
                    self.binary.display()
                )
            });
        self.child = Some(child);
    }

    /// Waits until the bucket answers over S3: false if the server exits or `limit` passes.
    fn ready_within(&mut self, limit: Duration) -> bool {
        let addr: SocketAddr = ([127, 0, 0, 1], self.ports[0]).into();
        let began = Instant::now();
        while began.elapsed() < limit {
            if self
                .child
                .as_mut()
                .is_none_or(|c| c.try_wait().ok().flatten().is_some())
            {
                return false;
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok()
                && head_bucket(addr, &self.bucket)
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// Kills the server with SIGKILL and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

/// Whether `HEAD /bucket` answers 200 (the bucket exists and the gateway serves).
fn head_bucket(addr: SocketAddr, bucket: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = format!("HEAD /{bucket} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        Err(_) => false,
    }
}

impl Drop for WeedServer {
    fn drop(&mut self) {
        self.kill();
    }
}
