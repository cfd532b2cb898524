//! Turn parsed requests into routing requests, checking who may do what.
//!
//! Auth and secrets are settled here, per listener; what a request means (which profile
//! `toggle` goes to, whether this listener may select it) and the switch itself are the
//! engine's routing reconciler's ([`crate::engine::routing::answer`]). The listeners
//! reach it through [`RoutingControl`]: in `usbroute serve` that is the engine's
//! handle, so every switch from the TCP listener, a VM's serial link or the control
//! socket goes through the engine (and its one dry run); a [`Mutex`] around any
//! [`PortRouting`] answers directly (tests, a service without the daemon).

use super::protocol::{parse_line, Reply, Request};
use crate::engine::coordinator::EngineHandle;
use crate::engine::routing::{answer, PortRouting, RoutingAnswer, RoutingAsk, RoutingRequest};
use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

/// A request's answer, on its way.
pub type Answering<'a> = Pin<Box<dyn Future<Output = RoutingAnswer> + Send + 'a>>;

/// Where the toggle service sends its requests.
pub trait RoutingControl: Send + Sync {
    /// Decide and carry out one request.
    fn ask(&self, request: RoutingRequest) -> Answering<'_>;
}

/// In the daemon: the engine's routing reconciler decides (and, in a dry run, only says).
impl RoutingControl for EngineHandle {
    fn ask(&self, request: RoutingRequest) -> Answering<'_> {
        Box::pin(self.routing(request))
    }
}

/// Without the engine: the same decision, on the spot, one request at a time.
impl<R: PortRouting> RoutingControl for Mutex<R> {
    fn ask(&self, request: RoutingRequest) -> Answering<'_> {
        // A panic elsewhere while holding the lock leaves the routing readable: the
        // registers themselves are the truth, not the guarded value.
        let mut routing = self.lock().unwrap_or_else(|p| p.into_inner());
        let answer = answer(&mut *routing, &request, false);
        Box::pin(std::future::ready(answer))
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

/// Handle one line on the spot, over `routing` itself. `None` for a blank line (no
/// reply). Bad input gets `err` and changes nothing.
pub fn handle_line(
    routing: &mut dyn PortRouting,
    access: &Access,
    session: &mut Session,
    line: &[u8],
) -> Option<Reply> {
    match parse_line(line) {
        Ok(None) => None,
        Ok(Some(request)) => Some(match admit(access, session, request) {
            Ok(request) => reply(answer(routing, &request, false)),
            Err(reply) => reply,
        }),
        Err(e) => Some(Reply::Err(e.to_string())),
    }
}

/// Handle one request through `control`.
pub async fn dispatch(
    control: &dyn RoutingControl,
    access: &Access,
    session: &mut Session,
    request: Request,
) -> Reply {
    match admit(access, session, request) {
        Ok(request) => reply(control.ask(request).await),
        Err(reply) => reply,
    }
}

/// Settle `auth` and the listener's secret here: `Err` with the reply when the line is
/// answered by that (an `auth`, or a listener not unlocked yet), else the request for
/// the routing, with what this listener may select.
pub fn admit(
    access: &Access,
    session: &mut Session,
    request: Request,
) -> Result<RoutingRequest, Reply> {
    let ask = match request {
        Request::Auth(given) => {
            return Err(match &access.secret {
                Some(secret) if same_secret(secret, &given) => {
                    session.authenticated = true;
                    Reply::Authenticated
                }
                Some(_) => {
                    session.failed_auths += 1;
                    Reply::Err("wrong secret".into())
                }
                None => Reply::Authenticated,
            });
        }
        _ if access.secret.is_some() && !session.authenticated => {
            return Err(Reply::Err("this listener needs `auth SECRET` first".into()));
        }
        Request::Status => RoutingAsk::Status,
        Request::Toggle => RoutingAsk::Toggle,
        Request::Host => RoutingAsk::Host,
        Request::Guest => RoutingAsk::Guest,
        Request::Profile(name) => RoutingAsk::Profile(name),
    };
    Ok(RoutingRequest {
        ask,
        origin: access.origin.clone(),
        allowed: access.allowed.clone(),
    })
}

/// The reply line for an answer.
pub fn reply(answer: RoutingAnswer) -> Reply {
    match answer {
        RoutingAnswer::Ok { profile, xusb2pr } => Reply::Ok {
            profile,
            mask: xusb2pr,
        },
        RoutingAnswer::Err(e) => Reply::Err(e),
    }
}
