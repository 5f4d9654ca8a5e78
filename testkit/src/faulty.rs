//! A downstream that behaves like Postfix's smtpd where tarmac's trust boundary depends on it,
//! with faults drawn at random per connection, for the fault-injection test (`tests/faults.rs`).
//!
//! Like Postfix 3.7 with `smtpd_authorized_xclient_hosts = 127.0.0.1`: a `220` banner; EHLO
//! offers PIPELINING, SIZE, 8BITMIME and `XCLIENT ADDR NAME PORT HELO PROTO`, the latter only
//! until an XCLIENT succeeded (Postfix re-checks its authorisation against the address it was
//! just given); XCLIENT is answered with a new `220` greeting, a second one with
//! `550 5.7.0 Error: insufficient authorization`; RSET and NOOP `250 2.0.0 Ok`, QUIT
//! `221 2.0.0 Bye`. Postfix does not require HELO before MAIL by default, and neither does this.
//!
//! Each accepted connection draws a [`Plan`] from a PRNG seeded by the run's seed and the
//! connection's accept index ([`plan_for`]): nothing, no XCLIENT offered, or one [`Fault`] (a
//! 4xx/5xx reply, a close without a reply, a stall, a reset) at the n-th time a [`Stage`] is
//! reached. It records everything it received, line by line and in order, each line with what
//! the connection's state was when it arrived ([`Received`]): whether the handshake was complete,
//! which client the last accepted XCLIENT named, whether a QUIT came before. Every message it
//! answered `250` at end-of-data is kept as a [`Completed`].
//!
//! Plain std sockets: one accept thread, one thread per connection, every read bounded by
//! [`IO_TIMEOUT`] so a connection thread ends on its own even if tarmac hangs.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// Longest any read or write on a downstream connection waits: far above tarmac's timeouts in
/// the fault test, so only a hung tarmac reaches it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest line kept; longer ones are cut (tarmac never sends one in these tests).
const MAX_LINE: usize = 64 * 1024;

const HOSTNAME: &str = "faulty.test";

/// Where in the dialogue a fault fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// On accept, instead of (or as) the banner.
    Banner,
    /// At an EHLO or HELO.
    Ehlo,
    /// At an XCLIENT.
    Xclient,
    Mail,
    Rcpt,
    /// At the DATA command.
    Data,
    /// At a line of a message body (the n-th body line of the connection).
    Body,
    /// At the final dot, before any reply to it.
    EndOfData,
}

const STAGES: [Stage; 8] = [
    Stage::Banner,
    Stage::Ehlo,
    Stage::Xclient,
    Stage::Mail,
    Stage::Rcpt,
    Stage::Data,
    Stage::Body,
    Stage::EndOfData,
];

/// What happens when a fault fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// This reply instead of the normal one; `421` also closes, like Postfix.
    Reply(u16),
    /// Close (FIN) without a reply.
    Close,
    /// Stop replying; go on reading (and recording) until the peer closes.
    Stall,
    /// Close with `SO_LINGER 0`: the peer sees a reset.
    Reset,
}

/// One fault: `action` at the `nth` time (1-based) `stage` is reached on the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub stage: Stage,
    pub nth: u32,
    pub action: Action,
}

/// What one connection does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Postfix, nothing injected.
    Clean,
    /// Never offers XCLIENT (tarmac missing from `smtpd_authorized_xclient_hosts`).
    NoXclient,
    Fault(Fault),
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Plan::Clean => write!(f, "clean"),
            Plan::NoXclient => write!(f, "XCLIENT not offered"),
            Plan::Fault(Fault { stage, nth, action }) => {
                let what = match action {
                    Action::Reply(code) => format!("reply {code}"),
                    Action::Close => "close without reply".to_owned(),
                    Action::Stall => "stall".to_owned(),
                    Action::Reset => "reset (SO_LINGER 0)".to_owned(),
                };
                write!(f, "{what} at {stage:?} #{nth}")
            }
        }
    }
}

/// splitmix64: small, good enough, and the same on every platform for a given seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// How often and how late faults come.
#[derive(Clone, Copy, Debug)]
pub struct FaultMix {
    /// Share of connections with a fault (or without XCLIENT offered), in percent.
    pub percent: u64,
    /// A fault fires at the first time its stage is reached half of the time, otherwise at
    /// one of the first `max_nth` times (body lines: the first `4 × max_nth`).
    pub max_nth: u32,
}

