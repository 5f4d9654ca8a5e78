//! A real DNS server on loopback for tests and benches (STYLE.md §5: no mock resolvers).
//!
//! hickory-server on its own thread and tokio runtime, UDP and TCP on one `127.0.0.1` port,
//! answering authoritatively from zones given as data: A, AAAA and PTR records with TTLs;
//! NXDOMAIN (or NODATA for a name with other types) with the zone's SOA, whose minimum is the
//! negative TTL; REFUSED for names outside every zone. The whole server can be switched to
//! [`Behaviour::Silent`], [`Behaviour::Slow`] or [`Behaviour::Refused`], its zones replaced
//! while it runs, and its received queries counted. It stops when dropped.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Header, HeaderCounts, Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, PTR, SOA};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;

/// TTL of records added without one.
pub const DEFAULT_TTL: u32 = 300;

/// Negative TTL (SOA minimum) of zones that do not set one.
pub const DEFAULT_NEGATIVE_TTL: u32 = 300;

/// The UDP socket's receive buffer, bytes.
const UDP_RECV_BUFFER: usize = 1 << 20;

/// How long dropping the server waits for its thread.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// How the whole server treats every query (each is counted first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Answers from its zones.
    Answer,
    /// Never answers.
    Silent,
    /// Answers from its zones after this delay.
    Slow(Duration),
    /// Answers REFUSED.
    Refused,
}

/// A zone as data: an origin, records under it, a negative TTL.
#[derive(Clone, Debug)]
pub struct Zone {
    /// Lowercase, no trailing dot.
    origin: String,
    records: Vec<(String, Data)>,
    negative_ttl: u32,
}

#[derive(Clone, Debug)]
enum Data {
    A(Ipv4Addr, u32),
    Aaaa(Ipv6Addr, u32),
    Ptr(String, u32),
}

/// The server; stops on drop.
pub struct DnsServer {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: mpsc::Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

impl Zone {
    /// An empty zone at `origin` (`bl.test`, `in-addr.arpa`; a trailing dot is ignored).
    pub fn new(origin: &str) -> Zone {
        Zone {
            origin: normalise(origin),
            records: Vec::new(),
            negative_ttl: DEFAULT_NEGATIVE_TTL,
        }
    }

    /// An A record at `label` under the origin (`"@"` for the origin itself).
    pub fn a(self, label: &str, addr: &str) -> Zone {
        self.a_ttl(label, addr, DEFAULT_TTL)
    }

    /// An A record with its TTL in seconds.
    pub fn a_ttl(mut self, label: &str, addr: &str, ttl: u32) -> Zone {
        let addr = addr.parse().expect("an IPv4 address");
        let name = self.name(label);
        self.records.push((name, Data::A(addr, ttl)));
        self
    }

    /// An AAAA record at `label`.
    pub fn aaaa(mut self, label: &str, addr: &str) -> Zone {
        let addr = addr.parse().expect("an IPv6 address");
        let name = self.name(label);
        self.records.push((name, Data::Aaaa(addr, DEFAULT_TTL)));
        self
    }

    /// A PTR record for `ip` (its in-addr.arpa or ip6.arpa name, which must lie in this zone)
    /// pointing at `target`.
    pub fn ptr(mut self, ip: &str, target: &str) -> Zone {
        let ip: IpAddr = ip.parse().expect("an IP address");
        let name = reverse_name(ip);
        assert!(
            in_zone(&name, &self.origin),
            "{name} is not in zone {}",
            self.origin
        );
        // The target keeps its case: the resolver must lowercase it.
        let target = target.trim_end_matches('.').to_owned();
        self.records.push((name, Data::Ptr(target, DEFAULT_TTL)));
        self
    }

    /// The negative TTL (SOA minimum) sent with NXDOMAIN and NODATA.
    pub fn negative_ttl(mut self, secs: u32) -> Zone {
        self.negative_ttl = secs;
        self
    }

