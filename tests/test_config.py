from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from router import config as cfg
from router.errors import ConfigError

from .conftest import run_cli


class TestLoad:
    """Flags beat the environment, which beats the TOML file, which beats the defaults."""

    def test_defaults(self) -> None:
        config = cfg.load(env={})
        assert config.listen == "127.0.0.1:8080"
        assert config.infinario_url == "https://api.infinario.com"
        assert config.api == "legacy"
        assert config.session_timeout == 1200
        assert config.data_dir == Path("./var")
        assert config.concurrency == 8

    def test_precedence(self, tmp_path: Path) -> None:
        path = tmp_path / "router.toml"
        path.write_text('concurrency = 2\nsession_timeout = 30\nlisten = "127.0.0.1:1"\n'
                        'write_key = ["a=pa"]\n[projects.pa]\nauth = "token:T"\n')
        config = cfg.load(
            toml=cfg.read_toml(path),
            env={"ROUTER_CONCURRENCY": "3", "ROUTER_LISTEN": "127.0.0.1:2",
                 "ROUTER_WRITE_KEY": "b=pb,c=pc"},
            flags={"listen": "127.0.0.1:3", "write_key": ["d=pd"]},
        )
        assert config.session_timeout == 30
        assert config.concurrency == 3
        assert config.listen == "127.0.0.1:3"
        assert dict(config.write_keys) == {"d": "pd"}
        assert config.auth_header("pa") == "Token T"

    def test_basic_auth_header(self) -> None:
        config = cfg.load(env={"ROUTER_INFINARIO_AUTH": "basic:id:secret"})
        assert config.auth_header("any") == "Basic aWQ6c2VjcmV0"

    def test_sizes(self) -> None:
        assert cfg.parse_size("2GiB") == 2 * 1024**3
        assert cfg.parse_size("500MB") == 500 * 1000**2
        assert cfg.parse_size(1234) == 1234


class TestValidation:
    """Every bad setting is refused with one line that names it."""

    @pytest.mark.parametrize(
        ("env", "named"),
        [
            ({"ROUTER_LISTEN": "nowhere"}, "listen"),
            ({"ROUTER_INFINARIO_URL": "ftp://x"}, "infinario-url"),
            ({"ROUTER_API": "v3"}, "api"),
            ({"ROUTER_WRITE_KEY": "novalue"}, "write-key"),
            ({"ROUTER_SESSION_TIMEOUT": "-1"}, "session-timeout"),
            ({"ROUTER_CONCURRENCY": "many"}, "concurrency"),
            ({"ROUTER_CONCURRENCY": "0"}, "concurrency"),
            ({"ROUTER_INFINARIO_AUTH": "password:x"}, "infinario-auth"),
        ],
    )
    def test_names_the_setting(self, env: dict[str, str], named: str) -> None:
        with pytest.raises(ConfigError) as info:
            cfg.load(env=env)
        message = str(info.value)
        assert message.startswith(named + ":")
        assert "\n" not in message

    def test_unknown_toml_key(self, tmp_path: Path) -> None:
        path = tmp_path / "r.toml"
        path.write_text("colour = 'blue'\n")
        with pytest.raises(ConfigError, match="unknown setting 'colour'"):
            cfg.load(toml=cfg.read_toml(path), env={})


class TestCli:
    """The CLI exits non-zero with a one-line reason for bad configuration."""

    def test_bad_flag_exits_2(self, tmp_path: Path) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "router", "serve", "--concurrency", "zero",
             "--data-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            "infinario-router: concurrency: expected a whole number, got 'zero'"
        ]

    def test_no_write_key_without_simulator(self, tmp_path: Path) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "router", "serve", "--data-dir", str(tmp_path),
             "--listen", "127.0.0.1:0"],
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 2
        assert "write-key" in result.stderr.strip().splitlines()[-1]


