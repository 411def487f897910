//! Who may call what: every request's peer (its verified certificate's identity, put in
//! the request's extensions by `hitless_tls::server::incoming`) is checked against the
//! method's rule before any handler runs; a refusal is PermissionDenied, logged with
//! the certificate's identity, and changes nothing.
//!
//! | who | may call |
//! | --- | --- |
//! | viewer | `Coordinator/Status`, `Pull`; `Registry/List`, `Watch`; health, reflection |
//! | operator | a viewer's, and `Push`, `Pause`, `Resume`, `Promote`, `Abort`, `Drain`, `Undrain`, `DrainQuiet` |
//! | admin | an operator's, and `Registry/Apply`, `ApplyStream`, `Register`, `Deregister`, `Heartbeat`; `Coordinator/RemoveNode` |
//! | a node's agent | `AgentLink/Session` (for its own node only: `agent_link`), and what its node-local API asks for its pods: `Registry/Register`, `Deregister`, `Heartbeat`, `List`, `Watch`; `Coordinator/Drain`, `Undrain`, `DrainQuiet`, `Status`; health, reflection |
//!
//! A method not in the table is refused to everyone (a new RPC is closed until it is
//! given a rule). Plaintext connections (`--insecure`, loopback only) carry no identity
//! and are not checked.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hitless_tls::{Identity, Peer, Role};
use tonic::body::Body;
use tonic::Status;
use tracing::warn;

use super::limits::Limiter;

/// Who may call a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// The lowest operator role allowed (`None`: no operator).
    pub role: Option<Role>,
    /// Whether a node's agent may call it.
    pub node: bool,
}

const fn rule(role: Option<Role>, node: bool) -> Rule {
    Rule { role, node }
}

/// Every method's rule, by its gRPC path.
pub const RULES: &[(&str, Rule)] = &[
    ("/hitless.v1.Coordinator/Status", rule(Some(Role::Viewer), true)),
    ("/hitless.v1.Coordinator/Pull", rule(Some(Role::Viewer), false)),
    ("/hitless.v1.Coordinator/Drain", rule(Some(Role::Operator), true)),
    ("/hitless.v1.Coordinator/Undrain", rule(Some(Role::Operator), true)),
    ("/hitless.v1.Coordinator/DrainQuiet", rule(Some(Role::Operator), true)),
    ("/hitless.v1.Coordinator/Push", rule(Some(Role::Operator), false)),
    ("/hitless.v1.Coordinator/Pause", rule(Some(Role::Operator), false)),
    ("/hitless.v1.Coordinator/Resume", rule(Some(Role::Operator), false)),
    ("/hitless.v1.Coordinator/Promote", rule(Some(Role::Operator), false)),
    ("/hitless.v1.Coordinator/Abort", rule(Some(Role::Operator), false)),
    ("/hitless.v1.Coordinator/RemoveNode", rule(Some(Role::Admin), false)),
    ("/hitless.v1.Registry/List", rule(Some(Role::Viewer), true)),
    ("/hitless.v1.Registry/Watch", rule(Some(Role::Viewer), true)),
    ("/hitless.v1.Registry/Register", rule(Some(Role::Admin), true)),
    ("/hitless.v1.Registry/Deregister", rule(Some(Role::Admin), true)),
    ("/hitless.v1.Registry/Heartbeat", rule(Some(Role::Admin), true)),
    ("/hitless.v1.Registry/Apply", rule(Some(Role::Admin), false)),
    ("/hitless.v1.Registry/ApplyStream", rule(Some(Role::Admin), false)),
    ("/hitless.v1.AgentLink/Session", rule(None, true)),
];

/// Services every identity may use (probes, grpcurl's listing).
const OPEN_SERVICES: &[&str] =
    &["/grpc.health.v1.Health/", "/grpc.reflection.v1.ServerReflection/", "/grpc.reflection.v1alpha.ServerReflection/"];

/// The rule of the method at `path`, if it has one.
pub fn rule_of(path: &str) -> Option<Rule> {
    RULES.iter().find(|(p, _)| *p == path).map(|(_, r)| *r)
}

