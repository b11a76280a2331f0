//! Splicing two byte streams together, counting bytes as they flow (not only when a
//! stream ends) so that status pages and metrics move during long transfers, and
//! optionally holding both directions to a shared byte rate by reading more slowly
//! (backpressure, never buffering).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::limits::SPLICE_BUFFER;
use crate::rate::SharedBucket;
use crate::sync::lock;

/// Smallest read worth waiting for under a rate limit: waking up for a few bytes at a
/// time would burn CPU without moving data faster.
const MIN_LIMITED_READ: u64 = 16 * 1024;

/// Called with each chunk size as bytes pass in one direction.
pub type Counter = Arc<dyn Fn(u64) + Send + Sync>;

/// Wraps a stream so that every byte *read* from it is reported to a counter and,
/// with a limit, taken from a token bucket first.
struct Counted<S> {
    inner: S,
    on_read: Counter,
    limit: Option<SharedBucket>,
    /// Told (with 1) each time a read has to wait for the limit.
    on_throttle: Option<Counter>,
    wait: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut allowed = buf.remaining();
        if let Some(limit) = self.limit.clone() {
            if let Some(wait) = self.wait.as_mut() {
                if wait.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.wait = None;
            }
            let now = tokio::time::Instant::now().into_std();
            let mut bucket = lock(&limit);
            let want = (buf.remaining() as u64).clamp(1, MIN_LIMITED_READ);
            let available = bucket.available(now);
            if available < want {
                let delay = bucket.wait_for(want, now);
                drop(bucket);
                if let Some(on_throttle) = &self.on_throttle {
                    on_throttle(1);
                }
                let mut sleep = Box::pin(tokio::time::sleep(delay));
                // Registers the waker; the sleep cannot be ready yet.
                let _ = sleep.as_mut().poll(cx);
                self.wait = Some(sleep);
                return Poll::Pending;
            }
            allowed = allowed.min(available as usize);
        }
        let n = {
            let mut limited = buf.take(allowed);
            let result = Pin::new(&mut self.inner).poll_read(cx, &mut limited);
            let n = limited.filled().len();
            match result {
                Poll::Ready(Ok(())) => n,
                other => return other,
            }
        };
        // SAFETY: `n` bytes were initialised and filled by the inner read above.
        unsafe {
            buf.assume_init(n);
        }
        buf.advance(n);
        if n > 0 {
            if let Some(limit) = &self.limit {
                lock(limit).take(n as u64, tokio::time::Instant::now().into_std());
            }
            (self.on_read)(n as u64);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Copies `a` to `b` and `b` to `a` until both directions end, passing half-closes on.
/// Returns the bytes moved each way.
pub async fn splice<A, B>(a: A, b: B, a_to_b: Counter, b_to_a: Counter) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    splice_limited(a, b, a_to_b, b_to_a, None).await
}

/// Like [`splice`], with both directions together held to the rate of `limit` (shared
/// with other streams of the same node) by reading no faster than it allows; the
/// limit's counter hears of every wait.
pub async fn splice_limited<A, B>(
    a: A,
    b: B,
    a_to_b: Counter,
    b_to_a: Counter,
    limit: Option<(SharedBucket, Counter)>,
) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (bucket, on_throttle) = match limit {
        Some((bucket, counter)) => (Some(bucket), Some(counter)),
        None => (None, None),
    };
    let mut a = Counted {
        inner: a,
        on_read: a_to_b,
        limit: bucket.clone(),
        on_throttle: on_throttle.clone(),
        wait: None,
    };
    let mut b = Counted {
        inner: b,
        on_read: b_to_a,
        limit: bucket,
        on_throttle,
        wait: None,
    };
    tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, SPLICE_BUFFER, SPLICE_BUFFER).await
}

/// A counter that counts nothing.
pub fn no_counter() -> Counter {
    Arc::new(|_| {})
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn splice_moves_and_counts_both_directions() {
        let (mut client, a) = tokio::io::duplex(1024);
        let (b, mut server) = tokio::io::duplex(1024);
        let up = Arc::new(AtomicU64::new(0));
        let down = Arc::new(AtomicU64::new(0));
        let (u, d) = (up.clone(), down.clone());
        let task = tokio::spawn(splice(
            a,
            b,
            Arc::new(move |n| {
                u.fetch_add(n, Ordering::Relaxed);
            }),
            Arc::new(move |n| {
                d.fetch_add(n, Ordering::Relaxed);
            }),
        ));
        let payload = vec![7u8; 100_000];
        let writer = {
            let payload = payload.clone();
            tokio::spawn(async move {
                client.write_all(&payload).await.unwrap();
                client.shutdown().await.unwrap();
                let mut back = Vec::new();
                client.read_to_end(&mut back).await.unwrap();
                back
            })
        };
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, payload);
        server.write_all(b"reply").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"reply");
        assert_eq!(task.await.unwrap().unwrap(), (100_000, 5));
        assert_eq!(up.load(Ordering::Relaxed), 100_000);
        assert_eq!(down.load(Ordering::Relaxed), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_limited_splice_moves_everything_at_the_rate() {
        let (mut client, a) = tokio::io::duplex(64 * 1024);
        let (b, mut server) = tokio::io::duplex(64 * 1024);
        // 100 KB/s with a 16 KiB burst: 216 KiB takes about two seconds.
        let limit = crate::rate::shared(100_000.0, 16_384.0);
        let waits = Arc::new(AtomicU64::new(0));
        let w = waits.clone();
        let on_wait: Counter = Arc::new(move |n| {
            w.fetch_add(n, Ordering::Relaxed);
        });
        let task = tokio::spawn(splice_limited(
            a,
            b,
            no_counter(),
            no_counter(),
            Some((limit, on_wait)),
        ));
        let payload: Vec<u8> = (0..216 * 1024).map(|i| i as u8).collect();
        let sent = payload.clone();
        let start = tokio::time::Instant::now();
        tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.unwrap();
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, payload, "every byte, in order");
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(1800), "{took:?}");
        assert!(waits.load(Ordering::Relaxed) > 0, "the waits were counted");
        server.shutdown().await.unwrap();
        task.await.unwrap().unwrap();
    }
}