class TestPrecedence:
    """Each source replaces what the sources below it set, repeatable settings included."""

    def test_write_keys_and_renames_are_replaced_not_merged(self, tmp_path: Path) -> None:
        path = tmp_path / "r.toml"
        path.write_text('write_key = ["a=pa"]\nrename = { "A" = "a" }\n')
        toml = cfg.read_toml(path)
        from_toml = cfg.load(toml=toml, env={})
        assert dict(from_toml.write_keys) == {"a": "pa"}
        assert dict(from_toml.renames) == {"A": "a"}
        from_env = cfg.load(toml=toml, env={"ROUTER_WRITE_KEY": "b=pb",
                                            "ROUTER_RENAME": "B=b"})
        assert dict(from_env.write_keys) == {"b": "pb"}
        assert dict(from_env.renames) == {"B": "b"}
        from_flags = cfg.load(toml=toml, env={"ROUTER_WRITE_KEY": "b=pb"},
                              flags={"write_key": ["c=pc"], "rename": ["C=c"]})
        assert dict(from_flags.write_keys) == {"c": "pc"}
        assert dict(from_flags.renames) == {"C": "c"}

    def test_a_source_that_does_not_set_a_value_keeps_the_lower_one(
            self, tmp_path: Path) -> None:
        path = tmp_path / "r.toml"
        path.write_text('write_key = ["a=pa"]\nconcurrency = 3\n')
        config = cfg.load(toml=cfg.read_toml(path), env={"ROUTER_WRITE_KEY": ""},
                          flags={"write_key": None, "concurrency": None})
        assert dict(config.write_keys) == {"a": "pa"}
        assert config.concurrency == 3

    def test_converters_follow_the_annotations(self) -> None:
        config = cfg.load(env={"ROUTER_SPOOL_CAP": "1MiB", "ROUTER_DATA_DIR": "/tmp/x",
                               "ROUTER_ALLOW_CAMPAIGN": "yes", "ROUTER_RATE_LIMIT": "0",
                               "ROUTER_LINGER": "0.5", "ROUTER_API": "v2"})
        assert config.spool_cap == 1024**2
        assert config.data_dir == Path("/tmp/x")
        assert config.allow_campaign is True
        assert config.rate_limit == 0 and config.effective_rate_limit is None
        assert config.linger == 0.5
        assert config.api == "v2"

    def test_router_config_names_the_file(self, tmp_path: Path) -> None:
        path = tmp_path / "r.toml"
        path.write_text('log_level = "loud"\n')
        result = run_cli("serve", env={"ROUTER_CONFIG": str(path)})
        assert result.returncode == 2
        assert result.stderr.splitlines() == [
            "infinario-router: log-level: expected debug, info, warning or error, got 'loud'"]

    def test_flags_beat_router_config(self, tmp_path: Path) -> None:
        path = tmp_path / "r.toml"
        path.write_text('concurrency = 0\n')
        result = run_cli("serve", "--concurrency", "-1", env={"ROUTER_CONFIG": str(path)})
        assert result.stderr.splitlines() == [
            "infinario-router: concurrency: must be greater than 0, got -1"]


