from pathlib import Path

import pytest

from cluster.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


def test_every_shipped_config_loads():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        assert isinstance(load_config(path), Config), path


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("scheduler:\n  max_num_seq: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert "scheduler.max_num_seq" in str(err.value)
    assert "max_num_seqs" in str(err.value)  # what is allowed


def test_unknown_section_and_wrong_types_are_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("schedular: {}\n")
    with pytest.raises(ConfigError, match="unknown section 'schedular'"):
        load_config(path)
    path.write_text("cache:\n  block_size: sixteen\n")
    with pytest.raises(ConfigError, match=r"cache\.block_size must be int"):
        load_config(path)
    path.write_text("cache:\n  block_size: 12\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: cache\.block_size must be 8, 16"):
        load_config(path)


def test_overrides_apply_over_the_file():
    cfg = load_config(REPO / "configs" / "local.yaml", ["scheduler.max_num_seqs=7"])
    assert cfg.scheduler.max_num_seqs == 7
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["max_num_seqs=7"])


def test_server_security_settings_are_checked_naming_the_key(tmp_path):
    cert = tmp_path / "server.pem"
    cert.write_text("not checked until the server reads it")
    path = tmp_path / "server.yaml"
    cases = {
        f"tls_cert_file: {cert}": "server.tls_cert_file and server.tls_key_file go together",
        f"tls_cert_file: {cert}\n  tls_key_file: /nope.key": "server.tls_key_file: no such file",
        "auth_tokens: [ok, 3]": r"server\.auth_tokens must be a list of str",
        "auth_tokens: secret": r"server\.auth_tokens must be a list of str",
        "auth_tokens: ['has space']": "server.auth_tokens must be non-empty strings",
        "max_concurrent_requests: -1": "server.max_concurrent_requests must be >= 0",
    }
    for body, message in cases.items():
        path.write_text(f"server:\n  {body}\n")
        with pytest.raises(ConfigError, match=message) as err:
            load_config(path)
        assert str(path) in str(err.value)
    path.write_text(
        f"server:\n  tls_cert_file: {cert}\n  tls_key_file: {cert}\n  auth_tokens: [a]\n"
    )
    server = load_config(path).server
    assert server.auth_tokens == ("a",) and server.tokens() == frozenset({"a"})


def test_the_number_of_frontends_is_checked_and_defaults_to_the_machine(tmp_path, monkeypatch):
    path = tmp_path / "server.yaml"
    for body, message in {
        "frontends: 0": "server.frontends must be >= 1, got 0",
        "frontends: two": r"server\.frontends must be int",
    }.items():
        path.write_text(f"server:\n  {body}\n")
        with pytest.raises(ConfigError, match=message):
            load_config(path)
    for cpus, frontends in [(1, 1), (2, 1), (8, 2), (64, 4)]:
        monkeypatch.setattr("os.cpu_count", lambda cpus=cpus: cpus)
        assert load_config(None).server.frontends == frontends
