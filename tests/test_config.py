from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from router import config as cfg
from router.errors import ConfigError


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
        assert dict(config.write_keys) == {"a": "pa", "b": "pb", "c": "pc", "d": "pd"}
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
            "infinario-router: concurrency: invalid literal for int() with base 10: 'zero' "
            "(got 'zero')"
        ]

    def test_no_write_key_without_simulator(self, tmp_path: Path) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "router", "serve", "--data-dir", str(tmp_path),
             "--listen", "127.0.0.1:0"],
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 2
        assert "write-key" in result.stderr.strip().splitlines()[-1]