/// The plan of the connection accepted `index`-th (from 0) in a run seeded `seed`: the same
/// seed gives the same sequence of plans in accept order.
pub fn plan_for(seed: u64, index: u64, mix: FaultMix) -> Plan {
    let mut rng = Rng::new(seed ^ index.wrapping_mul(0xd6e8_feb8_6659_fd93));
    if !rng.chance(mix.percent) {
        return Plan::Clean;
    }
    if rng.chance(6) {
        return Plan::NoXclient;
    }
    let stage = rng.pick(&STAGES);
    let max = u64::from(mix.max_nth.max(1));
    let nth = match stage {
        Stage::Banner => 1,
        Stage::Body => 1 + rng.below(4 * max) as u32,
        _ if rng.chance(50) => 1,
        _ => 1 + rng.below(max) as u32,
    };
    let temp = rng.pick(&[421, 450, 451, 452]);
    let perm = rng.pick(&[550, 552, 554]);
    let action = match stage {
        // Nothing answers a body line.
        Stage::Body => rng.pick(&[Action::Close, Action::Stall, Action::Reset]),
        _ => rng.pick(&[
            Action::Reply(temp),
            Action::Reply(perm),
            Action::Close,
            Action::Stall,
            Action::Reset,
        ]),
    };
    Plan::Fault(Fault { stage, nth, action })
}

/// One line the downstream received, with the connection's state when it arrived.
#[derive(Clone, Debug)]
pub struct Received {
    /// The line without its CRLF (lossy UTF-8; a line with no LF before EOF ends in `<EOF>`).
    pub text: String,
    /// A body line (between `354` and the final dot, the dot included).
    pub in_data: bool,
    /// Banner `220` sent, EHLO/HELO answered `250`, and XCLIENT answered `220` if the first EHLO
    /// offered it.
    pub handshake_done: bool,
    /// The banner's code, once one was sent.
    pub banner: Option<u16>,
    /// An EHLO or HELO had arrived (answered or not).
    pub ehlo_received: bool,
    /// An EHLO or HELO had been answered `250`.
    pub ehlo_answered: bool,
    /// ADDR of the last XCLIENT answered `220` on this connection.
    pub identity: Option<String>,
    /// A QUIT arrived before this line.
    pub after_quit: bool,
}

/// Milliseconds since the first call in this process: the clock of every transcript, so the
/// downstream's and the clients' can be read side by side.
pub fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// One entry of a connection's log, stamped with [`clock_ms`].
#[derive(Clone, Debug)]
pub struct Timed {
    pub ms: u64,
    pub event: Event,
}

impl Timed {
    fn now(event: Event) -> Timed {
        Timed {
            ms: clock_ms(),
            event,
        }
    }
}

/// What one log entry is.
#[derive(Clone, Debug)]
pub enum Event {
    Received(Received),
    /// A reply sent, CRLFs shown as ` | ` between lines.
    Sent(String),
    /// The connection ended: how.
    End(String),
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Received(r) => {
                let mut flags = Vec::new();
                if !r.handshake_done {
                    flags.push("BEFORE-HANDSHAKE".to_owned());
                }
                if r.after_quit {
                    flags.push("AFTER-QUIT".to_owned());
                }
                if r.in_data {
                    flags.push("data".to_owned());
                }
                if let Some(id) = &r.identity {
                    flags.push(format!("as {id}"));
                }
                write!(f, "C: {}   [{}]", r.text, flags.join(", "))
            }
            Event::Sent(reply) => write!(f, "S: {reply}"),
            Event::End(how) => write!(f, "-- {how}"),
        }
    }
}

/// Everything about one downstream connection.
#[derive(Clone, Debug)]
pub struct Connection {
    /// Accept order, from 0.
    pub index: u64,
    pub peer: SocketAddr,
    pub plan: Plan,
    pub events: Vec<Timed>,
    /// The connection thread has finished.
    pub ended: bool,
}

