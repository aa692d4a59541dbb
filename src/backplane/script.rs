//! Lua scripts called by their SHA1 (EVALSHA), sent to Redis only when it does not know them.
//!
//! A script is loaded on a node the first time a call there answers NOSCRIPT (it restarted,
//! failed over, or its scripts were flushed), then that call is made again; every later call
//! sends only the SHA. On a Redis Cluster the load goes to every primary (redis-rs routes
//! `SCRIPT LOAD` so), and each call to the node that owns its first key.

use std::borrow::Cow;

use sha1::{Digest, Sha1};

/// A Lua script and its SHA1. Make each once (in a `static` `LazyLock`).
#[derive(Debug)]
pub struct Script {
    code: &'static str,
    sha: String,
}

impl Script {
    /// The script `code`.
    pub fn new(code: &'static str) -> Self {
        let sha = Sha1::digest(code.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Self { code, sha }
    }

    /// A call of the script, its KEYS and ARGV still to add.
    pub fn call(&self) -> Invocation<'_> {
        Invocation {
            script: self,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }

    /// The command that loads the script (`SCRIPT LOAD`).
    pub(super) fn load(&self) -> redis::Cmd {
        let mut cmd = redis::cmd("SCRIPT");
        cmd.arg("LOAD").arg(self.code);
        cmd
    }
}

/// One call of a [`Script`]: its KEYS and its ARGV, each in order.
#[derive(Debug)]
pub struct Invocation<'a> {
    script: &'a Script,
    keys: Vec<String>,
    args: Vec<Cow<'a, [u8]>>,
}

impl<'a> Invocation<'a> {
    /// Adds a key (`KEYS[n]`).
    pub fn key(&mut self, key: impl Into<String>) -> &mut Self {
        self.keys.push(key.into());
        self
    }

    /// Adds an argument (`ARGV[n]`); borrowed bytes are copied only into the command.
    pub fn arg(&mut self, arg: impl Into<Cow<'a, [u8]>>) -> &mut Self {
        self.args.push(arg.into());
        self
    }

    /// Adds a number, in decimal, as an argument.
    pub fn number(&mut self, n: u64) -> &mut Self {
        self.arg(n.to_string().into_bytes())
    }

    /// The script that is called.
    pub(super) fn script(&self) -> &Script {
        self.script
    }

    /// `EVALSHA <sha> <number of keys> <keys...> <args...>`.
    pub(super) fn cmd(&self) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.script.sha).arg(self.keys.len());
        for key in &self.keys {
            cmd.arg(key);
        }
        for arg in &self.args {
            cmd.arg(arg.as_ref());
        }
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sha_is_the_one_redis_computes() {
        // `redis-cli SCRIPT LOAD "return 1"` answers this.
        assert_eq!(
            Script::new("return 1").sha,
            "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"
        );
    }

    #[test]
    fn a_call_is_evalsha_with_its_keys_then_its_args() {
        let script = Script::new("return 1");
        let mut call = script.call();
        call.key("k1").arg(&b"a1"[..]).key("k2").number(42);
        let args: Vec<Vec<u8>> = call
            .cmd()
            .args_iter()
            .map(|arg| match arg {
                redis::Arg::Simple(bytes) => bytes.to_vec(),
                _ => panic!("a cursor in a script call"),
            })
            .collect();
        let expected: Vec<&[u8]> = vec![
            b"EVALSHA",
            b"e0e1f9fabfc9d4800c877a703b823ac0578ff8db",
            b"2",
            b"k1",
            b"k2",
            b"a1",
            b"42",
        ];
        assert_eq!(args, expected);
    }
}
