//! A tower layer around the gRPC router that admits or refuses each call
//! before any service sees it: [`crate::tls::Gate`] (authorization) and
//! [`super::shed::Shed`] (load shedding) are [`Guard`]s. A refusal becomes
//! the gRPC answer at once; what an admission returns is held until the
//! call's answer starts.

use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::Status;

/// Decides on one call; may add to the request (its extensions).
pub trait Guard: Clone {
    /// Held while the call runs (a permit, say).
    type Pass: Send + 'static;
    fn admit<B>(&self, req: &mut ::http::Request<B>) -> Result<Self::Pass, Status>;
}

/// Authorization: admits a call its caller's role may make, and hands the
/// role on in the request's extensions.
impl Guard for crate::tls::Gate {
    type Pass = ();

    fn admit<B>(&self, req: &mut ::http::Request<B>) -> Result<(), Status> {
        if let Some(role) = self.check(req)? {
            req.extensions_mut().insert(role);
        }
        Ok(())
    }
}

/// The layer of a guard.
#[derive(Clone)]
pub struct GuardLayer<G>(pub G);

impl<S, G: Guard> tower::Layer<S> for GuardLayer<G> {
    type Service = Guarded<S, G>;
    fn layer(&self, inner: S) -> Guarded<S, G> {
        Guarded { inner, guard: self.0.clone() }
    }
}

#[derive(Clone)]
pub struct Guarded<S, G> {
    inner: S,
    guard: G,
}

impl<S, G, B, R> tower::Service<::http::Request<B>> for Guarded<S, G>
where
    G: Guard,
    S: tower::Service<::http::Request<B>, Response = ::http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = ::http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: ::http::Request<B>) -> Self::Future {
        match self.guard.admit(&mut req) {
            Ok(pass) => {
                let call = self.inner.call(req);
                Box::pin(async move {
                    let response = call.await;
                    drop(pass);
                    response
                })
            }
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}
