//! The procedures usbroute calls and the events it reads, with their argument and reply
//! layouts. Numbers and layouts checked against libvirt's `src/remote/remote_protocol.x`
//! (`enum remote_procedure`, the `remote_*_args`/`_ret`/`_msg` structs) and
//! `include/libvirt/{virterror,libvirt-domain}.h` of libvirt 11.3 for the enum values.

use super::xdr::{Decoder, Encoder, XdrError, STRING_MAX};
use super::{Domain, DomainEvent, Lifecycle};

/// `REMOTE_PROC_CONNECT_OPEN`: `remote_connect_open_args { remote_string name; unsigned flags; }`.
pub const CONNECT_OPEN: i32 = 1;
/// `REMOTE_PROC_CONNECT_CLOSE`: no args, no reply body.
pub const CONNECT_CLOSE: i32 = 2;
/// `REMOTE_PROC_DOMAIN_GET_XML_DESC`: `{ dom; unsigned flags; }` → `{ remote_nonnull_string xml; }`.
pub const DOMAIN_GET_XML_DESC: i32 = 14;
/// `REMOTE_PROC_DOMAIN_LOOKUP_BY_NAME`: `{ remote_nonnull_string name; }` → `{ dom; }`.
pub const DOMAIN_LOOKUP_BY_NAME: i32 = 23;
/// `REMOTE_PROC_AUTH_LIST`: no args → `{ remote_auth_type types<REMOTE_AUTH_TYPE_LIST_MAX>; }`.
pub const AUTH_LIST: i32 = 66;
/// `REMOTE_PROC_DOMAIN_ATTACH_DEVICE_FLAGS`: `{ dom; remote_nonnull_string xml; unsigned flags; }`.
pub const DOMAIN_ATTACH_DEVICE_FLAGS: i32 = 160;
/// `REMOTE_PROC_DOMAIN_GET_STATE`: `{ dom; unsigned flags; }` → `{ int state; int reason; }`.
pub const DOMAIN_GET_STATE: i32 = 212;
/// `REMOTE_PROC_CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY`: `{ int eventID; remote_domain dom; }`
/// → `{ int callbackID; }`.
pub const CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY: i32 = 316;
/// `REMOTE_PROC_DOMAIN_EVENT_CALLBACK_LIFECYCLE`: `{ int callbackID; { dom; int event; int detail; } }`.
pub const DOMAIN_EVENT_CALLBACK_LIFECYCLE: i32 = 318;
/// `REMOTE_PROC_DOMAIN_EVENT_CALLBACK_DEVICE_REMOVED`: `{ int callbackID; { dom; devAlias; } }`.
pub const DOMAIN_EVENT_CALLBACK_DEVICE_REMOVED: i32 = 333;
/// `REMOTE_PROC_DOMAIN_EVENT_CALLBACK_DEVICE_REMOVAL_FAILED`: `{ int callbackID; dom; devAlias; }`
/// (not nested, unlike the two above).
pub const DOMAIN_EVENT_CALLBACK_DEVICE_REMOVAL_FAILED: i32 = 367;
/// `REMOTE_PROC_DOMAIN_DETACH_DEVICE_ALIAS`: `{ dom; remote_nonnull_string alias; unsigned flags; }`.
pub const DOMAIN_DETACH_DEVICE_ALIAS: i32 = 392;

/// `VIR_DOMAIN_EVENT_ID_LIFECYCLE`.
pub const EVENT_ID_LIFECYCLE: i32 = 0;
/// `VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED`.
pub const EVENT_ID_DEVICE_REMOVED: i32 = 15;
/// `VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED`.
pub const EVENT_ID_DEVICE_REMOVAL_FAILED: i32 = 22;

/// `REMOTE_AUTH_NONE` (`enum remote_auth_type`; SASL is 1, POLKIT 2).
pub const AUTH_NONE: i32 = 0;
/// `REMOTE_AUTH_TYPE_LIST_MAX`.
const AUTH_TYPE_LIST_MAX: u32 = 20;
/// `VIR_DOMAIN_AFFECT_LIVE`.
pub const AFFECT_LIVE: u32 = 1;

/// The longest domain name or device alias we keep: far over any real one (libvirt's
/// own cap is the 4 MiB string), so a hostile daemon cannot make us hold much per event.
const NAME_MAX: usize = 4096;

