//! What every gRPC call shares, as one tower layer in front of all services:
//!
//! - a server-side deadline: a call not answered within it gets `DEADLINE_EXCEEDED` naming
//!   the method (tonic applies a client's `grpc-timeout` too, and answers that `CANCELLED`);
//!   a streaming call is bounded until its response starts, not for its whole life;
//! - a request message over the size limit gets `RESOURCE_EXHAUSTED`, as the gRPC status
//!   code table asks, instead of tonic's `OUT_OF_RANGE`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::codegen::http;
use tonic::{Code, Status};
use tower::{Layer, Service};

/// The layer; see the module documentation.
#[derive(Clone, Debug)]
pub struct CallLimitsLayer {
    pub deadline: Duration,
}

impl<S> Layer<S> for CallLimitsLayer {
    type Service = CallLimits<S>;

    fn layer(&self, inner: S) -> CallLimits<S> {
        CallLimits {
            inner,
            deadline: self.deadline,
        }
    }
}

#[derive(Clone, Debug)]
pub struct CallLimits<S> {
    inner: S,
    deadline: Duration,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for CallLimits<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let deadline = self.deadline;
        let method = request.uri().path().to_owned();
        let answer = self.inner.call(request);
        Box::pin(async move {
            match tokio::time::timeout(deadline, answer).await {
                Ok(answer) => answer.map(oversized_is_resource_exhausted),
                Err(_) => {
                    metrics::counter!("mesh_grpc_deadline_exceeded_total").increment(1);
                    Ok(Status::deadline_exceeded(format!(
                        "{method}: no answer within the server's deadline of {}",
                        humantime::format_duration(deadline)
                    ))
                    .into_http())
                }
            }
        })
    }
}

/// tonic answers a request message over the limit with `OUT_OF_RANGE` before any handler
/// runs (the status rides in the response's extensions); gRPC's code for it is
/// `RESOURCE_EXHAUSTED`.
fn oversized_is_resource_exhausted<B: Default>(response: http::Response<B>) -> http::Response<B> {
    const TONIC: &str = "Error, decoded message length too large";
    match response.extensions().get::<Status>() {
        Some(s) if s.code() == Code::OutOfRange && s.message().starts_with(TONIC) => {
            let detail = s.message().trim_start_matches("Error, decoded ");
            Status::resource_exhausted(format!("request {detail}")).into_http()
        }
        _ => response,
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    /// A service that answers `status` after `delay`.
    #[derive(Clone)]
    struct Slow {
        delay: Duration,
        status: Option<(Code, &'static str)>,
    }

    impl Service<http::Request<()>> for Slow {
        type Response = http::Response<()>;
        type Error = std::convert::Infallible;
        type Future = BoxFuture<Result<http::Response<()>, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            let me = self.clone();
            Box::pin(async move {
                tokio::time::sleep(me.delay).await;
                Ok(match me.status {
                    Some((code, message)) => Status::new(code, message).into_http(),
                    None => http::Response::new(()),
                })
            })
        }
    }

    fn call(slow: Slow, deadline: Duration) -> BoxFuture<Result<http::Response<()>, Infallible>> {
        let mut svc = CallLimitsLayer { deadline }.layer(slow);
        let request = http::Request::builder()
            .uri("/mesh.v1.GoalService/SubmitGoal")
            .body(())
            .unwrap();
        svc.call(request)
    }

    fn status_of(response: &http::Response<()>) -> Option<(Code, String)> {
        Status::from_header_map(response.headers()).map(|s| (s.code(), s.message().to_owned()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_past_the_deadline_is_answered_deadline_exceeded_naming_the_method() {
        let slow = Slow {
            delay: Duration::from_secs(60),
            status: None,
        };
        let response = call(slow, Duration::from_secs(30)).await.unwrap();
        let (code, message) = status_of(&response).expect("a status");
        assert_eq!(code, Code::DeadlineExceeded);
        assert_eq!(
            message,
            "/mesh.v1.GoalService/SubmitGoal: no answer within the server's deadline of 30s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_within_the_deadline_is_answered_unchanged() {
        let ok = Slow {
            delay: Duration::from_secs(29),
            status: None,
        };
        let response = call(ok, Duration::from_secs(30)).await.unwrap();
        assert_eq!(status_of(&response), None);
        let not_found = Slow {
            delay: Duration::ZERO,
            status: Some((Code::NotFound, "no run r-1")),
        };
        let response = call(not_found, Duration::from_secs(30)).await.unwrap();
        assert_eq!(
            status_of(&response),
            Some((Code::NotFound, "no run r-1".to_owned()))
        );
    }

    #[tokio::test]
    async fn an_oversized_request_is_resource_exhausted() {
        let oversized = Slow {
            delay: Duration::ZERO,
            status: Some((
                Code::OutOfRange,
                "Error, decoded message length too large: found 5242885 bytes, the limit is: 4194304 bytes",
            )),
        };
        let response = call(oversized, Duration::from_secs(30)).await.unwrap();
        assert_eq!(
            status_of(&response),
            Some((
                Code::ResourceExhausted,
                "request message length too large: found 5242885 bytes, the limit is: 4194304 bytes"
                    .to_owned()
            ))
        );
        // Other OUT_OF_RANGE answers are the handlers' own and stay.
        let page = Slow {
            delay: Duration::ZERO,
            status: Some((Code::OutOfRange, "page_size: at most 1000")),
        };
        let response = call(page, Duration::from_secs(30)).await.unwrap();
        assert_eq!(status_of(&response).unwrap().0, Code::OutOfRange);
    }
}
