"""Federation provisioning (momkd_fed.certs): files, permissions, certificate chain, key formats, refusals."""

from __future__ import annotations

import ipaddress
import json
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from momkd_fed.certs import ProvisionError, add_site, inspect, provision, validate_host, validate_site_name
from momkd_fed.config import load_config
from momkd_fed.errors import ConfigError

SITES = ["hospital_a", "site-b"]


@pytest.fixture(scope="module")
def prov(tmp_path_factory):
    out = tmp_path_factory.mktemp("prov") / "federation"
    return provision(out, coordinator_hosts=["fl.example.org", "10.0.0.5"], sites=SITES, days=30)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _cert(p: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(p.read_bytes())


def test_layout_and_permissions(prov):
    out = prov.out
    expected = {"provision.json", "ca/ca.crt", "ca/ca.key", "coordinator/ca.crt", "coordinator/server.crt",
                "coordinator/server.key", "coordinator/bundle.json", "coordinator/README.txt"}
    expected |= {f"coordinator/sites/{s}.pub" for s in SITES}
    for s in SITES:
        expected |= {f"sites/{s}/{f}" for f in ("ca.crt", f"{s}.key", f"{s}.pub", "site.yaml", "bundle.json",
                                                 "README.txt")}
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert files == expected
    for p in out.rglob("*"):
        if p.is_dir():
            assert _mode(p) == 0o700, p
    assert _mode(out) == 0o700
    private = [out / "ca/ca.key", out / "coordinator/server.key"] + [out / f"sites/{s}/{s}.key" for s in SITES]
    for p in private:
        assert _mode(p) == 0o600, p
    # the CA key never travels in a bundle
    for bundle in [out / "coordinator", *(out / "sites").iterdir()]:
        assert not list(bundle.rglob("ca.key"))
        for p in bundle.rglob("*"):
            if p.is_file():
                assert b"BEGIN PRIVATE KEY" not in p.read_bytes() or p.name == "server.key"


def test_server_certificate_chain_and_sans(prov):
    ca = _cert(prov.ca_dir / "ca.crt")
    srv = _cert(prov.coordinator_dir / "server.crt")
    srv.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign is True
    assert srv.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = srv.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"fl.example.org", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("10.0.0.5"),
                                                             ipaddress.ip_address("127.0.0.1")}
    days = (srv.not_valid_after_utc - srv.not_valid_before_utc).days
    assert 29 <= days <= 30
    # the server key matches the certificate
    key = serialization.load_pem_private_key((prov.coordinator_dir / "server.key").read_bytes(), None)
    assert key.public_key().public_numbers() == srv.public_key().public_numbers()
    # every bundle carries the same CA
    for s in SITES:
        assert (prov.site_dirs[s] / "ca.crt").read_bytes() == (prov.ca_dir / "ca.crt").read_bytes()


def test_site_keys_are_openssh_ec_pairs(prov):
    for s in SITES:
        d = prov.site_dirs[s]
        priv = serialization.load_ssh_private_key((d / f"{s}.key").read_bytes(), None)  # what flower-supernode reads
        pub = serialization.load_ssh_public_key((d / f"{s}.pub").read_bytes())  # what `flwr supernode register` reads
        assert isinstance(priv, ec.EllipticCurvePrivateKey) and isinstance(pub, ec.EllipticCurvePublicKey)
        assert priv.curve.name == "secp384r1"
        assert priv.public_key().public_numbers() == pub.public_numbers()
        assert (prov.coordinator_dir / "sites" / f"{s}.pub").read_bytes() == (d / f"{s}.pub").read_bytes()
    a, b = (serialization.load_ssh_public_key((prov.site_dirs[s] / f"{s}.pub").read_bytes()) for s in SITES)
    assert a.public_numbers() != b.public_numbers()


