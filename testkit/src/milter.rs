//! A small scripted milter for the milter client's tests and the session's (DESIGN.md §7):
//! a std-thread listener on `127.0.0.1:0` ([`TestMilter::start`]) or on a Unix socket in a
//! temp dir ([`TestMilter::start_unix`]), speaking the protocol through tarmac's own codec.
//!
//! The [`Script`] says what to negotiate and what to answer to each command: by default
//! `SMFIR_CONTINUE` to every stage that expects an answer (none to those its protocol flags
//! leave unanswered, none to macros, abort and quit); a closure can answer anything else —
//! a reply code for one recipient, modifications at end of body, raw garbage, a close, or a
//! stall (it reads on and never answers). Every command received, on every connection, is
//! recorded for assertions ([`TestMilter::received`]).
//!
//! Test code: it panics where a test should fail; every read is bounded by three times
//! [`WAIT`](crate::WAIT), so a forgotten connection cannot keep a thread forever.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tarmac::content::MilterAddr;
use tarmac::content::milter::codec::{Command, FrameDecoder, Response, action, protocol};

/// What the milter does in answer to one command.
#[derive(Clone, Debug)]
pub enum Act {
    /// Send this response.
    Respond(Response),
    /// Send these bytes as they are (garbage, a broken frame).
    Raw(Vec<u8>),
    /// Close the connection.
    Close,
    /// Answer nothing, now or later, on this connection (it still reads and records).
    Stall,
}

type Answer = dyn Fn(&Command) -> Option<Vec<Act>> + Send + Sync;

/// What the milter negotiates and answers.
#[derive(Clone)]
pub struct Script {
    /// The version in its `SMFIC_OPTNEG` reply.
    pub version: u32,
    /// The `SMFIF_*` it asks for.
    pub actions: u32,
    /// The `SMFIP_*` it asks for.
    pub protocol: u32,
    answer: Arc<Answer>,
}

impl Default for Script {
    fn default() -> Self {
        Script::new()
    }
}

impl Script {
    /// Version 6, every header and body action plus the envelope ones, no protocol flags,
    /// `SMFIR_CONTINUE` everywhere.
    pub fn new() -> Script {
        Script {
            version: 6,
            actions: action::ADDHDRS
                | action::CHGHDRS
                | action::CHGBODY
                | action::ADDRCPT
                | action::DELRCPT
                | action::CHGFROM
                | action::ADDRCPT_PAR
                | action::QUARANTINE,
            protocol: 0,
            answer: Arc::new(|_| None),
        }
    }

    /// Asks for these `SMFIP_*` flags.
    pub fn protocol(mut self, flags: u32) -> Script {
        self.protocol = flags;
        self
    }

    /// Asks for these `SMFIF_*` actions.
    pub fn actions(mut self, actions: u32) -> Script {
        self.actions = actions;
        self
    }

    /// Negotiates this version.
    pub fn version(mut self, version: u32) -> Script {
        self.version = version;
        self
    }

    /// Answers each command with what `answer` returns; `None`: the default answer.
    pub fn answer(
        mut self,
        answer: impl Fn(&Command) -> Option<Vec<Act>> + Send + Sync + 'static,
    ) -> Script {
        self.answer = Arc::new(answer);
        self
    }

    /// The default answer: the negotiation reply, `SMFIR_CONTINUE` for a stage that is
    /// answered, nothing otherwise.
    fn default_answer(&self, command: &Command) -> Vec<Act> {
        let nr = |flag: u32| {
            if self.protocol & flag != 0 {
                Vec::new()
            } else {
                vec![Act::Respond(Response::Continue)]
            }
        };
        match command {
            Command::OptNeg { .. } => vec![Act::Respond(Response::OptNeg {
                version: self.version,
                actions: self.actions,
                protocol: self.protocol,
            })],
            Command::Macro { .. } | Command::Abort => Vec::new(),
            Command::Quit => vec![Act::Close],
            Command::Connect { .. } => nr(protocol::NR_CONN),
            Command::Helo(_) => nr(protocol::NR_HELO),
            Command::Mail(_) => nr(protocol::NR_MAIL),
            Command::Rcpt(_) => nr(protocol::NR_RCPT),
            Command::Data => nr(protocol::NR_DATA),
            Command::Header { .. } => nr(protocol::NR_HDR),
            Command::Eoh => nr(protocol::NR_EOH),
            Command::Body(_) => nr(protocol::NR_BODY),
            Command::BodyEob => vec![Act::Respond(Response::Continue)],
        }
    }
}

/// A running test milter; dropping it stops the listener.
pub struct TestMilter {
    addr: MilterAddr,
    received: Arc<Mutex<Vec<Command>>>,
    connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    dir: Option<PathBuf>,
}

impl TestMilter {
    /// Listens on `127.0.0.1:0`.
    pub fn start(script: Script) -> TestMilter {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = MilterAddr::Inet(listener.local_addr().unwrap());
        TestMilter::serving(addr, None, script, move || {
            let (stream, _) = listener.accept()?;
            let _ = stream.set_nodelay(true);
            Ok(stream)
        })
    }

