//! Child processes that die with the test process that started them, however it dies.
//!
//! A test's `Drop`s kill its relays, shims and helpers when it passes or panics, but
//! nothing runs when the test process itself is killed (SIGKILL, the kernel's OOM
//! killer, nextest's timeout): its children lived on, holding their ports, and the
//! next run of the same test failed at once. So the kernel is asked to SIGKILL every
//! child when its parent dies (`PR_SET_PDEATHSIG`, which survives `exec`, including
//! `ip netns exec`, which execs in place). The kernel counts the *thread* that forked
//! the child as its parent, and tests start programs from short-lived threads too, so
//! every child is forked by one thread that lives as long as the process.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Mutex, OnceLock};

type Request = (Command, Sender<io::Result<Child>>);

/// Starting a [`Command`] as a child that dies with the test process.
pub trait TiedToTest {
    /// [`Command::spawn`], with the child killed by the kernel when the test process
    /// ends. The command is used up: `self` is left as an empty command.
    fn spawn_tied(&mut self) -> io::Result<Child>;

    /// [`Command::output`], likewise tied.
    fn output_tied(&mut self) -> io::Result<Output>;
}

impl TiedToTest for Command {
    fn spawn_tied(&mut self) -> io::Result<Child> {
        let parent = std::process::id();
        // SAFETY: the closure runs between fork and exec and calls only prctl(2),
        // getppid(2) and _exit(2), which are async-signal-safe.
        unsafe {
            self.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before the signal was asked for.
                if libc::getppid() as u32 != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let command = std::mem::replace(self, Command::new("true"));
        let (answer, reply) = channel();
        forker()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send((command, answer))
            .map_err(|_| io::Error::other("the process-starting thread is gone"))?;
        reply
            .recv()
            .map_err(|_| io::Error::other("the process-starting thread is gone"))?
    }

    fn output_tied(&mut self) -> io::Result<Output> {
        self.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        self.spawn_tied()?.wait_with_output()
    }
}

/// The one thread that forks every child; it never ends before the process does.
fn forker() -> &'static Mutex<Sender<Request>> {
    static FORKER: OnceLock<Mutex<Sender<Request>>> = OnceLock::new();
    FORKER.get_or_init(|| {
        let (requests, incoming) = channel::<Request>();
        std::thread::Builder::new()
            .name("child-forker".into())
            .spawn(move || {
                for (mut command, answer) in incoming {
                    let _ = answer.send(command.spawn());
                }
            })
            .expect("start the thread that starts test programs");
        Mutex::new(requests)
    })
}
