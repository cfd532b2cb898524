//! The commands of one attach, written to QEMU together: one round trip.
//!
//! Why one batch is enough: QEMU runs a monitor's commands in the order received, so a
//! `device_add` written right behind the `add-fd` that passes its file finds the file
//! there, and a `qom-get` behind the `device_add` reads the device it made. For the
//! `device_add` to name the file set before QEMU has answered `add-fd`, usbroute chooses
//! the set's id itself ([`fdset_id`]).
//!
//! What `device_add` returning means (QEMU's `hw/usb/host-libusb.c`, realize): a usb-host
//! by address (`hostbus` + `hostaddr`) or by passed file (`hostdevice`) is opened and
//! attached to the guest's bus inside `device_add`, or `device_add` fails; success means
//! attached, and nothing is asked after it. By port or id QEMU may keep the device waiting
//! for a match (its 2 s rescan): `attached` is read in the same batch when the caller
//! wants to say so (the CLI; the engine does not need it).

use super::qmp::QmpError;
use serde_json::{json, Value};

/// The fdset id of this process's `n`th passed file: bit 30 set, then 21 bits of the
/// process id and 9 of count. `add-fd` with an id that exists adds to that set, and QEMU
/// opens the first file of a set that fits: an id of its own per process keeps two
/// usbroute processes (on two monitors of one QEMU) from sharing a set, and QEMU's own
/// choice of ids starts at 0, far below. Below 2^31: QEMU reads `/dev/fdset/N` as an
/// `int`. A count that wraps meets at most a set of its own that lingers empty (QEMU
/// closes a removed file at once), which is harmless: one file goes through at a time.
pub fn fdset_id(n: u64) -> u64 {
    (1 << 30) | ((u64::from(std::process::id()) & 0x1f_ffff) << 9) | (n & 0x1ff)
}

/// The commands of one attach, in the order QEMU must run them: with `fdset`, `add-fd`
/// first (the file rides with it) and `remove-fd` after `device_add` (QEMU keeps its own
/// duplicate once the device is realized; the set is only the hand-over); with `confirm`,
/// a `qom-get` of `attached` last.
pub fn commands(
    mut device_add: Value,
    id: &str,
    fdset: Option<u64>,
    confirm: bool,
) -> Vec<(&'static str, Option<Value>)> {
    let mut commands = Vec::with_capacity(4);
    if let Some(set) = fdset {
        commands.push(("add-fd", Some(json!({"fdset-id": set, "opaque": id}))));
        // With `hostdevice` QEMU opens that path once and ignores hostbus and hostaddr for
        // the open; they stay set so listings show the address.
        device_add["hostdevice"] = json!(format!("/dev/fdset/{set}"));
    }
    commands.push(("device_add", Some(device_add)));
    if let Some(set) = fdset {
        commands.push(("remove-fd", Some(json!({"fdset-id": set}))));
    }
    if confirm {
        let path = format!("/machine/peripheral/{id}");
        commands.push((
            "qom-get",
            Some(json!({"path": path, "property": "attached"})),
        ));
    }
    commands
}

/// What the batch of [`commands`] answered.
#[derive(Debug)]
pub struct Outcome {
    /// `add-fd`'s answer, when a file was passed.
    pub add_fd: Option<Result<Value, QmpError>>,
    /// `device_add`'s answer.
    pub device_add: Result<Value, QmpError>,
    /// `attached` as read, when asked.
    pub attached: Option<Result<Value, QmpError>>,
}

impl Outcome {
    /// Split the results of [`commands`] run with the same `fdset` (some or none) and
    /// `confirm`. `remove-fd`'s answer is dropped: a set QEMU could not remove only lingers
    /// until QEMU exits, and the attach itself is what it was.
    pub fn from_results(results: Vec<Result<Value, QmpError>>, fd: bool, confirm: bool) -> Self {
        let mut results = results.into_iter();
        let mut next = || {
            results.next().unwrap_or(Err(QmpError::Closed {
                command: None,
                partial: None,
            }))
        };
        let add_fd = fd.then(&mut next);
        let device_add = next();
        if fd {
            let _remove_fd = next();
        }
        let attached = confirm.then(next);
        Outcome {
            add_fd,
            device_add,
            attached,
        }
    }

    /// The first failure of passing the file and adding the device (a failed `add-fd`
    /// explains the `device_add` failure that follows it).
    pub fn added(&self) -> Result<(), QmpError> {
        if let Some(Err(e)) = &self.add_fd {
            return Err(e.clone());
        }
        self.device_add.as_ref().map(|_| ()).map_err(Clone::clone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(commands: &[(&str, Option<Value>)]) -> Vec<String> {
        commands.iter().map(|(c, _)| c.to_string()).collect()
    }

    #[test]
    fn by_address_with_a_passed_file_is_add_fd_device_add_remove_fd() {
        let add =
            json!({"driver": "usb-host", "id": "usbroute-addr-1-5", "hostbus": 1, "hostaddr": 5});

        let commands = commands(add, "usbroute-addr-1-5", Some(77), false);

        assert_eq!(names(&commands), ["add-fd", "device_add", "remove-fd"]);
        assert_eq!(
            commands[0].1,
            Some(json!({"fdset-id": 77, "opaque": "usbroute-addr-1-5"}))
        );
        assert_eq!(
            commands[1].1.as_ref().unwrap()["hostdevice"],
            "/dev/fdset/77"
        );
        assert_eq!(commands[2].1, Some(json!({"fdset-id": 77})));
    }

    #[test]
    fn by_port_reads_attached_behind_device_add() {
        let add = json!({"driver": "usb-host", "id": "usbroute-port-1-2"});

        let commands = commands(add, "usbroute-port-1-2", None, true);

        assert_eq!(names(&commands), ["device_add", "qom-get"]);
        assert_eq!(
            commands[1].1,
            Some(json!({"path": "/machine/peripheral/usbroute-port-1-2", "property": "attached"}))
        );
    }

    #[test]
    fn a_failed_add_fd_is_the_failure_reported() {
        let refused = |desc: &str| QmpError::Command {
            command: "x".into(),
            class: "GenericError".into(),
            desc: desc.into(),
        };
        let results = vec![
            Err(refused("no fd")),
            Err(refused("failed to open /dev/fdset/77")),
            Ok(json!({})),
        ];

        let outcome = Outcome::from_results(results, true, false);

        let Err(QmpError::Command { desc, .. }) = outcome.added() else {
            panic!("not refused")
        };
        assert_eq!(desc, "no fd");
    }

    #[test]
    fn fdset_ids_of_one_process_differ_and_name_it() {
        let (a, b) = (fdset_id(0), fdset_id(1));

        assert_ne!(a, b);
        assert!(b < 1 << 31, "QEMU parses /dev/fdset/N as an int");
        assert_eq!(
            (a >> 9) & 0x1f_ffff,
            u64::from(std::process::id()) & 0x1f_ffff
        );
    }
}
