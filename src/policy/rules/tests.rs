//! The rule files' tests: syntax, every error message, matching, the shipped rules.

use super::matcher::{Condition, Pattern};
use super::*;
use crate::policy::cidr::Cidr;
use crate::smtp::reply::EnhancedCode;

fn parse(text: &str) -> Result<RuleSet, Vec<FileError>> {
    RuleSet::parse(&[(PathBuf::from("rules.toml"), text.to_owned())])
}

fn set(text: &str) -> RuleSet {
    parse(text).unwrap_or_else(|e| panic!("{e:#?}"))
}

/// Every error of `text`, one `path:line: key: message` per line.
fn errors(text: &str) -> String {
    let errors = parse(text).unwrap_err();
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn facts(client: &str) -> Facts<'static> {
    Facts {
        client: ip(client),
        helo: None,
        rdns: None,
        sender: None,
        recipient: None,
        listed_in: &[],
        score: 0,
    }
}

/// The name of the rule deciding at `stage`, if any.
fn decides(set: &RuleSet, stage: Stage, facts: &Facts<'_>) -> Option<String> {
    set.evaluate(stage, facts).1.map(|d| d.rule.to_owned())
}

/// One rule `when = { <condition> }`, `action = "allow"`, named "r".
fn one(condition: &str) -> RuleSet {
    set(&format!(
        "[[rule]]\nname = \"r\"\nwhen = {{ {condition} }}\naction = \"allow\"\n"
    ))
}

