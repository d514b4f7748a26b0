//! What every gRPC request passes before a service sees it: the
//! `content-type` must be gRPC's, the bytes of request bodies received
//! but not yet made into a message, over all connections, stay within one
//! budget, and the request counts as its connection's use
//! ([`conns`](crate::conns)) until its answer's last byte.
//!
//! tonic gathers a unary request's body until the message is whole. A
//! client that sends most of a large message and stalls holds that memory,
//! and forty of them held 600 MB before this: now such bodies draw on the
//! budget as they arrive, a body that would go over it fails at once with
//! `RESOURCE_EXHAUSTED` (its bytes freed), and the server's request timeout
//! frees the rest of a stalled one.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tonic::body::Body;

use crate::conns::InFlight;
use crate::grpc::Peer;

/// Bytes of request bodies in flight, and the most there may be.
#[derive(Debug)]
pub struct Budget {
    held: AtomicUsize,
    limit: usize,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            held: AtomicUsize::new(0),
            limit,
        })
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    fn take(&self, n: usize) -> bool {
        let before = self.held.fetch_add(n, Ordering::AcqRel);
        if before + n > self.limit {
            self.held.fetch_sub(n, Ordering::AcqRel);
            return false;
        }
        true
    }

    fn give_back(&self, n: usize) {
        self.held.fetch_sub(n, Ordering::AcqRel);
    }
}

/// The tower layer putting [`Guard`] in front of the routes.
#[derive(Clone, Debug)]
pub struct GuardLayer {
    budget: Arc<Budget>,
}

impl GuardLayer {
    /// Request bodies drawing on `budget`.
    pub fn new(budget: Arc<Budget>) -> Self {
        GuardLayer { budget }
    }
}

impl<S> tower::Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            budget: self.budget.clone(),
        }
    }
}

/// The service [`GuardLayer`] makes.
#[derive(Clone, Debug)]
pub struct Guard<S> {
    inner: S,
    budget: Arc<Budget>,
}

type Response = http::Response<Body>;

impl<S> tower::Service<http::Request<Body>> for Guard<S>
where
    S: tower::Service<http::Request<Body>, Response = Response> + Send,
    S::Error: Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let grpc = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        if !grpc {
            // What the gRPC spec asks of a server for a foreign content type.
            let mut refused = http::Response::new(Body::empty());
            *refused.status_mut() = http::StatusCode::UNSUPPORTED_MEDIA_TYPE;
            return Box::pin(std::future::ready(Ok(refused)));
        }
        let in_flight = request
            .extensions()
            .get::<Peer>()
            .map(|peer| peer.activity().begin());
        let (parts, body) = request.into_parts();
        let body = Body::new(Metered {
            inner: body,
            budget: self.budget.clone(),
            held: 0,
        });
        let answer = self.inner.call(http::Request::from_parts(parts, body));
        let Some(in_flight) = in_flight else {
            return Box::pin(answer);
        };
        Box::pin(async move {
            let response = answer.await?;
            // A streaming answer (a Subscribe, a health Watch) keeps its
            // connection in use until it ends.
            Ok(response.map(|body| {
                Body::new(Answering {
                    inner: body,
                    _in_flight: in_flight,
                })
            }))
        })
    }
}

/// An answer's body, counting as its connection's use until it drops.
struct Answering {
    inner: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Answering {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body whose bytes count against the budget until it is
/// dropped (when tonic has made it into a message, or given up on it).
struct Metered {
    inner: Body,
    budget: Arc<Budget>,
    held: usize,
}

impl http_body::Body for Metered {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if !this.budget.take(data.len()) {
                        return Poll::Ready(Some(Err(tonic::Status::resource_exhausted(
                            "too many request bytes in flight; try again",
                        ))));
                    }
                    this.held += data.len();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        self.budget.give_back(self.held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_refuses_what_would_go_over_and_takes_back_what_is_given() {
        let budget = Budget::new(100);
        assert!(budget.take(60));
        assert!(!budget.take(41), "over the limit");
        assert_eq!(budget.held(), 60, "a refusal takes nothing");
        assert!(budget.take(40));
        budget.give_back(100);
        assert_eq!(budget.held(), 0);
    }
}
