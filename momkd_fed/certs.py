"""Federation provisioning: a private CA, the coordinator's TLS certificate and one SuperNode key per site.

``provision`` writes one folder per role, so that each party receives only what it needs::

    out/
      provision.json            what was issued (hosts, sites, expiry, key fingerprints); no secrets
      ca/ca.crt, ca/ca.key      the CA; ca.key never leaves this folder (keep it offline)
      coordinator/              for the coordinator: ca.crt, server.crt, server.key, sites/<site>.pub, bundle.json
      sites/<site>/             for one site: ca.crt, <site>.key, <site>.pub, site.yaml, bundle.json

Formats are the ones Flower 1.42 reads (checked in the installed ``flwr``):

- ``flower-superlink --ssl-certfile/--ssl-keyfile/--ssl-ca-certfile``: PEM certificate, PEM (PKCS#8) key, PEM CA;
- ``flower-supernode --root-certificates``: the PEM CA;
- ``flower-supernode --auth-supernode-private-key``: an **OpenSSH** EC private key (``load_ssh_private_key``);
- ``flwr supernode register KEY.pub``: an **OpenSSH** EC public key on a NIST curve (``load_ssh_public_key``).

Everything is EC P-384. Private keys are written 0600 and folders 0700; nothing here imports flwr.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import tempfile
from base64 import b64decode, b64encode
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import ConfigError, MomkdError

log = logging.getLogger(__name__)

CURVE = ec.SECP384R1  # NIST P-384 for the CA, the TLS certificate and the SuperNode keys
LOOPBACK_HOSTS = ("localhost", "127.0.0.1")  # always in the server certificate: SuperExec and `flwr` use loopback
DEFAULT_FLEET_PORT = 9443  # public port of the coordinator's reverse proxy (deploy/nginx/momkd-fed.conf)
MANIFEST = "provision.json"

_SITE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class ProvisionError(MomkdError):
    """Provisioning cannot proceed (existing output, unreadable bundle); the message names the path and the fix."""


@dataclass(frozen=True)
class ProvisionResult:
    """What :func:`provision` wrote.

    Attributes
    ----------
    out : Path
        The provision folder.
    ca_dir : Path
        ``out/ca`` (CA certificate and private key; stays with whoever provisions).
    coordinator_dir : Path
        ``out/coordinator``: the coordinator's bundle.
    site_dirs : dict[str, Path]
        Site name -> ``out/sites/<site>``: that site's bundle.
    hosts : tuple[str, ...]
        Subject alternative names of the server certificate (given hosts plus loopback).
    not_after : datetime.datetime
        Expiry of the server certificate (UTC).
    """

    out: Path
    ca_dir: Path
    coordinator_dir: Path
    site_dirs: dict[str, Path]
    hosts: tuple[str, ...]
    not_after: dt.datetime


@dataclass(frozen=True)
class CertInfo:
    """One certificate as :func:`inspect` reports it."""

    path: Path
    subject: str
    not_after: dt.datetime
    days_left: int
    hosts: tuple[str, ...] = ()  # subject alternative names (server certificate only)
    signed_by_ca: bool = True  # the signature verifies against out/ca/ca.crt


@dataclass(frozen=True)
class ProvisionSummary:
    """What :func:`inspect` found in a provision folder."""

    out: Path
    certificates: list[CertInfo] = field(default_factory=list)
    site_keys: dict[str, str] = field(default_factory=dict)  # site -> SHA256 fingerprint of its public key
    fleet_address: str = ""  # host:port the sites connect to

    def lines(self) -> list[str]:
        """Human-readable lines (what ``momkd-fed certs --inspect`` prints)."""
        rows = [f"provision {self.out} (sites connect to {self.fleet_address})"]
        for c in self.certificates:
            ok = "" if c.signed_by_ca else "  NOT SIGNED BY ca/ca.crt"
            sans = f"  hosts={','.join(c.hosts)}" if c.hosts else ""
            rows.append(f"  {c.path.relative_to(self.out)}: {c.subject}, expires {c.not_after:%Y-%m-%d} "
                        f"({c.days_left} days){sans}{ok}")
        for site, fp in self.site_keys.items():
            rows.append(f"  site {site}: node key {fp}")
        return rows


# --------------------------------------------------------------------------------------------------------------
# Validation


def validate_site_name(name: str) -> str:
    """Return ``name`` if it is a safe file and node-config name, else raise ConfigError.

    Allowed: 1-63 characters, letters, digits, ``_`` and ``-``, starting with a letter or digit.
    """
    if not isinstance(name, str) or not _SITE_RE.match(name):
        raise ConfigError(f"sites: {name!r} is not a valid site name (fix: 1-63 letters, digits, '_' or '-', "
                          "starting with a letter or digit, e.g. 'hospital_a')")
    return name


def validate_host(host: str) -> x509.GeneralName:
    """Return the subjectAltName entry for ``host``: an IP address or a DNS name; raise ConfigError otherwise."""
    if not isinstance(host, str) or not host:
        raise ConfigError(f"coordinator_hosts: {host!r} is not a host name or IP address")
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    name = host.rstrip(".").lower()
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL_RE.match(lab) for lab in labels) or labels[-1].isdigit():
        raise ConfigError(f"coordinator_hosts: {host!r} is neither an IP address nor a valid DNS name "
                          "(fix: e.g. 'fl.hospital.org' or '10.0.0.5'; no scheme, port or wildcard)")
    return x509.DNSName(name)


# --------------------------------------------------------------------------------------------------------------
# Files


def _write(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (no umask window), refusing to replace a file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # O_CREAT applies the umask


def _mkdir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def ssh_public_line(key: ec.EllipticCurvePublicKey, comment: str) -> bytes:
    """OpenSSH public key line (``ecdsa-sha2-nistp384 AAAA... comment``), the format ``flwr supernode register`` reads."""
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + \
        f" {comment}\n".encode()


def fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """``SHA256:...`` fingerprint of a public key, as ``ssh-keygen -lf`` prints it."""
    blob = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    return "SHA256:" + b64encode(hashlib.sha256(b64decode(blob)).digest()).decode().rstrip("=")


# --------------------------------------------------------------------------------------------------------------
# Certificates


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "momkd-fed"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _make_ca(days: int, now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE())
    name = _name("momkd-fed federation CA")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA384()))
    return key, cert


def _make_server(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: list[str], days: int,
                 now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE())
    sans = [validate_host(h) for h in hosts]
    cert = (x509.CertificateBuilder()
            .subject_name(_name(hosts[0])).issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    return key, cert


def _site_yaml(site: str, fleet_address: str) -> str:
    return f"""\
