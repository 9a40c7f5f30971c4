//! Benchmark (not a test; outside the data flow): the least CPU any fan-out server can spend
//! per delivery on this machine. Plain blocking `write`s of update-sized messages to loopback
//! sockets in the fan-out target's shape (50 readers, 100 updates/s), with no WebSocket
//! framing, no runtime and no document behind them; the readers are another process on the
//! other core, as the load generator is for the servers.
//!
//! bench_send_floor [--readers 50] [--rate 100] [--seconds 10] [--bytes 32] [--reader-cpu 1]
//! bench_send_floor --join BYTES [--readers 150] [--reader-cpu 1]
//!
//! Run it pinned like a server (`taskset -c 0`; scripts/bench.sh does). It measures one write
//! per delivery, then several messages per write (what holding a connection's writer gathers),
//! and prints sender CPU per 1,000 deliveries from `/proc/self/stat` (utime+stime), the figure
//! the servers are measured by. On loopback the sender also pays for the receive side's TCP
//! processing, as every server does.
//!
//! `--join BYTES` is the join storm's floor instead: one payload of BYTES (the document's
//! encoded size) written by blocking `write_all`s to each of the readers in turn, and the time
//! until every reader has all of it (each reader answers one byte once it has the payload).

use std::io::Write;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--read-from") {
        let addr = args
            .get(i + 1)
            .ok_or_else(|| anyhow::anyhow!("--read-from ADDR"))?;
        return read_all(addr, chorus_tests::arg("--readers", 50));
    }
    if let Some(i) = args.iter().position(|a| a == "--read-join") {
        let addr = args
            .get(i + 1)
            .ok_or_else(|| anyhow::anyhow!("--read-join ADDR"))?;
        return read_join(
            addr,
            chorus_tests::arg("--readers", 150),
            chorus_tests::arg("--expect", 0),
        );
    }
    if args.iter().any(|a| a == "--join") {
        return join(
            chorus_tests::arg("--join", 20_000_000),
            chorus_tests::arg("--readers", 150),
            chorus_tests::arg("--reader-cpu", 1),
        );
    }
    let readers = chorus_tests::arg("--readers", 50);
    let rate = chorus_tests::arg("--rate", 100);
    let seconds = chorus_tests::arg("--seconds", 10);
    let bytes = chorus_tests::arg("--bytes", 32);
    let reader_cpu = chorus_tests::arg("--reader-cpu", 1);
    println!(
        "bench_send_floor: {readers} loopback sockets, {rate} updates/s of {bytes} B, each update \
         written to every socket, {seconds} s per row; readers in a separate process on CPU {reader_cpu}"
    );
    println!(
        "{:>18} {:>14} {:>14} {:>22}",
        "messages/write", "deliveries/s", "writes/s", "sender CPU ms/1k deliv"
    );
    for batch in [1usize, 3, 10] {
        let (delivered, secs, cpu) = run(readers, rate, seconds, bytes, batch, reader_cpu)?;
        let per_1k = cpu * 1000.0 * 1000.0 / delivered as f64;
        println!(
            "{batch:>18} {:>14.0} {:>14.0} {per_1k:>22.2}",
            delivered as f64 / secs,
            delivered as f64 / secs / batch as f64
        );
        println!(
            "RESULT {}",
            serde_json::json!({
                "scenario": "floor", "server": "floor", "messages_per_write": batch,
                "deliveries_per_s": delivered as f64 / secs, "cpu_ms_per_1k": per_1k,
                "readers": readers, "rate": rate, "bytes": bytes,
            })
        );
    }
    Ok(())
}

