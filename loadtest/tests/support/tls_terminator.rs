//! A TLS terminator (`tls_terminator.py`, beside this file) in front of a plain-HTTP Flux, with
//! a self-signed certificate for 127.0.0.1 made by `openssl`: what the `https://` tests of the
//! load generator (`loadtest/tests/generator.rs`) and of the CLI (`tests/cli.rs`) talk to. It
//! listens on loopback only and stops by itself after [`LIFETIME_SECONDS`], or on drop.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use tempfile::TempDir;

/// How long a terminator serves before it ends itself (longer than any test using one).
pub const LIFETIME_SECONDS: u32 = 90;

/// The script, carried in the test binary so that either package's tests can run it.
const SCRIPT: &str = include_str!("tls_terminator.py");

/// A running terminator, killed on drop; its certificate and key live in a temporary directory.
pub struct TlsTerminator {
    child: Child,
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    /// The certificate it presents (PEM), the one to give as `--ca-cert`.
    pub cert: PathBuf,
    _dir: TempDir,
}

impl TlsTerminator {
    /// Forwards to `127.0.0.1:<upstream_port>`, presenting a certificate marked as no CA's
    /// (`CA:FALSE`), as a server's own should be.
    pub fn start(upstream_port: u16) -> TlsTerminator {
        TlsTerminator::start_with(
            upstream_port,
            &["-addext", "basicConstraints=critical,CA:FALSE"],
        )
    }

    /// With these extra `openssl req` arguments, and `openssl req -x509`'s own defaults for the
    /// rest: OpenSSL 3 marks the certificate as a CA's (`CA:TRUE`), which chain checks refuse
    /// as a server's own.
    pub fn start_with(upstream_port: u16, extra: &[&str]) -> TlsTerminator {
        let dir = tempfile::tempdir().expect("temp dir");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let made = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
            .args(["-subj", "/CN=flux-loadtest-test"])
            .args(["-addext", "subjectAltName=IP:127.0.0.1"])
            .args(extra)
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run openssl");
        assert!(made.success(), "openssl could not make a certificate");
        let mut child = Command::new("python3")
            .args(["-c", SCRIPT])
            .arg(&cert)
            .arg(&key)
            .args([upstream_port.to_string(), LIFETIME_SECONDS.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the TLS terminator");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("terminator stdout"))
            .read_line(&mut line)
            .expect("the terminator's port");
        let port: u16 = line.trim().parse().expect("a port number");
        TlsTerminator {
            child,
            url: format!("https://127.0.0.1:{port}"),
            cert,
            _dir: dir,
        }
    }
}

impl Drop for TlsTerminator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
