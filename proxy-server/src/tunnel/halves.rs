//! The two halves of a registered agent's control stream run together: the sending half
//! (control messages to the agent) and the serving half (reading the agent's messages, pinging,
//! holding its registration).
//!
//! Not `join`: once the serving half is over, the sending half has [`CLOSE_GRACE`] to hand its
//! last messages to h2 and end the stream. An agent that stopped granting the stream window
//! (or never granted any) would otherwise keep it waiting for send capacity, and with it this
//! task and an open HTTP/2 stream, for as long as its connection lives; an agent could then
//! pile up such streams by ending each control stream and opening the next. When the grace
//! ends the sending half is dropped, which resets the stream.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use proxy_common::shutdown::CLOSE_GRACE;

pin_project_lite::pin_project! {
    /// Runs `sending` and `serving` until both are done, or `serving` is done and `sending`
    /// is not within [`CLOSE_GRACE`].
    pub struct Halves<Snd, Srv> {
        #[pin]
        sending: Snd,
        #[pin]
        serving: Srv,
        sending_done: bool,
        serving_done: bool,
        // Boxed, and only once the serving half is over: a timer in every agent's task would
        // cost its room for the agent's whole life.
        grace: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<Snd, Srv> Halves<Snd, Srv> {
    pub fn new(sending: Snd, serving: Srv) -> Self {
        Self {
            sending,
            serving,
            sending_done: false,
            serving_done: false,
            grace: None,
        }
    }
}

impl<Snd, Srv> Future for Halves<Snd, Srv>
where
    Snd: Future<Output = Result<(), h2::Error>>,
    Srv: Future<Output = ()>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if !*this.sending_done
            && let Poll::Ready(sent) = this.sending.poll(cx)
        {
            *this.sending_done = true;
            if let Err(err) = sent {
                tracing::debug!(%err, "control stream's sending half failed");
            }
        }
        if !*this.serving_done && this.serving.poll(cx).is_ready() {
            *this.serving_done = true;
        }
        match (*this.sending_done, *this.serving_done) {
            (true, true) => Poll::Ready(()),
            (_, false) => Poll::Pending,
            (false, true) => {
                let grace = this
                    .grace
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(CLOSE_GRACE)));
                ready!(grace.as_mut().poll(cx));
                tracing::debug!(
                    grace_s = CLOSE_GRACE.as_secs(),
                    "control stream's last messages not taken by the agent in time; stream reset"
                );
                Poll::Ready(())
            }
        }
    }
}