class TestValues:
    """Values a person might type wrong are refused with a message that says what was expected."""

    @pytest.mark.parametrize(
        ("flag", "value", "line"),
        [
            ("--concurrency", "abc", "concurrency: expected a whole number, got 'abc'"),
            ("--concurrency", "2.5", "concurrency: expected a whole number, got '2.5'"),
            ("--concurrency", "1000", "concurrency: at most 256, got 1000"),
            ("--rate-limit", "-5", "rate-limit: must be 0 or more (0 means no limit), got -5"),
            ("--session-timeout", "soon", "session-timeout: expected a number, got 'soon'"),
            ("--session-timeout", "nan", "session-timeout: expected a number, got 'nan'"),
            ("--grace", "0", "grace: must be greater than 0, got 0.0"),
            ("--linger", "-1", "linger: must be 0 or more, got -1.0"),
            ("--spool-cap", "12XB",
             "spool-cap: expected a size such as 1048576, 512MB or 2GiB, got '12XB'"),
            ("--spool-cap", "0", "spool-cap: must be greater than 0, got 0"),
            ("--listen", "127.0.0.1:70000", "listen: expected HOST:PORT, got '127.0.0.1:70000'"),
            ("--listen", "8080", "listen: expected HOST:PORT, got '8080'"),
            ("--infinario-url", "api.infinario.com",
             "infinario-url: expected an http(s) URL, got 'api.infinario.com'"),
            ("--infinario-url", "https://u:pw@h:99999",
             "infinario-url: the port must be a number up to 65535, got 'https://u:***@h:99999'"),
            ("--api", "v3", "api: expected legacy or v2, got 'v3'"),
            ("--log-format", "xml", "log-format: expected json or console, got 'xml'"),
            ("--log-level", "loud", "log-level: expected debug, info, warning or error, "
             "got 'loud'"),
            ("--write-key", "k", "write-key: expected KEY=PROJECT_TOKEN, got a value without '='"),
            ("--rename", "A=", "rename: expected SEGMENT_EVENT=EVENT_TYPE, got 'A='"),
        ],
    )
    def test_one_line_exit_2(self, tmp_path: Path, flag: str, value: str, line: str) -> None:
        result = run_cli("serve", "--data-dir", str(tmp_path), flag, value)
        assert result.returncode == 2
        assert result.stderr.splitlines() == ["infinario-router: " + line]

    def test_simulate_flags_are_checked_too(self, tmp_path: Path) -> None:
        result = run_cli("serve", "--simulate", "--data-dir", str(tmp_path), "--api", "v3")
        assert (result.returncode, result.stderr.splitlines()) == (
            2, ["infinario-router: api: expected legacy or v2, got 'v3'"])

    def test_toml_types_are_checked(self, tmp_path: Path) -> None:
        path = tmp_path / "r.toml"
        path.write_text('concurrency = "many"\n')
        with pytest.raises(ConfigError, match=r"^concurrency: expected a whole number, "
                                              r"got 'many'$"):
            cfg.load(toml=cfg.read_toml(path), env={})
        path.write_text("allow_campaign = 3\n")
        with pytest.raises(ConfigError, match=r"^allow-campaign: expected true or false, got 3$"):
            cfg.load(toml=cfg.read_toml(path), env={})

    def test_usage_errors_are_one_line(self) -> None:
        for args in (["serve", "--bogus"], ["serve", "--listen"], ["launch"], []):
            result = run_cli(*args)
            assert result.returncode == 2, args
            assert len(result.stderr.splitlines()) == 1, (args, result.stderr)
            assert result.stderr.startswith("infinario-router: ")

    def test_secrets_are_not_echoed(self) -> None:
        with pytest.raises(ConfigError) as info:
            cfg.load(env={"ROUTER_INFINARIO_AUTH": "s3cr3tvalue"})
        assert "s3cr3t" not in str(info.value)
        with pytest.raises(ConfigError) as info:
            cfg.load(env={"ROUTER_WRITE_KEY": "wk=", "ROUTER_API": "v2"})
        assert str(info.value) == "write-key: expected KEY=PROJECT_TOKEN, got a value with " \
            "an empty side"


