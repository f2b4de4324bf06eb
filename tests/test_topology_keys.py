"""topology.keys and `bastion keys`: CURVE key files, their modes, allow-lists, and secrets that
never show in a repr, a message or CLI output."""

from __future__ import annotations

import os
import stat

import pytest
import zmq
import zmq.auth

from cluster.cli import main as bastion
from topology.keys import (
    CurveIdentity,
    KeyFileError,
    generate_keypair,
    load_allow_list,
    load_identity,
    load_public_key,
    load_public_keys,
)


def _secret_of(path) -> bytes:
    _, secret = zmq.auth.load_certificate(path)
    assert secret is not None
    return secret


def test_generate_when_new_name_then_public_0644_secret_0600_and_a_matching_pair(tmp_path):
    public, secret = generate_keypair(tmp_path / "keys", "tokyo-1")
    assert (public.name, secret.name) == ("tokyo-1.key", "tokyo-1.key_secret")
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    ident = load_identity(secret)
    assert ident.public == load_public_key(public) == zmq.curve_public(ident.secret)
    # ZeroMQ's own certificate reader understands the files (czmq/pyzmq format).
    assert zmq.auth.load_certificates(tmp_path / "keys") == {ident.public: True}
    assert [p.name for p in (tmp_path / "keys").iterdir() if p.name.startswith(".")] == []


def test_generate_when_files_exist_then_refused_unless_overwrite(tmp_path):
    generate_keypair(tmp_path, "a")
    before = load_public_key(tmp_path / "a.key")
    with pytest.raises(FileExistsError, match="a.key.*already exists"):
        generate_keypair(tmp_path, "a")
    assert load_public_key(tmp_path / "a.key") == before
    generate_keypair(tmp_path, "a", overwrite=True)
    assert load_public_key(tmp_path / "a.key") != before
    assert stat.S_IMODE((tmp_path / "a.key_secret").stat().st_mode) == 0o600


@pytest.mark.parametrize("name", ["", "../escape", "a/b", ".hidden", "x" * 200, "sp ace"])
def test_generate_when_name_is_not_a_plain_file_name_then_value_error(tmp_path, name):
    with pytest.raises(ValueError, match="name = "):
        generate_keypair(tmp_path, name)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_load_identity_when_secret_readable_by_others_then_refused_with_mode_and_fix(tmp_path,
                                                                                      mode):
    _, secret_path = generate_keypair(tmp_path, "n")
    os.chmod(secret_path, mode)
    with pytest.raises(KeyFileError) as err:
        load_identity(secret_path)
    message = str(err.value)
    assert f"mode {mode:04o}, must be 0600" in message and f"chmod 600 {secret_path}" in message
    assert _secret_of(secret_path).decode() not in message


def test_load_identity_when_owner_read_only_then_accepted(tmp_path):
    _, secret_path = generate_keypair(tmp_path, "n")
    os.chmod(secret_path, 0o400)
    assert load_identity(secret_path).public == load_public_key(tmp_path / "n.key")


def test_load_identity_when_public_file_missing_file_or_garbage_then_clear_key_file_error(
        tmp_path):
    public, _ = generate_keypair(tmp_path, "n")
    os.chmod(public, 0o600)
    with pytest.raises(KeyFileError, match="no secret-key in it"):
        load_identity(public)
    with pytest.raises(KeyFileError, match="cannot read secret key file"):
        load_identity(tmp_path / "missing.key_secret")
    junk = tmp_path / "junk.key_secret"
    junk.write_text("hello\n")
    junk.chmod(0o600)
    with pytest.raises(KeyFileError, match="no public-key"):
        load_identity(junk)


def test_load_identity_when_public_key_does_not_match_secret_then_refused_without_the_secret(
        tmp_path):
    _, secret_path = generate_keypair(tmp_path, "n")
    other, _ = zmq.curve_keypair()
    secret = _secret_of(secret_path)
    secret_path.write_text(f'curve\n    public-key = "{other.decode()}"\n'
                           f'    secret-key = "{secret.decode()}"\n')
    with pytest.raises(KeyFileError, match="does not belong to the secret key") as err:
        load_identity(secret_path)
    assert secret.decode() not in str(err.value)


def test_curve_identity_when_printed_then_public_key_only():
    ident = CurveIdentity.generate()
    for text in (repr(ident), str(ident), f"{ident}", repr([ident])):
        assert ident.public.decode() in text and ident.secret.decode() not in text
    assert "<redacted>" in repr(ident)
    with pytest.raises(ValueError) as err:
        CurveIdentity(zmq.curve_keypair()[0], ident.secret)
    assert ident.secret.decode() not in str(err.value)


def test_allow_list_when_directory_of_keys_then_public_keys_only_and_missing_dir_refused(
        tmp_path):
    keys = {name: load_public_key(generate_keypair(tmp_path, name)[0]) for name in "cab"}
    assert load_public_keys(tmp_path) == dict(sorted(keys.items()))
    assert list(load_public_keys(tmp_path)) == ["a", "b", "c"]
    assert load_allow_list(tmp_path) == frozenset(keys.values())
    with pytest.raises(KeyFileError, match="not a directory"):
        load_allow_list(tmp_path / "nope")


def test_bastion_keys_when_generate_and_list_then_public_keys_printed_never_secrets(tmp_path,
                                                                                    capsys):
    folder = tmp_path / "k"
    assert bastion(["keys", "generate", "--dir", str(folder), "--name", "a", "--name", "b"]) == 0
    generated = capsys.readouterr().out
    assert bastion(["keys", "list", "--dir", str(folder)]) == 0
    listed = capsys.readouterr().out
    keys = load_public_keys(folder)
    assert listed.splitlines() == [f"{n} {k.decode()}" for n, k in keys.items()]
    for name in "ab":
        assert f"{name} {keys[name].decode()} " in generated
        assert _secret_of(folder / f"{name}.key_secret").decode() not in generated + listed
    assert bastion(["keys", "generate", "--dir", str(folder), "--name", "a"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert bastion(["keys", "generate", "--dir", str(folder), "--name", "a", "--force"]) == 0