/// One row: `rate` updates a second for `seconds`, each written to every reader, `batch`
/// updates to a write. Returns (deliveries, seconds, sender CPU seconds).
/// Starts this binary again on `reader_cpu` as the readers (`args`, then the address to read
/// from) and accepts their `readers` connections.
fn spawn_readers(
    reader_cpu: usize,
    readers: usize,
    args: &[&str],
) -> anyhow::Result<(std::process::Child, Vec<std::net::TcpStream>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let child = Command::new("taskset")
        .arg("-c")
        .arg(reader_cpu.to_string())
        .arg(std::env::current_exe()?)
        .args(args)
        .args([addr.as_str(), "--readers", &readers.to_string()])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut socks = Vec::with_capacity(readers);
    for _ in 0..readers {
        let (s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        socks.push(s);
    }
    Ok((child, socks))
}

fn run(
    readers: usize,
    rate: usize,
    seconds: usize,
    bytes: usize,
    batch: usize,
    reader_cpu: usize,
) -> anyhow::Result<(u64, f64, f64)> {
    let (child, mut socks) = spawn_readers(reader_cpu, readers, &["--read-from"])?;
    let message = vec![0x55u8; bytes * batch];
    // Writes come every `batch` update periods, `batch` updates at a time.
    let period = Duration::from_secs_f64(batch as f64 / rate as f64);
    let rounds = (seconds * rate).div_ceil(batch);
    let cpu0 = chorus_tests::process_cpu_seconds(std::process::id());
    let t0 = Instant::now();
    let mut next = t0;
    for _ in 0..rounds {
        for s in &mut socks {
            s.write_all(&message)?;
        }
        next += period;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = chorus_tests::process_cpu_seconds(std::process::id()) - cpu0;
    drop(socks);
    let out = child.wait_with_output()?;
    let got: u64 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    let sent = (rounds * batch * readers * bytes) as u64;
    anyhow::ensure!(got == sent, "readers got {got} bytes of {sent}");
    Ok(((rounds * batch * readers) as u64, secs, cpu))
}

/// The reader process: one thread, one task per socket (as the load generator reads), each
/// reading until the sender closes; prints the bytes received.
fn read_all(addr: &str, readers: usize) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let total = rt.block_on(async {
        let mut tasks = Vec::with_capacity(readers);
        for _ in 0..readers {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut total = 0u64;
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                total
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await?;
        }
        anyhow::Ok(total)
    })?;
    println!("{total}");
    Ok(())
}

/// The join storm's floor: `bytes` to each of `readers` sockets by plain blocking writes, one
/// socket after another. Prints the time until every reader had all of it (and the median
/// reader's), as a `join-floor` result.
fn join(bytes: usize, readers: usize, reader_cpu: usize) -> anyhow::Result<()> {
    use std::io::Read;
    let expect = bytes.to_string();
    let (child, mut socks) =
        spawn_readers(reader_cpu, readers, &["--expect", &expect, "--read-join"])?;
    let payload = vec![0x55u8; bytes];
    let cpu0 = chorus_tests::process_cpu_seconds(std::process::id());
    let t0 = Instant::now();
    // One thread per socket waits for its reader's "have it all" byte, so that each reader's
    // time is taken when it answers, not when the writing is over.
    let acks: Vec<_> = socks
        .iter()
        .map(|s| {
            let mut s = s.try_clone()?;
            Ok(std::thread::spawn(move || {
                let mut b = [0u8; 1];
                s.read_exact(&mut b).map(|()| t0.elapsed())
            }))
        })
        .collect::<anyhow::Result<_>>()?;
    for s in &mut socks {
        s.write_all(&payload)?;
    }
    let mut times = Vec::with_capacity(readers);
    for a in acks {
        let t = a
            .join()
            .map_err(|_| anyhow::anyhow!("ack thread panicked"))??;
        times.push(t.as_secs_f64() * 1000.0);
    }
    let cpu = chorus_tests::process_cpu_seconds(std::process::id()) - cpu0;
    drop(socks);
    child.wait_with_output()?;
    times.sort_by(f64::total_cmp);
    let all_ms = times.last().copied().unwrap_or(0.0);
    let p50_ms = times.get(times.len() / 2).copied().unwrap_or(0.0);
    println!(
        "bench_send_floor --join: {bytes} B to each of {readers} loopback sockets by blocking \
         writes: every reader had it all after {all_ms:.0} ms (median reader {p50_ms:.0} ms), \
         sender CPU {cpu:.2} s"
    );
    println!(
        "RESULT {}",
        serde_json::json!({
            "scenario": "join-floor", "server": "floor", "readers": readers, "doc_bytes": bytes,
            "all_ms": all_ms, "p50_ms": p50_ms, "sender_cpu_s": cpu,
        })
    );
    Ok(())
}

/// The join floor's reader process: one task per socket reads until it has `expect` bytes,
/// answers one byte, then reads on until the sender closes.
fn read_join(addr: &str, readers: usize, expect: usize) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    rt.block_on(async {
        let mut tasks = Vec::with_capacity(readers);
        for _ in 0..readers {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut total = 0usize;
                let mut acked = false;
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    total += n;
                    if !acked && total >= expect {
                        acked = true;
                        if s.write_all(&[1]).await.is_err() {
                            break;
                        }
                    }
                }
            }));
        }
        for t in tasks {
            t.await?;
        }
        anyhow::Ok(())
    })
}
