//! The control protocol: one JSON object per line each way, documented in docs/daemon.md.
//! Pure data; the server and the client only move these across the socket.

use crate::backend::{AttachMode, HostMatch, VmUsbDevice};
use serde::{Deserialize, Serialize};

/// Longest request or reply line accepted, newline included. A longer line is refused
/// and the connection closed, so a peer cannot make the daemon buffer without bound.
pub const MAX_LINE: usize = 64 * 1024;

/// Longest reply line the client accepts (a status with hundreds of devices is large).
pub const MAX_REPLY_LINE: usize = 16 * 1024 * 1024;

/// A request from a client: `{"request": "status"}`, `{"request": "why", "selector": "1-3"}`...
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Every device, where it is, where it should be and why, and pending retries.
    Status {},
    /// Which rule decides the devices a selector matches, and why the others do not.
    Why {
        /// A selector (the selector grammar).
        selector: String,
    },
    /// Manual override: put the device on this VM until it is unplugged or cleared.
    Attach {
        /// Must match exactly one device.
        selector: String,
        /// A VM named in the config.
        vm: String,
        /// How QEMU finds the device (default: the matching rule's, else `address`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<AttachMode>,
    },
    /// Manual override: keep the device on the host until it is unplugged or cleared.
    Detach {
        /// Must match exactly one device.
        selector: String,
    },
    /// Drop the manual override of the matching devices: the rules decide again.
    Clear {
        /// The devices whose override goes.
        selector: String,
    },
    /// Re-read the config file (like SIGHUP); a bad file keeps the running config.
    Reload {},
    /// One toggle-service line (`toggle`, `host`, `guest`, a profile name, `status`),
    /// answered with [`Reply::Routing`] (docs/routing.md).
    Routing {
        /// The line, without its newline.
        line: String,
    },
    /// Every usb-host device a VM has, read over the daemon's own connection to it (QEMU
    /// serves one client per monitor, and the daemon holds it), answered with
    /// [`Reply::VmDevices`]. `failed` while the VM is down.
    VmDevices {
        /// A VM named in the config.
        vm: String,
    },
}

/// The daemon's answer: `{"reply": "done", "message": "..."}`, `{"reply": "error", ...}`...
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// Answer to `status`.
    Status(Box<StatusReport>),
    /// Answer to `why`.
    Why(WhyReport),
    /// Answer to `routing`: the toggle service's reply line (`ok PROFILE 0xMASK` or
    /// `err REASON`).
    Routing {
        /// The reply line, without its newline.
        line: String,
    },
    /// Answer to `vm_devices`.
    VmDevices {
        /// The VM.
        vm: String,
        /// Its usb-host devices, as `usbroute vm devices --json` prints them.
        devices: Vec<VmDevice>,
    },
    /// A command was carried out (or accepted: the reconcile loop does the work).
    Done {
        /// What happened, for a human.
        message: String,
    },
    /// The request was not carried out.
    Error {
        /// Which kind of failure.
        kind: ErrorKind,
        /// What went wrong and what to do, naming the device, VM or file.
        message: String,
    },
}

impl Reply {
    /// A `Done` reply.
    pub fn done(message: impl Into<String>) -> Self {
        Reply::Done {
            message: message.into(),
        }
    }

    /// An `Error` reply.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Self {
        Reply::Error {
            kind,
            message: message.into(),
        }
    }
}

/// Kinds of refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The peer is neither root nor in the control group.
    PermissionDenied,
    /// Not valid JSON, an unknown request, or a line over [`MAX_LINE`].
    BadRequest,
    /// The selector matches no device, or the VM is not in the config.
    NotFound,
    /// The selector matches more than one device where one is needed.
    Ambiguous,
    /// The request was valid but failed (a bad config on reload, ...).
    Failed,
    /// Too many connections (from this peer, or in all); retry later.
    Busy,
}

/// Answer to `status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The config file in use, `None` when running with the empty policy.
    pub config: Option<String>,
    /// `true` when the daemon only logs what it would do.
    pub dry_run: bool,
    /// Every VM in the config.
    pub vms: Vec<VmStatus>,
    /// Every USB device on the host (hubs included, they say why they stay).
    pub devices: Vec<DeviceStatus>,
    /// What the daemon last did (or, in a dry run, would do) for each `[[controller]]`
    /// rule, and for removed rules whose controller could not be given back.
    #[serde(default)]
    pub controllers: Vec<ControllerStatus>,
    /// Why the last read of sysfs failed, when it did: `devices` is then the last good
    /// picture, kept rather than taking every device for unplugged. `null` when sysfs
    /// reads fine.
    #[serde(default)]
    pub sysfs_error: Option<String>,
    /// `true` when the daemon has nothing left to do on its own: every device present is
    /// planned, every VM that is up has been listed, no action is in flight and none
    /// waits for a retry (in a dry run: nothing more it would do). Scripts and tests wait
    /// for this instead of sleeping.
    #[serde(default)]
    pub at_rest: bool,
    /// Port routing as the engine's reconciler last read it: the profile the register
    /// matches, XUSB2PR, the profile usbroute holds it to, what a dry run would write
    /// back. Absent when the daemon does not route ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<crate::engine::routing::RoutingStatus>,
}