# momkd-fed site configuration for site "{site}". It stays at the site: nothing in it is sent.
# Fill in the three paths, then
#   momkd-fed check-data --config site.yaml --site {site}
#   momkd-fed client --config site.yaml --site {site} --certs <this folder>
# The coordinator (Flower Fleet API behind its reverse proxy) is {fleet_address}; it is also in bundle.json.
sites:
  - name: {site}
    manifest: /path/to/manifest.csv  # CSV: case_id, slide_id, label column, optional split (train/val/test)
    features_dir: /path/to/features  # TRIDENT or CLAM .h5 files, one per slide (searched recursively)
    omics: ""  # genomics matrix (CSV/TSV/Parquet) or folder of <case_id>.npy; "" = histology-only site
"""


def _write_site_bundle(site_dir: Path, site: str, ca_pem: bytes, fleet_address: str,
                       coordinator_sites: Path) -> str:
    """Generate the site's key pair, write its bundle and its public key for the coordinator; return fingerprint."""
    key = ec.generate_private_key(CURVE())
    pub = ssh_public_line(key.public_key(), f"momkd-fed-{site}")
    _mkdir(site_dir)
    _write(site_dir / "ca.crt", ca_pem, 0o644)
    _write(site_dir / f"{site}.key",
           key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption()), 0o600)
    _write(site_dir / f"{site}.pub", pub, 0o644)
    _write(site_dir / "site.yaml", _site_yaml(site, fleet_address).encode(), 0o600)
    bundle = {"role": "site", "site": site, "superlink": fleet_address, "root_certificates": "ca.crt",
              "private_key": f"{site}.key", "public_key": f"{site}.pub"}
    _write(site_dir / "bundle.json", (json.dumps(bundle, indent=2) + "\n").encode(), 0o644)
    _write(site_dir / "README.txt",
           (f"momkd-fed site bundle for {site}. {site}.key is this site's private node key: keep it here (0600), "
            f"never send it. The coordinator already holds {site}.pub. Connect to {fleet_address} with ca.crt.\n"
            ).encode(), 0o644)
    _write(coordinator_sites / f"{site}.pub", pub, 0o644)
    return fingerprint(key.public_key())


