//! [`ResponseFuture`] of [`BearerTokenService`](super::BearerTokenService).

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tower::Service;

use super::{
    ReplayableBody, TokenProvider,
    error::BearerTokenError,
    replay::ReplayCopy,
    service::{BearerConfig, FetchTrigger, SentToken, fetch_token},
};
use crate::{
    cache::{Rejection, TokenCache, TokenUnavailable},
    token::Token,
};

/// A token being fetched (miss path and after a `401` only).
pub(super) type TokenFuture =
    Pin<Box<dyn Future<Output = Result<Arc<Token>, TokenUnavailable>> + Send>>;

pin_project! {
    /// Response future of [`BearerTokenService`](super::BearerTokenService).
    pub struct ResponseFuture<S, B, P = TokenCache>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S::Future>,
        // The request waiting for its token, or the copy kept for a replay.
        held: Held<B>,
        // The service for a deferred call or a replay; polled ready before
        // each call.
        service: Option<S>,
        // The token the first call carries.
        sent: Option<SentToken>,
        config: Arc<BearerConfig<P>>,
    }
}

/// What the future holds besides the call under way.
enum Held<B> {
    Nothing,
    /// Miss path: the request, until its token arrives (boxed, so that
    /// the hit path's future stays small).
    Request(Box<Request<B>>),
    /// After the first call: the copy for a replay, if the body allows one.
    Copy(ReplayCopy<B>),
}

impl<B> Held<B> {
    fn take(&mut self) -> Self {
        std::mem::replace(self, Self::Nothing)
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        // Miss path: waiting for the token.
        Fetching { fetch: TokenFuture },
        // The first call.
        Calling { #[pin] future: F },
        // `401` with a replay: fetching a token other than the rejected one.
        Refetching { fetch: TokenFuture },
        // Waiting for the service to be ready for the replay, with its token.
        ReplayReady { token: Option<Arc<Token>> },
        // The replay; whatever it answers is the answer.
        Replaying { #[pin] future: F },
        Done,
    }
}

impl<S, B, P> ResponseFuture<S, B, P>
where
    S: Service<Request<B>>,
{
    /// Hit path: the first call is already made.
    pub(super) fn called(
        future: S::Future,
        sent: SentToken,
        replay: Option<ReplayCopy<B>>,
        service: Option<S>,
        config: Arc<BearerConfig<P>>,
    ) -> Self {
        Self {
            state: State::Calling { future },
            held: replay.map_or(Held::Nothing, Held::Copy),
            service,
            sent: Some(sent),
            config,
        }
    }

    /// Miss path: `service` has been polled ready and is called once the
    /// token is there.
    pub(super) fn fetching(
        fetch: TokenFuture,
        request: Request<B>,
        service: S,
        config: Arc<BearerConfig<P>>,
    ) -> Self {
        Self {
            state: State::Fetching { fetch },
            held: Held::Request(Box::new(request)),
            service: Some(service),
            sent: None,
            config,
        }
    }
}

impl<S, B, P, ResB> Future for ResponseFuture<S, B, P>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    P: TokenProvider,
    B: ReplayableBody,
{
    type Output = Result<Response<ResB>, BearerTokenError<S::Error>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Fetching { fetch } => {
                    let token = match ready!(fetch.as_mut().poll(cx)) {
                        Ok(token) => token,
                        Err(e) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(BearerTokenError::Token(e)));
                        }
                    };
                    let Held::Request(request) = this.held.take() else {
                        unreachable!("request held until its token arrives");
                    };
                    let mut request = *request;
                    this.config.header.apply(&mut request, &token);
                    if this.config.retry_on_unauthorized
                        && let Some(copy) = ReplayCopy::of(&request)
                    {
                        *this.held = Held::Copy(copy);
                    }
                    let service = this.service.as_mut().expect("service held until called");
                    let future = service.call(request);
                    *this.sent = Some(SentToken::Provided(token));
                    this.state.set(State::Calling { future });
                }
                StateProj::Calling { future } => {
                    let response = match ready!(future.poll(cx)) {
                        Ok(response) => response,
                        Err(e) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(BearerTokenError::Inner(e)));
                        }
                    };
                    if response.status() != StatusCode::UNAUTHORIZED {
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(response));
                    }
                    let Some(rejected) = this.sent.take() else {
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(response));
                    };
                    // The cache decides: this very token was sent, and
                    // forced refreshes are rate-limited.
                    let rejection = this.config.reject(&rejected);
                    let copy = match this.held.take() {
                        Held::Copy(copy) if this.service.is_some() => Some(copy),
                        _ => None,
                    };
                    let replayable = copy.is_some();
                    // Rebuilt only for a replay; should that fail (see
                    // `ReplayCopy::into_request`), the 401 goes back.
                    let replay = copy
                        .filter(|_| rejection != Rejection::Limited)
                        .and_then(ReplayCopy::into_request);
                    let Some(replay) = replay else {
                        tracing::debug!(
                            token_id = rejected.id(),
                            ?rejection,
                            replayable,
                            "upstream answered 401; handing it back"
                        );
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(response));
                    };
                    *this.held = Held::Request(Box::new(replay));
                    tracing::debug!(
                        token_id = rejected.id(),
                        "upstream answered 401; replaying with a new token"
                    );
                    // The 401's body is of no use; let its connection go.
                    drop(response);
                    let fetch = fetch_token(&this.config.provider, FetchTrigger::Unauthorized);
                    this.state.set(State::Refetching { fetch });
                }
                StateProj::Refetching { fetch } => match ready!(fetch.as_mut().poll(cx)) {
                    Ok(token) => {
                        this.state.set(State::ReplayReady { token: Some(token) });
                    }
                    Err(e) => {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(BearerTokenError::Token(e)));
                    }
                },
                StateProj::ReplayReady { token } => {
                    let service = this.service.as_mut().expect("service held for the replay");
                    if let Err(e) = ready!(service.poll_ready(cx)) {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(BearerTokenError::Inner(e)));
                    }
                    let Held::Request(request) = this.held.take() else {
                        unreachable!("request rebuilt for the replay");
                    };
                    let mut request = *request;
                    let token = token.take().expect("token fetched for the replay");
                    this.config.header.apply(&mut request, &token);
                    let future = service.call(request);
                    this.state.set(State::Replaying { future });
                }
                StateProj::Replaying { future } => {
                    let result = ready!(future.poll(cx));
                    this.state.set(State::Done);
                    return Poll::Ready(result.map_err(BearerTokenError::Inner));
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}
