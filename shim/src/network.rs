//! A Pod's network: a veth pair between the node and the Pod namespace, the Pod's
//! /32 address, and routes both ways (Calico-style point-to-point: every host veth
//! carries the node's gateway address, the Pod routes everything via it).
use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd, OwnedFd},
};

use anyhow::{anyhow, Context as _, Result};
use futures::TryStreamExt as _;
use rtnetlink::{
    packet_route::{link::LinkAttribute, route::RouteScope},
    Handle, LinkUnspec, LinkVeth, RouteMessageBuilder,
};

use crate::netns;

/// Name of the host end of a Pod's veth: `fy` + 8 hex digits of its key (<= 15).
pub fn host_veth_name(pod_key: &str) -> String {
    let h = pod_key
        .bytes()
        .fold(0x811c_9dc5u32, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193));
    format!("fy{h:08x}")
}

/// A netlink handle in the network namespace `ns` (the socket is created on a
/// thread that entered it; the connection runs on the caller's runtime).
pub fn handle_in(ns: &OwnedFd) -> Result<Handle> {
    let rt = tokio::runtime::Handle::current();
    let (conn, handle, _) = netns::run_in(ns, move || {
        // The socket registers with the runtime's reactor.
        let _guard = rt.enter();
        rtnetlink::new_connection()
    })??;
    tokio::spawn(conn);
    Ok(handle)
}

/// A netlink handle in our own (the node's) network namespace.
pub fn handle_here() -> Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(conn);
    Ok(handle)
}

async fn index_of(h: &Handle, name: &str) -> Result<Option<u32>> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(l)) => Ok(Some(l.header.index)),
        Ok(None) => Ok(None),
        // ENODEV: no such link.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Wires a Pod namespace to the node: veth, addresses, routes.
pub async fn setup(
    node: &Handle,
    pod_ns_name: &str,
    host_veth: &str,
    pod_ip: Ipv4Addr,
    gateway: Ipv4Addr,
) -> Result<()> {
    if let Some(old) = index_of(node, host_veth).await? {
        node.link().del(old).execute().await.context("removing a stale veth")?;
    }
    let peer_tmp = format!("{host_veth}p");
    node.link()
        .add(LinkVeth::new(host_veth, &peer_tmp).build())
        .execute()
        .await
        .with_context(|| format!("creating veth {host_veth}"))?;
    let host_idx = index_of(node, host_veth)
        .await?
        .ok_or_else(|| anyhow!("veth {host_veth} vanished"))?;
    let peer_idx = index_of(node, &peer_tmp)
        .await?
        .ok_or_else(|| anyhow!("veth {peer_tmp} vanished"))?;
    let ns = netns::open(pod_ns_name)?;
    node.link()
        .set(LinkUnspec::new_with_index(peer_idx).setns_by_fd(ns.as_raw_fd()).build())
        .execute()
        .await
        .context("moving the veth into the Pod namespace")?;
    // Node side.
    node.address()
        .add(host_idx, gateway.into(), 32)
        .execute()
        .await
        .context("gateway address")?;
    node.link()
        .set(LinkUnspec::new_with_index(host_idx).up().build())
        .execute()
        .await?;
    node.route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(pod_ip, 32)
                .output_interface(host_idx)
                .scope(RouteScope::Link)
                .build(),
        )
        .execute()
        .await
        .context("route to the Pod")?;
    // Pod side.
    let pod = handle_in(&ns)?;
    let lo = index_of(&pod, "lo")
        .await?
        .ok_or_else(|| anyhow!("no lo in the Pod namespace"))?;
    pod.link()
        .set(LinkUnspec::new_with_index(lo).up().build())
        .execute()
        .await?;
    let eth = index_of(&pod, &peer_tmp)
        .await?
        .ok_or_else(|| anyhow!("veth peer missing in the Pod"))?;
    pod.link()
        .set(LinkUnspec::new_with_index(eth).name("eth0").build())
        .execute()
        .await?;
    pod.address()
        .add(eth, pod_ip.into(), 32)
        .execute()
        .await
        .context("Pod address")?;
    pod.link()
        .set(LinkUnspec::new_with_index(eth).up().build())
        .execute()
        .await?;
    pod.route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(gateway, 32)
                .output_interface(eth)
                .scope(RouteScope::Link)
                .build(),
        )
        .execute()
        .await
        .context("route to the gateway")?;
    pod.route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(gateway)
                .output_interface(eth)
                .build(),
        )
        .execute()
        .await
        .context("default route")?;
    Ok(())
}

/// Removes the host end (and with it the pair).
pub async fn teardown(node: &Handle, host_veth: &str) -> Result<()> {
    if let Some(idx) = index_of(node, host_veth).await? {
        node.link().del(idx).execute().await?;
    }
    Ok(())
}

/// Whether a link attribute list names `name` (used in tests).
pub fn has_name(attrs: &[LinkAttribute], name: &str) -> bool {
    attrs.iter().any(|a| matches!(a, LinkAttribute::IfName(n) if n == name))
}
