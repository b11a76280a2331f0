//! The paths measured at an Internet-sized MTU (#20): a fresh network namespace whose
//! loopback and one more interface have MTU 1500, so TCP moves 1500-byte segments
//! as it would through a real host's NIC (on the host's loopback, MTU 65,536, TCP moves
//! 64 KiB segments and QUIC cannot), everything else as on the host.
//!
//! Only the calling thread enters the namespace (Linux keeps namespaces per thread);
//! the processes and threads it starts meanwhile inherit it, and the thread goes back
//! to its own namespace afterwards. By hand with `unshare(2)`/`setns(2)` rather than
//! `ip netns exec` around a second run: one process keeps both regimes' samples, so
//! the report compares them in one table without a round trip through files.

use std::os::fd::AsRawFd;
use std::process::Command;

use anyhow::{Context, bail};

/// The namespace's MTU.
pub const INTERNET_MTU: u32 = 1500;

/// The MTU of `lo` in the calling thread's namespace (`ip` runs as a child, in it).
pub fn loopback_mtu() -> anyhow::Result<u32> {
    let out = Command::new("ip")
        .args(["-o", "link", "show", "lo"])
        .output()
        .context("run ip (iproute2) to read the loopback MTU")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "mtu")
        .nth(1)
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("no MTU in `ip link show lo`: {text}"))
}

/// Runs `measure` in a new network namespace whose loopback and interface `ferry0`
/// (192.0.2.1/24, so a program that looks for a non-loopback address finds one) have
/// MTU `mtu`, then returns this thread to its namespace. `ferry0` is one end of a veth
/// pair rather than a dummy interface: kernels built without the dummy driver (this
/// project's VMs) all have veth, which the NAT lab needs too. Needs root
/// (CAP_SYS_ADMIN and CAP_NET_ADMIN); the error says so.
pub fn with_mtu<T>(mtu: u32, measure: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let home = std::fs::File::open("/proc/thread-self/ns/net")
        .context("open this thread's network namespace")?;
    // SAFETY: unshare(2) with CLONE_NEWNET only changes this thread's namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        bail!(
            "cannot make a network namespace ({}); run as root for the MTU-{mtu} paths",
            std::io::Error::last_os_error()
        );
    }
    let result = set_up(mtu).and_then(|()| measure());
    // SAFETY: setns(2) on a namespace file this thread opened; it only changes this
    // thread's namespace back.
    if unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        // Every later part would run in the wrong namespace: stop the run.
        panic!(
            "cannot return to the host's network namespace: {}",
            std::io::Error::last_os_error()
        );
    }
    result
}

fn set_up(mtu: u32) -> anyhow::Result<()> {
    let mtu_text = mtu.to_string();
    for args in [
        vec!["link", "set", "lo", "mtu", &mtu_text, "up"],
        vec![
            "link", "add", "ferry0", "mtu", &mtu_text, "type", "veth", "peer", "name", "ferry1",
            "mtu", &mtu_text,
        ],
        vec!["addr", "add", "192.0.2.1/24", "dev", "ferry0"],
        vec!["link", "set", "ferry1", "up"],
        vec!["link", "set", "ferry0", "up"],
    ] {
        let status = Command::new("ip")
            .args(&args)
            .status()
            .context("run ip (iproute2)")?;
        if !status.success() {
            bail!("ip {} failed in the MTU-{mtu} namespace", args.join(" "));
        }
    }
    let got = loopback_mtu()?;
    if got != mtu {
        bail!("the namespace's loopback MTU is {got}, not {mtu}");
    }
    Ok(())
}