# --------------------------------------------------------------------------------------------------------------
# Public API


def provision(out: Path, *, coordinator_hosts: list[str], sites: list[str], days: int = 825, force: bool = False,
              fleet_port: int = DEFAULT_FLEET_PORT) -> ProvisionResult:
    """Create a CA, the coordinator's TLS certificate and one SuperNode key pair per site, as per-role bundles.

    Parameters
    ----------
    out : Path
        Provision folder; created. Must not exist or be empty, unless ``force`` and it holds a provision.
    coordinator_hosts : list[str]
        DNS names and/or IP addresses sites use to reach the coordinator; the first is the certificate's CN and the
        address written into site bundles. ``localhost`` and ``127.0.0.1`` are always added.
    sites : list[str]
        Site names (unique; letters, digits, ``_``, ``-``).
    days : int
        Validity of the CA and the server certificate.
    force : bool
        Replace an existing provision (every issued bundle becomes invalid).
    fleet_port : int
        Public port the sites connect to (the reverse proxy's), written into site bundles.

    Raises
    ------
    ConfigError
        Bad host, site name, days or port.
    ProvisionError
        ``out`` already holds a provision (without ``force``) or other files.
    """
    out = Path(out).expanduser().absolute()
    if not coordinator_hosts:
        raise ConfigError("coordinator_hosts: give at least one host name or IP address of the coordinator")
    if not sites:
        raise ConfigError("sites: give at least one site name")
    for s in sites:
        validate_site_name(s)
    dupes = sorted({s for s in sites if sites.count(s) > 1})
    if dupes:
        raise ConfigError(f"sites: duplicate site names {dupes}")
    if not isinstance(days, int) or days < 1:
        raise ConfigError(f"days: {days!r} must be a positive number of days")
    if not isinstance(fleet_port, int) or not 1 <= fleet_port <= 65535:
        raise ConfigError(f"fleet_port: {fleet_port!r} must be a port number 1-65535")
    hosts: list[str] = []
    for h in [*coordinator_hosts, *LOOPBACK_HOSTS]:
        validate_host(h)
        h = h.strip("[]").rstrip(".").lower()
        if h not in hosts:
            hosts.append(h)

    replacing = out.exists() and any(out.iterdir())
    if replacing:
        if not (out / MANIFEST).is_file():
            raise ProvisionError(f"{out}: folder is not empty and holds no {MANIFEST} (fix: choose a new or empty "
                                 "folder; momkd-fed never deletes files it did not write)")
        if not force:
            raise ProvisionError(f"{out}: a provision already exists (fix: pass --force to replace it; every bundle "
                                 "issued from it stops working, or use a new folder)")
    out.parent.mkdir(parents=True, exist_ok=True)

    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    host0 = hosts[0]
    fleet_address = f"[{host0}]:{fleet_port}" if ":" in host0 else f"{host0}:{fleet_port}"
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # 0700
    try:
        ca_key, ca_cert = _make_ca(days, now)
        srv_key, srv_cert = _make_server(ca_key, ca_cert, hosts, days, now)
        ca_pem = _pem_cert(ca_cert)
        _write(_mkdir(stage / "ca") / "ca.crt", ca_pem, 0o644)
        _write(stage / "ca" / "ca.key", _pem_key(ca_key), 0o600)
        coord = _mkdir(stage / "coordinator")
        _write(coord / "ca.crt", ca_pem, 0o644)
        _write(coord / "server.crt", _pem_cert(srv_cert), 0o644)
        _write(coord / "server.key", _pem_key(srv_key), 0o600)
        coord_sites = _mkdir(coord / "sites")
        fps = {s: _write_site_bundle(_mkdir(stage / "sites") / s, s, ca_pem, fleet_address, coord_sites)
               for s in sites}
        bundle = {"role": "coordinator", "hosts": hosts, "fleet_address": fleet_address, "sites": list(sites),
                  "ssl_certfile": "server.crt", "ssl_keyfile": "server.key", "ssl_ca_certfile": "ca.crt",
                  "site_keys_dir": "sites"}
        _write(coord / "bundle.json", (json.dumps(bundle, indent=2) + "\n").encode(), 0o644)
        _write(coord / "README.txt",
               (f"momkd-fed coordinator bundle: server.crt/server.key (TLS for {', '.join(hosts)}), ca.crt, and "
                "sites/<site>.pub (register each with `flwr supernode register`). server.key stays here (0600).\n"
                ).encode(), 0o644)
        manifest = {"created": now.isoformat(), "not_after": srv_cert.not_valid_after_utc.isoformat(),
                    "hosts": hosts, "fleet_address": fleet_address, "sites": fps, "days": days}
        _write(stage / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode(), 0o644)
        if replacing:
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            out.rename(old / "p")
            stage.rename(out)
            shutil.rmtree(old)
        else:
            if out.exists():
                out.rmdir()  # empty
            stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    os.chmod(out, 0o700)
    log.info("provisioned %s: hosts %s, sites %s, valid until %s", out, hosts, list(sites),
             srv_cert.not_valid_after_utc.date())
    return ProvisionResult(out=out, ca_dir=out / "ca", coordinator_dir=out / "coordinator",
                           site_dirs={s: out / "sites" / s for s in sites}, hosts=tuple(hosts),
                           not_after=srv_cert.not_valid_after_utc)


