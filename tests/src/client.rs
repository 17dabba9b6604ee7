//! Real clients inside Pod network namespaces.
//!
//! A socket belongs to the network namespace of the thread that created it, so a
//! client runs its connect/bind on a short-lived thread that has entered the Pod's
//! namespace; the resulting socket can then be used from anywhere.
use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};

/// Runs `f` on a thread inside the named network namespace (/run/netns/NAME).
pub fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let path = format!("/run/netns/{netns}");
    let ns = File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::spawn(move || {
        // SAFETY: setns on this thread only; the fd is valid for the call.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(anyhow!("setns into {path}: {}", std::io::Error::last_os_error()));
        }
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow!("client thread panicked"))?
}

/// `GET path` over HTTP/1.1 from `netns` to `to`: (status code, body).
pub fn http_get(netns: &str, to: SocketAddr, path: &str) -> Result<(u16, String)> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n");
    in_netns(netns, move || -> Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(request.as_bytes())?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .context("no HTTP status line")?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    })?
}

/// One TCP request: connect from `netns` to `addr`, send a line, return the answer
/// line (the echo server answers with its Pod name).
pub fn tcp_ask(netns: &str, addr: SocketAddr) -> Result<String> {
    let mut s = TcpSession::connect(netns, addr)?;
    s.ask()
}

/// One UDP request from a fresh socket: send a datagram, return the answer.
pub fn udp_ask(netns: &str, addr: SocketAddr) -> Result<String> {
    let sock = in_netns(netns, move || -> Result<UdpSocket> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.connect(addr)?;
        Ok(s)
    })??;
    udp_ask_on(&sock)
}

/// One UDP "peer" request from a fresh socket: the answering backend's name
/// and the address it saw the datagram come from (source NAT checks). The
/// socket is connected, so an answer also proves the reply came from `addr`.
pub fn udp_ask_peer(netns: &str, addr: SocketAddr) -> Result<(String, SocketAddr)> {
    let sock = in_netns(netns, move || -> Result<UdpSocket> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.connect(addr)?;
        Ok(s)
    })??;
    sock.send(b"peer\n")?;
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).context("no UDP answer")?;
    let line = String::from_utf8_lossy(&buf[..n]).trim().to_string();
    let (name, peer) = line
        .split_once(' ')
        .with_context(|| format!("unexpected answer {line:?}"))?;
    Ok((
        name.to_string(),
        peer.parse().with_context(|| format!("unexpected answer {line:?}"))?,
    ))
}

/// Sends one datagram on an existing (connected) socket and returns the answer.
pub fn udp_ask_on(sock: &UdpSocket) -> Result<String> {
    sock.send(b"hello\n")?;
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).context("no UDP answer")?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

/// One datagram on a connected UDP socket: the answer, or None (no answer
/// within the socket's read timeout, or an error).
pub fn udp_try_on(sock: &UdpSocket) -> Option<String> {
    sock.send(b"hello\n").ok()?;
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).trim().to_string())
}

/// Asks on `sock` every 50 ms until `other` answers: how long that took and
/// the answers before (None: no answer). Fails once `limit` has passed.
pub fn udp_wait_moved(sock: &UdpSocket, other: &str, limit: Duration) -> Result<(Duration, Vec<Option<String>>)> {
    let since = std::time::Instant::now();
    let mut answers = Vec::new();
    loop {
        let a = udp_try_on(sock);
        if a.as_deref() == Some(other) {
            return Ok((since.elapsed(), answers));
        }
        answers.push(a);
        if since.elapsed() > limit {
            bail!("the same UDP socket still got {answers:?} after {limit:?}, never {other}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A persistent TCP connection to a Service: ask repeatedly on the same flow.
pub struct TcpSession {
    reader: BufReader<TcpStream>,
    stream: TcpStream,
    pub peer: SocketAddr,
}

impl TcpSession {
    pub fn connect(netns: &str, addr: SocketAddr) -> Result<Self> {
        let stream = in_netns(netns, move || TcpStream::connect_timeout(&addr, Duration::from_secs(2)))?
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        stream.set_nodelay(true)?;
        let peer = stream.peer_addr()?;
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            stream,
            peer,
        })
    }

    /// Connects from a given local address and port (e.g. two clients with the
    /// same source port).
    pub fn connect_from(netns: &str, local: SocketAddr, addr: SocketAddr) -> Result<Self> {
        let stream = in_netns(netns, move || -> std::io::Result<TcpStream> {
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            sock.set_reuse_address(true)?;
            sock.bind(&local.into())?;
            sock.connect_timeout(&addr.into(), Duration::from_secs(2))?;
            Ok(sock.into())
        })?
        .with_context(|| format!("connecting from {local} to {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        stream.set_nodelay(true)?;
        let peer = stream.peer_addr()?;
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            stream,
            peer,
        })
    }

    /// Closes the connection with a RST (SO_LINGER 0): no TIME_WAIT, so the
    /// client's port can be used again at once.
    pub fn abort(self) -> Result<()> {
        socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO))?;
        Ok(())
    }

    /// The connection's socket (its local address, socket options).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Sends a line and returns the answer line.
    pub fn ask(&mut self) -> Result<String> {
        self.ask_line("hello")
    }

    /// Asks the echo server which address it sees this connection from:
    /// returns (backend name, that address).
    pub fn ask_peer(&mut self) -> Result<(String, SocketAddr)> {
        let line = self.ask_line("peer")?;
        let (name, peer) = line
            .split_once(' ')
            .with_context(|| format!("unexpected answer {line:?}"))?;
        Ok((
            name.to_string(),
            peer.parse().with_context(|| format!("unexpected answer {line:?}"))?,
        ))
    }

    fn ask_line(&mut self, what: &str) -> Result<String> {
        self.stream.write_all(format!("{what}\n").as_bytes())?;
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).context("reading the answer")?;
        if n == 0 {
            bail!("connection closed by {}", self.peer);
        }
        Ok(line.trim().to_string())
    }
}

/// Asks `n` times from `client` and counts the answers (which backend
/// answered how often).
pub fn split(
    client: &str,
    n: usize,
    ask: impl Fn(&str) -> Result<String>,
) -> Result<std::collections::BTreeMap<String, usize>> {
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..n {
        *counts.entry(ask(client)?).or_insert(0) += 1;
    }
    Ok(counts)
}

/// Sends `size` bytes to `to` from `netns` (an echo that sends back all it
/// gets, such as [`crate::manifests::cat_pod`]), uploading while it reads,
/// and checks that the same bytes came back.
pub fn bulk_round_trip(netns: &str, to: SocketAddr, size: usize) -> Result<()> {
    in_netns(netns, move || -> Result<()> {
        let s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.set_write_timeout(Some(Duration::from_secs(20)))?;
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let (mut writer, sent) = (s.try_clone()?, data.clone());
        let upload = std::thread::spawn(move || {
            writer
                .write_all(&sent)
                .and_then(|()| writer.shutdown(std::net::Shutdown::Write))
        });
        let mut back = Vec::with_capacity(size);
        (&s).read_to_end(&mut back).context("reading the echo")?;
        upload
            .join()
            .map_err(|_| anyhow!("upload thread panicked"))?
            .context("uploading")?;
        if back != data {
            bail!(
                "{} of {size} bytes came back{}",
                back.len(),
                if back.len() == size { ", changed" } else { "" }
            );
        }
        Ok(())
    })?
}