#[test]
fn patterns_exact_glob_regex_and_case() {
    let table: &[(&str, &str, bool)] = &[
        // Exact: whole value, ASCII case ignored, one trailing dot ignored for names.
        (r#"helo = "localhost""#, "localhost", true),
        (r#"helo = "localhost""#, "LocalHost", true),
        (r#"helo = "localhost""#, "localhost.", true),
        (r#"helo = "LOCALHOST.""#, "localhost", true),
        (r#"helo = "localhost""#, "localhost.localdomain", false),
        (r#"helo = "localhost""#, "my.localhost", false),
        (r#"helo = "localhost""#, "localhost..", false),
        (r#"helo = "bücher.example""#, "BÜCHER.example", false),
        (r#"helo = "bücher.example""#, "Bücher.EXAMPLE", true),
        // Globs: `*` spans dots, may be empty, anchors both ends.
        (r#"helo = "*.example.com""#, "mx.example.com", true),
        (r#"helo = "*.example.com""#, "a.b.c.Example.COM", true),
        (r#"helo = "*.example.com""#, "example.com", false),
        (
            r#"helo = "*.example.com""#,
            "mx.example.com.evil.test",
            false,
        ),
        (r#"helo = "*example.com""#, "example.com", true),
        (
            r#"helo = "*.dynamic.*""#,
            "1-2-3-4.dynamic.example.net",
            true,
        ),
        (r#"helo = "*.dynamic.*""#, "dynamic.example.net", false),
        // The value loses its trailing dot first: "host.dynamic" has no dot to spare.
        (r#"helo = "*.dynamic.*""#, "host.dynamic.", false),
        (r#"helo = "*.dynamic.*""#, "host.dynamic.x.", true),
        (r#"helo = "dsl-*""#, "DSL-7.example.net", true),
        (r#"helo = "dsl-*""#, "adsl-7.example.net", false),
        (r#"helo = "a*b*a""#, "aba", true),
        (r#"helo = "a*b*a""#, "aa", false),
        (r#"helo = "a*b*a""#, "ab", false),
        (r#"helo = "a*a""#, "a", false),
        (r#"helo = "a**b""#, "ab", true),
        (r#"helo = "*""#, "anything at all", true),
        (r#"helo = "*x*y*""#, "..y..x..", false),
        (r#"helo = "*x*y*""#, "..x..y..", true),
        // Regexes: unanchored unless anchored, case-sensitive unless (?i), raw value.
        (r#"helo = "/^[0-9.]+$/""#, "192.0.2.7", true),
        (r#"helo = "/^[0-9.]+$/""#, "[192.0.2.7]", false),
        (r#"helo = "/dynamic/""#, "host.dynamic.example", true),
        (r#"helo = "/dynamic/""#, "host.DYNAMIC.example", false),
        (r#"helo = "/(?i)dynamic/""#, "host.DYNAMIC.example", true),
        (r#"helo = "/\\.$/""#, "localhost.", true),
        // Arrays: any element.
        (r#"helo = ["localhost", "/^[0-9.]+$/"]"#, "192.0.2.7", true),
        (r#"helo = ["localhost", "/^[0-9.]+$/"]"#, "LOCALHOST", true),
        (
            r#"helo = ["localhost", "/^[0-9.]+$/"]"#,
            "mx.example.com",
            false,
        ),
    ];
    for (condition, helo, expected) in table {
        let set = one(condition);
        let facts = Facts {
            helo: Some(helo),
            ..facts("192.0.2.7")
        };
        let matched = decides(&set, Stage::Helo, &facts).is_some();
        assert_eq!(matched, *expected, "{condition} against {helo:?}");
    }
}

#[test]
fn addresses_keep_their_dots_and_the_null_sender_is_empty() {
    let with_sender = |condition: &str, sender: &str| {
        let facts = Facts {
            sender: Some(sender),
            ..facts("192.0.2.7")
        };
        decides(&one(condition), Stage::Mail, &facts).is_some()
    };
    assert!(with_sender(
        r#"sender = "user@example.com""#,
        "User@Example.COM"
    ));
    // No trailing-dot folding for addresses.
    assert!(!with_sender(
        r#"sender = "user@example.com""#,
        "user@example.com."
    ));
    assert!(with_sender(
        r#"sender = "*@example.com""#,
        "a.b@EXAMPLE.com"
    ));
    assert!(!with_sender(
        r#"sender = "*@example.com""#,
        "a@sub.example.com"
    ));
    assert!(with_sender(
        r#"sender = "*@*example.com""#,
        "a@sub.example.com"
    ));
    assert!(with_sender(r#"sender = """#, ""));
    assert!(!with_sender(r#"sender = """#, "user@example.com"));
    assert!(with_sender(r#"sender = "*""#, ""));
    assert!(!with_sender(r#"sender = "*@*""#, ""));
    assert!(with_sender(r#"sender = "*@*""#, "a@b"));
    // Before MAIL there is no sender: not even "*" matches, and the rule runs at mail.
    let set = one(r#"sender = "*""#);
    assert_eq!(set.rules[0].stage, Stage::Mail);
    assert!(decides(&set, Stage::Mail, &facts("192.0.2.7")).is_none());
    let facts_rcpt = Facts {
        recipient: Some("Postmaster@Example.ORG"),
        ..facts("192.0.2.7")
    };
    let set = one(r#"recipient = "postmaster@example.org""#);
    assert!(decides(&set, Stage::Rcpt, &facts_rcpt).is_some());
}

#[test]
fn client_blocks_and_mapped_addresses() {
    let set = one(r#"client = ["192.0.2.0/24", "2001:db8::/32", "198.51.100.7"]"#);
    let table = [
        ("192.0.2.0", true),
        ("192.0.2.255", true),
        ("192.0.3.0", false),
        ("::ffff:192.0.2.9", true),
        ("::ffff:192.0.3.9", false),
        ("198.51.100.7", true),
        ("198.51.100.8", false),
        ("2001:db8:ffff::1", true),
        ("2001:db9::1", false),
        ("::192.0.2.9", false),
    ];
    for (client, expected) in table {
        let matched = decides(&set, Stage::Connect, &facts(client)).is_some();
        assert_eq!(matched, expected, "{client}");
    }
    let single = one(r#"client = "2001:db8::7""#);
    assert!(decides(&single, Stage::Connect, &facts("2001:db8::7")).is_some());
    assert!(decides(&single, Stage::Connect, &facts("2001:db8::8")).is_none());
}

#[test]
fn unknown_facts_do_not_match_except_no_rdns() {
    let base = facts("192.0.2.7");
    let named = Facts {
        rdns: Some("mx.example.com"),
        ..base
    };
    let rdns = one(r#"rdns = "*""#);
    assert!(decides(&rdns, Stage::Connect, &base).is_none());
    assert!(decides(&rdns, Stage::Connect, &named).is_some());
    let no_rdns = one("no_rdns = true");
    assert!(decides(&no_rdns, Stage::Connect, &base).is_some());
    assert!(decides(&no_rdns, Stage::Connect, &named).is_none());
    let has_rdns = one("no_rdns = false");
    assert!(decides(&has_rdns, Stage::Connect, &base).is_none());
    assert!(decides(&has_rdns, Stage::Connect, &named).is_some());
    let helo = one(r#"helo = "*""#);
    assert!(decides(&helo, Stage::Helo, &base).is_none());

    let zones = ["zen.spamhaus.org", "bl.example.net"];
    let listed = Facts {
        listed_in: &zones,
        ..base
    };
    let dnsbl = one(r#"dnsbl = "ZEN.spamhaus.org.""#);
    assert!(decides(&dnsbl, Stage::Connect, &listed).is_some());
    assert!(decides(&dnsbl, Stage::Connect, &base).is_none());
    let any = one(r#"dnsbl = "*""#);
    assert!(decides(&any, Stage::Connect, &listed).is_some());
    assert!(decides(&any, Stage::Connect, &base).is_none());
    assert!(decides(&one(r#"dnsbl = "spamhaus.org""#), Stage::Connect, &listed).is_none());

    let score = one("score_at_least = 2");
    let at = |score| Facts { score, ..base };
    assert!(decides(&score, Stage::Connect, &at(1)).is_none());
    assert!(decides(&score, Stage::Connect, &at(2)).is_some());
    assert!(decides(&one("score_at_least = -1"), Stage::Connect, &at(-1)).is_some());
}

#[test]
fn every_condition_must_match() {
    let set = one(r#"client = "192.0.2.0/24", helo = "localhost", no_rdns = true"#);
    let helo = |client, helo| Facts {
        helo: Some(helo),
        ..facts(client)
    };
    assert!(decides(&set, Stage::Helo, &helo("192.0.2.7", "localhost")).is_some());
    assert!(decides(&set, Stage::Helo, &helo("198.51.100.7", "localhost")).is_none());
    assert!(decides(&set, Stage::Helo, &helo("192.0.2.7", "mx.example.com")).is_none());
    let named = Facts {
        rdns: Some("mx.example.com"),
        ..helo("192.0.2.7", "localhost")
    };
    assert!(decides(&set, Stage::Helo, &named).is_none());
}

#[test]
fn a_rule_runs_at_the_stage_of_its_latest_input() {
    let text = r#"
[[rule]]
name = "empty"
when = {}
action = "tarpit"
[[rule]]
name = "connect"
when = { client = "0.0.0.0/0", rdns = "*", no_rdns = false, dnsbl = "*", score_at_least = 0 }
action = "allow"
[[rule]]
name = "helo"
when = { client = "0.0.0.0/0", helo = "*" }
action = "allow"
[[rule]]
name = "mail"
when = { helo = "*", sender = "*" }
action = "allow"
[[rule]]
name = "rcpt"
when = { recipient = "*", rdns = "*" }
action = "allow"
[[rule]]
name = "rcpt-first"
when = { sender = "*", recipient = "*", helo = "*", client = "::/0" }
action = "allow"
"#;
    let set = set(text);
    let stages: Vec<(&str, Stage)> = set.rules.iter().map(|r| (&*r.name, r.stage)).collect();
    assert_eq!(
        stages,
        [
            ("empty", Stage::Connect),
            ("connect", Stage::Connect),
            ("helo", Stage::Helo),
            ("mail", Stage::Mail),
            ("rcpt", Stage::Rcpt),
            ("rcpt-first", Stage::Rcpt),
        ]
    );
    assert!(Stage::Connect < Stage::Helo && Stage::Helo < Stage::Mail);
    assert!(Stage::Mail < Stage::Rcpt);
    // A rule runs only at its own stage, even when its facts are known later.
    let all = Facts {
        helo: Some("mx.example.com"),
        rdns: Some("mx.example.com"),
        sender: Some("a@example.com"),
        recipient: Some("b@example.org"),
        ..facts("192.0.2.7")
    };
    let at = |stage| decides(&set, stage, &all);
    assert_eq!(at(Stage::Connect).as_deref(), Some("empty"));
    assert_eq!(at(Stage::Helo).as_deref(), Some("helo"));
    assert_eq!(at(Stage::Mail).as_deref(), Some("mail"));
    assert_eq!(at(Stage::Rcpt).as_deref(), Some("rcpt"));
}

#[test]
fn score_rules_add_first_then_the_first_terminal_rule_decides() {
    let text = r#"
[[rule]]
name = "tarpit-if-2"
when = { score_at_least = 2 }
action = "tarpit"
[[rule]]
name = "no-rdns"
when = { no_rdns = true }
action = "score"
score = 1
[[rule]]
name = "reject-if-3"
when = { score_at_least = 3 }
action = "reject"
[[rule]]
name = "builds-on-no-rdns"
when = { score_at_least = 2 }
action = "score"
score = 1
[[rule]]
name = "bonus-later-stage"
when = { helo = "*" }
action = "score"
score = 5
[[rule]]
name = "allowlisted"
when = { client = "192.0.2.1" }
action = "score"
score = -4
"#;
    let set = set(text);
    let base = facts("192.0.2.7");
    // Score 0, no rDNS: +1 → 1; 1 < 2, so builds-on-no-rdns does not fire; nothing
    // terminal at 1.
    assert_eq!(set.evaluate(Stage::Connect, &base), (1, None));
    // Score 1: +1 → 2, then builds-on-no-rdns sees 2 → 3; the first terminal rule in
    // file order that matches at 3 is tarpit-if-2, although reject-if-3 matches too.
    let (added, decision) = set.evaluate(Stage::Connect, &Facts { score: 1, ..base });
    assert_eq!(added, 2);
    let decision = decision.unwrap();
    assert_eq!(decision.rule, "tarpit-if-2");
    assert_eq!(decision.action, RuleAction::Tarpit);
    assert_eq!(decision.reply, None);
    // A negative score rule can keep a terminal rule from firing.
    let trusted = Facts {
        score: 3,
        ..facts("192.0.2.1")
    };
    // 3 + 1 (no rDNS) + 1 (builds on it) − 4 = 1: below both terminal rules.
    assert_eq!(set.evaluate(Stage::Connect, &trusted), (-2, None));
    // Score rules of other stages are not run.
    let (added, _) = set.evaluate(
        Stage::Helo,
        &Facts {
            helo: Some("x"),
            ..base
        },
    );
    assert_eq!(added, 5);
    // Sums saturate.
    let huge = Facts {
        score: i32::MAX,
        ..base
    };
    let (added, decision) = set.evaluate(Stage::Connect, &huge);
    assert_eq!(added, 2);
    assert_eq!(decision.unwrap().rule, "tarpit-if-2");
    assert_eq!(RuleSet::default().evaluate(Stage::Rcpt, &base), (0, None));
}

#[test]
fn replies_given_and_default() {
    let text = r#"
[[rule]]
name = "reject-with-text"
when = { helo = "a" }
action = "reject"
reply = "554 5.7.1 Go away now"
[[rule]]
name = "defer-without-enhanced"
when = { helo = "b" }
action = "defer"
reply = "451 Try later"
[[rule]]
name = "reject-default"
when = { helo = "c" }
action = "reject"
"#;
    let set = set(text);
    let at = |helo| {
        let facts = Facts {
            helo: Some(helo),
            ..facts("192.0.2.7")
        };
        set.evaluate(Stage::Helo, &facts).1.unwrap()
    };
    assert_eq!(
        at("a").reply,
        Some(&Reply::new(554, "5.7.1", "Go away now"))
    );
    assert_eq!(at("b").reply, Some(&Reply::new(451, "4.7.1", "Try later")));
    assert_eq!(at("c").reply, None);
    assert_eq!(
        at("c").reply_at(Stage::Helo),
        Some(Reply::new(
            554,
            "5.7.1",
            "Service unavailable; rejected by local policy"
        ))
    );
    assert_eq!(
        at("a").reply_at(Stage::Rcpt),
        Some(Reply::new(554, "5.7.1", "Go away now"))
    );

    for stage in Stage::ALL {
        let reject = default_reply(RuleAction::Reject, stage).unwrap();
        let defer = default_reply(RuleAction::Defer, stage).unwrap();
        let expected = if stage <= Stage::Helo { 554 } else { 550 };
        assert_eq!(reject.code, expected, "{stage}");
        assert_eq!(reject.enhanced, Some(EnhancedCode(5, 7, 1)));
        assert_eq!(defer.code, 450, "{stage}");
        assert_eq!(defer.enhanced, Some(EnhancedCode(4, 7, 1)));
        for action in [
            RuleAction::Allow,
            RuleAction::Tarpit,
            RuleAction::Greylist,
            RuleAction::Score(1),
        ] {
            assert_eq!(default_reply(action, stage), None);
        }
    }
    assert_eq!(
        default_reply(RuleAction::Reject, Stage::Rcpt)
            .unwrap()
            .lines,
        ["Recipient rejected by local policy"]
    );
}

#[test]
fn errors_name_line_key_and_fix() {
    let text = r#"[[rule]]
name = "bad regex"
when = { helo = "/([a-z]/", rdns = "*.ok.example", colour = "red" }
action = "reject"

[[rule]]
name = "reply-class"
when = { client = "192.0.2.1/24" }
action = "reject"
reply = "450 4.7.1 Later"

[[rule]]
name = "tarpit-with-reply"
when = { sender = "*@example.com" }
action = "tarpit"
reply = "550 5.7.1 No"
priority = 3

[[rule]]
name = "score-missing"
when = { recipient = "" }
action = "score"

[[rule]]
when = { dnsbl = [] }
action = "blackhole"
score = 0
"#;
    assert_eq!(
        errors(text),
        r#"rules.toml:2: rule[0].name: ' ' is not allowed; a name is letters, digits, '.', '_' and '-' (it goes into log lines)
rules.toml:3: rule[0].when.helo: invalid regex "/([a-z]/": unclosed group
rules.toml:3: rule[0].when.colour: unknown condition; expected one of: client, helo, rdns, sender, recipient, dnsbl, score_at_least, no_rdns
rules.toml:8: rule[1].when.client: invalid CIDR "192.0.2.1/24": host bits are set; did you mean 192.0.2.0/24?
rules.toml:10: rule[1].reply: a reject rule needs a 5xx reply, got 450; use action = "defer" for a 4xx reply
rules.toml:16: rule[2].reply: only reject (5xx) and defer (4xx) rules send a reply; a tarpit rule sends none
rules.toml:17: rule[2].priority: unknown key; expected one of: name, when, action, reply, score
rules.toml:21: rule[3].when.recipient: an empty pattern never matches
rules.toml:22: rule[3].score: missing; action = "score" needs the points to add, such as score = 2
rules.toml:24: rule[4].name: missing; give the rule a name for the logs, such as name = "reject-localhost-helo"
rules.toml:25: rule[4].when.dnsbl: an empty array never matches; give at least one pattern
rules.toml:26: rule[4].action: unknown action "blackhole"; expected one of: allow, reject, defer, tarpit, greylist, score"#
    );
}

#[test]
fn more_errors() {
    let table: &[(&str, &str)] = &[
        (
            "[rule]\nname = \"x\"\n",
            "rules.toml:1: rule: expected an array of tables; write [[rule]] with double \
                 brackets, one table per rule",
        ),
        (
            "[[rules]]\nname = \"x\"\n",
            "rules.toml:1: rules: unknown key; a rule file holds only [[rule]] tables",
        ),
        (
            "[[rule]]\nname = \"x\"\naction = \"allow\"\n",
            "rules.toml:1: rule[0].when: missing; give the conditions, such as when = { \
                 helo = \"localhost\" }, or when = {} for every client",
        ),
        (
            "[[rule]]\nname = \"x\"\nwhen = { helo = \"a\" }\n",
            "rules.toml:1: rule[0].action: missing; give one of: allow, reject, defer, \
                 tarpit, greylist, score",
        ),
        (
            "[[rule]]\nname = \"x\"\nwhen = \"helo\"\naction = \"allow\"\n",
            "rules.toml:3: rule[0].when: expected a table of conditions such as { helo = \
                 \"localhost\" }, found string",
        ),
        (
            "[[rule]]\nname = \"x\"\nwhen = {}\naction = \"allow\"\nscore = 2\n",
            "rules.toml:5: rule[0].score: only for action = \"score\"; a allow rule adds \
                 nothing to the score (remove score, or use action = \"score\")",
        ),
        (
            "[[rule]]\nname = \"x\"\nwhen = {}\naction = \"score\"\nscore = 0\n",
            "rules.toml:5: rule[0].score: must not be 0; a score rule that adds nothing \
                 does nothing",
        ),
        (
            "[[rule]]\nname = \"x\"\nwhen = {}\naction = \"score\"\nscore = 1001\n",
            "rules.toml:5: rule[0].score: must be from -1000 to 1000, got 1001",
        ),
        (
            "[[rule]]\nname = \"x\"\nwhen = { helo = \"/abc\" }\naction = \"allow\"\n",
            "rules.toml:3: rule[0].when.helo: \"/abc\" starts with '/' but does not end \
                 with one; write a regex as \"/…/\"",
        ),
        (
            "[[rule]]\nname = \"x\"\nwhen = { helo = \"//\" }\naction = \"allow\"\n",
            "rules.toml:3: rule[0].when.helo: empty regex \"//\"; it would match everything",
        ),
        (
            "[[rule]]\nname = \"x\"\nwhen = { helo = \"/a{1000}{1000}/\" }\naction = \"allow\"\n",
            "rules.toml:3: rule[0].when.helo: invalid regex \"/a{1000}{1000}/\": compiles \
                 to more than 1048576 bytes; simplify it (large counted repetitions such as \
                 {1000} multiply its size)",
        ),
        (
            "[[rule]]\nname = \"x\"\nwhen = { helo = [\"ok\", \"\"] }\naction = \"allow\"\n",
            "rules.toml:3: rule[0].when.helo[1]: an empty pattern never matches",
        ),
        (
            "[[rule]]\nname = \"x\"\nwhen = { helo = \"a\\tb\" }\naction = \"allow\"\n",
            "rules.toml:3: rule[0].when.helo: '\\t' is not allowed; a pattern is one line \
                 without control characters",
        ),
        (
            "[[rule]]\nname = \"x\"\nwhen = { client = [\"192.0.2.7\", \"bad\"] }\naction = \"allow\"\n",
            "rules.toml:3: rule[0].when.client: element 1: invalid CIDR \"bad\": expected \
                 an address or block such as \"192.0.2.0/24\" or \"2001:db8::/32\"",
        ),
        (
            "[[rule]]\nname = \"x\"\nwhen = { no_rdns = \"yes\" }\naction = \"allow\"\n",
            "rules.toml:3: rule[0].when.no_rdns: expected true or false, found string",
        ),
        (
            "[[rule]]\nname = \"x\"\nwhen = { score_at_least = 9999999999 }\naction = \"allow\"\n",
            "rules.toml:3: rule[0].when.score_at_least: 9999999999 is out of range",
        ),
        (
            "[[rule]]\nname = \"x\"\nwhen = {}\naction = \"reject\"\nreply = \"550 4.7.1 No\"\n",
            "rules.toml:5: rule[0].reply: enhanced code 4.7.1 does not match reply code \
                 550; use 5.7.1",
        ),
        (
            "[[rule]]\nname = \"x\"\nwhen = {}\naction = \"reject\"\nreply = \"550 5.07.1 No\"\n",
            "rules.toml:5: rule[0].reply: invalid enhanced code \"5.07.1\": expected \
                 class.subject.detail such as 5.7.1",
        ),
        (
            "[[rule]]\nname = \"x\"\nwhen = {}\naction = \"defer\"\nreply = \"421 4.7.0 Bye\"\n",
            "rules.toml:5: rule[0].reply: 421 means the server closes the connection, which \
                 a rule does not do; use 450 or 451",
        ),
        (
            "[[rule]]\nname = \"x\"\nwhen = {}\naction = \"defer\"\nreply = \"250 ok\"\n",
            "rules.toml:5: rule[0].reply: reply code 250 is neither 4xx (defer) nor 5xx \
                 (reject)",
        ),
        (
            "[[rule]]\nname = \"x\"\nwhen = {}\naction = \"reject\"\nreply = \"550 5.7.1\"\n",
            "rules.toml:5: rule[0].reply: reply \"550 5.7.1\" has no text; say what the \
                 client should do, such as \"550 5.7.1 Not accepted here\"",
        ),
        (
            "[[rule]]\nname = \"x\"\nwhen = {}\naction = \"reject\"\nreply = \"Go away\"\n",
            "rules.toml:5: rule[0].reply: invalid reply \"Go away\": expected a three-digit \
                 code, an optional enhanced code and a text, such as \"550 5.7.1 Not accepted \
                 here\"",
        ),
        (
            "[[rule]]\nname = \"x\"\nwhen = {}\naction = \"reject\"\nreply = \"550 5.7.1 \
                 caf\u{e9}\"\n",
            "rules.toml:5: rule[0].reply: '\u{e9}' is not allowed; reply text is one line \
                 of printable ASCII",
        ),
        (
            "[[rule]]\nname = \"x\"\nwhen = {}\naction = \"bad\"\nreply = \"250 ok\"\n",
            "rules.toml:4: rule[0].action: unknown action \"bad\"; expected one of: allow, \
                 reject, defer, tarpit, greylist, score\nrules.toml:5: rule[0].reply: reply \
                 code 250 is neither 4xx (defer) nor 5xx (reject)",
        ),
        (
            "[[rule]]\nname = \"x\"\nwhen = {}\naction = \"allow\"\n[[rule]]\nname = \
                 \"X\"\nwhen = {}\naction = \"allow\"\n",
            "rules.toml:6: rule[1].name: rule \"X\" is already defined at rules.toml:2",
        ),
        (
            "[[rule]]\nname = \"x\"\nwhen = { helo = = \"a\" }\n",
            "rules.toml:3: toml: extra assignment between key-value pairs, expected value",
        ),
        (
            "rule = 5\n",
            "rules.toml:1: rule: expected an array of tables ([[rule]]), found integer",
        ),
        (
            "rule = [5]\n",
            "rules.toml:1: rule[0]: expected a table, found integer",
        ),
    ];
    for (text, expected) in table {
        assert_eq!(errors(text), *expected, "{text}");
    }
    let long = format!(
        "[[rule]]\nname = \"{}\"\nwhen = {{}}\naction = \"allow\"\n",
        "n".repeat(65)
    );
    assert_eq!(
        errors(&long),
        "rules.toml:2: rule[0].name: longer than 64 characters"
    );
}

#[test]
fn errors_from_every_file_and_duplicates_across_files() {
    let files = [
        (
            PathBuf::from("/etc/tarmac/rules/a.toml"),
            "[[rule]]\nname = \"one\"\nwhen = {}\naction = \"allow\"\n".to_owned(),
        ),
        (
            PathBuf::from("/etc/tarmac/rules/b.toml"),
            "\u{feff}[[rule]]\r\nname = \"two\"\r\nwhen = { helo = \"/(/\" }\r\naction = \
                 \"allow\"\r\n\r\n[[rule]]\r\nname = \"One\"\r\nwhen = {}\r\naction = \
                 \"reject\"\r\n"
                .to_owned(),
        ),
    ];
    let shown: Vec<String> = RuleSet::parse(&files)
        .unwrap_err()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        shown,
        [
            "/etc/tarmac/rules/b.toml:3: rule[0].when.helo: invalid regex \"/(/\": unclosed \
                 group",
            "/etc/tarmac/rules/b.toml:7: rule[1].name: rule \"One\" is already defined at \
                 /etc/tarmac/rules/a.toml:2",
        ]
    );
    let ok = RuleSet::parse(&files[..1]).unwrap();
    assert_eq!(ok.len(), 1);
    assert!(RuleSet::parse(&[]).unwrap().is_empty());
    assert!(parse("# nothing yet\n").unwrap().is_empty());
}

#[test]
fn equal_sets_compare_regexes_by_source() {
    let text = "[[rule]]\nname = \"r\"\nwhen = { helo = \"/^a$/\" }\naction = \"allow\"\n";
    assert_eq!(set(text), set(text));
    assert_ne!(set(text), set(&text.replace("^a$", "^b$")));
    assert_eq!(set(text).clone(), set(text));
}

#[test]
fn hostile_values_are_cheap() {
    // A backtracking matcher would not finish these in the age of the universe; the test
    // finishing at all is the check, with no wall-clock bound to flake on a loaded machine.
    // Linear time is by construction: a glob takes each piece at its leftmost place
    // (`Glob::matches`, no backtracking), and the `regex` crate guarantees matching time
    // linear in the input (finite automata, no backtracking engine).
    let hostile = "a".repeat(4096);
    let with_b = format!("{hostile}b");
    let facts = |helo| Facts {
        helo: Some(helo),
        ..facts("192.0.2.7")
    };
    for (name, pattern) in [("glob", "*a*a*a*a*a*a*a*a*a*a*b"), ("regex", "/(a+)+b/")] {
        let set = set(&format!(
            "[[rule]]\nname = \"{name}\"\nwhen = {{ helo = \"{pattern}\" }}\naction = \"allow\"\n"
        ));
        for _ in 0..100 {
            assert!(
                set.evaluate(Stage::Helo, &facts(&hostile)).1.is_none(),
                "{name}"
            );
        }
        // And the answers are right, not merely quick: with the `b` it matches.
        let hit = set.evaluate(Stage::Helo, &facts(&with_b)).1;
        assert_eq!(hit.map(|decision| decision.rule), Some(name));
    }
}

/// The shipped files parse, use documentation addresses and reserved names only, and the
/// default rules do what their comments say.
#[test]
fn shipped_rule_files() {
    let shipped = [
        (
            "rules/default.toml",
            include_str!("../../../rules/default.toml"),
        ),
        (
            "rules/examples/dynamic-pools.toml",
            include_str!("../../../rules/examples/dynamic-pools.toml"),
        ),
        (
            "rules/examples/partners.toml",
            include_str!("../../../rules/examples/partners.toml"),
        ),
        (
            "rules/examples/senders.toml",
            include_str!("../../../rules/examples/senders.toml"),
        ),
    ];
    let files: Vec<(PathBuf, String)> = shipped
        .iter()
        .map(|(path, text)| (PathBuf::from(path), (*text).to_owned()))
        .collect();
    let all = RuleSet::parse(&files).unwrap_or_else(|e| panic!("{e:#?}"));
    assert!(all.len() >= 10, "{}", all.len());
    for (path, text) in &files {
        let set = RuleSet::parse(&[(path.clone(), text.clone())]).unwrap();
        assert!(!set.is_empty(), "{}", path.display());
    }

    let default = RuleSet::parse(&files[..1]).unwrap();
    let helo = |name: &'static str| {
        let facts = Facts {
            helo: Some(name),
            rdns: Some("mail.example.com"),
            ..facts("192.0.2.7")
        };
        decides(&default, Stage::Helo, &facts)
    };
    for forged in [
        "localhost",
        "LOCALHOST.localdomain",
        "[127.0.0.1]",
        "localhost.",
    ] {
        assert_eq!(helo(forged).as_deref(), Some("reject-helo-localhost"));
    }
    for bare in ["192.0.2.7", "10.0.0.1"] {
        assert_eq!(helo(bare).as_deref(), Some("reject-helo-bare-ip"));
    }
    for fine in [
        "mail.example.com",
        "[192.0.2.7]",
        "[IPv6:2001:db8::7]",
        "mx1.example.net",
        "192.0.2.7.example.com",
        "localhost.example.com",
    ] {
        assert_eq!(helo(fine), None, "{fine}");
    }
    let zones = ["bl.example.net"];
    let listed = Facts {
        listed_in: &zones,
        score: 2,
        ..facts("192.0.2.7")
    };
    assert_eq!(default.evaluate(Stage::Connect, &listed), (1, None));
    let named = Facts {
        rdns: Some("mail.example.com"),
        ..listed
    };
    assert_eq!(default.evaluate(Stage::Connect, &named), (0, None));
    assert_eq!(
        default.evaluate(Stage::Connect, &facts("192.0.2.7")),
        (0, None)
    );

    // Addresses in the shipped files come from the documentation ranges (RFC 5737,
    // RFC 3849) and names from the reserved ones (RFC 2606).
    let documentation: [Cidr; 4] = [
        "192.0.2.0/24".parse().unwrap(),
        "198.51.100.0/24".parse().unwrap(),
        "203.0.113.0/24".parse().unwrap(),
        "2001:db8::/32".parse().unwrap(),
    ];
    for rule in &all.rules {
        for condition in &rule.conditions {
            match condition {
                Condition::Client(blocks) => {
                    for block in blocks {
                        assert!(
                            documentation
                                .iter()
                                .any(|d| d.contains(block.addr) && d.prefix <= block.prefix),
                            "{}: {block}",
                            rule.name
                        );
                    }
                }
                Condition::Rdns(p) | Condition::Sender(p) | Condition::Recipient(p) => {
                    for pattern in &p.any {
                        if let Pattern::Exact(s) = pattern {
                            if s.is_empty() {
                                continue; // the null sender
                            }
                            assert!(
                                [".example.com", ".example.net", ".example.org"]
                                    .iter()
                                    .any(|r| s.ends_with(r) || s.ends_with(&r[1..])),
                                "{}: {s}",
                                rule.name
                            );
                        }
                    }
                }
                _ => {}
            }
        }
    }
}
