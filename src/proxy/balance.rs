//! Client connections spread evenly over the runtimes of one listener
//! (`runtime = "thread_per_core"`).
//!
//! Each runtime accepts on its own `SO_REUSEPORT` listener, and the kernel
//! picks the listener by a hash of the connection's addresses, not by how
//! busy a runtime is. With a few dozen long-lived keep-alive connections
//! the split is uneven (of 64 connections over two runtimes, one gets 36 or
//! more in 38 % of splits), and since a connection stays on its runtime for
//! life, the clients of the fuller one wait longer for every request: much
//! of the proxy's p99 at 64 connections came from them (BENCHMARKS.md). So
//! a runtime that accepts a connection while another runtime of the
//! listener serves fewer hands it over (as a plain socket, before a byte is
//! read), and each runtime ends up with its share, as Envoy's
//! `exact_balance` keeps its workers. A connection is handed over at most
//! once, and only when accepted: nothing moves while it is served.

use std::{
    net::SocketAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::sync::{OwnedSemaphorePermit, mpsc};

/// A connection accepted by one runtime for another to serve: the socket,
/// taken off the accepting runtime's event loop, its peer, and its place
/// under `max_connections`.
pub(super) struct Handoff {
    pub(super) stream: std::net::TcpStream,
    pub(super) remote: SocketAddr,
    pub(super) place: Place,
}

/// The runtimes (one [`Member`] each) serving one listener's port.
#[derive(Default)]
pub(crate) struct Balancer {
    members: RwLock<Vec<Arc<Slot>>>,
}

/// One runtime's count of connections it serves, and where others hand it
/// theirs. The inbox is unbounded, but every connection in it holds a
/// `max_connections` place, so it holds at most that many.
struct Slot {
    live: AtomicUsize,
    inbox: mpsc::UnboundedSender<Handoff>,
}

/// A runtime's part in a [`Balancer`]: its own slot and the receiving end
/// of its inbox.
pub(super) struct Member {
    balancer: Arc<Balancer>,
    index: usize,
    pub(super) inbox: mpsc::UnboundedReceiver<Handoff>,
}

/// A connection's place: its `max_connections` permit, and its count on
/// the runtime that serves it. Both are given back when it is dropped.
pub(super) struct Place {
    _permit: OwnedSemaphorePermit,
    counted: Option<Arc<Slot>>,
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(slot) = self.counted.take() {
            slot.live.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// What to do with a connection just accepted.
pub(super) enum Assigned {
    /// Serve it here.
    Keep(Place),
    /// Another runtime serves fewer: send it there (it is counted there).
    Send(mpsc::UnboundedSender<Handoff>, Place),
}

impl Balancer {
    /// Adds a runtime to the listener's set.
    pub(crate) fn join(self: &Arc<Self>) -> Member {
        let (inbox, receiver) = mpsc::unbounded_channel();
        let mut members = self
            .members
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        members.push(Arc::new(Slot {
            live: AtomicUsize::new(0),
            inbox,
        }));
        Member {
            balancer: Arc::clone(self),
            index: members.len() - 1,
            inbox: receiver,
        }
    }

    /// The runtimes' slots, in the order they joined.
    fn members(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Slot>>> {
        self.members
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Connections each runtime serves now, in the order they joined.
    #[cfg(test)]
    pub(crate) fn live(&self) -> Vec<usize> {
        self.members()
            .iter()
            .map(|slot| slot.live.load(Ordering::Relaxed))
            .collect()
    }
}

impl Member {
    /// Where a connection this runtime accepted is served: here, unless
    /// another runtime serves fewer connections; then the one that serves
    /// the fewest. The count is taken at once, so that a burst of
    /// connections spreads out before any is served.
    pub(super) fn assign(&self, permit: OwnedSemaphorePermit) -> Assigned {
        let members = self.balancer.members();
        let own = &members[self.index];
        let mut target = own;
        let mut fewest = own.live.load(Ordering::Relaxed);
        for slot in members.iter() {
            let live = slot.live.load(Ordering::Relaxed);
            if live < fewest && !slot.inbox.is_closed() {
                target = slot;
                fewest = live;
            }
        }
        let place = Place::counted(permit, target);
        if Arc::ptr_eq(target, own) {
            Assigned::Keep(place)
        } else {
            Assigned::Send(target.inbox.clone(), place)
        }
    }

    /// A connection this runtime keeps whatever the others serve (one sent
    /// back because its target stopped): counted here.
    pub(super) fn keep(&self, mut place: Place) -> Place {
        let members = self.balancer.members();
        let own = &members[self.index];
        own.live.fetch_add(1, Ordering::Relaxed);
        if let Some(before) = place.counted.replace(Arc::clone(own)) {
            before.live.fetch_sub(1, Ordering::Relaxed);
        }
        place
    }
}

impl Place {
    fn counted(permit: OwnedSemaphorePermit, slot: &Arc<Slot>) -> Self {
        slot.live.fetch_add(1, Ordering::Relaxed);
        Self {
            _permit: permit,
            counted: Some(Arc::clone(slot)),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
        sync::Semaphore,
    };

    use super::*;

    fn permit(cap: &Arc<Semaphore>) -> OwnedSemaphorePermit {
        Arc::clone(cap).try_acquire_owned().unwrap()
    }

    #[test]
    fn a_burst_on_one_runtime_ends_up_split_evenly() {
        let balancer = Arc::new(Balancer::default());
        let (mut a, mut b) = (balancer.join(), balancer.join());
        let cap = Arc::new(Semaphore::new(100));
        let mut served = Vec::new();
        // Every connection arrives on runtime `a`'s listener.
        for _ in 0..9 {
            match a.assign(permit(&cap)) {
                Assigned::Keep(place) => served.push(place),
                Assigned::Send(inbox, place) => {
                    assert!(inbox.same_channel(&balancer.members()[1].inbox));
                    served.push(place);
                }
            }
        }
        assert_eq!(balancer.live(), vec![5, 4]);
        // A connection is counted once, where it is served, and given back
        // with its permit when it ends.
        assert_eq!(cap.available_permits(), 91);
        served.truncate(3);
        assert_eq!(balancer.live().iter().sum::<usize>(), 3);
        assert_eq!(cap.available_permits(), 97);
        drop(served);
        assert_eq!(balancer.live(), vec![0, 0]);
        assert_eq!(cap.available_permits(), 100);
        assert!(a.inbox.try_recv().is_err() && b.inbox.try_recv().is_err());
    }

    #[test]
    fn connections_arriving_evenly_stay_where_they_arrive() {
        let balancer = Arc::new(Balancer::default());
        let members = [balancer.join(), balancer.join(), balancer.join()];
        let cap = Arc::new(Semaphore::new(100));
        let mut served = Vec::new();
        for round in 0..4 {
            for member in &members {
                match member.assign(permit(&cap)) {
                    Assigned::Keep(place) => served.push(place),
                    Assigned::Send(..) => panic!("round {round}: moved although even"),
                }
            }
        }
        assert_eq!(balancer.live(), vec![4, 4, 4]);
    }

    #[test]
    fn a_stopped_runtime_gets_nothing_and_what_comes_back_is_counted_here() {
        let balancer = Arc::new(Balancer::default());
        let (a, mut b) = (balancer.join(), balancer.join());
        let cap = Arc::new(Semaphore::new(100));
        let kept = match a.assign(permit(&cap)) {
            Assigned::Keep(place) => place,
            Assigned::Send(..) => panic!("moved to an equal runtime"),
        };
        let sent = match a.assign(permit(&cap)) {
            Assigned::Send(_, place) => place,
            Assigned::Keep(_) => panic!("kept although the other runtime serves none"),
        };
        assert_eq!(balancer.live(), vec![1, 1]);
        // Its target stopped before taking it: it is served here instead.
        let back = a.keep(sent);
        assert_eq!(balancer.live(), vec![2, 0]);
        b.inbox.close();
        for _ in 0..3 {
            assert!(matches!(a.assign(permit(&cap)), Assigned::Keep(_)));
        }
        drop((kept, back));
        assert_eq!(balancer.live(), vec![0, 0]);
    }

    #[tokio::test]
    async fn a_handed_over_socket_keeps_its_bytes_and_its_peer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let (accepted, remote) = listener.accept().await.unwrap();
        assert_eq!(remote, client.local_addr().unwrap());

        let balancer = Arc::new(Balancer::default());
        let (a, mut b) = (balancer.join(), balancer.join());
        let cap = Arc::new(Semaphore::new(2));
        let _first = a.assign(permit(&cap));
        let Assigned::Send(inbox, place) = a.assign(permit(&cap)) else {
            panic!("kept although the other runtime serves none");
        };
        inbox
            .send(Handoff {
                stream: accepted.into_std().unwrap(),
                remote,
                place,
            })
            .map_err(|_| "send")
            .unwrap();
        let handoff = b.inbox.recv().await.unwrap();
        assert_eq!(handoff.remote, remote);
        let mut served = TcpStream::from_std(handoff.stream).unwrap();
        let mut head = [0u8; 16];
        served.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"GET / HTTP/1.1\r\n");
        served
            .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .await
            .unwrap();
        let mut answer = [0u8; 27];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HTTP/1.1 204 No Content\r\n\r\n");
    }
}