/// Whether `peer` may call the method at `path`; the refusal says why and what would do.
pub fn check(peer: Option<&Peer>, path: &str) -> Result<(), Status> {
    let Some(peer) = peer.filter(|p| p.tls) else { return Ok(()) };
    let refuse = |why: String| {
        warn!(peer = %peer.describe(), method = path, "refused: {why}");
        Err(Status::permission_denied(format!("{path}: {why}")))
    };
    let Some(identity) = &peer.identity else {
        return refuse(format!(
            "the client certificate names no hitless identity (URI SANs {:?}); issue one with `hitless certs issue`, or give it a URI SAN {}node/NAME or {}operator/NAME/ROLE",
            peer.uris,
            hitless_tls::identity::URI_PREFIX,
            hitless_tls::identity::URI_PREFIX
        ));
    };
    if OPEN_SERVICES.iter().any(|s| path.starts_with(s)) && !matches!(identity, Identity::Coordinator) {
        return Ok(());
    }
    let Some(rule) = rule_of(path) else { return refuse("no rule allows this method to anyone".into()) };
    match identity {
        Identity::Node(_) if rule.node => Ok(()),
        Identity::Operator { role, .. } if rule.role.is_some_and(|min| *role >= min) => Ok(()),
        Identity::Operator { role, .. } => match rule.role {
            Some(min) => {
                refuse(format!("{identity} may not: it needs the {min} role or above, this certificate has {role}"))
            }
            None => refuse(format!("{identity} may not: only a node's agent may")),
        },
        Identity::Node(_) => refuse(format!("{identity} may not: a node's agent may not call it")),
        Identity::Coordinator => refuse("the coordinator's certificate is no client's".into()),
    }
}

/// The layer that runs [`check`], then the caller's limits ([`Limiter`]), before
/// every request.
#[derive(Clone)]
pub struct AuthorizeLayer {
    /// Each identity's limits.
    pub limiter: Arc<Limiter>,
}

impl<S> tower_layer::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize { inner, limiter: Arc::clone(&self.limiter) }
    }
}

/// [`check`] and the limits, then the inner service.
#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    limiter: Arc<Limiter>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S> tower_service::Service<http::Request<Body>> for Authorize<S>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<Body>> + Send,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<http::Response<Body>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let peer = req.extensions().get::<Peer>();
        let admitted = check(peer, req.uri().path()).and_then(|()| {
            match peer.filter(|p| p.tls).and_then(|p| p.identity.as_ref()) {
                Some(id) => self.limiter.admit(&id.uri(), req.uri().path()).map(Some),
                None => Ok(None),
            }
        });
        match admitted {
            Ok(guard) => {
                let call = self.inner.call(req);
                Box::pin(async move {
                    let r = call.await;
                    drop(guard);
                    r
                })
            }
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(identity: Option<Identity>) -> Peer {
        Peer { addr: "127.0.0.1:1".parse().expect("addr"), tls: true, identity, uris: vec![] }
    }

    fn op(role: Role) -> Identity {
        Identity::Operator { name: "ana".into(), role }
    }

    /// Every method of the contract has a rule (a new RPC must be given one).
    #[test]
    fn every_method_of_the_contract_has_a_rule() {
        use prost::Message as _;
        let set = prost_types::FileDescriptorSet::decode(hitless_proto::FILE_DESCRIPTOR_SET).expect("descriptor set");
        let mut n = 0;
        for f in &set.file {
            for s in &f.service {
                if s.name() == "Node" {
                    continue; // the agent's node-local API, served by the agent
                }
                for m in &s.method {
                    let path = format!("/{}.{}/{}", f.package(), s.name(), m.name());
                    assert!(rule_of(&path).is_some(), "{path} has no rule in auth::RULES");
                    n += 1;
                }
            }
        }
        assert!(n >= 18, "{n} methods");
    }

    #[test]
    fn plaintext_is_not_checked_and_a_certificate_without_identity_is_refused() {
        assert!(check(None, "/hitless.v1.Registry/Apply").is_ok());
        let p = peer(None);
        assert_eq!(
            check(Some(&p), "/hitless.v1.Coordinator/Status").map_err(|s| s.code()),
            Err(tonic::Code::PermissionDenied)
        );
        assert_eq!(
            check(Some(&peer(Some(op(Role::Admin)))), "/hitless.v1.Nope/X").map_err(|s| s.code()),
            Err(tonic::Code::PermissionDenied)
        );
        assert!(check(Some(&peer(Some(op(Role::Viewer)))), "/grpc.health.v1.Health/Check").is_ok());
        assert!(check(Some(&peer(Some(Identity::Node("a".into())))), "/hitless.v1.AgentLink/Session").is_ok());
        assert!(check(Some(&peer(Some(op(Role::Admin)))), "/hitless.v1.AgentLink/Session").is_err());
    }
}
