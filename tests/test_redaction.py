"""What counts as a secret (sana_ray.redaction): URIs of any scheme and case, credential-like query
parameters, bearer tokens and the values of secret environment variables; and what is not."""

from __future__ import annotations

import pytest

from sana_ray.redaction import redact_data, redact_text, uri_credentials


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql+psycopg2://user:pw@host/db", "postgresql+psycopg2://***@host/db"),
        ("mysql2://u:p@h:3306/x", "mysql2://***@h:3306/x"),
        ("HTTPS://Bob:Secret@MLFLOW.example.com", "HTTPS://***@MLFLOW.example.com"),
        ("https://ghp_abc123@github.com/org/repo", "https://***@github.com/org/repo"),  # a token as the user
        ("mysql://u:pa/ss@host/db", "mysql://***@host/db"),  # a '/' in the password is still masked whole
        ("redis://u:p@ss@h", "redis://***@h"),  # an '@' too
        ("https://h/x?token=abc&page=2", "https://h/x?token=***&page=2"),
        ("https://h/x?a=1&access_token=zz#frag", "https://h/x?a=1&access_token=***#frag"),
        ("s3://b/k?X-Amz-Signature=abc&X-Amz-Credential=def&X-Amz-Date=1", "s3://b/k?X-Amz-Signature=***&X-Amz-Credential=***&X-Amz-Date=1"),
        ("https://acct.blob.core.windows.net/c?sv=2020&sig=SAS", "https://acct.blob.core.windows.net/c?sv=2020&sig=***"),
        ("http://h/?api_key=k1&apikey=k2&Password=k3", "http://h/?api_key=***&apikey=***&Password=***"),
        ("Authorization: Bearer abcdefghijkl", "Authorization: Bearer ***"),
        ("see https://a:b@h and postgresql://c:d@e.", "see https://***@h and postgresql://***@e."),
    ],
)
def test_secrets_are_masked(text, expected):
    assert redact_text(text) == expected


@pytest.mark.parametrize(
    "text",
    ["sqlite:////tmp/runs/mlflow.db", "sqlite:////tmp/a:b@c/mlflow.db", "http://127.0.0.1:5000", "ray://head:10001",
     "https://huggingface.co/Efficient-Large-Model/Sana_1600M_1024px_diffusers", "a red circle on a white background",
     "user@example.com", "https://h/x?page=2&sort=asc"],
)
def test_what_is_not_a_secret_is_left_alone(text):
    assert redact_text(text) == text
    assert uri_credentials(text) is None


def test_secret_environment_values_are_masked_wherever_they_appear(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cr3t-value-1")
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnop")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # short: not taken for a secret
    text = "login failed with s3cr3t-value-1 (token hf_abcdefghijklmnop); parallelism false"
    assert redact_text(text) == "login failed with *** (token ***); parallelism false"


def test_redact_data_masks_every_string_and_keeps_the_shape():
    data = {"a": ["https://u:p@h", 3, None], "b": {"c": "x?token=t"}, "d": True}
    assert redact_data(data) == {"a": ["https://***@h", 3, None], "b": {"c": "x?token=***"}, "d": True}


@pytest.mark.parametrize(
    ("uri", "found"),
    [("postgresql+psycopg2://u:p@h/db", "a password"), ("MYSQL2://u:p@h", "a password"),
     ("https://h/?token=t", "a credential in its query (token=)"), ("https://h/?sig=s", "a credential in its query (sig=)"),
     ("https://user@h", None)],  # a user name alone is not a password (MLflow reads the password from the environment)
)
def test_uri_credentials_names_what_it_found(uri, found):
    result = uri_credentials(uri)
    assert (result is None) if found is None else result.startswith(found)


def test_long_text_without_secrets_costs_linear_time():
    # Bounded patterns: 250k scheme-like fragments and a 1 MB word are scanned, not backtracked over.
    assert redact_text("a://" * 250_000) == "a://" * 250_000
    assert redact_text("?" + "k" * 1_000_000) == "?" + "k" * 1_000_000
