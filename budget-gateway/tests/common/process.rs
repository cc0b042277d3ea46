//! The `budget-gateway` binary run as a child process, as an operator runs
//! it.

use std::io::Read;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The binary Cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_budget-gateway");

/// A free loopback address (bound, then let go, for the child to bind).
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// Kills the child if a test fails before it stops.
pub struct Gateway(pub Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary with `args`, its standard error kept for
/// [`wait_listening`] to tell why it exited.
pub fn spawn(args: &[&str]) -> Gateway {
    Gateway(
        Command::new(BIN)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

/// Waits (at most 20 s) until `addr` accepts connections; fails with the
/// child's standard error if it exits first.
pub fn wait_listening(addr: &str, child: &mut Gateway) {
    let start = Instant::now();
    while TcpStream::connect(addr).is_err() {
        if let Some(status) = child.0.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut stderr) = child.0.stderr.take() {
                // What could be read of it is what there is to show.
                let _ = stderr.read_to_string(&mut err);
            }
            panic!("the gateway exited ({status}): {err}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{addr} never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (at most 20 s) for the child to exit.
pub fn wait_exit(child: &mut Gateway) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the gateway never exited"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