def test_site_bundle_describes_the_connection_and_yaml_loads(prov):
    info = json.loads((prov.site_dirs["hospital_a"] / "bundle.json").read_text())
    assert info["site"] == "hospital_a" and info["superlink"] == "fl.example.org:9443"
    cfg = load_config(prov.site_dirs["hospital_a"] / "site.yaml")
    assert [s.name for s in cfg.sites] == ["hospital_a"]
    assert cfg.sites[0].manifest == "/path/to/manifest.csv" and cfg.sites[0].omics == ""
    assert yaml.safe_load((prov.site_dirs["site-b"] / "site.yaml").read_text())["sites"][0]["name"] == "site-b"


def test_refuses_overwrite_without_force_and_replaces_with_force(tmp_path):
    out = tmp_path / "p"
    first = provision(out, coordinator_hosts=["coord"], sites=["a"])
    old_ca = (out / "ca/ca.crt").read_bytes()
    with pytest.raises(ProvisionError, match=str(out)):
        provision(out, coordinator_hosts=["coord"], sites=["a"])
    assert (out / "ca/ca.crt").read_bytes() == old_ca  # untouched
    second = provision(out, coordinator_hosts=["coord"], sites=["b"], force=True)
    assert (out / "ca/ca.crt").read_bytes() != old_ca
    assert not (out / "sites/a").exists() and (out / "sites/b/b.key").is_file()
    assert first.out == second.out
    assert [p.name for p in tmp_path.iterdir()] == ["p"]  # no staging folders left behind


def test_never_deletes_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(ProvisionError, match="not empty"):
        provision(tmp_path, coordinator_hosts=["coord"], sites=["a"], force=True)
    assert (tmp_path / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize("bad", ["", "../evil", "a/b", "-lead", "has space", "x" * 64, "dot.name", "é"])
def test_bad_site_names_rejected(tmp_path, bad):
    with pytest.raises(ConfigError, match="site name"):
        provision(tmp_path / "p", coordinator_hosts=["coord"], sites=[bad])
    assert not (tmp_path / "p").exists()


def test_duplicate_sites_and_bad_hosts_rejected(tmp_path):
    with pytest.raises(ConfigError, match="duplicate"):
        provision(tmp_path / "p", coordinator_hosts=["coord"], sites=["a", "a"])
    for bad in ["https://coord", "coord:9443", "*.example.org", "bad_host.org", "-x.org", "1.2.3"]:
        with pytest.raises(ConfigError, match="coordinator_hosts"):
            validate_host(bad)
    assert validate_host("::1") == x509.IPAddress(ipaddress.ip_address("::1"))
    assert validate_host("FL.Example.org.") == x509.DNSName("fl.example.org")
    assert validate_site_name("Site_01") == "Site_01"
    with pytest.raises(ConfigError):
        provision(tmp_path / "p", coordinator_hosts=[], sites=["a"])
    with pytest.raises(ConfigError, match="days"):
        provision(tmp_path / "p", coordinator_hosts=["coord"], sites=["a"], days=0)


def test_inspect_and_add_site(tmp_path):
    out = tmp_path / "p"
    provision(out, coordinator_hosts=["coord.example"], sites=["a"], days=10)
    new = add_site(out, "late_joiner")
    assert (new / "late_joiner.key").is_file() and _mode(new / "late_joiner.key") == 0o600
    assert (out / "coordinator/sites/late_joiner.pub").is_file()
    with pytest.raises(ProvisionError, match="already provisioned"):
        add_site(out, "a")
    summary = inspect(out)
    assert set(summary.site_keys) == {"a", "late_joiner"}
    assert all(fp.startswith("SHA256:") for fp in summary.site_keys.values())
    server = [c for c in summary.certificates if c.path.name == "server.crt"][0]
    assert server.signed_by_ca and 9 <= server.days_left <= 10
    assert "coord.example" in server.hosts and "127.0.0.1" in server.hosts
    assert summary.fleet_address == "coord.example:9443"
    assert any("late_joiner" in line for line in summary.lines())
    # a server certificate from another provision does not verify against this CA
    other = provision(tmp_path / "other", coordinator_hosts=["coord.example"], sites=["a"])
    (out / "coordinator/server.crt").write_bytes((other.coordinator_dir / "server.crt").read_bytes())
    assert not [c for c in inspect(out).certificates if c.path.name == "server.crt"][0].signed_by_ca
