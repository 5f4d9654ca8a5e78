//! The `rule_file` target: rule files and their evaluation.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use tarmac::policy::{Facts, RuleAction, RuleSet, Stage};
use tarmac::smtp::reply::{Status, parse_reply};

use super::vocabulary;

/// Parses the input as a rule file (`[rules] files`), and again built from rule-file keys,
/// values and syntax.
///
/// Properties: no panic; an error list is non-empty and each error names the path, a line
/// inside the text and a key, with a message, on one line; a set parses the same twice, holds
/// one rule per `[[rule]]` table of the TOML, and the same file given twice makes exactly one
/// duplicate-name error per rule, at the second file; `evaluate` at every stage on fixed facts
/// (and on facts taken from the input) never panics, decides only with a terminal action and
/// a rule of the set, and a reply a decision carries or defaults to is of the action's class
/// (5xx reject, 4xx defer), with an enhanced code of that class, and parses back to itself.
pub fn rule_file(data: &[u8]) {
    rule_text(&String::from_utf8_lossy(data));
    rule_text(&vocabulary(data, RULE_TOKENS));
}

const RULE_PATH: &str = "/fuzz/rules.toml";

fn rule_text(text: &str) {
    let files = [(PathBuf::from(RULE_PATH), text.to_owned())];
    let set = match RuleSet::parse(&files) {
        Ok(set) => set,
        Err(errors) => {
            assert!(!errors.is_empty(), "error without errors for {text:?}");
            // Lines are counted after the byte order mark, which shares line 1; an error at
            // the very end is on the line after the last LF.
            let last_line = text.matches('\n').count() + 1;
            for error in &errors {
                let shown = error.to_string();
                assert_eq!(error.path, Path::new(RULE_PATH), "{shown}");
                let line = error.line;
                assert!((1..=last_line).contains(&line), "{shown} for {text:?}");
                assert!(!error.key.is_empty(), "{shown}");
                assert!(!error.message.trim().is_empty(), "{shown}");
                assert!(!shown.contains(['\n', '\r']), "{shown:?}");
            }
            return;
        }
    };
    assert_eq!(RuleSet::parse(&files).as_ref(), Ok(&set));

    let body = text.strip_prefix('\u{feff}').unwrap_or(text);
    let tables = body
        .parse::<toml::Table>()
        .unwrap_or_else(|e| panic!("rules parsed from a file toml refuses: {e}"))
        .get("rule")
        .and_then(toml::Value::as_array)
        .map_or(0, Vec::len);
    assert_eq!(set.len(), tables, "{text:?}");
    assert_eq!(set.is_empty(), tables == 0);

    let second = PathBuf::from("/fuzz/again.toml");
    let twice = [files[0].clone(), (second.clone(), text.to_owned())];
    match RuleSet::parse(&twice) {
        Ok(both) => assert!(set.is_empty() && both.is_empty(), "{text:?}"),
        Err(errors) => {
            assert_eq!(errors.len(), set.len(), "{errors:?}");
            for error in &errors {
                assert_eq!(error.path, second);
                assert!(error.key.ends_with(".name"), "{error}");
                assert!(error.message.contains("is already defined at"), "{error}");
            }
        }
    }

    let zones = ["zen.spamhaus.org", "BL.example.net."];
    let long = "a.".repeat(2048);
    let from_input: String = text.chars().filter(|c| !c.is_control()).take(300).collect();
    let facts = [
        Facts {
            client: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
            helo: None,
            rdns: None,
            sender: None,
            recipient: None,
            listed_in: &[],
            score: 0,
        },
        Facts {
            client: IpAddr::V6(Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped()),
            helo: Some("LOCALHOST."),
            rdns: Some("mx.example.com"),
            sender: Some(""),
            recipient: Some("Postmaster@example.org"),
            listed_in: &zones,
            score: 3,
        },
        Facts {
            client: IpAddr::V6(Ipv6Addr::LOCALHOST),
            helo: Some(&long),
            rdns: Some(&long),
            sender: Some(&long),
            recipient: Some("@"),
            listed_in: &zones[..1],
            score: i32::MIN,
        },
        Facts {
            client: IpAddr::V4(Ipv4Addr::BROADCAST),
            helo: Some(&from_input),
            rdns: Some(&from_input),
            sender: Some(&from_input),
            recipient: Some(&from_input),
            listed_in: &[],
            score: i32::MAX,
        },
    ];
    for facts in &facts {
        for stage in Stage::ALL {
            let (_, decision) = set.evaluate(stage, facts);
            let Some(decision) = decision else {
                continue;
            };
            assert!(decision.action.is_terminal(), "{decision:?}");
            assert!(!decision.rule.is_empty());
            assert!(
                decision
                    .rule
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-_".contains(&b)),
                "{decision:?}"
            );
            let class = match decision.action {
                RuleAction::Reject => 5,
                RuleAction::Defer => 4,
                _ => {
                    assert_eq!(decision.reply, None, "{decision:?}");
                    assert_eq!(decision.reply_at(stage), None);
                    continue;
                }
            };
            let Some(reply) = decision.reply_at(stage) else {
                panic!("no reply for {decision:?}");
            };
            assert_eq!(reply.class(), class, "{reply:?}");
            assert_eq!(reply.enhanced.map(|e| e.class()), Some(class), "{reply:?}");
            assert_eq!(reply.lines.len(), 1, "{reply:?}");
            let mut wire = Vec::new();
            reply.write_to(&mut wire);
            assert_eq!(
                parse_reply(&wire),
                Ok(Status::Complete((reply.clone(), wire.len()))),
                "{reply:?}"
            );
        }
    }
}

/// Rule-file keys, values and syntax; input bytes pick from it.
const RULE_TOKENS: &[&str] = &[
    "\n",
    "\n",
    "\r\n",
    " ",
    "[[rule]]\n",
    "[rule]\n",
    "name = ",
    "when = ",
    "action = ",
    "reply = ",
    "score = ",
    "{ ",
    " }",
    ", ",
    "[",
    "]",
    "\"",
    "'",
    " = ",
    "helo",
    "rdns",
    "client",
    "sender",
    "recipient",
    "dnsbl",
    "score_at_least",
    "no_rdns",
    "colour",
    "\"allow\"",
    "\"reject\"",
    "\"defer\"",
    "\"tarpit\"",
    "\"greylist\"",
    "\"score\"",
    "\"r1\"",
    "\"r2\"",
    "\"R1\"",
    "\"bad name\"",
    "\"localhost\"",
    "\"*.example.com\"",
    "\"*\"",
    "\"**\"",
    "\"\"",
    "\"/^[0-9.]+$/\"",
    "'/\\d+/'",
    "\"/(/\"",
    "\"/(?i)x/\"",
    "\"/a{1000}{1000}/\"",
    "\"192.0.2.0/24\"",
    "\"192.0.2.1/24\"",
    "\"2001:db8::/32\"",
    "\"::ffff:192.0.2.0/120\"",
    "true",
    "false",
    "1",
    "-1",
    "0",
    "2",
    "1001",
    "9999999999",
    "\"550 5.7.1 No\"",
    "\"450 4.7.1 Later\"",
    "\"451 Later\"",
    "\"550 4.7.1 x\"",
    "\"421 4.7.0 x\"",
    "\"550\"",
    "\"250 ok\"",
    "#",
    "\t",
    "\\",
    "a",
    "*",
    "/",
    ".",
    "@",
    "\u{feff}",
];