def add_site(out: Path, site: str) -> Path:
    """Issue a bundle for a new site in an existing provision (no CA key needed); return its folder.

    The coordinator must then register ``coordinator/sites/<site>.pub`` (``momkd-fed server`` does at start).
    """
    out = Path(out).expanduser().absolute()
    validate_site_name(site)
    man_path = out / MANIFEST
    if not man_path.is_file():
        raise ProvisionError(f"{man_path}: not found (fix: run `momkd-fed certs` first, or point at its folder)")
    manifest = json.loads(man_path.read_text())
    site_dir = out / "sites" / site
    if site_dir.exists() or site in manifest["sites"]:
        raise ProvisionError(f"{site_dir}: site {site!r} is already provisioned (fix: choose another name)")
    fp = _write_site_bundle(site_dir, site,
                            (out / "ca" / "ca.crt").read_bytes(), manifest["fleet_address"],
                            out / "coordinator" / "sites")
    manifest["sites"][site] = fp
    tmp = man_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(man_path)
    return site_dir


def inspect(out: Path) -> ProvisionSummary:
    """Summarise a provision folder: certificate subjects, hosts, expiry, CA signature check, site key fingerprints."""
    out = Path(out).expanduser().absolute()
    ca_path = out / "ca" / "ca.crt"
    if not ca_path.is_file():
        ca_path = out / "coordinator" / "ca.crt"
    if not ca_path.is_file():
        raise ProvisionError(f"{out}: no ca/ca.crt or coordinator/ca.crt (fix: point at a `momkd-fed certs` folder)")
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    now = dt.datetime.now(dt.timezone.utc)
    certs: list[CertInfo] = []
    for p in [ca_path, out / "coordinator" / "server.crt"]:
        if not p.is_file():
            continue
        c = x509.load_pem_x509_certificate(p.read_bytes())
        try:
            hosts = _san_strings(c)
        except x509.ExtensionNotFound:
            hosts = ()
        try:
            c.verify_directly_issued_by(ca)
            ok = True
        except (ValueError, TypeError, InvalidSignature):
            ok = False
        certs.append(CertInfo(path=p, subject=c.subject.rfc4514_string(), not_after=c.not_valid_after_utc,
                              days_left=(c.not_valid_after_utc - now).days, hosts=hosts, signed_by_ca=ok))
    keys: dict[str, str] = {}
    for pub in sorted((out / "coordinator" / "sites").glob("*.pub")):
        k = serialization.load_ssh_public_key(pub.read_bytes())
        keys[pub.stem] = fingerprint(k)  # type: ignore[arg-type]
    fleet = ""
    if (out / MANIFEST).is_file():
        fleet = json.loads((out / MANIFEST).read_text()).get("fleet_address", "")
    return ProvisionSummary(out=out, certificates=certs, site_keys=keys, fleet_address=fleet)


def _san_strings(cert: x509.Certificate) -> tuple[str, ...]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return tuple([*san.get_values_for_type(x509.DNSName), *map(str, san.get_values_for_type(x509.IPAddress))])
