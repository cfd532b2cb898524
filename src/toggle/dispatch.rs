//! Turn parsed requests into routing changes, checking who may do what.
//!
//! The routing itself sits behind [`RoutingControl`], so the same dispatcher serves the
//! TCP listener, every VM's serial link and the daemon's control socket.

use super::protocol::{parse_line, Reply, Request};
use crate::routing::config_space::ConfigSpace;
use crate::routing::control::ProfileRouter;
use std::collections::BTreeSet;

/// What the toggle service needs from the routing.
pub trait RoutingControl: Send {
    /// Every configured profile name.
    fn profiles(&self) -> BTreeSet<String>;
    /// The two profiles `toggle` flips between, if configured.
    fn toggle_pair(&self) -> Option<(String, String)>;
    /// The active profile (if the routing matches one) and XUSB2PR.
    fn active(&self) -> Result<(Option<String>, u16), String>;
    /// Apply a profile; XUSB2PR afterwards.
    fn apply(&mut self, profile: &str) -> Result<u16, String>;
}

impl<C: ConfigSpace> RoutingControl for ProfileRouter<C> {
    fn profiles(&self) -> BTreeSet<String> {
        self.config().profile.keys().cloned().collect()
    }

    fn toggle_pair(&self) -> Option<(String, String)> {
        ProfileRouter::toggle_pair(self, None).ok()
    }

    fn active(&self) -> Result<(Option<String>, u16), String> {
        let profile = self.active_profile().map_err(|e| e.to_string())?;
        Ok((profile, self.mask().map_err(|e| e.to_string())?))
    }

    fn apply(&mut self, profile: &str) -> Result<u16, String> {
        // The service never adds force: only a profile's own `force = true` does.
        let (_, applied) = ProfileRouter::apply(self, profile, false).map_err(|e| e.to_string())?;
        Ok(applied.after.xusb2pr)
    }
}

/// Who is on the other end of a listener, and what they may select.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// For logs and messages: `tcp 127.0.0.1:4510`, `vm win11`.
    pub origin: String,
    /// Profiles this listener may select; `None` = all.
    pub allowed: Option<BTreeSet<String>>,
    /// Shared secret a client must present with `auth` before anything else.
    pub secret: Option<String>,
}

impl Access {
    /// Anything goes (the control socket, which checks its peer itself).
    pub fn unrestricted(origin: impl Into<String>) -> Self {
        Self {
            origin: origin.into(),
            allowed: None,
            secret: None,
        }
    }
}

/// Per-connection state.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Session {
    /// `auth` succeeded.
    pub authenticated: bool,
    /// Failed `auth` attempts (the server hangs up after a few).
    pub failed_auths: u32,
}

/// Compare without an early exit, so timing does not reveal how much of a guess matched.
fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

/// Handle one line. `None` for a blank line (no reply). Bad input gets `err` and
/// changes nothing.
pub fn handle_line(
    control: &mut dyn RoutingControl,
    access: &Access,
    session: &mut Session,
    line: &[u8],
) -> Option<Reply> {
    match parse_line(line) {
        Ok(None) => None,
        Ok(Some(request)) => Some(dispatch(control, access, session, request)),
        Err(e) => Some(Reply::Err(e.to_string())),
    }
}

/// Handle one request.
pub fn dispatch(
    control: &mut dyn RoutingControl,
    access: &Access,
    session: &mut Session,
    request: Request,
) -> Reply {
    if let Request::Auth(given) = &request {
        return match &access.secret {
            Some(secret) if same_secret(secret, given) => {
                session.authenticated = true;
                Reply::Authenticated
            }
            Some(_) => {
                session.failed_auths += 1;
                Reply::Err("wrong secret".into())
            }
            None => Reply::Authenticated,
        };
    }
    if access.secret.is_some() && !session.authenticated {
        return Reply::Err("this listener needs `auth SECRET` first".into());
    }
    let target = match resolve(control, &request) {
        Ok(None) => {
            return match control.active() {
                Ok((profile, mask)) => Reply::Ok { profile, mask },
                Err(e) => Reply::Err(e),
            }
        }
        Ok(Some(t)) => t,
        Err(e) => return Reply::Err(e),
    };
    if let Some(allowed) = &access.allowed {
        if !allowed.contains(&target) {
            return Reply::Err(format!(
                "profile `{target}` is not allowed for {} (allowed: {})",
                access.origin,
                allowed.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    match control.apply(&target) {
        Ok(mask) => Reply::Ok {
            profile: Some(target),
            mask,
        },
        Err(e) => Reply::Err(e),
    }
}

/// The profile a request selects; `Ok(None)` for `status`.
fn resolve(control: &dyn RoutingControl, request: &Request) -> Result<Option<String>, String> {
    let profiles = control.profiles();
    let pair = || {
        control
            .toggle_pair()
            .ok_or_else(|| "no `toggle = [A, B]` in [routing]".to_string())
    };
    // `host`/`guest` name profiles when such profiles exist (the seed author's setup),
    // otherwise the first/second toggle profile.
    let named_or = |name: &str, pick: fn((String, String)) -> String| {
        if profiles.contains(name) {
            Ok(name.to_string())
        } else {
            pair().map(pick)
        }
    };
    match request {
        Request::Status | Request::Auth(_) => Ok(None),
        Request::Host => named_or("host", |p| p.0).map(Some),
        Request::Guest => named_or("guest", |p| p.1).map(Some),
        Request::Toggle => {
            let (a, b) = pair()?;
            let (active, _) = control.active()?;
            Ok(Some(if active.as_deref() == Some(a.as_str()) {
                b
            } else {
                a
            }))
        }
        Request::Profile(name) if profiles.contains(name) => Ok(Some(name.clone())),
        Request::Profile(name) => Err(format!(
            "no profile `{name}` (configured: {})",
            profiles.into_iter().collect::<Vec<_>>().join(", ")
        )),
    }
}