    fn name(&self, label: &str) -> String {
        if label == "@" {
            self.origin.clone()
        } else {
            format!("{}.{}", normalise(label), self.origin)
        }
    }
}

impl DnsServer {
    /// Starts serving `zones` on `127.0.0.1`, UDP and TCP on one port.
    #[track_caller]
    pub fn start(zones: Vec<Zone>) -> DnsServer {
        let state = Arc::new(State {
            zones: RwLock::new(Zones::new(zones)),
            behaviour: Mutex::new(Behaviour::Answer),
            queries: AtomicU64::new(0),
        });
        let (udp, tcp) = bind_pair();
        let addr = udp.local_addr().expect("UDP address");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done) = mpsc::channel::<()>();
        let handler = Handler {
            state: Arc::clone(&state),
        };
        let thread = std::thread::Builder::new()
            .name("test-dns".to_owned())
            .spawn(move || {
                // Declared in this order so the runtime is dropped before `done` says so.
                let _done = done_tx;
                let runtime = runtime;
                runtime.block_on(async move {
                    let mut server = Server::new(handler);
                    server.register_socket(
                        tokio::net::UdpSocket::from_std(udp).expect("tokio UDP socket"),
                    );
                    server.register_listener(
                        tokio::net::TcpListener::from_std(tcp).expect("tokio TCP listener"),
                        Duration::from_secs(5),
                        16,
                    );
                    // Sent or dropped: stop either way.
                    let _ = stop_rx.await;
                    let _ = server.shutdown_gracefully().await;
                });
            })
            .expect("spawn the DNS server thread");
        DnsServer {
            addr,
            state,
            stop: Some(stop),
            done,
            thread: Some(thread),
        }
    }

    /// Where it listens (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Queries received so far, retransmissions included, whatever the behaviour.
    pub fn queries(&self) -> u64 {
        self.state.queries.load(Ordering::SeqCst)
    }

    /// Switches how every later query is treated.
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *self
            .state
            .behaviour
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = behaviour;
    }

    /// Replaces all zones; later queries see only these.
    pub fn set_zones(&self, zones: Vec<Zone>) {
        *self
            .state
            .zones
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Zones::new(zones);
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        drop(self.stop.take());
        let Some(thread) = self.thread.take() else {
            return;
        };
        // Disconnected = the thread ended; on timeout it is left behind rather than hanging
        // the test.
        if let Err(mpsc::RecvTimeoutError::Disconnected) = self.done.recv_timeout(STOP_WAIT) {
            let _ = thread.join();
        }
    }
}

/// The in-addr.arpa or ip6.arpa name of `ip`, lowercase, no trailing dot.
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}.in-addr.arpa")
        }
        IpAddr::V6(v6) => {
            let mut name = String::new();
            for byte in v6.octets().iter().rev() {
                name.push_str(&format!("{:x}.{:x}.", byte & 0x0f, byte >> 4));
            }
            name.push_str("ip6.arpa");
            name
        }
    }
}

struct State {
    zones: RwLock<Zones>,
    behaviour: Mutex<Behaviour>,
    queries: AtomicU64,
}

/// The zones, indexed for answering.
struct Zones {
    /// (origin, negative TTL), longest origin first so the closest enclosing zone wins.
    origins: Vec<(String, u32)>,
    records: HashMap<String, Vec<Data>>,
}

impl Zones {
    fn new(zones: Vec<Zone>) -> Zones {
        let mut origins: Vec<(String, u32)> = zones
            .iter()
            .map(|zone| (zone.origin.clone(), zone.negative_ttl))
            .collect();
        origins.sort_by_key(|(origin, _)| std::cmp::Reverse(origin.len()));
        let mut records: HashMap<String, Vec<Data>> = HashMap::new();
        for zone in zones {
            for (name, data) in zone.records {
                records.entry(name).or_default().push(data);
            }
        }
        Zones { origins, records }
    }
}

/// What to send for one query.
enum Reply {
    Records(Vec<Record>),
    /// NXDOMAIN or NODATA, with the zone's SOA.
    Negative(ResponseCode, Box<Record>),
    Refused,
}

impl Zones {
    fn reply(&self, query_name: &Name, record_type: RecordType) -> Reply {
        let name = normalise(&query_name.to_ascii());
        let Some((origin, negative_ttl)) = self
            .origins
            .iter()
            .find(|(origin, _)| in_zone(&name, origin))
        else {
            return Reply::Refused;
        };
        let Some(data) = self.records.get(&name) else {
            return Reply::Negative(ResponseCode::NXDomain, Box::new(soa(origin, *negative_ttl)));
        };
        let records: Vec<Record> = data
            .iter()
            .filter_map(|data| {
                let (ttl, rdata) = match data {
                    Data::A(addr, ttl) => (*ttl, RData::A(A(*addr))),
                    Data::Aaaa(addr, ttl) => (*ttl, RData::AAAA(AAAA(*addr))),
                    Data::Ptr(target, ttl) => {
                        let target = Name::from_ascii(format!("{target}.")).ok()?;
                        (*ttl, RData::PTR(PTR(target)))
                    }
                };
                (rdata.record_type() == record_type)
                    .then(|| Record::from_rdata(query_name.clone(), ttl, rdata))
            })
            .collect();
        if records.is_empty() {
            return Reply::Negative(ResponseCode::NoError, Box::new(soa(origin, *negative_ttl)));
        }
        Reply::Records(records)
    }
}