/// A procedure's name, for messages (`DOMAIN_GET_STATE`).
pub fn name(procedure: i32) -> &'static str {
    match procedure {
        CONNECT_OPEN => "CONNECT_OPEN",
        CONNECT_CLOSE => "CONNECT_CLOSE",
        DOMAIN_GET_XML_DESC => "DOMAIN_GET_XML_DESC",
        DOMAIN_LOOKUP_BY_NAME => "DOMAIN_LOOKUP_BY_NAME",
        AUTH_LIST => "AUTH_LIST",
        DOMAIN_ATTACH_DEVICE_FLAGS => "DOMAIN_ATTACH_DEVICE_FLAGS",
        DOMAIN_GET_STATE => "DOMAIN_GET_STATE",
        CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY => "CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY",
        DOMAIN_DETACH_DEVICE_ALIAS => "DOMAIN_DETACH_DEVICE_ALIAS",
        _ => "an unknown procedure",
    }
}

/// `remote_nonnull_domain { remote_nonnull_string name; remote_uuid uuid; int id; }`.
pub fn put_domain(e: &mut Encoder, d: &Domain) {
    e.string(&d.name).fixed_opaque(&d.uuid).i32(d.id);
}

/// Read a `remote_nonnull_domain`.
pub fn domain(d: &mut Decoder<'_>) -> Result<Domain, XdrError> {
    Ok(Domain {
        name: d.string("domain name", NAME_MAX)?,
        uuid: d.fixed_opaque::<16>("domain uuid")?,
        id: d.i32("domain id")?,
    })
}

/// The args of a call on one domain followed by a string and flags (attach, detach).
pub fn domain_string_flags(dom: &Domain, s: &str, flags: u32) -> Vec<u8> {
    let mut e = Encoder::new();
    put_domain(&mut e, dom);
    e.string(s).u32(flags);
    e.into_bytes()
}

/// The args of a call on one domain with flags (get state, get XML).
pub fn domain_flags(dom: &Domain, flags: u32) -> Vec<u8> {
    let mut e = Encoder::new();
    put_domain(&mut e, dom);
    e.u32(flags);
    e.into_bytes()
}

/// `remote_auth_list_ret`: the auth types the daemon asks of this client.
pub fn auth_list_ret(payload: &[u8]) -> Result<Vec<i32>, XdrError> {
    let mut d = Decoder::new(payload);
    let n = d.u32("auth type count")?;
    if n > AUTH_TYPE_LIST_MAX {
        return Err(XdrError {
            what: "auth type count",
            at: 0,
            problem: super::xdr::XdrProblem::TooLong(n),
        });
    }
    let types = (0..n)
        .map(|_| d.i32("auth type"))
        .collect::<Result<_, _>>()?;
    d.finish("AUTH_LIST reply")?;
    Ok(types)
}

/// One `int` reply (`callbackID`), or the first of several (`state` of GET_STATE).
pub fn int_ret(payload: &[u8], what: &'static str, fields: usize) -> Result<Vec<i32>, XdrError> {
    let mut d = Decoder::new(payload);
    let v = (0..fields).map(|_| d.i32(what)).collect::<Result<_, _>>()?;
    d.finish(what)?;
    Ok(v)
}

/// A reply that is one `remote_nonnull_domain`.
pub fn domain_ret(payload: &[u8]) -> Result<Domain, XdrError> {
    let mut d = Decoder::new(payload);
    let dom = domain(&mut d)?;
    d.finish("domain reply")?;
    Ok(dom)
}

/// A reply that is one `remote_nonnull_string` of at most `max` bytes.
pub fn string_ret(payload: &[u8], what: &'static str, max: usize) -> Result<String, XdrError> {
    let mut d = Decoder::new(payload);
    let s = d.string(what, max.min(STRING_MAX))?;
    d.finish(what)?;
    Ok(s)
}

/// The fields of `remote_error` usbroute keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteError {
    /// `virErrorNumber` (`VIR_ERR_NO_DOMAIN` = 42, `VIR_ERR_OPERATION_INVALID` = 55).
    pub code: i32,
    /// `virErrorDomain`: which part of libvirt raised it.
    pub domain: i32,
    /// The message, if any (raw: the caller escapes and caps it).
    pub message: Option<String>,
}

/// `remote_error { int code; int domain; remote_string message; int level; remote_domain dom;
/// remote_string str1, str2, str3; int int1, int2; remote_network net; }`. Only code, domain
/// and message are kept; the rest is read to check the whole reply is well formed.
pub fn remote_error(payload: &[u8]) -> Result<RemoteError, XdrError> {
    let mut d = Decoder::new(payload);
    let code = d.i32("error code")?;
    let domain = d.i32("error domain")?;
    let message = d.optional("error message", |d| d.string("error message", STRING_MAX))?;
    d.i32("error level")?;
    d.optional("error domain object", self::domain)?;
    for what in ["error str1", "error str2", "error str3"] {
        d.optional(what, |d| d.string(what, STRING_MAX))?;
    }
    d.i32("error int1")?;
    d.i32("error int2")?;
    d.optional("error network", |d| {
        d.string("network name", NAME_MAX)?;
        d.fixed_opaque::<16>("network uuid")
    })?;
    d.finish("remote_error")?;
    Ok(RemoteError {
        code,
        domain,
        message,
    })
}