/// One `[[controller]]` rule in `status`: its group's bind (or restore) and how it went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerStatus {
    /// The controller's PCI address.
    pub pci: String,
    /// The VM the rule gives it to.
    pub vm: String,
    /// `false` when the bind or restore failed (the message says why and what to do).
    pub ok: bool,
    /// What was done, as in the log.
    pub message: String,
}

/// One VM in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// Its name in the config.
    pub name: String,
    /// Its QMP socket.
    pub qmp: String,
    /// `true` when its QMP socket accepted a connection.
    pub up: bool,
    /// `true` while its monitor takes the daemon's connection but another client holds it
    /// (QEMU serves one client per monitor): the daemon waits its turn, and the log says
    /// how to give usbroute a monitor of its own.
    #[serde(default)]
    pub monitor_held: bool,
    /// Ids of the usb-host devices usbroute gave it.
    pub devices: Vec<String>,
}

/// One usb-host device of a VM in a `vm_devices` reply: the fields `usbroute vm devices
/// --json` prints (`id`, `attached`, `ours` and the match fields that apply).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDevice {
    /// The hypervisor's handle (QEMU: the device id).
    pub id: String,
    /// `true` when the host device is really connected to the guest now.
    pub attached: bool,
    /// `true` when usbroute attached it.
    pub ours: bool,
    /// What it matches on (`bus`+`address`, `bus`+`port`, `vendor_id`+`product_id`).
    #[serde(flatten)]
    pub matcher: HostMatch,
}

impl From<&VmUsbDevice> for VmDevice {
    fn from(d: &VmUsbDevice) -> Self {
        VmDevice {
            id: d.id.clone(),
            attached: d.attached,
            ours: d.is_ours(),
            matcher: d.matcher.clone(),
        }
    }
}

/// One device in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// Port path (`1-3.4`).
    pub port: String,
    /// `bus:address`, if known.
    pub address: Option<String>,
    /// `046d:c016 Logitech Optical Mouse`.
    pub label: String,
    /// Where it is now: `host` or a VM name.
    pub location: String,
    /// Where the policy wants it: `host` or a VM name.
    pub desired: String,
    /// Why (the deciding rule, an override, or a built-in protection).
    pub reason: String,
    /// A manual override in force (`attach:VM` or `detach`), if any.
    #[serde(rename = "override")]
    pub manual_override: Option<String>,
    /// A failed action waiting for its retry, if any.
    pub pending: Option<Pending>,
}

/// A failed action the daemon will retry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// `attach to VM` or `detach from VM`.
    pub action: String,
    /// How many attempts failed so far.
    pub attempts: u32,
    /// The last error, naming the VM.
    pub last_error: String,
}

/// Answer to `why`: one entry per device the selector matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhyReport {
    /// The devices.
    pub devices: Vec<WhyDevice>,
}

/// Why one device goes where it goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhyDevice {
    /// Port path.
    pub port: String,
    /// The controller-anchored place (`0000:00:14.0/3.4.2`), when its controller is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub physical_port: Option<String>,
    /// Label.
    pub label: String,
    /// `host` or a VM name.
    pub target: String,
    /// The decision in one sentence.
    pub reason: String,
    /// Every rule in order, with whether it matched and why (not).
    pub rules: Vec<RuleVerdict>,
    /// What it follows, when a rule's `follow` decided it (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub followed: Option<Followed>,
}

/// The device a followed device came after (a rule's `follow`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Followed {
    /// The followed rule, as `rules[].rule` names it.
    pub rule: String,
    /// The port path of the device that left (`1-3`).
    pub port: String,
    /// Its controller-anchored place, the same as this device's.
    pub physical_port: String,
    /// Its `vendor:product` (`0627:0001`), `null` when unreadable.
    pub id: Option<String>,
    /// When it left, UTC (`2026-12-01T19:55:04Z`).
    pub left_at: String,
    /// How long after it left this device appeared, in milliseconds.
    pub after_ms: u64,
}