fn soa(origin: &str, negative_ttl: u32) -> Record {
    let origin = Name::from_ascii(format!("{origin}.")).expect("a zone name");
    let mname = Name::from_ascii("ns.test.").expect("a name");
    let rname = Name::from_ascii("hostmaster.test.").expect("a name");
    let soa = SOA::new(mname, rname, 1, 3600, 600, 86_400, negative_ttl);
    Record::from_rdata(origin, negative_ttl, RData::SOA(soa))
}

struct Handler {
    state: Arc<State>,
}

impl Handler {
    async fn answer<R: ResponseHandler>(&self, request: &Request, mut response: R) -> ResponseInfo {
        self.state.queries.fetch_add(1, Ordering::SeqCst);
        let behaviour = *self
            .state
            .behaviour
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        match behaviour {
            Behaviour::Answer => {}
            Behaviour::Silent => return info(metadata),
            Behaviour::Slow(delay) => tokio::time::sleep(delay).await,
            Behaviour::Refused => {
                metadata.response_code = ResponseCode::Refused;
                let message = MessageResponseBuilder::from_message_request(request)
                    .build_no_records(metadata);
                return response
                    .send_response(message)
                    .await
                    .unwrap_or(info(metadata));
            }
        }
        let Ok(request_info) = request.request_info() else {
            metadata.response_code = ResponseCode::FormErr;
            let message =
                MessageResponseBuilder::from_message_request(request).build_no_records(metadata);
            return response
                .send_response(message)
                .await
                .unwrap_or(info(metadata));
        };
        let query = request_info.query.original();
        let reply = self
            .state
            .zones
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .reply(query.name(), query.query_type());
        let (answers, soa) = match reply {
            Reply::Records(records) => (records, Vec::new()),
            Reply::Negative(code, soa) => {
                metadata.response_code = code;
                (Vec::new(), vec![*soa])
            }
            Reply::Refused => {
                metadata.response_code = ResponseCode::Refused;
                metadata.authoritative = false;
                (Vec::new(), Vec::new())
            }
        };
        let message = MessageResponseBuilder::from_message_request(request).build(
            metadata,
            answers.iter(),
            std::iter::empty(),
            soa.iter(),
            std::iter::empty(),
        );
        response
            .send_response(message)
            .await
            .unwrap_or(info(metadata))
    }
}

// `RequestHandler` is declared with `#[async_trait]`; this is that macro's expansion written
// out, so the server needs no async-trait dependency of its own.
impl RequestHandler for Handler {
    fn handle_request<'life0, 'life1, 'async_trait, R, T>(
        &'life0 self,
        request: &'life1 Request,
        response_handle: R,
    ) -> Pin<Box<dyn Future<Output = ResponseInfo> + Send + 'async_trait>>
    where
        R: ResponseHandler + 'async_trait,
        T: Time + 'async_trait,
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(self.answer(request, response_handle))
    }
}

fn info(metadata: Metadata) -> ResponseInfo {
    ResponseInfo::from(Header {
        metadata,
        counts: HeaderCounts::default(),
    })
}

/// Lowercase, no trailing dot.
fn normalise(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether `name` is `origin` or under it (both normalised).
fn in_zone(name: &str, origin: &str) -> bool {
    name == origin
        || name
            .strip_suffix(origin)
            .is_some_and(|head| head.ends_with('.'))
}

/// A UDP socket and a TCP listener on the same free loopback port, non-blocking.
#[track_caller]
fn bind_pair() -> (UdpSocket, TcpListener) {
    for _ in 0..20 {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind UDP on loopback");
        let addr = udp.local_addr().expect("UDP address");
        // The port may be taken for TCP by someone else: try another.
        let Ok(tcp) = TcpListener::bind(addr) else {
            continue;
        };
        udp.set_nonblocking(true).expect("non-blocking UDP");
        // As real servers do (unbound's so-rcvbuf): the default ~200 KB drops queries when a
        // client bursts a few hundred at once (bench/dns.rs), and a lost query costs a
        // resolver a retransmission or its whole timeout. The kernel caps it at rmem_max.
        socket2::SockRef::from(&udp)
            .set_recv_buffer_size(UDP_RECV_BUFFER)
            .expect("UDP receive buffer");
        tcp.set_nonblocking(true).expect("non-blocking TCP");
        return (udp, tcp);
    }
    panic!("no loopback port free for both UDP and TCP");
}
