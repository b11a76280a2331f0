//! The measurements themselves: bulk throughput with iperf3, connect-to-first-byte
//! with a short request/response against an in-process echo service, and the
//! statistics (median, p99) reported for them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Bytes of the request and of the answer in a connect-to-first-byte sample: a small
/// RPC, like a Foolscap call or an HTTP GET of a tiny object.
pub const RR_BYTES: usize = 32;

/// A TCP echo service on loopback, one thread per connection; the service behind
/// every tunnel for request/response samples.
pub fn echo_service() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = stream.set_nodelay(true);
                let mut reader = match stream.try_clone() {
                    Ok(r) => r,
                    Err(_) => return,
                };
                let mut writer = stream;
                let _ = std::io::copy(&mut reader, &mut writer);
            });
        }
    });
    Ok(addr)
}

/// One sample: connect, send [`RR_BYTES`], wait for the first byte of the echo, read
/// the rest; the time to the first byte.
pub fn connect_to_first_byte(addr: SocketAddr) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connect to {addr}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(&[7u8; RR_BYTES])?;
    let mut first = [0u8; 1];
    stream
        .read_exact(&mut first)
        .with_context(|| format!("no answer through {addr}"))?;
    let took = start.elapsed();
    let mut rest = [0u8; RR_BYTES - 1];
    stream.read_exact(&mut rest)?;
    if first[0] != 7 || rest.iter().any(|b| *b != 7) {
        bail!("the answer through {addr} was not the request echoed");
    }
    Ok(took)
}

/// Retries a request/response through `addr` until it works (a tunnel coming up).
pub fn wait_working(addr: SocketAddr, limit: Duration) -> anyhow::Result<()> {
    crate::procs::wait_for(&format!("an echo through {addr}"), limit, || {
        connect_to_first_byte(addr).ok()
    })
    .map(|_| ())
}

/// An iperf3 server on `port`, serving one test at a time until dropped.
pub fn iperf3_server(iperf3: &Path, port: u16, dir: &Path) -> anyhow::Result<crate::procs::Child> {
    let mut child = crate::procs::Child::spawn(
        "iperf3-server",
        iperf3,
        &[
            "-s".into(),
            "--forceflush".into(),
            "-B".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ],
        dir,
    )?;
    child.wait_line("Server listening", Duration::from_secs(10))?;
    Ok(child)
}

/// Runs `iperf3 -c` through `addr` for `seconds`; the receiver's bits per second.
pub fn iperf3_bulk(iperf3: &Path, addr: SocketAddr, seconds: u32) -> anyhow::Result<f64> {
    let out = Command::new(iperf3)
        .args([
            "-c",
            &addr.ip().to_string(),
            "-p",
            &addr.port().to_string(),
            "-t",
            &seconds.to_string(),
            "-J",
        ])
        .output()
        .context("run iperf3")?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 printed no JSON: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(error) = report["error"].as_str() {
        bail!("iperf3 through {addr}: {error}");
    }
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("no end.sum_received.bits_per_second in iperf3's report")
}

/// Median and 99th percentile (nearest rank) of samples.
pub fn median_p99(samples: &[f64]) -> Option<(f64, f64)> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank =
        |q: f64| sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1];
    let median = if sorted.len() % 2 == 1 {
        sorted[sorted.len() / 2]
    } else {
        (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2]) / 2.0
    };
    Some((median, rank(0.99)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_p99_by_nearest_rank() {
        assert_eq!(median_p99(&[]), None);
        assert_eq!(median_p99(&[3.0]), Some((3.0, 3.0)));
        assert_eq!(median_p99(&[4.0, 1.0, 3.0, 2.0]), Some((2.5, 4.0)));
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(median_p99(&hundred), Some((50.5, 99.0)));
    }

    #[test]
    fn an_echo_sample_measures_and_checks_the_answer() {
        let addr = echo_service().unwrap();
        let took = connect_to_first_byte(addr).unwrap();
        assert!(took < Duration::from_secs(5));
    }
}
