from pathlib import Path

import pytest

from cluster.config import Config, ConfigError, load_config
from scheduler.core.page_table import PageTableManager
from scheduler.core.scheduler import Scheduler

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


def test_unset_scheduler_sizes_follow_the_workers_device():
    unset = load_config(REPO / "configs" / "local.yaml").scheduler
    assert (unset.max_num_seqs, unset.max_num_batched_tokens) == (None, None)
    gpu, cpu = unset.for_device(gpu=True), unset.for_device(gpu=False)
    assert (gpu.max_num_seqs, gpu.max_num_batched_tokens) == (512, 16384)
    assert (cpu.max_num_seqs, cpu.max_num_batched_tokens) == (256, 2048)
    set_ = load_config(None, ["scheduler.max_num_seqs=7"]).scheduler.for_device(gpu=True)
    assert (set_.max_num_seqs, set_.max_num_batched_tokens) == (7, 16384)
    with pytest.raises(ValueError, match="for_device"):
        Scheduler(unset, PageTableManager(8, 16))


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
        "max_concurrent_requests: -1": r"server\.max_concurrent_requests must be in \[0, ",
        "port: 9000\n  http_port: 9000": r"server\.http_port must differ from server\.port \(",
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
        "frontends: 0": r"server\.frontends must be in \[1, 64\], got 0",
        "frontends: two": r"server\.frontends must be int",
    }.items():
        path.write_text(f"server:\n  {body}\n")
        with pytest.raises(ConfigError, match=message):
            load_config(path)
    for cpus, frontends in [(1, 1), (2, 1), (8, 2), (32, 8), (64, 8)]:
        monkeypatch.setattr("os.cpu_count", lambda cpus=cpus: cpus)
        assert load_config(None).server.frontends == frontends


def test_the_replicas_are_split_over_the_engine_cores_as_evenly_as_can_be():
    split = {
        (replicas, cores): load_config(
            None, [f"parallel.replicas={replicas}", f"parallel.engine_cores={cores}"]
        ).parallel.split()
        for replicas, cores in [(1, 1), (2, 1), (2, 2), (5, 2), (7, 3)]
    }
    assert split == {
        (1, 1): [1],
        (2, 1): [2],
        (2, 2): [1, 1],
        (5, 2): [3, 2],
        (7, 3): [3, 2, 2],
    }
    assert load_config(None).parallel.engine_cores == 1


@pytest.mark.parametrize(
    "section, body, message",
    [
        ("cluster", "num_cpus: -1", r"cluster\.num_cpus must be in \[0, 2147483647\], got -1"),
        ("cluster", "startup_timeout_s: .inf", r"cluster\.startup_timeout_s must be a finite"),
        ("model", "seed: -1", r"model\.seed must be in \[0, 18446744073709551615\], got -1"),
        ("model", f"seed: {2**64}", r"model\.seed must be in \[0, 18446744073709551615\]"),
        ("model", f"max_model_len: {2**31}", r"model\.max_model_len must be in \[2, 2147483647\]"),
        ("server", f"max_request_bytes: {2**31}", r"server\.max_request_bytes must be in \[1024, "),
        ("server", "frontends: 65", r"server\.frontends must be in \[1, 64\], got 65"),
        ("scheduler", f"max_num_seqs: {2**31}", r"scheduler\.max_num_seqs must be in \[1, "),
        ("scheduler", f"max_num_batched_tokens: {2**40}", r"scheduler\.max_num_batched_tokens"),
        ("scheduler", "max_queued_requests: -1", r"scheduler\.max_queued_requests must be in \[0"),
        ("scheduler", "step_timeout_s: 0", r"scheduler\.step_timeout_s must be a finite .* > 0"),
        ("scheduler", "step_timeout_s: .nan", r"scheduler\.step_timeout_s must be a finite number"),
        ("cache", f"num_blocks: {2**31}", r"cache\.num_blocks must be in \[1, 2147483647\]"),
        ("cache", "cpu_cache_gb: .inf", r"cache\.cpu_cache_gb must be a finite number > 0"),
        ("cache", f"cpu_cache_gb: {10**400}", r"cache\.cpu_cache_gb must be a finite number > 0"),
        ("cache", "swap_space_gb: .nan", r"cache\.swap_space_gb must be a finite number >= 0"),
        ("parallel", f"replicas: {2**31}", r"parallel\.replicas must be in \[1, 2147483647\]"),
        ("parallel", f"tensor_parallel_size: {2**31}", r"parallel\.tensor_parallel_size"),
        ("parallel", "engine_cores: 0", r"parallel\.engine_cores must be in \[1, 2147483647\]"),
        (
            "parallel",
            "replicas: 2\n  engine_cores: 3",
            r"parallel\.engine_cores=3 exceeds parallel\.replicas=2: each engine core drives at "
            r"least one replica",
        ),
        (
            "model",
            "max_model_len: 321\ncache:\n  num_blocks: 20",
            r"model\.max_model_len=321 does not fit the KV cache: cache\.num_blocks=20 x "
            r"cache\.block_size=16 = 320 tokens",
        ),
    ],
)
def test_numbers_the_cluster_cannot_use_fail_at_load_naming_the_file_and_key(
    tmp_path, section, body, message
):
    path = tmp_path / "numbers.yaml"
    path.write_text(f"{section}:\n  {body}\n")
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ")


def test_the_largest_numbers_the_cluster_can_use_load(tmp_path):
    path = tmp_path / "numbers.yaml"
    path.write_text(
        f"model:\n  seed: {2**64 - 1}\n"
        f"server:\n  max_request_bytes: {2**31 - 1}\n"
        "cluster:\n  num_cpus: 0\n"
    )
    cfg = load_config(path)
    assert (cfg.model.seed, cfg.server.max_request_bytes, cfg.cluster.num_cpus) == (
        2**64 - 1,
        2**31 - 1,
        0,
    )


def test_an_admin_token_in_the_client_tokens_file_fails_at_load(tmp_path):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("client-1\n\n  shared  \n")
    path = tmp_path / "server.yaml"
    path.write_text(f"server:\n  auth_tokens_file: {tokens}\n  admin_tokens: [shared]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"{path}: server.admin_tokens must differ from the tokens of server.auth_tokens_file"
    )
    tokens.write_bytes(b"client-1\n\xff\xfe\n")
    with pytest.raises(ConfigError, match=r"server\.auth_tokens_file: cannot read it: 'utf-8'"):
        load_config(path)
    tokens.write_text("client-1\n")
    server = load_config(path).server
    assert server.tokens() == frozenset({"client-1", "shared"})