/// One rule's verdict on one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleVerdict {
    /// How the rule is named (`rule 2 (port:1-3 -> win11)`, `file:line`).
    pub rule: String,
    /// `true` when its selector matched.
    pub matched: bool,
    /// `true` when it is the rule that decided.
    pub decided: bool,
    /// Why it matched or not, or why it did not decide.
    pub detail: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_request_reads_documented_form() {
        let line = r#"{"request":"attach","selector":"port:1-3","vm":"win11","by":"port"}"#;

        let req: Request = serde_json::from_str(line).unwrap();

        assert_eq!(
            req,
            Request::Attach {
                selector: "port:1-3".into(),
                vm: "win11".into(),
                by: Some(AttachMode::Port)
            }
        );
    }

    #[test]
    fn routing_request_and_reply_read_documented_form() {
        let req: Request =
            serde_json::from_str(r#"{"request":"routing","line":"toggle"}"#).unwrap();
        let reply = Reply::Routing {
            line: "ok guest 0x3ffc".into(),
        };

        let written = serde_json::to_string(&reply).unwrap();

        assert_eq!(
            req,
            Request::Routing {
                line: "toggle".into()
            }
        );
        assert_eq!(written, r#"{"reply":"routing","line":"ok guest 0x3ffc"}"#);
    }

    #[test]
    fn status_request_reads_bare_form() {
        let req: Request = serde_json::from_str(r#"{"request":"status"}"#).unwrap();

        assert_eq!(req, Request::Status {});
    }

    #[test]
    fn unknown_field_in_request_is_refused() {
        let line = r#"{"request":"status","verbose":true}"#;

        let err = serde_json::from_str::<Request>(line).unwrap_err();

        assert!(err.to_string().contains("verbose"), "{err}");
    }

    #[test]
    fn error_reply_writes_documented_form() {
        let reply = Reply::error(ErrorKind::PermissionDenied, "uid 65534 refused");

        let line = serde_json::to_string(&reply).unwrap();

        assert_eq!(
            line,
            r#"{"reply":"error","kind":"permission_denied","message":"uid 65534 refused"}"#
        );
    }

    #[test]
    fn status_reply_round_trips() {
        let reply = Reply::Status(Box::new(StatusReport {
            config: Some("/etc/usbroute.toml".into()),
            dry_run: false,
            vms: vec![VmStatus {
                name: "win11".into(),
                qmp: "/run/qemu/win11.qmp".into(),
                up: true,
                monitor_held: false,
                devices: vec!["usbroute-port-1-3".into()],
            }],
            devices: vec![],
            controllers: vec![ControllerStatus {
                pci: "0000:00:1d.7".into(),
                vm: "win11".into(),
                ok: true,
                message: "IOMMU group 7 is on vfio-pci (4 function(s)), ready for VM win11".into(),
            }],
            sysfs_error: None,
            at_rest: true,
            routing: Some(crate::engine::routing::RoutingStatus {
                controller: "0000:00:14.0".into(),
                profile: Some("guest".into()),
                xusb2pr: 0x3ffc,
                intent: Some("guest".into()),
                would: None,
                error: None,
            }),
        }));

        let back: Reply = serde_json::from_str(&serde_json::to_string(&reply).unwrap()).unwrap();

        assert_eq!(back, reply);
    }

    #[test]
    fn vm_devices_request_reads_documented_form() {
        let req: Request =
            serde_json::from_str(r#"{"request":"vm_devices","vm":"win11"}"#).unwrap();

        assert_eq!(req, Request::VmDevices { vm: "win11".into() });
    }

    #[test]
    fn vm_devices_reply_writes_the_vm_devices_json_and_round_trips() {
        let reply = Reply::VmDevices {
            vm: "win11".into(),
            devices: vec![
                VmDevice {
                    id: "usbroute-port-1-3.4".into(),
                    attached: false,
                    ours: true,
                    matcher: HostMatch::Port {
                        bus: 1,
                        port: "3.4".into(),
                    },
                },
                VmDevice {
                    id: "mine".into(),
                    attached: true,
                    ours: false,
                    matcher: HostMatch::Address { bus: 2, address: 7 },
                },
            ],
        };

        let line = serde_json::to_string(&reply).unwrap();
        let back: Reply = serde_json::from_str(&line).unwrap();

        assert_eq!(
            line,
            r#"{"reply":"vm_devices","vm":"win11","devices":[{"id":"usbroute-port-1-3.4","attached":false,"ours":true,"bus":1,"port":"3.4"},{"id":"mine","attached":true,"ours":false,"bus":2,"address":7}]}"#
        );
        assert_eq!(back, reply);
    }

    #[test]
    fn vm_device_is_printed_as_vm_devices_json_prints_the_listed_device() {
        let listed = VmUsbDevice {
            id: "usbroute-id-046d-c016".into(),
            attached: true,
            key: crate::backend::qemu::ids::key_of("usbroute-id-046d-c016"),
            matcher: HostMatch::Id {
                vendor_id: crate::inventory::HexId(0x046d),
                product_id: crate::inventory::HexId(0xc016),
            },
        };

        let through_daemon = serde_json::to_value(VmDevice::from(&listed)).unwrap();

        assert_eq!(through_daemon, serde_json::to_value(&listed).unwrap());
    }

    #[test]
    fn status_from_a_daemon_without_monitor_held_reads_as_not_held() {
        let vm = r#"{"name":"a","qmp":"/run/a.qmp","up":false,"devices":[]}"#;

        let status: VmStatus = serde_json::from_str(vm).unwrap();

        assert!(!status.monitor_held);
    }
}
