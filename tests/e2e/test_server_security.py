"""The Serving endpoint with mutual TLS, bearer tokens and limits, on a running cluster; the
engine core behind it, on loopback, serving only callers with the cluster secret."""

import subprocess

import grpc
import pytest
import ray

from cluster.client import Client, Credentials
from protos import serving_pb2
from scheduler.sampling_params import SamplingParams

TIMEOUT = 120
TOKEN, FILE_TOKEN, ADMIN_TOKEN = "s3cret-token", "token-from-a-file", "admin-token"
PROMPT = [5, 17, 42, 99]  # token ids of the tiny model's 256-token vocabulary


def _self_signed(directory, name: str) -> tuple[str, str]:
    """A certificate for 127.0.0.1 that is its own CA; returns (cert, key) paths."""
    cert, key = str(directory / f"{name}.pem"), str(directory / f"{name}.key")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
        + ["-keyout", key, "-out", cert, "-subj", f"/CN={name}"]
        + ["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@pytest.fixture(scope="module")
def secure(local_cluster, tiny_models, smollm2_path, tmp_path_factory):
    """A cluster of the tiny Llama behind mTLS, two tokens (one from a file), one Generate at
    a time and 4 KiB requests; yields (address, server cert, client cert, client key, the
    engine core's address)."""
    from cluster.config import Config
    from cluster.launcher import Cluster, replace_sections

    directory = tmp_path_factory.mktemp("tls")
    server_cert, server_key = _self_signed(directory, "server")
    client_cert, client_key = _self_signed(directory, "client")
    tokens_file = directory / "tokens"
    tokens_file.write_text(f"\n{FILE_TOKEN}\n")
    path, _ = tiny_models["llama"]
    config = replace_sections(
        Config(),
        model={"model": str(path), "tokenizer": smollm2_path, "max_model_len": 256},
        cache={"num_blocks": 128, "block_size": 8},
        server={
            "port": 0,
            "tls_cert_file": server_cert,
            "tls_key_file": server_key,
            "tls_client_ca_file": client_cert,
            "auth_tokens": (TOKEN,),
            "auth_tokens_file": str(tokens_file),
            "admin_tokens": (ADMIN_TOKEN,),
            "max_concurrent_requests": 1,
            "max_request_bytes": 4096,
        },
    )
    cluster = Cluster(config)
    address = cluster.start()
    core_address = ray.get(cluster.schedulers[0].address.remote(), timeout=TIMEOUT)
    yield address, server_cert, client_cert, client_key, core_address
    cluster.shutdown()


def _client(secure, token: str | None = TOKEN, client_cert: bool = True) -> Client:
    address, server_cert, client_cert_file, client_key, _ = secure
    return Client(
        address,
        Credentials(
            token=token,
            tls_ca_file=server_cert,
            tls_cert_file=client_cert_file if client_cert else None,
            tls_key_file=client_key if client_cert else None,
        ),
    )


def _generate(client: Client, max_tokens: int = 4) -> list:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return list(client.generate(PROMPT, params, timeout=TIMEOUT))


def test_a_client_with_its_certificate_and_a_token_is_served(secure):
    for token in (TOKEN, FILE_TOKEN):
        with _client(secure, token) as client:
            assert _generate(client)[-1].finish_reason == "length"


@pytest.mark.parametrize(
    "token,reason",
    [(None, "authorization"), ("wrong", "not accepted")],
)
def test_a_missing_or_wrong_token_is_unauthenticated_and_names_why(secure, token, reason):
    with _client(secure, token) as client:
        with pytest.raises(grpc.RpcError) as err:
            _generate(client)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert reason in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            client.server_info()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert client.health() == "SERVING"  # probes need no token


def test_plaintext_and_clients_without_a_certificate_are_turned_away(secure):
    address = secure[0]
    with Client(address, Credentials(token=TOKEN)) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.health(timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with _client(secure, client_cert=False) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.health(timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_requests_beyond_the_concurrency_limit_are_resource_exhausted(secure):
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    with _client(secure) as client:
        first = client.generate(PROMPT, params, timeout=TIMEOUT)
        head = next(first)  # in flight now (its first message: a token, or more if merged)
        with pytest.raises(grpc.RpcError) as err:
            _generate(client)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_concurrent_requests=1" in err.value.details()
        # The first goes on to its end.
        assert len(head.token_ids) + sum(len(d.token_ids) for d in first) == 200
        assert _generate(client)[-1].finish_reason == "length"  # and the slot is free again


def test_a_request_over_max_request_bytes_is_refused_and_the_server_goes_on(secure):
    with _client(secure) as client:
        with pytest.raises(grpc.RpcError) as err:
            list(client.generate(PROMPT * 1500, SamplingParams(max_tokens=2), timeout=TIMEOUT))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _generate(client)[-1].finish_reason == "length"


def test_the_cli_connects_with_a_token_and_certificates(secure, capsys):
    from cluster.cli import main

    address, server_cert, client_cert, client_key, _ = secure
    tls = ["--address", address, "--tls-ca", server_cert]
    tls += ["--tls-cert", client_cert, "--tls-key", client_key]
    assert main(["status", *tls, "--token", TOKEN]) == 0
    assert "replica 0 (serving)" in capsys.readouterr().out
    assert main(["scale", "--replicas", "1", *tls, "--token", TOKEN]) == 1  # a client's token
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    assert main(["scale", "--replicas", "1", *tls, "--token", ADMIN_TOKEN]) == 0
    assert main(["status", *tls]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_the_engine_core_listens_on_loopback_and_refuses_a_caller_without_the_secret(secure):
    core_address = secure[4]
    assert core_address.rpartition(":")[0] == "127.0.0.1"  # every frontend is on its node
    with grpc.insecure_channel(core_address) as channel:
        server_info = channel.unary_unary(
            "/pagedserve.frontend.EngineCore/GetServerInfo",
            request_serializer=serving_pb2.ServerInfoRequest.SerializeToString,
            response_deserializer=serving_pb2.ServerInfoResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as err:
            server_info(serving_pb2.ServerInfoRequest(), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with _client(secure) as client:  # the frontends carry the secret: the core serves them
        assert _generate(client)[-1].finish_reason == "length"
