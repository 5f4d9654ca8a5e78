//! Greylisting through the server: a new triplet is deferred, an early retry too, a retry
//! after the (short, configured) delay passes, and each recipient is decided on its own.

use std::time::{Duration, Instant};

use tarmac_testkit::sink::Behaviour;

use tarmac_testkit::{Client, Server, WAIT, sink, test_config};

#[test]
fn new_early_then_pass_and_a_new_recipient_on_its_own() {
    let sink = sink(Behaviour::Normal);
    let mut config = test_config(sink.local_addr());
    config.greylist.enabled = true;
    config.greylist.delay = Duration::from_millis(300);
    let server = Server::start(config);
    let mut client = Client::connect(server.addr);
    assert!(client.reply().starts_with("220 "));
    assert!(client.command("EHLO client.example").starts_with("250-"));
    assert_eq!(
        client.command("MAIL FROM:<a@example.org>"),
        "250 2.1.0 Ok\r\n"
    );
    let started = Instant::now();
    let deferred = "451 4.7.1 Greylisted, please try again in 1 seconds\r\n";
    assert_eq!(client.command("RCPT TO:<b@example.net>"), deferred, "new");
    assert_eq!(client.command("RCPT TO:<b@example.net>"), deferred, "early");
    // Retry until it passes; it must not pass before the delay.
    let passed = loop {
        let reply = client.command("RCPT TO:<b@example.net>");
        if reply.starts_with("250 ") {
            break started.elapsed();
        }
        assert_eq!(reply, deferred);
        assert!(started.elapsed() < WAIT, "never passed");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        passed >= Duration::from_millis(300),
        "passed after {passed:?}"
    );
    assert_eq!(
        client.command("RCPT TO:<other@example.net>"),
        deferred,
        "another recipient is a new triplet"
    );
    assert!(client.command("DATA").starts_with("354 "));
    client.send("hi\r\n.\r\n");
    assert!(client.reply().starts_with("250 "));
    let messages = sink.wait_for_messages(1, WAIT);
    assert_eq!(
        messages[0].rcpt_to,
        ["b@example.net"],
        "only the passed recipient"
    );
}