impl Connection {
    /// The whole log, one event a line, indented.
    /// The whole log, one event a line with its [`clock_ms`] in seconds, indented; runs of ordinary body lines (and the `502`s
    /// they get when they arrive as commands) are shortened to their first line and a count,
    /// long lines cut at 110 characters.
    pub fn transcript(&self) -> String {
        let mut text = format!(
            "downstream connection #{} from {} ({}):\n",
            self.index, self.peer, self.plan
        );
        let mut skipped = 0;
        let mut previous_filler = false;
        for Timed { ms, event } in &self.events {
            let filler = match event {
                Event::Received(r) => is_filler(r),
                Event::Sent(reply) => previous_filler && reply.starts_with("502 "),
                Event::End(_) => false,
            };
            if filler && previous_filler {
                skipped += 1;
                continue;
            }
            if skipped > 0 {
                text.push_str(&format!("    ... {skipped} more like the line above\n"));
                skipped = 0;
            }
            previous_filler = filler;
            let mut line = format!("[{:>6}.{:03}] {event}", ms / 1000, ms % 1000);
            if line.len() > 110 {
                let mut cut = 110;
                while !line.is_char_boundary(cut) {
                    cut -= 1;
                }
                line = format!("{}... ({} bytes)", &line[..cut], line.len());
            }
            text.push_str("    ");
            text.push_str(&line);
            text.push('\n');
        }
        if skipped > 0 {
            text.push_str(&format!("    ... {skipped} more like the line above\n"));
        }
        text
    }

    pub fn received(&self) -> impl Iterator<Item = &Received> {
        self.events.iter().filter_map(|e| match &e.event {
            Event::Received(r) => Some(r),
            _ => None,
        })
    }
}

/// A body line that tells nothing new: not a command, not the Message-ID, not the final dot.
fn is_filler(r: &Received) -> bool {
    const VERBS: [&str; 10] = [
        "EHLO", "HELO", "XCLIENT", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "STARTTLS",
    ];
    let verb = r.text.split_whitespace().next().unwrap_or_default();
    r.text != "."
        && !r.text.starts_with("Message-ID:")
        && !r.text.starts_with("Received:")
        && !VERBS.iter().any(|v| v.eq_ignore_ascii_case(verb))
}

/// A message the downstream answered `250` at end-of-data.
#[derive(Clone, Debug)]
pub struct Completed {
    pub connection: u64,
    /// ADDR of the XCLIENT in effect when MAIL arrived.
    pub identity_at_mail: Option<String>,
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    /// The content, dot-unstuffed, CRLF line ends.
    pub body: String,
}

struct Shared {
    seed: u64,
    mix: FaultMix,
    next_index: AtomicU64,
    live: AtomicUsize,
    connections: Mutex<Vec<Arc<Mutex<Connection>>>>,
    completed: Mutex<Vec<Completed>>,
}

/// The running downstream; stops (and joins its accept thread) when dropped.
pub struct Faulty {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Faulty {
    /// Listens on a free loopback port; connections draw their plans from `seed` and `mix`.
    pub fn start(seed: u64, mix: FaultMix) -> Faulty {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("faulty binds");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            seed,
            mix,
            next_index: AtomicU64::new(0),
            live: AtomicUsize::new(0),
            connections: Mutex::new(Vec::new()),
            completed: Mutex::new(Vec::new()),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let shared = Arc::clone(&shared);
            let stop = Arc::clone(&stop);
            thread::spawn(move || accept_loop(listener, shared, stop))
        };
        Faulty {
            addr,
            shared,
            stop,
            accept: Some(accept),
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// A snapshot of every connection so far, in accept order.
    pub fn connections(&self) -> Vec<Connection> {
        lock(&self.shared.connections)
            .iter()
            .map(|c| lock(c).clone())
            .collect()
    }

    pub fn completed(&self) -> Vec<Completed> {
        lock(&self.shared.completed).clone()
    }

    /// Connection threads still running.
    pub fn live(&self) -> usize {
        self.shared.live.load(Ordering::SeqCst)
    }

    /// Stops accepting and joins the accept thread; connection threads end with their peers
    /// (or at [`IO_TIMEOUT`]).
    pub fn stop(&mut self) {
        if let Some(accept) = self.accept.take() {
            self.stop.store(true, Ordering::SeqCst);
            // Wakes the blocking accept; the loop sees the flag and drops this connection.
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5));
            let _ = accept.join();
        }
    }
}

