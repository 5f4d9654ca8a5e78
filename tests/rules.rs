//! Rule files as an operator meets them: `tarmac check` on bad and on shipped rule files, and
//! `Config::load` reading `[rules] files` next to the list files.

use std::path::{Path, PathBuf};

use tarmac::config::Config;

use crate::util::tarmac_check;
use tarmac_testkit::temp_dir;

/// The shipped default rules, by absolute path, so the config may live anywhere.
const SHIPPED_DEFAULT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/rules/default.toml");

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_prints_every_rule_error_as_file_line_key_message() {
    let dir = temp_dir("check-errors");
    let config = write(
        &dir,
        "tarmac.toml",
        "[lists]\nallow = []\ndeny = []\n[rules]\nfiles = [\"a.toml\", \"b.toml\", \"missing.toml\"]\n",
    );
    write(
        &dir,
        "a.toml",
        r#"[[rule]]
name = "bad-regex"
when = { helo = "/([0-9]/" }
action = "reject"

[[rule]]
name = "wrong-class"
when = { client = "192.0.2.1/24", colour = "red" }
action = "reject"
reply = "451 4.7.1 Later"
"#,
    );
    write(
        &dir,
        "b.toml",
        r#"[[rule]]
name = "tarpit-with-reply"
when = { rdns = "*.dynamic.example.net" }
action = "tarpit"
reply = "550 5.7.1 No"

[[rule]]
name = "bad-regex"
when = {}
action = "allow"
"#,
    );
    let out = tarmac_check(&config);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let (a, b) = (dir.join("a.toml"), dir.join("b.toml"));
    let (a, b) = (a.display(), b.display());
    let expected = [
        format!("{a}:3: rule[0].when.helo: invalid regex \"/([0-9]/\": unclosed group"),
        format!(
            "{a}:8: rule[1].when.client: invalid CIDR \"192.0.2.1/24\": host bits are set; did \
             you mean 192.0.2.0/24?"
        ),
        format!(
            "{a}:8: rule[1].when.colour: unknown condition; expected one of: client, helo, \
             rdns, sender, recipient, dnsbl, score_at_least, no_rdns"
        ),
        format!(
            "{a}:10: rule[1].reply: a reject rule needs a 5xx reply, got 451; use action = \
             \"defer\" for a 4xx reply"
        ),
        format!(
            "{b}:5: rule[0].reply: only reject (5xx) and defer (4xx) rules send a reply; a \
             tarpit rule sends none"
        ),
        format!("{b}:8: rule[1].name: rule \"bad-regex\" is already defined at {a}:2"),
        format!(
            "{}: cannot read rule file: No such file or directory (os error 2)",
            dir.join("missing.toml").display()
        ),
    ];
    let lines: Vec<&str> = stderr.lines().collect();
    for line in &expected {
        assert!(
            lines.contains(&line.as_str()),
            "missing {line:?} in:\n{stderr}"
        );
    }
    assert_eq!(lines.len(), expected.len(), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_accepts_the_shipped_rules() {
    let dir = temp_dir("check-shipped");
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/rules/examples");
    let config = write(
        &dir,
        "tarmac.toml",
        &format!(
            "[lists]\nallow = []\ndeny = []\n[rules]\nfiles = [{SHIPPED_DEFAULT:?}, \
             \"{examples}/partners.toml\", \"{examples}/dynamic-pools.toml\", \
             \"{examples}/senders.toml\"]\n"
        ),
    );
    let out = tarmac_check(&config);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let loaded = Config::load(&config).unwrap();
    assert!(loaded.rules.set.len() >= 10);
    assert!(
        stdout.contains(&format!("{} rule(s)", loaded.rules.set.len())),
        "{stdout}"
    );

    // The default file alone.
    let config = write(
        &dir,
        "default-only.toml",
        &format!("[lists]\nallow = []\ndeny = []\n[rules]\nfiles = [{SHIPPED_DEFAULT:?}]\n"),
    );
    let out = tarmac_check(&config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_default_rule_file_is_not_an_error_but_a_named_one_is() {
    let dir = temp_dir("load");
    // Defaults everywhere: no blocklists/ and no rules/ beside the config.
    let config = write(&dir, "tarmac.toml", "");
    let loaded = Config::load(&config).unwrap();
    assert!(loaded.rules.set.is_empty());
    assert_eq!(loaded.rules.files, [dir.join("rules/default.toml")]);

    // The default path, once it exists, is read.
    std::fs::create_dir_all(dir.join("rules")).unwrap();
    std::fs::copy(SHIPPED_DEFAULT, dir.join("rules/default.toml")).unwrap();
    let loaded = Config::load(&config).unwrap();
    assert!(!loaded.rules.set.is_empty());

    // A file named on purpose must exist; list and rule errors come out together.
    write(
        &dir,
        "tarmac.toml",
        "[lists]\nallow = [\"allow.txt\"]\ndeny = []\n[rules]\nfiles = [\"mine.toml\"]\n",
    );
    write(&dir, "allow.txt", "192.0.2.1/24\n");
    let errors = Config::load(&config).unwrap_err().0;
    let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        shown,
        [
            format!(
                "{}:1: invalid CIDR \"192.0.2.1/24\": host bits are set; did you mean \
                 192.0.2.0/24?",
                dir.join("allow.txt").display()
            ),
            format!(
                "{}: cannot read rule file: No such file or directory (os error 2)",
                dir.join("mine.toml").display()
            ),
        ]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A rule in a running server, then SIGHUP: the new rule applies to a new client at once and
/// to a session opened before the reload at its next command, which still completes its mail;
/// a broken rule file is refused with its file and line and the rules in force stay.
#[test]
fn sighup_switches_the_rules_without_dropping_a_session() {
    let sink = tarmac_testkit::sink(tarmac_testkit::sink::Behaviour::Normal);
    let dir = temp_dir("reload");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = write(
        &dir,
        "tarmac.toml",
        &format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\nhostname = \"mx.test\"\nworkers = 1\nstate_dir = \"state\"\n\
             [downstream]\nservers = [\"{}\"]\n[dns]\nrdns = false\n[tarpit]\ngreet_pause = \"0s\"\n[greylist]\nenabled = false\n\
             [lists]\nallow = []\ndeny = []\n[rules]\nfiles = [\"rules.toml\"]\n",
            sink.local_addr()
        ),
    );
    let rule = |helo: &str| {
        format!(
            "[[rule]]\nname = \"no-{helo}\"\nwhen = {{ helo = \"{helo}\" }}\naction = \"reject\"\n"
        )
    };
    let rules = write(&dir, "rules.toml", &rule("old.example"));
    let running = tarmac_testkit::Running::start(crate::util::tarmac(), &config);
    tarmac_testkit::wait_for_log(&running.lines, "listening on ");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let refusal = "554 5.7.1 Service unavailable; rejected by local policy\r\n";

    let mut before = tarmac_testkit::Client::connect(addr);
    assert!(before.reply().starts_with("220 "));
    assert_eq!(before.command("EHLO old.example"), refusal);
    let mut live = tarmac_testkit::Client::connect(addr);
    assert!(live.reply().starts_with("220 "));
    assert!(live.command("EHLO client.example").starts_with("250-"));
    assert!(
        live.command("MAIL FROM:<a@example.org>")
            .starts_with("250 ")
    );

    std::fs::write(&rules, rule("new.example")).unwrap();
    running.signal("HUP");
    tarmac_testkit::wait_for_log(&running.lines, "reloaded ");
    let mut fresh = tarmac_testkit::Client::connect(addr);
    assert!(fresh.reply().starts_with("220 "));
    assert_eq!(fresh.command("EHLO new.example"), refusal);
    let mut other = tarmac_testkit::Client::connect(addr);
    assert!(other.reply().starts_with("220 "));
    assert!(
        other.command("EHLO old.example").starts_with("250-"),
        "the old rule is gone"
    );

    // The session opened before the reload completes its mail, and its next HELO meets the
    // new rules.
    assert!(live.command("RCPT TO:<b@example.net>").starts_with("250 "));
    assert!(live.command("DATA").starts_with("354 "));
    live.send("hi\r\n.\r\n");
    assert!(live.reply().starts_with("250 "));
    assert_eq!(live.command("EHLO new.example"), refusal);
    assert_eq!(sink.wait_for_messages(1, tarmac_testkit::WAIT).len(), 1);

    std::fs::write(
        &rules,
        "[[rule]]\nname = \"broken\"\nwhen = { helo = \"/(/\" }\naction = \"reject\"\n",
    )
    .unwrap();
    running.signal("HUP");
    let refused = tarmac_testkit::wait_for_log(&running.lines, "reload refused");
    assert!(
        refused.contains(&format!("{}:3: ", rules.display())),
        "{refused}"
    );
    let mut after = tarmac_testkit::Client::connect(addr);
    assert!(after.reply().starts_with("220 "));
    assert_eq!(
        after.command("EHLO new.example"),
        refusal,
        "the rules in force stay"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn rule_set(text: &str) -> tarmac::policy::RuleSet {
    tarmac::policy::RuleSet::parse(&[(PathBuf::from("rules.toml"), text.to_owned())]).unwrap()
}

#[test]
fn sender_glob_rule_refuses_that_mail_with_its_text_through_the_server() {
    let sink = tarmac_testkit::sink(tarmac_testkit::sink::Behaviour::Normal);
    let mut config = tarmac_testkit::test_config(sink.local_addr());
    config.rules.set = rule_set(
        "[[rule]]\nname = \"no-spam-example\"\nwhen = { sender = \"*@spam.example\" }\n\
         action = \"reject\"\nreply = \"550 5.7.1 We take no mail from spam.example\"\n",
    );
    let server = tarmac_testkit::Server::start(config);
    let mut client = tarmac_testkit::Client::connect(server.addr);
    assert!(client.reply().starts_with("220 "));
    assert!(client.command("EHLO client.example").starts_with("250-"));
    assert_eq!(
        client.command("MAIL FROM:<bulk@Spam.Example>"),
        "550 5.7.1 We take no mail from spam.example\r\n"
    );
    assert_eq!(
        client.command("MAIL FROM:<a@example.org>"),
        "250 2.1.0 Ok\r\n"
    );
    assert_eq!(
        sink.connections(),
        1,
        "only the good sender reached the downstream"
    );
}

#[test]
fn score_rule_pushes_a_listed_client_without_rdns_to_reject_through_the_server() {
    use tarmac_testkit::dns_server::{DnsServer, Zone};
    let dns = DnsServer::start(vec![
        Zone::new("bl.test")
            .a("2.0.0.127", "127.0.0.2")
            .a("60.0.0.127", "127.0.0.2"),
    ]);
    let sink = tarmac_testkit::sink(tarmac_testkit::sink::Behaviour::Normal);
    let mut config = tarmac_testkit::test_config(sink.local_addr());
    config.dns.servers = vec![dns.addr()];
    config.dnsbl = vec![tarmac::config::Dnsbl {
        zone: "bl.test".into(),
        weight: 1,
        codes: Vec::new(),
        reply: None,
    }];
    // The shipped default: no verified rDNS and already a positive score adds 1. With a
    // second rule adding 1 for this zone, the client reaches reject_at (3).
    let shipped = std::fs::read_to_string(SHIPPED_DEFAULT).unwrap();
    config.rules.set = tarmac::policy::RuleSet::parse(&[
        (PathBuf::from(SHIPPED_DEFAULT), shipped),
        (
            PathBuf::from("local.toml"),
            "[[rule]]\nname = \"bl-test-extra\"\nwhen = { dnsbl = \"bl.test\" }\n\
             action = \"score\"\nscore = 1\n"
                .to_owned(),
        ),
    ])
    .unwrap();
    let server = tarmac_testkit::Server::start(config);
    let mut listed =
        tarmac_testkit::Client::connect_from(server.addr, "127.0.0.60".parse().unwrap());
    assert_eq!(
        listed.reply(),
        "554 5.7.1 Service unavailable; client [127.0.0.60] blocked using bl.test\r\n"
    );
    let mut clean =
        tarmac_testkit::Client::connect_from(server.addr, "127.0.0.61".parse().unwrap());
    assert!(
        clean.reply().starts_with("220 "),
        "score 0: no rule adds anything"
    );
}
