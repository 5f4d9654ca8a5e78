//! Transparent sessions (DESIGN.md §9) on invented time: the connection goes to the client's
//! original destination (never a configured server, never the pool), announces the client
//! only when it comes from this host, reads no PROXY header, and the report names `dst`.

use super::*;

/// Where the transparent client connected: another host's port 25.
const DESTINATION: &str = "198.51.100.25:25";

fn destination() -> std::net::SocketAddr {
    DESTINATION.parse().unwrap()
}

/// The testkit's client, accepted on a transparent listener for [`DESTINATION`].
fn transparent_peer(spoof_source: bool) -> Peer {
    Peer {
        local: destination(),
        transparent: true,
        spoof_source,
        ..peer(false, false)
    }
}

#[test]
fn relays_to_the_original_destination_announced_from_this_host() {
    let mut pair = Pair::from_peer(multiplexing(), Vec::new(), transparent_peer(false));
    pair.send(TRANSACTION);
    assert_eq!(pair.take_output(), TRANSACTION_REPLIES);
    assert_eq!(pair.connects, [destination()]);
    assert_eq!(pair.connects_via, [Via::Transparent { from: None }]);
    let xclient: Vec<&String> = pair
        .downstream
        .commands
        .iter()
        .filter(|c| c.starts_with("XCLIENT "))
        .collect();
    assert_eq!(xclient.len(), 1, "{:?}", pair.downstream.commands);
    assert!(xclient[0].contains("ADDR=192.0.2.7"), "{xclient:?}");
    assert!(
        pair.pooled.is_none(),
        "a transparent connection went to the pool"
    );
    let report = pair.session.report();
    assert_eq!((report.dst, report.msgs), (Some(destination()), 1));
}

#[test]
fn spoof_source_connects_from_the_client_and_announces_nothing() {
    let mut pair = Pair::from_peer(multiplexing(), Vec::new(), transparent_peer(true));
    pair.send(TRANSACTION);
    assert_eq!(pair.take_output(), TRANSACTION_REPLIES);
    let client = peer(false, false).client.ip();
    assert_eq!(pair.connects_via, [Via::Transparent { from: Some(client) }]);
    assert!(
        pair.downstream
            .commands
            .iter()
            .all(|c| !c.starts_with("XCLIENT")),
        "{:?}",
        pair.downstream.commands
    );
    assert_eq!(pair.downstream.delivered.len(), 1);
}

#[test]
fn a_second_transaction_stays_on_the_same_destination() {
    let mut pair = Pair::from_peer(multiplexing(), Vec::new(), transparent_peer(true));
    pair.send(
        b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nx\r\n.\r\n\
          MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\ny\r\n.\r\n",
    );
    let output = pair.take_output();
    assert_eq!(output.matches("queued as").count(), 2, "{output}");
    assert_eq!(pair.connects, [destination()], "one connection per session");
    assert!(pair.pooled.is_none());
}

#[test]
fn a_proxy_header_on_a_transparent_listener_is_never_believed() {
    // Even from an address that may send one on a plain listener: it would otherwise choose
    // the address spoof_source connects from.
    let mut config = config();
    config.server.proxy_protocol_from = vec!["192.0.2.0/24".parse().unwrap()];
    let mut pair = Pair::from_peer(config, Vec::new(), transparent_peer(true));
    pair.pump();
    assert_eq!(pair.take_output(), BANNER, "no wait for a header");
    pair.send(b"PROXY TCP4 203.0.113.9 198.51.100.1 4000 25\r\nEHLO c\r\n");
    assert_eq!(pair.take_output(), "");
    assert!(pair.closed);
    let report = pair.session.report();
    assert_eq!(report.result, "bad-proxy");
    assert_eq!(report.client, peer(false, false).client);
    assert!(pair.connects.is_empty());
}

#[test]
fn a_plain_session_reports_no_destination() {
    let mut pair = Pair::new(config());
    pair.send(TRANSACTION);
    assert_eq!(pair.session.report().dst, None);
    assert_eq!(pair.connects_via, [Via::Server { pooled: true }]);
}

#[test]
fn greylisting_and_the_deny_list_apply_as_on_a_plain_listener() {
    let mut greylisting = config();
    greylisting.greylist.enabled = true;
    let mut pair = Pair::from_peer(greylisting, Vec::new(), transparent_peer(true));
    pair.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n");
    assert!(
        pair.take_output()
            .ends_with("451 4.7.1 Greylisted, please try again in 300 seconds\r\n")
    );
    assert_eq!(pair.session.report().greylist, "new");
    assert!(
        pair.downstream
            .commands
            .iter()
            .all(|c| !c.starts_with("RCPT")),
        "a greylisted recipient is not relayed to the destination"
    );

    let mut denying = config();
    denying.lists.entries = tarmac::policy::ListSet {
        allow: tarmac::policy::List::default(),
        deny: tarmac::policy::List::parse(&[("deny".into(), "192.0.2.7\n".to_owned())]).unwrap(),
    };
    let mut pair = Pair::from_peer(denying, Vec::new(), transparent_peer(true));
    pair.pump();
    assert!(pair.take_output().starts_with("554 5.7.1 "));
    assert!(
        pair.connects.is_empty(),
        "nothing connected for a deny-listed client"
    );
}
