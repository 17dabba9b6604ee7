//! The server the lab's Pods run: a TCP echo (requests come back byte for byte),
//! a UDP echo that answers the datagram "?" with the server's name (so a probe
//! learns which backend answered), and a TCP sink for the stream test.
use std::{net::SocketAddr, sync::Arc};

use anyhow::{bail, Context as _, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
};

#[derive(Clone, Debug, Default)]
pub struct ServeOpts {
    pub tcp: Option<u16>,
    pub udp: Option<u16>,
    pub sink: Option<u16>,
    pub name: String,
}

/// Serves until the process is killed (or a listener fails).
pub fn serve(opts: ServeOpts) -> Result<()> {
    if opts.tcp.is_none() && opts.udp.is_none() && opts.sink.is_none() {
        bail!("nothing to serve: give --tcp, --udp and/or --sink");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(p) = opts.tcp {
            let l = TcpListener::bind(("0.0.0.0", p))
                .await
                .with_context(|| format!("TCP port {p}"))?;
            tasks.spawn(accept_loop(l, false));
        }
        if let Some(p) = opts.sink {
            let l = TcpListener::bind(("0.0.0.0", p))
                .await
                .with_context(|| format!("TCP port {p}"))?;
            tasks.spawn(accept_loop(l, true));
        }
        if let Some(p) = opts.udp {
            let s = UdpSocket::bind(("0.0.0.0", p))
                .await
                .with_context(|| format!("UDP port {p}"))?;
            tasks.spawn(udp_echo(s, Arc::from(opts.name.as_str())));
        }
        match tasks.join_next().await {
            Some(Ok(r)) => r,
            Some(Err(e)) => Err(e.into()),
            None => Ok(()),
        }
    })
}

async fn accept_loop(l: TcpListener, sink: bool) -> Result<()> {
    loop {
        let (s, _) = l.accept().await?;
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let _ = if sink { discard(s).await } else { echo(s).await };
        });
    }
}

async fn echo(mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        s.write_all(&buf[..n]).await?;
    }
}

async fn discard(mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    while s.read(&mut buf).await? > 0 {}
    Ok(())
}

async fn udp_echo(s: UdpSocket, name: Arc<str>) -> Result<()> {
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, from): (usize, SocketAddr) = s.recv_from(&mut buf).await?;
        let answer: &[u8] = if &buf[..n] == b"?" { name.as_bytes() } else { &buf[..n] };
        // A full socket buffer drops the answer, as a real server would.
        let _ = s.send_to(answer, from).await;
    }
}