impl Drop for Faulty {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let index = shared.next_index.fetch_add(1, Ordering::SeqCst);
        let plan = plan_for(shared.seed, index, shared.mix);
        let peer = stream
            .peer_addr()
            .unwrap_or_else(|_| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
        let record = Arc::new(Mutex::new(Connection {
            index,
            peer,
            plan,
            events: Vec::new(),
            ended: false,
        }));
        lock(&shared.connections).push(Arc::clone(&record));
        shared.live.fetch_add(1, Ordering::SeqCst);
        let shared = Arc::clone(&shared);
        thread::spawn(move || {
            let end = match Dialogue::new(stream, plan, record.clone(), shared.clone()) {
                Ok(mut dialogue) => match dialogue.run() {
                    Ok(end) => end,
                    Err(e) => format!("I/O error: {e}"),
                },
                Err(e) => format!("setup error: {e}"),
            };
            {
                let mut record = lock(&record);
                record.events.push(Timed::now(Event::End(end)));
                record.ended = true;
            }
            shared.live.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// The transaction in progress.
#[derive(Default)]
struct Transaction {
    mail_from: Option<String>,
    identity_at_mail: Option<String>,
    rcpt_to: Vec<String>,
}

struct Dialogue {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    plan: Plan,
    record: Arc<Mutex<Connection>>,
    shared: Arc<Shared>,
    /// How many times each stage was reached (index as in [`STAGES`]).
    reached: [u32; 8],
    banner_ok: bool,
    banner: Option<u16>,
    ehlo_received: bool,
    /// The banner was a 5xx: only QUIT is served (postscreen-like).
    refused: bool,
    ehlo_ok: bool,
    xclient_offered: bool,
    xclient_ok: bool,
    identity: Option<String>,
    quit_seen: bool,
    transaction: Transaction,
    /// The fault fired and was a stall: read and record, never answer.
    stalled: bool,
}

/// How a handled line leaves the connection.
enum Flow {
    Continue,
    /// Close now (after what was written); the text says why.
    Close(String),
}

impl Dialogue {
    fn new(
        stream: TcpStream,
        plan: Plan,
        record: Arc<Mutex<Connection>>,
        shared: Arc<Shared>,
    ) -> io::Result<Dialogue> {
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Dialogue {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            plan,
            record,
            shared,
            reached: [0; 8],
            banner_ok: false,
            banner: None,
            ehlo_received: false,
            refused: false,
            ehlo_ok: false,
            xclient_offered: false,
            xclient_ok: false,
            identity: None,
            quit_seen: false,
            transaction: Transaction::default(),
            stalled: false,
        })
    }

    fn handshake_done(&self) -> bool {
        self.banner_ok && self.ehlo_ok && (!self.xclient_offered || self.xclient_ok)
    }

    /// Counts `stage` and returns the fault's action if it fires now.
    fn reach(&mut self, stage: Stage) -> Option<Action> {
        let i = STAGES.iter().position(|s| *s == stage).unwrap();
        self.reached[i] += 1;
        match self.plan {
            Plan::Fault(f) if f.stage == stage && f.nth == self.reached[i] => Some(f.action),
            _ => None,
        }
    }

    fn log(&self, event: Event) {
        lock(&self.record).events.push(Timed::now(event));
    }

    fn reply(&mut self, text: &str) -> io::Result<()> {
        self.log(Event::Sent(text.trim_end().replace("\r\n", " | ")));
        self.writer.write_all(text.as_bytes())
    }

    /// Carries out a fault's action; `None` for a reply action (the caller sends it).
    fn act(&mut self, action: Action, stage: Stage) -> io::Result<Option<Flow>> {
        match action {
            Action::Reply(code) => {
                let class = code / 100;
                let text = format!("{code} {class}.3.0 Error: injected fault at {stage:?}\r\n");
                self.reply(&text)?;
                if code == 421 {
                    return Ok(Some(Flow::Close(format!("closed after {code}"))));
                }
                Ok(Some(Flow::Continue))
            }
            Action::Close => Ok(Some(Flow::Close("closed without a reply".to_owned()))),
            Action::Reset => {
                socket2::SockRef::from(&self.writer).set_linger(Some(Duration::ZERO))?;
                Ok(Some(Flow::Close("reset (SO_LINGER 0)".to_owned())))
            }
            Action::Stall => {
                self.stalled = true;
                self.log(Event::End(format!("stalling from {stage:?} on")));
                Ok(Some(Flow::Continue))
            }
        }
    }

    fn run(&mut self) -> io::Result<String> {
        match self.reach(Stage::Banner) {
            None => {
                self.reply(&format!("220 {HOSTNAME} ESMTP Postfix\r\n"))?;
                self.banner_ok = true;
                self.banner = Some(220);
            }
            Some(action) => {
                // A 5xx banner: only QUIT is served from then on (postscreen-like).
                if let Action::Reply(code) = action {
                    self.refused = code / 100 == 5;
                    self.banner = Some(code);
                }
                if let Some(Flow::Close(why)) = self.act(action, Stage::Banner)? {
                    return Ok(why);
                }
            }
        }
        let mut in_data = false;
        let mut body = String::new();
        loop {
            let mut raw = Vec::new();
            let n = (&mut self.reader)
                .take(MAX_LINE as u64)
                .read_until(b'\n', &mut raw)?;
            if n == 0 {
                return Ok("peer closed (EOF)".to_owned());
            }
            let complete = raw.ends_with(b"\n");
            let mut text = String::from_utf8_lossy(&raw)
                .trim_end_matches(['\r', '\n'])
                .to_owned();
            if !complete {
                text.push_str("<EOF>");
            }
            self.log(Event::Received(Received {
                text: text.clone(),
                in_data,
                handshake_done: self.handshake_done(),
                banner: self.banner,
                ehlo_received: self.ehlo_received,
                ehlo_answered: self.ehlo_ok,
                identity: self.identity.clone(),
                after_quit: self.quit_seen,
            }));
            if !complete {
                return Ok("peer closed mid-line".to_owned());
            }
            if !in_data {
                let verb = text.split_whitespace().next().unwrap_or_default();
                if ["EHLO", "HELO"]
                    .iter()
                    .any(|v| v.eq_ignore_ascii_case(verb))
                {
                    self.ehlo_received = true;
                }
            }
            if self.stalled {
                if !in_data && text.eq_ignore_ascii_case("QUIT") {
                    self.quit_seen = true;
                }
                continue;
            }
            let flow = if in_data {
                self.data_line(&text, &mut in_data, &mut body)?
            } else {
                self.command(&text, &mut in_data, &mut body)?
            };
            if let Flow::Close(why) = flow {
                return Ok(why);
            }
        }
    }

    fn data_line(&mut self, text: &str, in_data: &mut bool, body: &mut String) -> io::Result<Flow> {
        if text != "." {
            if let Some(action) = self.reach(Stage::Body) {
                if let Some(Flow::Close(why)) = self.act(action, Stage::Body)? {
                    return Ok(Flow::Close(why));
                }
                return Ok(Flow::Continue);
            }
            body.push_str(text.strip_prefix('.').unwrap_or(text));
            body.push_str("\r\n");
            return Ok(Flow::Continue);
        }
        *in_data = false;
        let transaction = std::mem::take(&mut self.transaction);
        let content = std::mem::take(body);
        if let Some(action) = self.reach(Stage::EndOfData) {
            if let Some(Flow::Close(why)) = self.act(action, Stage::EndOfData)? {
                return Ok(Flow::Close(why));
            }
            return Ok(Flow::Continue);
        }
        let index = lock(&self.record).index;
        let n = lock(&self.shared.completed).len();
        // Recorded before the 250 leaves: whatever tarmac makes of it, the downstream took it.
        lock(&self.shared.completed).push(Completed {
            connection: index,
            identity_at_mail: transaction.identity_at_mail,
            mail_from: transaction.mail_from.unwrap_or_default(),
            rcpt_to: transaction.rcpt_to,
            body: content,
        });
        self.reply(&format!("250 2.0.0 Ok: queued as F{index}Q{n}\r\n"))?;
        Ok(Flow::Continue)
    }

    fn command(&mut self, text: &str, in_data: &mut bool, body: &mut String) -> io::Result<Flow> {
        let verb = text
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        let arg = text.get(verb.len()..).unwrap_or_default().trim();
        if verb == "QUIT" {
            self.quit_seen = true;
            self.reply("221 2.0.0 Bye\r\n")?;
            return Ok(Flow::Close("closed after QUIT".to_owned()));
        }
        if self.refused || !self.banner_ok {
            self.reply("503 5.5.1 Error: access denied\r\n")?;
            return Ok(Flow::Continue);
        }
        let stage = match verb.as_str() {
            "EHLO" | "HELO" => Some(Stage::Ehlo),
            "XCLIENT" => Some(Stage::Xclient),
            "MAIL" => Some(Stage::Mail),
            "RCPT" => Some(Stage::Rcpt),
            "DATA" => Some(Stage::Data),
            _ => None,
        };
        if let Some(stage) = stage {
            if let Some(action) = self.reach(stage) {
                if let Some(flow) = self.act(action, stage)? {
                    return Ok(flow);
                }
            }
        }
        match verb.as_str() {
            "EHLO" => {
                self.transaction = Transaction::default();
                // Offered until an XCLIENT succeeded, like Postfix re-checking the new address.
                let offer = self.plan != Plan::NoXclient && !self.xclient_ok;
                if !self.ehlo_ok {
                    self.xclient_offered = offer;
                }
                let mut reply =
                    format!("250-{HOSTNAME}\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n");
                if offer {
                    reply.push_str("250-XCLIENT ADDR NAME PORT HELO PROTO\r\n");
                }
                reply.push_str("250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250 DSN\r\n");
                self.reply(&reply)?;
                self.ehlo_ok = true;
            }
            "HELO" => {
                self.transaction = Transaction::default();
                self.reply(&format!("250 {HOSTNAME}\r\n"))?;
                self.ehlo_ok = true;
            }
            "XCLIENT" => {
                if self.transaction.mail_from.is_some() {
                    self.reply("503 5.5.1 Error: MAIL transaction in progress\r\n")?;
                } else if !self.xclient_offered || self.xclient_ok {
                    self.reply("550 5.7.0 Error: insufficient authorization\r\n")?;
                } else {
                    let addr = arg
                        .split_whitespace()
                        .find_map(|a| a.strip_prefix("ADDR="))
                        .map(str::to_owned);
                    self.identity = addr;
                    self.xclient_ok = true;
                    // Postfix restarts the session: a new greeting, and the next EHLO is the
                    // client's.
                    self.reply(&format!("220 {HOSTNAME} ESMTP Postfix\r\n"))?;
                }
            }
            "MAIL" => {
                if self.transaction.mail_from.is_some() {
                    self.reply("503 5.5.1 Error: nested MAIL command\r\n")?;
                } else {
                    self.transaction.mail_from = Some(arg.to_owned());
                    self.transaction.identity_at_mail = self.identity.clone();
                    self.reply("250 2.1.0 Ok\r\n")?;
                }
            }
            "RCPT" => {
                if self.transaction.mail_from.is_none() {
                    self.reply("503 5.5.1 Error: need MAIL command\r\n")?;
                } else {
                    self.transaction.rcpt_to.push(arg.to_owned());
                    self.reply("250 2.1.5 Ok\r\n")?;
                }
            }
            "DATA" => {
                if self.transaction.mail_from.is_none() {
                    self.reply("503 5.5.1 Error: need MAIL command\r\n")?;
                } else if self.transaction.rcpt_to.is_empty() {
                    self.reply("554 5.5.1 Error: no valid recipients\r\n")?;
                } else {
                    body.clear();
                    *in_data = true;
                    self.reply("354 End data with <CR><LF>.<CR><LF>\r\n")?;
                }
            }
            "RSET" => {
                self.transaction = Transaction::default();
                self.reply("250 2.0.0 Ok\r\n")?;
            }
            "NOOP" => self.reply("250 2.0.0 Ok\r\n")?,
            _ => self.reply("502 5.5.2 Error: command not recognized\r\n")?,
        }
        Ok(Flow::Continue)
    }
}
