//! What the live half reads from xenstore: which domain id has a name, a domain's qusb
//! controllers (libxl's backend nodes `state`, `usb-ver`, `num-ports`), and its port
//! nodes with our marks, read in one transaction so they are one snapshot. Bounded: at
//! most [`MAX_DOMAINS`] domains and [`xenstore::MAX_NODES`] nodes are read.

use super::client::{Xenstore, XsError};
use super::usb_list::{UsbCtrl, MAX_CONTROLLERS, MAX_PORTS};
use super::xenstore::{self, number, DomainPorts, BACKEND_ROOT, MARK_DIR, QUSB};

/// The most domains looked through for a name.
pub const MAX_DOMAINS: usize = 4096;

/// The id of the running domain named `name`, from `/local/domain/<id>/name`; `hint`,
/// the id it had, is asked first (one read instead of one per domain).
pub async fn domain_id(
    xs: &Xenstore,
    name: &str,
    hint: Option<u32>,
) -> Result<Option<u32>, XsError> {
    let named = |domid: u32| async move {
        let path = format!("/local/domain/{domid}/name");
        Ok::<_, XsError>(xs.read(0, &path).await?.as_deref() == Some(name))
    };
    if let Some(domid) = hint {
        if named(domid).await? {
            return Ok(Some(domid));
        }
    }
    let ids = xs.directory(0, "/local/domain").await?;
    for domid in ids.iter().take(MAX_DOMAINS).filter_map(|id| number(id)) {
        if named(domid).await? {
            return Ok(Some(domid));
        }
    }
    Ok(None)
}

/// The directory of domain `domid`'s qusb controllers in dom0's backend tree.
pub fn qusb_dir(domid: u32) -> String {
    format!("{BACKEND_ROOT}/{QUSB}/{domid}")
}

/// Domain `domid`'s qusb controllers as libxl's backend nodes describe them (the same
/// shape as `xl usb-list` gives, without its port lines).
pub async fn controllers(xs: &Xenstore, tx: u32, domid: u32) -> Result<Vec<UsbCtrl>, XsError> {
    let dir = qusb_dir(domid);
    let mut found = Vec::new();
    for name in xs.directory(tx, &dir).await?.iter().take(MAX_CONTROLLERS) {
        let Some(devid) = number(name) else { continue };
        let field = |node: &'static str| {
            let path = format!("{dir}/{devid}/{node}");
            async move { Ok::<_, XsError>(xs.read(tx, &path).await?.as_deref().and_then(number)) }
        };
        found.push(UsbCtrl {
            devid,
            kind: QUSB.into(),
            backend: 0,
            state: field("state").await?.unwrap_or(0),
            version: field("usb-ver").await?.unwrap_or(0),
            ports: field("num-ports")
                .await?
                .and_then(|n| u8::try_from(n).ok())
                .map_or(0, |n| n.min(MAX_PORTS)),
            listed: Vec::new(),
        });
    }
    Ok(found)
}

/// Domain `domid`'s port nodes and our marks, for the controllers in `ctrls`.
pub async fn ports(
    xs: &Xenstore,
    tx: u32,
    domid: u32,
    ctrls: &[UsbCtrl],
) -> Result<DomainPorts, XsError> {
    let mut nodes: Vec<(String, String)> = Vec::new();
    for ctrl in ctrls {
        for dir in ["port", MARK_DIR] {
            let base = format!("{}/{}/{dir}", qusb_dir(domid), ctrl.devid);
            for child in xs.directory(tx, &base).await? {
                if nodes.len() >= xenstore::MAX_NODES {
                    break;
                }
                let path = format!("{base}/{child}");
                if let Some(value) = xs.read(tx, &path).await? {
                    nodes.push((path, value));
                }
            }
        }
    }
    Ok(xenstore::domain_ports(
        domid,
        nodes.iter().map(|(p, v)| (p.as_str(), v.as_str())),
    ))
}

/// Controllers and ports read in one transaction (abandoned after: it only read).
pub async fn snapshot(xs: &Xenstore, domid: u32) -> Result<(Vec<UsbCtrl>, DomainPorts), XsError> {
    let tx = xs.transaction_start().await?;
    let read = async {
        let ctrls = controllers(xs, tx, domid).await?;
        let ports = ports(xs, tx, domid, &ctrls).await?;
        Ok::<_, XsError>((ctrls, ports))
    }
    .await;
    let ended = xs.transaction_end(tx, false).await;
    let read = read?;
    ended?;
    Ok(read)
}