    /// Listens on a Unix socket in a temp dir of its own.
    pub fn start_unix(script: Script) -> TestMilter {
        let dir = crate::process::instance_dir("milter");
        let path = dir.join("milter.sock");
        let listener = UnixListener::bind(&path).unwrap();
        TestMilter::serving(MilterAddr::Unix(path), Some(dir), script, move || {
            listener.accept().map(|(stream, _)| stream)
        })
    }

    /// Runs the accept loop on a thread of its own: each connection `accept` gives is served
    /// on its own thread by `script`, until the milter is dropped.
    fn serving<S: Read + Write + SetTimeout + Send + 'static>(
        addr: MilterAddr,
        dir: Option<PathBuf>,
        script: Script,
        mut accept: impl FnMut() -> std::io::Result<S> + Send + 'static,
    ) -> TestMilter {
        let mut milter = TestMilter {
            addr,
            received: Arc::default(),
            connections: Arc::default(),
            stop: Arc::default(),
            thread: None,
            dir,
        };
        let received = Arc::clone(&milter.received);
        let connections = Arc::clone(&milter.connections);
        let stop = Arc::clone(&milter.stop);
        milter.thread = Some(std::thread::spawn(move || {
            loop {
                let stream = accept();
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                spawn_conn(stream, script.clone(), &received, &connections);
            }
        }));
        milter
    }

    /// Where it listens, as tarmac's `[content] milters` takes it.
    pub fn addr(&self) -> MilterAddr {
        self.addr.clone()
    }

    /// Every command received so far, on every connection, in order.
    pub fn received(&self) -> Vec<Command> {
        self.received.lock().unwrap().clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Waits (bounded by [`WAIT`](crate::WAIT)) until `cond` holds for what was received.
    #[track_caller]
    pub fn wait_for(&self, what: &str, cond: impl Fn(&[Command]) -> bool) {
        crate::wait_until(what, || cond(&self.received.lock().unwrap()));
    }
}

impl Drop for TestMilter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        match &self.addr {
            MilterAddr::Inet(addr) => drop(TcpStream::connect(addr)),
            MilterAddr::Unix(path) => drop(UnixStream::connect(path)),
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The body bytes of every `SMFIC_BODY` in `commands`, joined.
pub fn body(commands: &[Command]) -> Vec<u8> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Body(chunk) => Some(chunk.as_slice()),
            _ => None,
        })
        .flatten()
        .copied()
        .collect()
}

/// Every `SMFIC_HEADER` in `commands` as `(name, value)`, the value as text.
pub fn headers(commands: &[Command]) -> Vec<(String, String)> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Header { name, value } => {
                Some((name.clone(), String::from_utf8_lossy(value).into_owned()))
            }
            _ => None,
        })
        .collect()
}

/// The command bytes of `commands` as a string (`"OCHMRTLLNBE"`), for asserting the order of
/// stages; macros (`D`) left out.
pub fn stages(commands: &[Command]) -> String {
    commands
        .iter()
        .filter(|c| !matches!(c, Command::Macro { .. }))
        .map(|c| char::from(c.code()))
        .collect()
}

/// The macros sent for `stage` (its command byte), merged in order.
pub fn macros(commands: &[Command], stage: u8) -> Vec<(String, String)> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Macro { stage: s, pairs } if *s == stage => Some(pairs.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn spawn_conn<S: Read + Write + SetTimeout + Send + 'static>(
    stream: S,
    script: Script,
    received: &Arc<Mutex<Vec<Command>>>,
    connections: &Arc<AtomicUsize>,
) {
    connections.fetch_add(1, Ordering::SeqCst);
    let received = Arc::clone(received);
    std::thread::spawn(move || serve(stream, &script, &received));
}

/// Sockets whose reads can be bounded.
trait SetTimeout {
    fn bound_reads(&self);
}

impl SetTimeout for TcpStream {
    fn bound_reads(&self) {
        self.set_read_timeout(Some(crate::WAIT * 3)).unwrap();
    }
}

impl SetTimeout for UnixStream {
    fn bound_reads(&self) {
        self.set_read_timeout(Some(crate::WAIT * 3)).unwrap();
    }
}

fn serve<S: Read + Write + SetTimeout>(
    mut stream: S,
    script: &Script,
    received: &Mutex<Vec<Command>>,
) {
    stream.bound_reads();
    let mut frames = FrameDecoder::new(2 * 1024 * 1024);
    let mut buf = vec![0; 64 * 1024];
    let mut stalled = false;
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        frames.push(&buf[..n]);
        loop {
            let (code, data) = match frames.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => panic!("test milter: the client sent a broken frame: {e}"),
            };
            let command = Command::parse(code, &data)
                .unwrap_or_else(|e| panic!("test milter: a command it cannot parse: {e}"));
            received.lock().unwrap().push(command.clone());
            if stalled {
                continue;
            }
            let acts = (script.answer)(&command).unwrap_or_else(|| script.default_answer(&command));
            let mut out = Vec::new();
            for act in acts {
                match act {
                    Act::Respond(response) => response.encode(&mut out),
                    Act::Raw(bytes) => out.extend_from_slice(&bytes),
                    Act::Close => {
                        let _ = stream.write_all(&out);
                        return;
                    }
                    Act::Stall => {
                        stalled = true;
                        break;
                    }
                }
            }
            if stream.write_all(&out).is_err() {
                return;
            }
        }
    }
}
