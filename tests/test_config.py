"""Every SHAREDSTATE_* key is defaulted, validated at init_app, and explained when wrong."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import pytest
from flask import Flask

from flask_sharedstate import ConfigError, SharedState
from flask_sharedstate.config import DEFAULTS


def init(**config: Any) -> Flask:
    app = Flask("config_app")
    app.config.update(config)
    SharedState().init_app(app)
    return app


def test_defaults_are_set_on_the_config() -> None:
    """init_app fills in every key with its default, as Flask extensions do."""
    app = init()
    for key, default in DEFAULTS.items():
        assert app.config[key] == default
    settings = app.extensions["sharedstate"].settings
    assert settings.backend == "manager" and settings.tcp is None
    assert settings.namespace == "config_app" and settings.timeout == 5.0


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("SHAREDSTATE_BACKEND", "postgres", "one of 'manager', 'memory', 'redis'"),
        ("SHAREDSTATE_BACKEND", "redis", "needs SHAREDSTATE_REDIS_URL"),
        ("SHAREDSTATE_REDIS_URL", "http://x", "redis://, rediss:// or unix://"),
        ("SHAREDSTATE_LEASE", -1, "positive number"),
        ("SHAREDSTATE_TIMEOUT", 0, "positive number"),
        ("SHAREDSTATE_TIMEOUT", "soon", "number of seconds"),
        ("SHAREDSTATE_TIMEOUT", True, "positive number"),
        ("SHAREDSTATE_PORT", 70000, "1 to 65535"),
        ("SHAREDSTATE_PORT", "http", "1 to 65535"),
        ("SHAREDSTATE_HOST", "127.0.0.1", "SHAREDSTATE_PORT is not"),
        ("SHAREDSTATE_FSYNC", "sometimes", "'always', 'everysec', 'no'"),
        ("SHAREDSTATE_FSYNC", "weekly", "'always', 'everysec', 'no'"),
        ("SHAREDSTATE_NAMESPACE", 5, "non-empty string"),
        ("SHAREDSTATE_KEY", 12345, "str or bytes"),
        ("SHAREDSTATE_SOCKET", "/tmp/" + "x" * 120, "at most 107 bytes"),
    ],
)
def test_bad_values_name_the_key(key: str, value: Any, message: str) -> None:
    """A wrong value raises ConfigError naming the key and what was expected."""
    with pytest.raises(ConfigError, match=key) as info:
        init(**{key: value})
    assert message in str(info.value)


def test_non_loopback_tcp_needs_a_long_explicit_key() -> None:
    """TCP on a non-loopback host without an explicit key of 16+ bytes is refused."""
    with pytest.raises(ConfigError, match="SHAREDSTATE_KEY"):
        init(SHAREDSTATE_HOST="10.1.2.3", SHAREDSTATE_PORT=7000)
    with pytest.raises(ConfigError, match="at least 16"):
        init(SHAREDSTATE_HOST="10.1.2.3", SHAREDSTATE_PORT=7000, SHAREDSTATE_KEY="short")
    app = init(SHAREDSTATE_HOST="10.1.2.3", SHAREDSTATE_PORT=7000, SHAREDSTATE_KEY="k" * 16)
    assert app.extensions["sharedstate"].settings.tcp == ("10.1.2.3", 7000)
    app = init(SHAREDSTATE_HOST="::1", SHAREDSTATE_PORT=7000)
    assert app.extensions["sharedstate"].settings.address == "[::1]:7000"


def test_prefixed_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """FLASK_SHAREDSTATE_* environment variables work through from_prefixed_env."""
    monkeypatch.setenv("FLASK_SHAREDSTATE_TIMEOUT", "2.5")
    monkeypatch.setenv("FLASK_SHAREDSTATE_PORT", "7001")
    app = Flask("env_app")
    app.config.from_prefixed_env()
    SharedState(app)
    settings = app.extensions["sharedstate"].settings
    assert settings.timeout == 2.5 and settings.tcp == ("127.0.0.1", 7001)


def test_apps_get_distinct_default_sockets() -> None:
    """Two apps get different socket paths and namespaces by default."""
    one, two = init(), Flask("other_app")
    SharedState(two)
    a = one.extensions["sharedstate"].settings
    b = two.extensions["sharedstate"].settings
    assert a.socket_path != b.socket_path and a.namespace != b.namespace


def test_tcp_refuses_a_key_derived_from_a_weak_secret_key() -> None:
    """A SECRET_KEY under 16 bytes derives no key for TCP: ConfigError naming both keys."""
    with pytest.raises(ConfigError, match="SECRET_KEY") as info:
        init(SHAREDSTATE_PORT=7000, SECRET_KEY="dev")
    message = str(info.value)
    assert "SHAREDSTATE_KEY" in message and "secrets.token_hex" in message
    assert "'dev'" not in message  # the secret itself is never shown
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        init(SHAREDSTATE_PORT=7000, SECRET_KEY=b"x" * 15)
    # Long enough, an explicit key, or a unix socket in its private folder: accepted.
    assert init(SHAREDSTATE_PORT=7000, SECRET_KEY="s" * 16).extensions["sharedstate"]
    app = init(SHAREDSTATE_PORT=7000, SECRET_KEY="dev", SHAREDSTATE_KEY="k" * 16)
    assert app.extensions["sharedstate"].settings.key == b"k" * 16
    assert init(SECRET_KEY="dev").extensions["sharedstate"].settings.tcp is None


def test_runtime_dir_skips_an_xdg_runtime_dir_of_another_user(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """$XDG_RUNTIME_DIR is used only when it is this user's (as the XDG spec requires): a
    root master's /run/user/0, inherited by workers that became nobody, is passed over."""
    from flask_sharedstate.config import runtime_dir

    other = tempfile.mkdtemp(prefix="xdg-", dir="/tmp")  # short: room for a socket
    try:
        monkeypatch.setenv("XDG_RUNTIME_DIR", other)
        assert runtime_dir().startswith(other + "/")  # this user's: used
        os.chown(other, os.getuid() + 1, -1)  # someone else's (the tests run as root)
        assert not runtime_dir().startswith(other + "/")
    finally:
        shutil.rmtree(other, ignore_errors=True)