/// `virDomainEventType` → [`Lifecycle`].
pub fn lifecycle(v: i32) -> Lifecycle {
    match v {
        0 => Lifecycle::Defined,
        1 => Lifecycle::Undefined,
        2 => Lifecycle::Started,
        3 => Lifecycle::Suspended,
        4 => Lifecycle::Resumed,
        5 => Lifecycle::Stopped,
        6 => Lifecycle::Shutdown,
        7 => Lifecycle::PmSuspended,
        8 => Lifecycle::Crashed,
        v => Lifecycle::Other(v),
    }
}

/// The event a MESSAGE packet of `procedure` carries: `Ok(None)` for a procedure we did
/// not register for.
pub fn event(procedure: i32, payload: &[u8]) -> Result<Option<DomainEvent>, XdrError> {
    let mut d = Decoder::new(payload);
    let event = match procedure {
        DOMAIN_EVENT_CALLBACK_LIFECYCLE => {
            d.i32("callback id")?;
            DomainEvent::Lifecycle {
                domain: domain(&mut d)?,
                event: lifecycle(d.i32("lifecycle event")?),
                detail: d.i32("lifecycle detail")?,
            }
        }
        DOMAIN_EVENT_CALLBACK_DEVICE_REMOVED => {
            d.i32("callback id")?;
            DomainEvent::DeviceRemoved {
                domain: domain(&mut d)?,
                alias: d.string("device alias", NAME_MAX)?,
            }
        }
        DOMAIN_EVENT_CALLBACK_DEVICE_REMOVAL_FAILED => {
            d.i32("callback id")?;
            DomainEvent::DeviceRemovalFailed {
                domain: domain(&mut d)?,
                alias: d.string("device alias", NAME_MAX)?,
            }
        }
        _ => return Ok(None),
    };
    d.finish("event")?;
    Ok(Some(event))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe() -> Domain {
        Domain {
            name: "vm1".into(),
            uuid: [7; 16],
            id: 3,
        }
    }

    #[test]
    fn a_domain_round_trips() {
        let mut e = Encoder::new();
        put_domain(&mut e, &probe());
        assert_eq!(domain_ret(&e.into_bytes()), Ok(probe()));
    }

    #[test]
    fn a_no_domain_error_decodes_with_its_code_and_message() {
        let mut e = Encoder::new();
        e.i32(42)
            .i32(10)
            .opt_string(Some("Domain not found: no domain with matching name 'x'"));
        e.i32(2)
            .bool(false)
            .opt_string(Some("x"))
            .opt_string(None)
            .opt_string(None);
        e.i32(0).i32(0).bool(false);
        let err = remote_error(&e.into_bytes()).unwrap();
        assert_eq!(err.code, 42);
        assert_eq!(err.domain, 10);
        assert!(err
            .message
            .unwrap()
            .contains("no domain with matching name"));
    }

    #[test]
    fn a_truncated_error_is_malformed_not_a_panic() {
        let mut e = Encoder::new();
        e.i32(42).i32(10).opt_string(Some("cut"));
        assert!(remote_error(&e.into_bytes()).is_err());
    }

    #[test]
    fn a_device_removed_event_decodes() {
        let mut e = Encoder::new();
        e.i32(1);
        put_domain(&mut e, &probe());
        e.string("ua-test");
        let ev = event(DOMAIN_EVENT_CALLBACK_DEVICE_REMOVED, &e.into_bytes()).unwrap();
        assert_eq!(
            ev,
            Some(DomainEvent::DeviceRemoved {
                domain: probe(),
                alias: "ua-test".into()
            })
        );
    }

    #[test]
    fn a_lifecycle_event_decodes_and_an_unknown_type_is_kept() {
        let mut e = Encoder::new();
        e.i32(1);
        put_domain(&mut e, &probe());
        e.i32(99).i32(4);
        let ev = event(DOMAIN_EVENT_CALLBACK_LIFECYCLE, &e.into_bytes()).unwrap();
        assert_eq!(
            ev,
            Some(DomainEvent::Lifecycle {
                domain: probe(),
                event: Lifecycle::Other(99),
                detail: 4
            })
        );
    }

    #[test]
    fn an_event_we_did_not_register_for_is_none() {
        assert_eq!(event(319, &[1, 2, 3]), Ok(None));
    }

    #[test]
    fn an_auth_list_over_its_cap_is_refused() {
        let mut e = Encoder::new();
        e.u32(21);
        assert!(auth_list_ret(&e.into_bytes()).is_err());
    }
}