class TestSecretFiles:
    """Write keys and project credentials can live in files of their own."""

    def test_write_key_file(self, tmp_path: Path) -> None:
        keys = tmp_path / "keys"
        keys.write_text("# web and backend\nweb=TOKEN_A\n\n  backend = TOKEN_B  \n")
        for config in (
            cfg.load(env={}, flags={"write_key_file": str(keys)}),
            cfg.load(env={"ROUTER_WRITE_KEY_FILE": str(keys)}),
        ):
            assert dict(config.write_keys) == {"web": "TOKEN_A", "backend": "TOKEN_B"}

    def test_write_key_file_in_toml_is_relative_to_the_toml(self, tmp_path: Path) -> None:
        (tmp_path / "keys").write_text("web=TOKEN_A\n")
        path = tmp_path / "r.toml"
        path.write_text('write_key_file = "keys"\n')
        config = cfg.load(toml=cfg.read_toml(path), env={})
        assert dict(config.write_keys) == {"web": "TOKEN_A"}

    def test_a_higher_source_replaces_the_file(self, tmp_path: Path) -> None:
        keys = tmp_path / "keys"
        keys.write_text("web=TOKEN_A\n")
        config = cfg.load(env={"ROUTER_WRITE_KEY_FILE": str(keys)},
                          flags={"write_key": ["cli=TOKEN_C"]})
        assert dict(config.write_keys) == {"cli": "TOKEN_C"}

    def test_bad_line_names_file_and_line_not_the_secret(self, tmp_path: Path) -> None:
        keys = tmp_path / "keys"
        keys.write_text("web=TOKEN_A\n# ok\nTOKEN_SECRET_B\n")
        result = run_cli("serve", "--write-key-file", str(keys))
        assert result.returncode == 2
        assert result.stderr.splitlines() == [
            f"infinario-router: write-key-file: {keys} line 3: expected KEY=PROJECT_TOKEN"]

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match=r"^write-key-file: file .* does not exist$"):
            cfg.load(env={"ROUTER_WRITE_KEY_FILE": str(tmp_path / "none")})

    def test_project_auth_file(self, tmp_path: Path) -> None:
        (tmp_path / "a.auth").write_text("# project A\nbasic:id:secret\n")
        path = tmp_path / "r.toml"
        path.write_text('[projects.PROJECT_TOKEN_A]\nauth_file = "a.auth"\n')
        config = cfg.load(toml=cfg.read_toml(path), env={})
        assert config.auth_header("PROJECT_TOKEN_A") == "Basic aWQ6c2VjcmV0"

    def test_bad_project_auth_file(self, tmp_path: Path) -> None:
        (tmp_path / "a.auth").write_text("\npassword:hunter2\n")
        path = tmp_path / "r.toml"
        path.write_text('[projects.PROJECT_TOKEN_A]\nauth_file = "a.auth"\n')
        with pytest.raises(ConfigError) as info:
            cfg.load(toml=cfg.read_toml(path), env={})
        message = str(info.value)
        assert message == (f"projects.PROJ….auth_file: {tmp_path / 'a.auth'} line 2: expected "
                           "token:API_TOKEN or basic:KEY_ID:SECRET, got 'password:...'")
        assert "hunter2" not in message and "PROJECT_TOKEN_A" not in message


class TestRedaction:
    """Settings can be logged without their secrets."""

    @pytest.mark.parametrize(
        ("url", "safe"),
        [
            ("https://user:pw@api.example.com/x", "https://user:***@api.example.com/x"),
            ("https://user:p@ss@host", "https://user:***@host"),
            ("https://user@host", "https://user@host"),
            ("https://api.example.com", "https://api.example.com"),
        ],
    )
    def test_redact_url(self, url: str, safe: str) -> None:
        assert cfg.redact_url(url) == safe

    def test_redacted_config(self) -> None:
        config = cfg.Config(write_keys={"web-write-key": "PROJECT_TOKEN_A"},
                            infinario_auth="token:SECRET_T",
                            project_auth={"PROJECT_TOKEN_A": "basic:id:SECRET_B"},
                            infinario_url="https://u:SECRET_P@api.example.com")
        text = repr(config.redacted())
        for secret in ("PROJECT_TOKEN_A", "SECRET_T", "SECRET_B", "SECRET_P", "web-write-key"):
            assert secret not in text
        assert config.redacted()["write_keys"] == {"web-…": "PROJ…"}
        assert config.redacted()["infinario_url"] == "https://u:***@api.example.com"
        assert config.redacted()["concurrency"] == 8