@pytest.mark.parametrize("key", ["SHAREDSTATE_TIMEOUT", "SHAREDSTATE_LEASE"])
@pytest.mark.parametrize("value", [float("inf"), 1e300, float("nan"), 2e9])
def test_seconds_keys_are_bounded(key: str, value: float) -> None:
    """SHAREDSTATE_TIMEOUT and SHAREDSTATE_LEASE take finite seconds up to 1e9: a value no
    backend can wait for is a ConfigError naming the key, not a failure at first use."""
    app = Flask("bounded")
    app.config[key] = value
    with pytest.raises(ConfigError, match=key):
        SharedState(app)


@pytest.mark.parametrize(
    ("key", "close"),
    [
        ("SHAREDSTATE_TIMEOUTT", "SHAREDSTATE_TIMEOUT"),
        ("SHAREDSTATE_BACKND", "SHAREDSTATE_BACKEND"),
        ("SHAREDSTATE_PERSIST", "SHAREDSTATE_PERSIST_PATH"),
    ],
)
def test_a_misspelt_key_is_refused_with_the_closest_key(key: str, close: str) -> None:
    """An unknown SHAREDSTATE_* key is a ConfigError naming it and the key it resembles."""
    with pytest.raises(ConfigError, match=f"{key} is not a key") as info:
        init(**{key: "memory"})
    assert f"did you mean {close!r}?" in str(info.value)


def test_an_unknown_key_with_no_close_one_lists_the_keys() -> None:
    """An unknown key like no other is refused with the list of the keys there are."""
    with pytest.raises(ConfigError, match="SHAREDSTATE_XYZZY is not a key") as info:
        init(SHAREDSTATE_XYZZY=1)
    assert "did you mean" not in str(info.value)
    for key in DEFAULTS:
        assert key in str(info.value)


def test_a_misspelt_environment_variable_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """FLASK_SHAREDSTATE_BACKND through from_prefixed_env is refused; right names still work."""
    monkeypatch.setenv("FLASK_SHAREDSTATE_BACKEND", "memory")
    monkeypatch.setenv("FLASK_SHAREDSTATE_REDIS_OPTIONS__socket_timeout", "2")
    app = Flask("env_app")
    app.config.from_prefixed_env()
    SharedState(app)  # nested keys (__) land inside a known key
    assert app.extensions["sharedstate"].settings.backend == "memory"
    monkeypatch.setenv("FLASK_SHAREDSTATE_BACKND", "memory")
    app = Flask("env_app")
    app.config.from_prefixed_env()
    with pytest.raises(ConfigError, match="did you mean 'SHAREDSTATE_BACKEND'"):
        SharedState(app)
